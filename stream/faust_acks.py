"""Repair Faust's acknowledgement bookkeeping so a partition's commits cannot stop for good.

Faust commits a partition only up to the first offset its streams have not acknowledged.
faust-streaming 0.15.3 (`Consumer._commit_offsets`) records the new committed offset even
when the commit request failed, for example during a rebalance or while a restarted worker
seeks to its committed offsets. The seek then moves the committed offset back, and the
acknowledgements recorded in between are gone. Every later commit of that partition waits
for offsets that were already processed, so its committed offset stays where it is while the
worker keeps consuming. This happened on about one restart in five. The group lag never
drains and the watchdog reports the partition stalled.

`install()` wraps `Consumer.ack` to record every offset this process acknowledged, and
`Consumer._new_offset`, which computes the next offset to commit, with a repair step that runs
before it:
- acknowledged offsets below the committed offset are dropped, and duplicates removed;
- when the first acknowledged offset lies above the committed offset, the missing offsets in
  between count as acknowledged only if this process acknowledged each of them before. Their
  effects were then flushed by the producer before this commit, so committing past them loses
  nothing. Any other gap is left to Faust, which commits nothing for that partition.

A partition whose committed offset is 0 or missing needs more. faust-streaming reads an
offset of 0 as "nothing committed" (`if offset else None`), and aiokafka's
`seek_to_committed` does not move such a partition back. `_new_offset` then commits the first
run of acknowledged offsets with no head-gap check. So records that Faust fetched and dropped
during a rebalance were not delivered again, and a commit past them lost them. `install()`
therefore also wraps `perform_seek`, which seeks every such partition to its earliest offset
and takes that offset as its committed offset. The head-gap rule above then applies to it too.

The new-offset step rejects any head gap, including the one-offset gap Faust lets through.
The topics the worker consumes use the delete policy without transactions, so their offsets
are contiguous. A jump in the offsets Faust fetched therefore means Faust dropped fetched
records, and `_add_gap`, which would count them as done, only logs it. `ReadOffsets` keeps
Faust's fetch loop from moving a partition's read offset past a pending seek, because Faust
drops the records the seek delivers again below that offset. Records fetched before the seek
are skipped until its target record arrives, so the partition is delivered in offset order.

Reprocessing is harmless here: the state table's per-user dedup set turns a record applied
twice into a no-op, and profile versions are written idempotently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.errors import IllegalStateError, KafkaError
from faust.transport.consumer import Consumer, ThreadDelegateConsumer
from faust.types import TP

from . import metrics

logger = logging.getLogger(__name__)

_ORIGINAL_ATTRIBUTE = "_profilestream_original_new_offset"
# Seconds a pending seek may wait for its target record before records after it are delivered.
REWIND_TIMEOUT_S = 30.0
# Attribute name of the broker's committed offsets, left by seek_to_committed for perform_seek.
_BROKER_COMMITTED = "_profilestream_broker_committed"
# Commit attempts (about 2.8 s apart) a head gap may stay before the partition is sought back.
SKIPPED_GAP_CHECKS = 3


@dataclass(frozen=True)
class Repair:
    """Outcome of `repair_acknowledgements` for one partition."""

    restored: int = 0


def repair_acknowledgements(consumer: Consumer, tp) -> Repair:
    """Normalize the acknowledged offsets of `tp`, restoring lost ones this process processed."""
    acked = consumer._acked[tp]
    committed = consumer._committed_offset[tp]
    processed = _processed(consumer, tp)
    if committed is not None and processed:
        processed.difference_update([offset for offset in processed if offset < committed])
    if not acked or committed is None:
        return Repair()
    offsets = sorted({offset for offset in acked if offset >= committed})
    restored = 0
    if offsets and offsets[0] > committed:
        first = offsets[0]
        # Every missing offset must have been acknowledged by this process before. The length
        # check keeps the loop bounded when the gap is larger than that record.
        if first - committed <= len(processed) and all(offset in processed for offset in range(committed, first)):
            restored = first - committed
            offsets = list(range(committed, first)) + offsets
    acked[:] = offsets
    consumer._acked_index[tp] = set(offsets)
    _seek_back_if_skipped(consumer, tp, committed, offsets, restored)
    return Repair(restored)


def _seek_back_if_skipped(consumer: Consumer, tp, committed: int, offsets: list[int], restored: int) -> None:
    """Seek `tp` back to its committed offset when Faust skipped the records of a head gap.

    After a seek, Faust drops records delivered again below its read offset, so records in
    the gap may never reach a stream. When the gap stays for `SKIPPED_GAP_CHECKS` commit
    attempts while the partition was read past it, the seek delivers them again. The ones
    processed already arrive as duplicates that change nothing.
    """
    gaps = consumer.__dict__.setdefault("_profilestream_gap_checks", {})
    read = consumer._read_offset[tp]
    if restored or not offsets or offsets[0] <= committed or read is None or read < offsets[0]:
        gaps.pop(tp, None)
        return
    gaps[tp] = gaps.get(tp, 0) + 1
    if gaps[tp] < SKIPPED_GAP_CHECKS:
        return
    gaps.pop(tp, None)
    metrics.SKIPPED_GAP_SEEKS.inc()
    logger.warning("consumer.seek_skipped_gap topic=%s partition=%s committed=%s first_acked=%s read=%s",
                   tp.topic, tp.partition, committed, offsets[0], read)
    # The event loop keeps only a weak reference to a task, so the consumer keeps one until it ends.
    seeks = consumer.__dict__.setdefault("_profilestream_seeks", set())
    task = asyncio.ensure_future(_rewind(consumer, tp, committed))
    seeks.add(task)
    task.add_done_callback(seeks.discard)


async def _rewind(consumer: Consumer, tp, committed: int) -> None:
    """Seek `tp` back to `committed`, or move the committed offset up to the log start.

    When retention deleted the records of the gap, nothing is left to deliver there.
    """
    earliest = (await consumer.earliest_offsets(tp)).get(tp)
    if earliest is not None and earliest > committed:
        logger.warning("consumer.gap_deleted topic=%s partition=%s committed=%s earliest=%s",
                       tp.topic, tp.partition, committed, earliest)
        consumer._committed_offset[tp] = earliest
        return
    await consumer._seek(tp, committed)
    _mark_rewind(consumer, tp, committed)


class ReadOffsets(defaultdict):
    """Faust's read offset per partition, kept from moving past a pending seek.

    Faust's fetch loop sets a partition's read offset after each record it delivers, also for
    records fetched before a seek, and then drops the records the seek delivers again below
    it. After `rewind(tp, offset)`, a later offset is ignored until the record at `offset`
    itself arrives.
    """

    def __init__(self, offsets=None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(lambda: None, offsets or {})
        self.rewinds: dict = {}
        self._rewound_at: dict = {}
        self._clock = clock

    def rewind(self, tp, offset: int) -> None:
        self.rewinds[tp] = offset
        self._rewound_at[tp] = self._clock()
        # Faust stores a read offset of 0 as None.
        super().__setitem__(tp, offset or None)

    def is_stale(self, tp, offset: int) -> bool:
        """Return True for a record fetched before a pending seek of its partition.

        The seek delivers it again in order. A seek whose target record has not arrived after
        `REWIND_TIMEOUT_S` stops filtering, so a failed seek cannot stop the partition.
        """
        target = self.rewinds.get(tp)
        if target is None or offset <= target:
            return False
        if self._clock() - self._rewound_at.get(tp, 0.0) > REWIND_TIMEOUT_S:
            logger.warning("consumer.rewind_timed_out topic=%s partition=%s target=%s offset=%s",
                           tp.topic, tp.partition, target, offset)
            del self.rewinds[tp]
            return False
        return True

    def overdue(self) -> list[tuple]:
        """Return (partition, target) of each pending seek whose target has not arrived for `REWIND_TIMEOUT_S`."""
        now = self._clock()
        return [(tp, target) for tp, target in self.rewinds.items()
                if now - self._rewound_at.get(tp, 0.0) > REWIND_TIMEOUT_S]

    def __setitem__(self, tp, value) -> None:
        target = self.rewinds.get(tp)
        if target is not None:
            if value is not None and value > target:
                return
            del self.rewinds[tp]
        super().__setitem__(tp, value)

    def pop(self, tp, *default):
        self.rewinds.pop(tp, None)
        return super().pop(tp, *default)


async def _resume(consumer: Consumer, tp, offset: int, *, sought: bool = True) -> None:
    """Continue `tp` from `offset`, or after the records from `offset` on this process processed.

    Records processed before a seek are not delivered again, so a restart reprocesses no more
    than the records its predecessor left uncommitted. `sought` is True when the consumer is
    already positioned at `offset`.
    """
    processed = _processed(consumer, tp)
    target = offset
    while target in processed:
        target += 1
    if target != offset or not sought:
        await consumer._seek(tp, target)
    _mark_rewind(consumer, tp, target)


async def reissue_overdue_seeks(consumer: Consumer) -> None:
    """Seek again each assigned partition whose pending seek target has not arrived for `REWIND_TIMEOUT_S`.

    The timeout in `ReadOffsets.is_stale` only runs when a record of the partition arrives. A
    partition whose fetched records all lay beyond the target can receive none, and then its
    committed offset never advances. Seeking again restarts the fetch at the target.
    """
    # NOTE: one stall under heavy load led to this, and later runs did not reproduce it. No test
    # shows that the seek ends such a stall. The watchdog still reports a stall that persists.
    offsets = consumer._read_offset
    if not isinstance(offsets, ReadOffsets):
        return
    assigned = consumer.assignment()
    for tp, target in offsets.overdue():
        if tp not in assigned:
            offsets.rewinds.pop(tp, None)
            continue
        metrics.SEEKS_REISSUED.inc()
        logger.warning("consumer.seek_reissued topic=%s partition=%s offset=%s", tp.topic, tp.partition, target)
        try:
            await consumer._seek(tp, target)
        except (KafkaError, IllegalStateError) as error:
            # Usually a rebalance started meanwhile, and the next assignment seeks the partition anyway.
            logger.warning("consumer.seek_reissue_failed topic=%s partition=%s error=%r", tp.topic, tp.partition, error)
            continue
        offsets.rewind(tp, target)


def _mark_rewind(consumer: Consumer, tp, offset: int) -> None:
    offsets = consumer._read_offset
    if isinstance(offsets, ReadOffsets):
        offsets.rewind(tp, offset)
    else:
        offsets[tp] = offset or None


def install() -> None:
    """Wrap Faust's consumer bookkeeping (acks, next offset, seeks, gaps, read offsets) once per process.

    Later calls do nothing.
    """
    if hasattr(Consumer, _ORIGINAL_ATTRIBUTE):
        return
    original: Callable = Consumer._new_offset
    original_ack: Callable = Consumer.ack
    original_seek: Callable = Consumer.perform_seek
    original_seek_to_committed: Callable = ThreadDelegateConsumer.seek_to_committed
    original_init: Callable = Consumer.__init__

    def ack(self: Consumer, message) -> bool:
        newly_acked = not message.acked
        result = original_ack(self, message)
        if newly_acked:
            _processed(self, message.tp).add(message.offset)
        return result

    def new_offset(self: Consumer, tp):
        repair = repair_acknowledgements(self, tp)
        if repair.restored:
            metrics.ACKS_RESTORED.inc(repair.restored)
            logger.warning(
                "consumer.acks_restored topic=%s partition=%s offsets=%d committed=%s",
                tp.topic, tp.partition, repair.restored, self._committed_offset[tp],
            )
        if has_head_gap(self, tp):
            return None
        return original(self, tp)

    async def add_gap(self: Consumer, tp, offset_from: int, offset_to: int) -> None:
        # Faust counts offsets missing from the fetched records as done. The topics the worker
        # consumes have contiguous offsets, so such a gap means Faust dropped fetched records.
        metrics.FETCH_GAPS.inc()
        logger.warning("consumer.fetch_gap topic=%s partition=%s from=%s to=%s",
                       tp.topic, tp.partition, offset_from, offset_to)

    async def seek_to_committed(self: ThreadDelegateConsumer):
        offsets = await original_seek_to_committed(self)
        self.__dict__[_BROKER_COMMITTED] = dict(offsets)
        return offsets

    async def perform_seek(self: Consumer) -> None:
        await original_seek(self)
        broker_committed = self.__dict__.pop(_BROKER_COMMITTED, {})
        for tp, offset in broker_committed.items():
            if offset is not None and offset > 0:
                await _resume(self, TP(tp.topic, tp.partition), offset)
        await seek_uncommitted(self, broker_committed)

    def init(self: Consumer, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        read_offsets = ReadOffsets(self._read_offset)
        self._read_offset = read_offsets
        deliver = self.callback

        async def deliver_fresh(message) -> None:
            if read_offsets.is_stale(message.tp, message.offset):
                metrics.STALE_RECORDS_SKIPPED.inc()
                return
            await deliver(message)

        self.callback = deliver_fresh

    setattr(Consumer, _ORIGINAL_ATTRIBUTE, original)
    Consumer._new_offset = new_offset
    Consumer.ack = ack
    Consumer.perform_seek = perform_seek
    Consumer._add_gap = add_gap
    Consumer.__init__ = init
    ThreadDelegateConsumer.seek_to_committed = seek_to_committed


def has_head_gap(consumer: Consumer, tp) -> bool:
    """Return True when the first acknowledged offset of `tp` lies above its committed offset."""
    acked = consumer._acked[tp]
    committed = consumer._committed_offset[tp]
    if not acked or committed is None:
        return False
    return min(acked) > committed


async def seek_uncommitted(consumer: Consumer, broker_committed: dict) -> None:
    """Seek each acknowledged partition with no committed offset (or 0) to its earliest offset.

    `broker_committed` maps partitions to the committed offsets the broker returned. The
    earliest offset becomes the partition's committed offset, so the head-gap rule applies
    from the first commit on. Runs after Faust's `perform_seek`, which skipped these.
    """
    acks_enabled_for = consumer.app.topics.acks_enabled_for
    uncommitted = [TP(tp.topic, tp.partition) for tp, offset in broker_committed.items()
                   if (offset is None or offset <= 0) and acks_enabled_for(tp.topic)]
    if not uncommitted:
        return
    try:
        earliest = await consumer.earliest_offsets(*uncommitted)
        for tp in uncommitted:
            floor = earliest.get(tp)
            if floor is None:
                continue
            consumer._committed_offset[tp] = floor
            await _resume(consumer, tp, floor, sought=False)
    except (KafkaError, IllegalStateError) as error:
        # Usually a rebalance started meanwhile. The next assignment seeks these partitions again.
        logger.warning("consumer.uncommitted_seek_failed partitions=%s error=%r",
                       ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(uncommitted)), error)
        return
    logger.info("consumer.uncommitted_sought partitions=%s",
                ",".join(f"{tp.topic}:{tp.partition}@{earliest.get(tp)}" for tp in sorted(uncommitted)))


def _processed(consumer: Consumer, tp) -> set[int]:
    """Offsets of `tp` this process acknowledged and has not seen committed yet."""
    table = consumer.__dict__.setdefault("_profilestream_processed", {})
    return table.setdefault(tp, set())
