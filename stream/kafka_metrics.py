"""Consumer-group metrics of one worker: lag and committed-offset age per input partition, pending regenerations, rebalances.

The rebalance tracker follows Faust's signals. The consumer monitor polls the broker with
its own admin client and offset-only consumer (public aiokafka APIs, no group membership),
so it reads what the group has committed, not what the Faust consumer keeps in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from mode import Service

from . import metrics
from .health import WorkerStatus
from .kafka_security import aiokafka_security_kwargs
from .multiprocess_metrics import clear_gauge_series
from .settings import Settings
from .watchdog import PartitionOffsets, Watchdog

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 5.0
REQUEST_TIMEOUT_S = 10.0
# Exit code of a worker the watchdog stops, distinct from Python's 1 for an uncaught error.
WATCHDOG_EXIT_CODE = 3


def input_partitions(assigned: Iterable[tuple[str, int]], topics: Iterable[str]) -> frozenset[TopicPartition]:
    """Return the assigned partitions of `topics`, leaving out the changelog partitions Faust also assigns."""
    topic_names = set(topics)
    return frozenset(TopicPartition(topic, partition) for topic, partition in assigned if topic in topic_names)


class RebalanceTracker:
    """Update the worker status and the rebalance metrics from Faust's rebalance signals.

    A rebalance starts at the first revocation or assignment signal after the previous one
    ended, and ends when table recovery completes. aiokafka revokes (possibly nothing) before
    every join, so the first join counts too. Faust sends the revocation signal only after it
    has drained the agents' buffers, so the measured time leaves that drain out. Rebalances
    that overlap count once each but are timed as one.
    """

    def __init__(self, status: WorkerStatus, topics: Iterable[str], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.status = status
        self.topics = frozenset(topics)
        self._clock = clock
        self._started_at: float | None = None

    def connect(self, app: faust.App) -> None:
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_rebalance_complete.connect(self._on_complete)

    def record_revoked(self, revoked: Iterable[tuple[str, int]]) -> None:
        """Count a rebalance and mark table recovery as pending."""
        metrics.REBALANCES.inc()
        self.status.recovered = False
        if self._started_at is None:
            self._started_at = self._clock()
        logger.info("rebalance.started revoked_input_partitions=%s",
                    len(input_partitions(revoked, self.topics)))

    def record_assigned(self, assigned: Iterable[tuple[str, int]]) -> None:
        """Store the new assignment's input partitions in the status."""
        self.status.recovered = False
        if self._started_at is None:
            self._started_at = self._clock()
        self.status.assigned_partitions = input_partitions(assigned, self.topics)
        metrics.ASSIGNED_PARTITIONS.set(len(self.status.assigned_partitions))
        logger.info("rebalance.assigned input_partitions=%s", len(self.status.assigned_partitions))

    def record_completed(self) -> None:
        """Mark table recovery as finished and observe the rebalance's duration."""
        self.status.recovered = True
        seconds = 0.0 if self._started_at is None else self._clock() - self._started_at
        self._started_at = None
        metrics.REBALANCE_SECONDS.observe(seconds)
        logger.info("rebalance.completed seconds=%.2f input_partitions=%s", seconds,
                    len(self.status.assigned_partitions))

    async def _on_revoked(self, app: faust.App, revoked: set, **kwargs: object) -> None:
        self.record_revoked(revoked)

    async def _on_assigned(self, app: faust.App, assigned: set, **kwargs: object) -> None:
        self.record_assigned(assigned)

    async def _on_complete(self, app: faust.App, **kwargs: object) -> None:
        self.record_completed()


class ConsumerMonitor(Service):
    """Poll the offsets of the assigned input partitions every `interval_s` seconds.

    Each poll sets the lag and committed-offset age gauges and feeds the watchdog, whose
    stalled partitions go to `status`. While table recovery is pending the watchdog is
    reset, because a rebalance pauses consumption on purpose. A failed poll is logged and
    retried at the next interval, keeping the previous values.
    """

    def __init__(self, settings: Settings, status: WorkerStatus, watchdog: Watchdog, *,
                 interval_s: float = POLL_INTERVAL_S, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.status = status
        self.watchdog = watchdog
        self.interval_s = interval_s
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reported: set[TopicPartition] = set()
        self._stalled_since: float | None = None

    async def on_stop(self) -> None:
        await self._close_clients()

    @Service.task
    async def _poll_forever(self) -> None:
        while not self.should_stop:
            await self.sleep(self.interval_s)
            if self.should_stop:
                break
            try:
                await self.poll()
            except (KafkaError, TimeoutError, OSError) as error:
                logger.warning("consumer_monitor.poll_failed error=%r retry_in_s=%s", error, self.interval_s)
                await self._close_clients()
            except Exception:
                # A monitoring bug must not crash the worker, which mode does for a failed service task.
                logger.exception("consumer_monitor.poll_crashed retry_in_s=%s", self.interval_s)
                await self._close_clients()

    async def poll(self) -> None:
        """Read the offsets once and update the gauges, the watchdog and the status."""
        partitions = sorted(self.status.assigned_partitions)
        offsets = await self._fetch(partitions) if partitions else {}
        if self.status.recovered:
            self.status.stalled_partitions = self.watchdog.observe(offsets)
        else:
            self.watchdog.reset()
            self.status.stalled_partitions = frozenset()
        self._report(offsets)
        self._exit_if_stalled_too_long()

    def _exit_if_stalled_too_long(self) -> None:
        """Exit the process when partitions stayed stalled for PROFILESTREAM_WATCHDOG_EXIT_AFTER_S.

        A stalled consumer may not finish a graceful shutdown, so the process exits at once
        with code 3 and commits nothing. Its supervisor restarts it, and the new worker
        resumes from the last commit.
        """
        exit_after_s = self.settings.watchdog_exit_after_s
        if not self.status.stalled_partitions:
            self._stalled_since = None
            return
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
        if exit_after_s > 0 and now - self._stalled_since >= exit_after_s:
            stalled = ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(self.status.stalled_partitions))
            logger.critical("watchdog.exiting code=%d stalled_for_s=%.0f partitions=%s",
                            WATCHDOG_EXIT_CODE, now - self._stalled_since, stalled)
            logging.shutdown()
            os._exit(WATCHDOG_EXIT_CODE)

    async def _fetch(self, partitions: list[TopicPartition]) -> dict[TopicPartition, PartitionOffsets]:
        admin, consumer = await self._clients()
        # end_offsets and beginning_offsets can wait forever for a partition that does not exist.
        ends = await asyncio.wait_for(consumer.end_offsets(partitions), REQUEST_TIMEOUT_S)
        committed = await asyncio.wait_for(
            admin.list_consumer_group_offsets(self.settings.app_id, partitions=partitions), REQUEST_TIMEOUT_S)
        positions = {
            partition: committed[partition].offset
            for partition in partitions
            if partition in committed and committed[partition].offset >= 0
        }
        uncommitted = [partition for partition in partitions if partition not in positions]
        starts = await asyncio.wait_for(consumer.beginning_offsets(uncommitted), REQUEST_TIMEOUT_S) if uncommitted else {}
        return {
            partition: PartitionOffsets(committed=positions.get(partition), start=starts.get(partition, 0),
                                        end=ends[partition])
            for partition in partitions
        }

    def _report(self, offsets: dict[TopicPartition, PartitionOffsets]) -> None:
        for partition in self._reported - set(offsets):
            labels = (partition.topic, str(partition.partition))
            clear_gauge_series(metrics.CONSUMER_LAG, *labels)
            clear_gauge_series(metrics.COMMITTED_OFFSET_AGE, *labels)
        for partition, current in offsets.items():
            labels = (partition.topic, str(partition.partition))
            metrics.CONSUMER_LAG.labels(*labels).set(current.lag)
            metrics.COMMITTED_OFFSET_AGE.labels(*labels).set(self.watchdog.committed_age_s(partition))
        self._reported = set(offsets)
        metrics.STALLED_PARTITIONS.set(len(self.status.stalled_partitions))
        regenerate = self.settings.topic_regenerate
        metrics.REGENERATIONS_PENDING.set(sum(current.lag for partition, current in offsets.items() if partition.topic == regenerate))

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            await self._close_clients()
            servers = self.settings.kafka_bootstrap_servers
            client_id = f"{self.settings.app_id}-monitor"
            security = aiokafka_security_kwargs(self.settings)
            admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id=client_id, **security)
            consumer = AIOKafkaConsumer(bootstrap_servers=servers, client_id=client_id, enable_auto_commit=False, **security)
            # Stored before starting, so the poll loop's error handler closes a half-started pair.
            self._admin, self._consumer = admin, consumer
            await admin.start()
            await consumer.start()
        return self._admin, self._consumer

    async def _close_clients(self) -> None:
        admin, consumer = self._admin, self._consumer
        self._admin = self._consumer = None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()
