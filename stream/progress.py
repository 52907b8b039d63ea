"""Consumer-group progress: how many records of the worker's topics are not yet committed."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from .kafka_security import aiokafka_security_kwargs
from .settings import Settings


def consumed_topics(settings: Settings) -> list[str]:
    return [*settings.input_topics, settings.topic_audience, settings.topic_post_index, settings.topic_regenerate]


async def group_lag(settings: Settings) -> tuple[int, int]:
    """Return (lag, committed): records not yet committed by the worker's group, and those committed."""
    security = aiokafka_security_kwargs(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id=f"{settings.app_id}-progress",
                                **security)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, client_id=f"{settings.app_id}-progress",
                                **security)
    await admin.start()
    await consumer.start()
    try:
        partitions = [
            TopicPartition(entry["topic"], partition["partition"])
            for entry in await admin.describe_topics(consumed_topics(settings))
            for partition in entry["partitions"]
        ]
        if not partitions:
            raise UnknownTopicOrPartitionError(f"none of the topics {consumed_topics(settings)} exist yet")
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=partitions)
        lag = 0
        done = 0
        for partition in partitions:
            position = committed.get(partition)
            offset = position.offset if position is not None and position.offset >= 0 else 0
            lag += max(0, ends[partition] - offset)
            done += offset
        return lag, done
    finally:
        await consumer.stop()
        await admin.close()


async def group_lag_when_ready(settings: Settings, *, timeout_s: float = 30.0, poll_s: float = 0.5) -> tuple[int, int]:
    """Return `group_lag(settings)`, retrying retriable errors such as a group coordinator still loading."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await group_lag(settings)
        except KafkaError as error:
            if not error.retriable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(poll_s)


async def wait_until_caught_up(settings: Settings, *, timeout_s: float, quiet_polls: int = 3, poll_s: float = 1.0,
                               on_poll=None) -> int:
    """Wait until the group's lag is zero for `quiet_polls` polls in a row; return the committed count.

    Raises TimeoutError naming the remaining lag when `timeout_s` passes first.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    lag = -1
    while time.monotonic() < deadline:
        try:
            lag, done = await group_lag(settings)
        except KafkaError as error:
            # The group coordinator is not ready in the first seconds of a new broker or group.
            if not error.retriable:
                raise
            await asyncio.sleep(poll_s)
            continue
        if on_poll is not None:
            on_poll(lag, done)
        quiet = quiet + 1 if lag == 0 else 0
        if quiet >= quiet_polls:
            return done
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"the worker still had {lag} uncommitted records after {timeout_s:.0f} s")
