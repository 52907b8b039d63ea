"""The acknowledgement repair lets a partition commit again after Faust lost acknowledgements."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from stream import faust_acks

POSTS = TP("posts", 1)
OTHER = TP("posts", 0)


def consumer(acked: list[int], committed: int | None, read: int | None, unacked: tuple = ()) -> SimpleNamespace:
    fake = SimpleNamespace(
        _acked=defaultdict(list),
        _acked_index=defaultdict(set),
        _committed_offset=defaultdict(lambda: None),
        _read_offset=defaultdict(lambda: None),
        _gap=defaultdict(IntervalTree),
        _unacked_messages=[SimpleNamespace(tp=tp, offset=offset) for tp, offset in unacked],
    )
    fake._acked[POSTS] = list(acked)
    fake._acked_index[POSTS] = set(acked)
    fake._committed_offset[POSTS] = committed
    fake._read_offset[POSTS] = read
    return fake


def test_lost_head_restored():
    fake = consumer(list(range(1373, 1400)), committed=1341, read=2765)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(restored=32)
    assert fake._committed_offset[POSTS] == 1373
    assert fake._acked[POSTS] == list(range(1373, 1400))
    assert fake._acked_index[POSTS] == set(range(1373, 1400))


def test_pending_record_below_first_ack_blocks_the_repair():
    fake = consumer([1373, 1374], committed=1341, read=2765, unacked=((POSTS, 1350),))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(blocked=True)
    assert fake._acked[POSTS] == [1373, 1374]


def test_pending_record_of_another_partition_does_not_block():
    fake = consumer([1373], committed=1341, read=1400, unacked=((OTHER, 5),))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(restored=32)


def test_gap_not_read_past_kept():
    # After a seek back to the committed offset, the records in the gap are delivered again.
    fake = consumer([1373, 1374], committed=1341, read=1341)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(blocked=True)
    assert fake._acked[POSTS] == [1373, 1374]


def test_offsets_below_committed_and_duplicates_are_dropped():
    fake = consumer([1363, 1364, 1364, 1365, 1365, 1366], committed=1364, read=1366)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair()
    assert fake._acked[POSTS] == [1364, 1365, 1366]


def test_uncommitted_partition_counts_from_zero():
    fake = consumer([0, 1, 1, 2], committed=None, read=2)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair()
    assert fake._acked[POSTS] == [0, 1, 2]


def test_uncommitted_partition_blocked_by_pending_records():
    # After a rebalance: offset 45 was acknowledged while 2 to 44 wait to be processed again.
    pending = tuple((POSTS, offset) for offset in range(2, 45))
    fake = consumer(list(range(45, 50)), committed=None, read=49, unacked=pending)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(blocked=True)
    assert Consumer._new_offset(fake, POSTS) is None


def test_uncommitted_partition_not_read_since_seek_blocked():
    fake = consumer(list(range(45, 50)), committed=None, read=None)
    assert Consumer._new_offset(fake, POSTS) is None


faust_acks.install()


def test_installed_new_offset_commits_past_lost_acknowledgements():
    faust_acks.install()  # a second call must not wrap twice
    fake = consumer(list(range(1373, 1400)), committed=1341, read=2765)
    assert Consumer._new_offset(fake, POSTS) == 1400


def test_original_new_offset_stays_stuck_on_lost_acknowledgements():
    # The defect the repair exists for: without it, the partition never commits again.
    original = getattr(Consumer, "_profilestream_original_new_offset")
    fake = consumer(list(range(1373, 1400)), committed=1341, read=2765)
    assert original(fake, POSTS) is None


def test_original_new_offset_commits_past_pending_records():
    # The other defect: with no committed offset, Faust commits past records still pending.
    original = getattr(Consumer, "_profilestream_original_new_offset")
    pending = tuple((POSTS, offset) for offset in range(2, 45))
    fake = consumer(list(range(45, 50)), committed=None, read=49, unacked=pending)
    assert original(fake, POSTS) == 50


def test_far_head_gap_restored_without_listing_offsets():
    fake = consumer([10**12, 10**12 + 1], committed=None, read=10**12 + 1)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(restored=10**12)
    assert Consumer._new_offset(fake, POSTS) == 10**12 + 2
