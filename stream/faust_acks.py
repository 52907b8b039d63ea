"""Repair Faust's acknowledgement bookkeeping so a partition's commits cannot stop for good.

Faust commits a partition only up to the first offset its streams have not acknowledged.
faust-streaming 0.15.3 (`Consumer._commit_offsets`) records the new committed offset even
when the commit request failed, for example during a rebalance or while a restarted worker
seeks to its committed offsets. The seek then moves the committed offset back, and the
acknowledgements recorded in between are gone. Every later commit of that partition waits
for offsets that were already processed, so its committed offset stays where it is while the
worker keeps consuming. This happened on about one restart in five. The group lag never
drains and the watchdog reports the partition stalled.

`install()` wraps `Consumer._new_offset`, which computes the next offset to commit, with a
repair step that runs before it:
- acknowledged offsets below the committed offset are dropped, and duplicates removed. A
  partition with no committed offset counts from offset 0, because Faust skips its own gap
  check there and could commit past records still being processed after a rebalance;
- when the first acknowledged offset lies above the committed offset, the missing offsets
  in between count as acknowledged only if the partition was read past them and none of
  its delivered records is still unacknowledged. Each record in that range was then
  delivered and processed, so committing past it loses nothing. Otherwise nothing is
  committed for that partition until that holds.

Reprocessing is harmless here: the state table's per-user dedup set turns a record applied
twice into a no-op, and profile versions are written idempotently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from faust.transport.consumer import Consumer

from . import metrics

logger = logging.getLogger(__name__)

_ORIGINAL_ATTRIBUTE = "_profilestream_original_new_offset"


@dataclass(frozen=True)
class Repair:
    """Outcome of `repair_acknowledgements` for one partition."""

    restored: int = 0
    # True while offsets below the first acknowledged one are still pending: nothing may be committed.
    blocked: bool = False


def repair_acknowledgements(consumer: Consumer, tp) -> Repair:
    """Normalize the acknowledged offsets of `tp`, restoring lost ones where that is safe."""
    acked = consumer._acked[tp]
    if not acked:
        return Repair()
    # Faust stores "no committed offset" as None and also turns a committed 0 into None.
    # Its own gap check then does nothing, and a rebalance can make it commit past records
    # that were delivered but not processed. Offset 0 is the lowest possible start.
    committed = consumer._committed_offset[tp] or 0
    offsets = sorted({offset for offset in acked if offset >= committed})
    restored = 0
    blocked = False
    if offsets and offsets[0] > committed:
        read = consumer._read_offset[tp]
        first = offsets[0]
        if read is not None and read >= first and not _unacknowledged_below(consumer, tp, first):
            # Moving the committed offset up to the first acknowledged one marks the offsets
            # in between as done without listing them, however many there are.
            restored = first - committed
            consumer._committed_offset[tp] = first
        else:
            blocked = True
    acked[:] = offsets
    consumer._acked_index[tp] = set(offsets)
    return Repair(restored, blocked)


def install() -> None:
    """Wrap `Consumer._new_offset` once per process. Later calls do nothing."""
    if hasattr(Consumer, _ORIGINAL_ATTRIBUTE):
        return
    original: Callable = Consumer._new_offset

    def new_offset(self: Consumer, tp):
        repair = repair_acknowledgements(self, tp)
        if repair.restored:
            metrics.ACKS_RESTORED.inc(repair.restored)
            logger.warning(
                "consumer.acks_restored topic=%s partition=%s offsets=%d committed=%s",
                tp.topic, tp.partition, repair.restored, self._committed_offset[tp],
            )
        if repair.blocked:
            return None
        return original(self, tp)

    setattr(Consumer, _ORIGINAL_ATTRIBUTE, original)
    Consumer._new_offset = new_offset


def _unacknowledged_below(consumer: Consumer, tp, offset: int) -> bool:
    return any(message.tp == tp and message.offset < offset for message in list(consumer._unacked_messages))
