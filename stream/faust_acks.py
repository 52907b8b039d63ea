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
- acknowledged offsets below the committed offset are dropped, and duplicates removed;
- when the first acknowledged offset lies above the committed offset, the missing offsets
  in between count as acknowledged only if the partition was read past them and none of
  its delivered records is still unacknowledged. Each record in that range was then
  delivered and processed, so committing past it loses nothing.

Reprocessing is harmless here: the state table's per-user dedup set turns a record applied
twice into a no-op, and profile versions are written idempotently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from faust.transport.consumer import Consumer

from . import metrics

logger = logging.getLogger(__name__)

_ORIGINAL_ATTRIBUTE = "_profilestream_original_new_offset"


def repair_acknowledgements(consumer: Consumer, tp) -> int:
    """Normalize the acknowledged offsets of `tp` and return how many lost ones it restored."""
    acked = consumer._acked[tp]
    committed = consumer._committed_offset[tp]
    if not acked or committed is None:
        return 0
    offsets = sorted({offset for offset in acked if offset >= committed})
    restored = 0
    if offsets and offsets[0] > committed:
        read = consumer._read_offset[tp]
        first = offsets[0]
        if read is not None and read >= first and not _unacknowledged_below(consumer, tp, first):
            restored = first - committed
            offsets = list(range(committed, first)) + offsets
    acked[:] = offsets
    consumer._acked_index[tp] = set(offsets)
    return restored


def install() -> None:
    """Wrap `Consumer._new_offset` once per process. Later calls do nothing."""
    if hasattr(Consumer, _ORIGINAL_ATTRIBUTE):
        return
    original: Callable = Consumer._new_offset

    def new_offset(self: Consumer, tp):
        restored = repair_acknowledgements(self, tp)
        if restored:
            metrics.ACKS_RESTORED.inc(restored)
            logger.warning(
                "consumer.acks_restored topic=%s partition=%s offsets=%d committed=%s",
                tp.topic, tp.partition, restored, self._committed_offset[tp],
            )
        return original(self, tp)

    setattr(Consumer, _ORIGINAL_ATTRIBUTE, original)
    Consumer._new_offset = new_offset


def _unacknowledged_below(consumer: Consumer, tp, offset: int) -> bool:
    return any(message.tp == tp and message.offset < offset for message in list(consumer._unacked_messages))
