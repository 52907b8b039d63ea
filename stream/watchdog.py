"""Stall detection: input partitions with lag whose committed offset stopped advancing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiokafka import TopicPartition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionOffsets:
    """Offsets of one partition: the group's committed offset (None before the first commit), the log start and end."""

    committed: int | None
    start: int
    end: int

    @property
    def lag(self) -> int:
        """Records not yet committed; without a commit the group starts at the log start (auto.offset.reset=earliest)."""
        position = self.start if self.committed is None else self.committed
        return max(0, self.end - position)


class Watchdog:
    """Track when each partition's committed offset last advanced and which partitions stall.

    A partition stalls when it has lag and, for `stall_s` seconds on `clock`, its committed
    offset has neither advanced nor caught up with the end offset. An idle partition without
    lag never stalls, and its stall timer restarts when new records arrive. The first
    observation of a partition counts as an advance, so a partition that was just assigned,
    or observed again after `reset`, starts with age 0. A warning is logged once when a
    partition starts to stall, and an info line when it moves again.
    """

    def __init__(self, stall_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.stall_s = stall_s
        self._clock = clock
        self._committed: dict[TopicPartition, int | None] = {}
        self._advanced_at: dict[TopicPartition, float] = {}
        self._moving_at: dict[TopicPartition, float] = {}
        self._stalled: set[TopicPartition] = set()

    @property
    def stalled(self) -> frozenset[TopicPartition]:
        return frozenset(self._stalled)

    def observe(self, offsets: Mapping[TopicPartition, PartitionOffsets]) -> frozenset[TopicPartition]:
        """Record one poll of the assigned partitions' offsets and return the stalled partitions.

        Partitions missing from `offsets` are no longer assigned and are forgotten.
        """
        now = self._clock()
        for partition in set(self._committed) - set(offsets):
            self._forget(partition)
        for partition, current in offsets.items():
            if partition not in self._committed or current.committed != self._committed[partition]:
                self._committed[partition] = current.committed
                self._advanced_at[partition] = now
                self._moving_at[partition] = now
            if current.lag == 0:
                self._moving_at[partition] = now
            self._update_stall(partition, current, now)
        return self.stalled

    def committed_age_s(self, partition: TopicPartition) -> float:
        """Return the seconds since `partition`'s committed offset last advanced; 0 for an unknown partition."""
        advanced_at = self._advanced_at.get(partition)
        return 0.0 if advanced_at is None else self._clock() - advanced_at

    def reset(self) -> None:
        """Forget every partition, for example while a rebalance pauses consumption."""
        for partition in list(self._committed):
            self._forget(partition)

    def _update_stall(self, partition: TopicPartition, current: PartitionOffsets, now: float) -> None:
        age_s = now - self._moving_at[partition]
        stalled = current.lag > 0 and age_s >= self.stall_s
        if stalled and partition not in self._stalled:
            self._stalled.add(partition)
            logger.warning(
                "watchdog.stalled topic=%s partition=%s lag=%s committed=%s stalled_s=%.0f",
                partition.topic, partition.partition, current.lag, current.committed, age_s,
            )
        elif not stalled and partition in self._stalled:
            self._stalled.discard(partition)
            logger.info(
                "watchdog.resumed topic=%s partition=%s lag=%s committed=%s",
                partition.topic, partition.partition, current.lag, current.committed,
            )

    def _forget(self, partition: TopicPartition) -> None:
        self._committed.pop(partition, None)
        self._advanced_at.pop(partition, None)
        self._moving_at.pop(partition, None)
        self._stalled.discard(partition)
