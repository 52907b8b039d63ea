"""The acknowledgement repair lets a partition commit again after Faust lost acknowledgements."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import faust
from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from stream import faust_acks

POSTS = TP("posts", 1)

faust_acks.install()


def consumer(acked: list[int], committed: int | None, processed: range | list[int] = ()) -> SimpleNamespace:
    fake = SimpleNamespace(
        _acked=defaultdict(list),
        _acked_index=defaultdict(set),
        _committed_offset=defaultdict(lambda: None),
        _read_offset=defaultdict(lambda: None),
        _gap=defaultdict(IntervalTree),
        _unacked_messages=set(),
        _n_acked=0,
        _waiting_for_ack=None,
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True)),
    )
    fake._acked[POSTS] = list(acked)
    fake._acked_index[POSTS] = set(acked)
    fake._committed_offset[POSTS] = committed
    fake._profilestream_processed = {POSTS: set(processed)}
    return fake


def test_lost_head_restored():
    # A commit failed but was recorded, then a seek moved the committed offset back to 1341.
    fake = consumer(list(range(1373, 1400)), committed=1341, processed=range(1341, 1400))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair(restored=32)
    assert fake._acked[POSTS] == list(range(1341, 1400))
    assert fake._acked_index[POSTS] == set(range(1341, 1400))


def test_installed_new_offset_commits_past_lost_acknowledgements():
    fake = consumer(list(range(1373, 1400)), committed=1341, processed=range(1341, 1400))
    assert Consumer._new_offset(fake, POSTS) == 1400


def test_unprocessed_gap_blocks_commit():
    # Records in the gap may still wait in a stream buffer: nothing may be committed.
    fake = consumer(list(range(1373, 1400)), committed=1341, processed=range(1373, 1400))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair()
    assert Consumer._new_offset(fake, POSTS) is None


def test_partly_processed_gap_blocks_commit():
    processed = [offset for offset in range(1341, 1400) if offset != 1350]
    fake = consumer(list(range(1373, 1400)), committed=1341, processed=processed)
    assert Consumer._new_offset(fake, POSTS) is None


def test_offsets_below_committed_and_duplicates_are_dropped():
    fake = consumer([1363, 1364, 1364, 1365, 1365, 1366], committed=1364)
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair()
    assert fake._acked[POSTS] == [1364, 1365, 1366]


def test_processed_offsets_pruned_below_committed():
    fake = consumer([1400], committed=1390, processed=range(1300, 1401))
    faust_acks.repair_acknowledgements(fake, POSTS)
    assert fake._profilestream_processed[POSTS] == set(range(1390, 1401))


def test_uncommitted_partition_left_to_faust():
    fake = consumer([7, 3, 3], committed=None, processed=range(0, 8))
    assert faust_acks.repair_acknowledgements(fake, POSTS) == faust_acks.Repair()
    assert fake._acked[POSTS] == [7, 3, 3]


class FakeMessage:
    def __init__(self, offset: int) -> None:
        self.acked = False
        self.tp = POSTS
        self.offset = offset
        self.topic = POSTS.topic


def test_ack_records_processed_offset():
    fake = consumer([], committed=10)
    message = FakeMessage(12)
    assert Consumer.ack(fake, message) is True
    assert fake._profilestream_processed[POSTS] == {12}
    assert fake._acked[POSTS] == [12]


def test_ack_below_committed_still_recorded():
    # Faust rejects it (its committed offset ran ahead), but the record was processed.
    fake = consumer([], committed=20)
    message = FakeMessage(12)
    assert Consumer.ack(fake, message) is False
    assert fake._profilestream_processed[POSTS] == {12}


def test_original_new_offset_stays_stuck_on_lost_acknowledgements():
    # The defect the repair exists for: without it, the partition never commits again.
    original = getattr(Consumer, "_profilestream_original_new_offset")
    fake = consumer(list(range(1373, 1400)), committed=1341)
    assert original(fake, POSTS) is None


def test_head_gap_above_zero_blocks_commit():
    # Faust reads a committed offset of 0 as none and would commit 5..9, skipping 0..4.
    fake = consumer(list(range(5, 10)), committed=0)
    assert original_new_offset(consumer(list(range(5, 10)), committed=0), POSTS) == 10
    assert Consumer._new_offset(fake, POSTS) is None


def test_one_offset_head_gap_blocks_commit():
    # Faust lets a gap of exactly one offset through, but that record may still wait in a buffer.
    fake = consumer(list(range(42, 50)), committed=41)
    assert original_new_offset(consumer(list(range(42, 50)), committed=41), POSTS) == 50
    assert Consumer._new_offset(fake, POSTS) is None


def test_contiguous_acknowledgements_commit_from_zero():
    fake = consumer(list(range(0, 10)), committed=0)
    assert Consumer._new_offset(fake, POSTS) == 10


async def test_fetch_gap_not_acknowledged():
    # Faust would count the missing offsets 41..44 as done, but here they block the commit.
    fake = consumer(list(range(45, 50)), committed=41)
    await Consumer._add_gap(fake, POSTS, 41, 44)
    assert not fake._gap[POSTS]
    assert Consumer._new_offset(fake, POSTS) is None


def original_new_offset(fake, tp):
    return getattr(Consumer, "_profilestream_original_new_offset")(fake, tp)


class SeekingConsumer(SimpleNamespace):
    """Consumer double that records the seeks `seek_uncommitted` makes and reports log start offsets."""

    async def earliest_offsets(self, *partitions):
        return {tp: self.log_start[tp] for tp in partitions}

    async def _seek(self, tp, offset):
        self.seeks[tp] = offset


REGENERATE = TP("regenerate", 0)
CHANGELOG = TP("state-changelog", 0)


async def test_uncommitted_partitions_sought_to_earliest():
    fake = consumer([], committed=None)
    seeking = SeekingConsumer(**vars(fake), seeks={}, log_start={POSTS: 0, REGENERATE: 7, CHANGELOG: 0})
    seeking.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: topic != CHANGELOG.topic))
    broker_committed = {POSTS: 0, REGENERATE: None, CHANGELOG: None, TP("likes", 0): 12}
    await faust_acks.seek_uncommitted(seeking, broker_committed)
    assert seeking.seeks == {POSTS: 0, REGENERATE: 7}
    assert seeking._committed_offset[POSTS] == 0
    assert seeking._committed_offset[REGENERATE] == 7
    assert seeking._committed_offset[CHANGELOG] is None
    # The next commit of the partition needs offset 0 acknowledged first.
    seeking._acked[POSTS] = [3, 4]
    assert Consumer._new_offset(seeking, POSTS) is None


def test_read_offset_held_at_rewind():
    offsets = faust_acks.ReadOffsets()
    offsets[POSTS] = 1400
    offsets.rewind(POSTS, 1349)
    # Records fetched before the seek still pass through Faust's fetch loop.
    offsets[POSTS] = 1401
    assert offsets[POSTS] == 1349
    offsets[POSTS] = 1349
    offsets[POSTS] = 1350
    assert offsets[POSTS] == 1350


def test_rewind_to_zero_reads_from_start():
    offsets = faust_acks.ReadOffsets()
    offsets.rewind(POSTS, 0)
    assert offsets[POSTS] is None
    offsets[POSTS] = 57
    assert offsets[POSTS] is None
    offsets[POSTS] = 0
    offsets[POSTS] = 1
    assert offsets[POSTS] == 1


def test_revoked_partition_forgets_rewind():
    offsets = faust_acks.ReadOffsets()
    offsets.rewind(POSTS, 10)
    offsets.pop(POSTS, None)
    offsets[POSTS] = 99
    assert offsets[POSTS] == 99


def test_app_consumer_read_offsets_guarded():
    # Creating the consumer opens no connection, so the address is never contacted.
    app = faust.App("faust-acks-test", broker="kafka://127.0.0.1:9")
    assert isinstance(app.consumer._read_offset, faust_acks.ReadOffsets)


def test_records_before_seek_target_stale():
    offsets = faust_acks.ReadOffsets(clock=lambda: 100.0)
    offsets.rewind(POSTS, 1344)
    assert offsets.is_stale(POSTS, 1527)
    assert not offsets.is_stale(POSTS, 1344)
    assert not offsets.is_stale(TP("posts", 0), 1527)


def test_target_arrival_ends_filtering():
    offsets = faust_acks.ReadOffsets(clock=lambda: 100.0)
    offsets.rewind(POSTS, 1344)
    offsets[POSTS] = 1344
    assert not offsets.is_stale(POSTS, 1345)


def test_filtering_stops_after_timeout():
    now = [100.0]
    offsets = faust_acks.ReadOffsets(clock=lambda: now[0])
    offsets.rewind(POSTS, 1344)
    now[0] += faust_acks.REWIND_TIMEOUT_S + 1
    assert not offsets.is_stale(POSTS, 1527)
    assert POSTS not in offsets.rewinds


async def test_seek_skips_offsets_processed_before():
    # Records this process handled before the seek are not delivered a second time.
    fake = consumer([], committed=None, processed=[0, 1, 2, 5])
    seeking = SeekingConsumer(**vars(fake), seeks={}, log_start={POSTS: 0})
    await faust_acks.seek_uncommitted(seeking, {POSTS: 0})
    assert seeking.seeks == {POSTS: 3}
    assert seeking._committed_offset[POSTS] == 0


async def test_overdue_seek_reissued():
    # A partition that receives no record after a seek would otherwise never reach its target.
    now = [100.0]
    offsets = faust_acks.ReadOffsets(clock=lambda: now[0])
    other = TP("likes", 1)
    offsets.rewind(POSTS, 742)
    offsets.rewind(other, 5)
    seeking = SeekingConsumer(_read_offset=offsets, seeks={}, assignment=lambda: {POSTS})
    await faust_acks.reissue_overdue_seeks(seeking)
    assert seeking.seeks == {}
    now[0] += faust_acks.REWIND_TIMEOUT_S + 1
    await faust_acks.reissue_overdue_seeks(seeking)
    assert seeking.seeks == {POSTS: 742}
    assert offsets.rewinds == {POSTS: 742}
    assert offsets.overdue() == []
