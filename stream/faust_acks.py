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

A partition with no committed offset is left to Faust unchanged. There faust-streaming also
drops records that a seek after a rebalance delivers again below its read offset, so the
repair could not tell processed records from lost ones.

Reprocessing is harmless here: the state table's per-user dedup set turns a record applied
twice into a no-op, and profile versions are written idempotently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from faust.transport.consumer import Consumer

from . import metrics

logger = logging.getLogger(__name__)

_ORIGINAL_ATTRIBUTE = "_profilestream_original_new_offset"
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
    task = asyncio.ensure_future(consumer.seek(tp, committed))
    seeks.add(task)
    task.add_done_callback(seeks.discard)


def install() -> None:
    """Wrap `Consumer.ack` and `Consumer._new_offset` once per process. Later calls do nothing."""
    if hasattr(Consumer, _ORIGINAL_ATTRIBUTE):
        return
    original: Callable = Consumer._new_offset
    original_ack: Callable = Consumer.ack

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
        return original(self, tp)

    setattr(Consumer, _ORIGINAL_ATTRIBUTE, original)
    Consumer._new_offset = new_offset
    Consumer.ack = ack


def _processed(consumer: Consumer, tp) -> set[int]:
    """Offsets of `tp` this process acknowledged and has not seen committed yet."""
    table = consumer.__dict__.setdefault("_profilestream_processed", {})
    return table.setdefault(tp, set())
