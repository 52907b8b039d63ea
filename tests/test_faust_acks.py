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
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 32
    assert fake._acked[POSTS] == list(range(1341, 1400))
    assert fake._acked_index[POSTS] == set(range(1341, 1400))


def test_pending_record_below_first_ack_blocks_the_repair():
    fake = consumer([1373, 1374], committed=1341, read=2765, unacked=((POSTS, 1350),))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 0
    assert fake._acked[POSTS] == [1373, 1374]


def test_pending_record_of_another_partition_does_not_block():
    fake = consumer([1373], committed=1341, read=1400, unacked=((OTHER, 5),))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 32


def test_gap_not_read_past_kept():
    # After a seek back to the committed offset, the records in the gap are delivered again.
    fake = consumer([1373, 1374], committed=1341, read=1341)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 0
    assert fake._acked[POSTS] == [1373, 1374]


def test_offsets_below_committed_and_duplicates_are_dropped():
    fake = consumer([1363, 1364, 1364, 1365, 1365, 1366], committed=1364, read=1366)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 0
    assert fake._acked[POSTS] == [1364, 1365, 1366]


def test_never_committed_partition_is_left_alone():
    fake = consumer([7, 3, 3], committed=None, read=7)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == 0
    assert fake._acked[POSTS] == [7, 3, 3]


def test_installed_new_offset_commits_past_lost_acknowledgements():
    faust_acks.install()
    faust_acks.install()  # a second call must not wrap twice
    fake = consumer(list(range(1373, 1400)), committed=1341, read=2765)
    assert Consumer._new_offset(fake, POSTS) == 1400


def test_original_new_offset_stays_stuck_on_lost_acknowledgements():
    # The defect the repair exists for: without it, the partition never commits again.
    original = getattr(Consumer, "_profilestream_original_new_offset", Consumer._new_offset)
    fake = consumer(list(range(1373, 1400)), committed=1341, read=2765)
    assert original(fake, POSTS) is None
