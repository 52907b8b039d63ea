"""The exactly_once processing guarantee (Kafka transactions) on the real broker.

Only post events are replayed: they arrive on one topic, so each user's events are processed
in the same order in every run, and the at-least-once and exactly-once runs must decide the
same profile versions. Three runs share this module: at-least-once, exactly-once, and
exactly-once with the worker killed by SIGKILL in the middle of the replay and started again.

In exactly_once mode every committed transaction leaves a control record (the commit marker)
in each partition it wrote. Consumers never receive it, so the group's committed offset can
stay one below the end offset for good, and `stream.progress.wait_until_caught_up` would
wait forever. `wait_until_drained` counts only the records a read_committed consumer receives.
"""

from __future__ import annotations

import asyncio
import gzip
import time

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from handlers.sinks.postgres import migrate
from stream.app import STATE_TABLE
from stream.demo import bundled_data_path
from stream.progress import consumed_topics, group_lag
from stream.replay import replay
from stream.worker import prepare
from tests.conftest import with_database
from tests.test_end_to_end import fetch_all
from tests.worker_harness import WorkerProcess, isolated_settings

DRAIN_TIMEOUT_S = 300.0
QUIET_POLLS = 3
POLL_S = 1.0
READ_TIMEOUT_S = 60.0
KILL_AFTER_FRACTION = 3  # kill the worker once a third of the posts is committed
REPLAY_S = 40.0  # the killed run replays at a rate that spreads the posts over this many seconds


def write_posts(path) -> int:
    with gzip.open(bundled_data_path(), "rb") as file:
        posts = [line for line in file if b'"post.v1"' in line]
    path.write_bytes(b"".join(posts))
    return len(posts)


async def create_database(postgres_dsn: str, name: str) -> str:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    dsn = with_database(postgres_dsn, name)
    await migrate(dsn)
    return dsn


async def committed_records(bootstrap: str, partitions: dict[TopicPartition, int]) -> dict[TopicPartition, list]:
    """Read each partition from its given offset to its last stable offset, as a read_committed consumer.

    The consumer's position moves past commit markers, so it reaches the end offset even when
    the partition ends with one.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        consumer.assign(list(partitions))
        for partition, offset in partitions.items():
            consumer.seek(partition, offset)
        ends = await consumer.end_offsets(list(partitions))
        records: dict[TopicPartition, list] = {partition: [] for partition in partitions}
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending := [partition for partition in partitions if await consumer.position(partition) < ends[partition]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {pending} to offsets {ends} took more than {READ_TIMEOUT_S:.0f} s")
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for partition, messages in batch.items():
                records[partition].extend(messages)
        return records
    finally:
        await consumer.stop()


async def unprocessed_records(settings) -> int:
    """Count the records of the worker's topics that a read_committed consumer gets after the group's commits."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        partitions = [
            TopicPartition(entry["topic"], partition["partition"])
            for entry in await admin.describe_topics(consumed_topics(settings))
            for partition in entry["partitions"]
        ]
        committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=partitions)
    finally:
        await admin.close()
    start = {partition: max(0, committed[partition].offset) if partition in committed else 0 for partition in partitions}
    records = await committed_records(settings.kafka_bootstrap_servers, start)
    return sum(len(messages) for messages in records.values())


async def wait_until_drained(settings, worker: WorkerProcess, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Wait until no committed record is left after the group's offsets for QUIET_POLLS polls in a row."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    remaining = -1
    while quiet < QUIET_POLLS:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{remaining} records still unprocessed after {timeout_s:.0f} s; log:\n{worker.log_tail()}")
        try:
            remaining = await unprocessed_records(settings)
        except KafkaError as error:
            # The group coordinator is not ready in the first seconds of a new group.
            if not error.retriable:
                raise
            remaining = -1
        quiet = quiet + 1 if remaining == 0 else 0
        await asyncio.sleep(POLL_S)


async def state_counts(settings) -> dict[str, int]:
    """Return events_applied per user from the last committed value of each key in the state changelog."""
    topic = f"{settings.app_id}-{STATE_TABLE}-changelog"
    records = await committed_records(
        settings.kafka_bootstrap_servers, {TopicPartition(topic, partition): 0 for partition in range(settings.partitions)}
    )
    latest: dict[str, dict | None] = {}
    for messages in records.values():
        for message in messages:
            latest[message.key.decode()] = None if message.value is None else orjson.loads(message.value)
    return {user: state["events_applied"] for user, state in latest.items() if state is not None}


async def run_clean(settings, events_path, log_path) -> None:
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, log_path).start()
    try:
        await wait_until_drained(settings, worker)
    finally:
        exit_code = worker.stop()
    assert exit_code == 0, worker.log_tail()


async def run_killed(settings, events_path, posts: int, log_path) -> float:
    """Replay while the worker runs, SIGKILL it a third of the way, start it again; return the restart's drain time."""
    await prepare(settings)
    replaying = asyncio.create_task(replay(events_path, settings, rate_per_s=posts / REPLAY_S, progress=False))
    first = WorkerProcess(settings, log_path.with_suffix(".first.log")).start()
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (await group_lag(settings))[1] < posts // KILL_AFTER_FRACTION:
            first.check_alive()
            assert time.monotonic() < deadline, f"no progress before the kill; log:\n{first.log_tail()}"
            await asyncio.sleep(0.2)
        assert not replaying.done(), "the replay ended before the kill; raise REPLAY_S"
        first.process.kill()
        first.process.wait()
    finally:
        first.stop()
    second = WorkerProcess(settings, log_path).start()
    restarted_at = time.monotonic()
    try:
        await replaying
        await wait_until_drained(settings, second)
        drained_s = time.monotonic() - restarted_at
    finally:
        replaying.cancel()
        exit_code = second.stop()
    assert exit_code == 0, second.log_tail()
    return drained_s


@pytest_asyncio.fixture(scope="module")
async def runs(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("exactly-once")
    events_path = workdir / "posts.jsonl"
    posts = write_posts(events_path)
    settings = {}
    for name, guarantee in (("at_least_once", "at_least_once"), ("exactly_once", "exactly_once"),
                            ("killed", "exactly_once")):
        dsn = await create_database(postgres_dsn, f"{workdir.name}_{name}".lower().replace("-", "_"))
        settings[name] = isolated_settings(kafka_bootstrap, dsn, workdir / name, processing_guarantee=guarantee,
                                           min_events_new_user=5)
    await run_clean(settings["at_least_once"], events_path, workdir / "at_least_once.log")
    await run_clean(settings["exactly_once"], events_path, workdir / "exactly_once.log")
    drained_s = await run_killed(settings["killed"], events_path, posts, workdir / "killed.log")
    print(f"\nexactly_once: restarted worker drained the topics {drained_s:.1f} s after the SIGKILL")
    yield {
        name: {
            "versions": {user: profile["version"] for user, profile in (await fetch_all(
                value.postgres_dsn.get_secret_value()))[0].items()},
            "counts": await state_counts(value),
            "log": (workdir / f"{name}.log").read_text(errors="replace"),
        }
        for name, value in settings.items()
    }


@pytest.mark.slow
@pytest.mark.timeout(3 * DRAIN_TIMEOUT_S + 300)
async def test_exactly_once_same_profiles(runs):
    assert len(runs["at_least_once"]["versions"]) > 50
    assert runs["exactly_once"]["versions"] == runs["at_least_once"]["versions"]


@pytest.mark.slow
async def test_exactly_once_uses_transactions(runs):
    assert "transactional producer" in runs["exactly_once"]["log"]
    assert "transactional producer" not in runs["at_least_once"]["log"]


@pytest.mark.slow
async def test_exactly_once_same_state(runs):
    assert runs["exactly_once"]["counts"] == runs["at_least_once"]["counts"]


@pytest.mark.slow
async def test_kill_keeps_state_counts(runs):
    assert runs["killed"]["counts"] == runs["exactly_once"]["counts"]


@pytest.mark.slow
async def test_kill_keeps_profiles(runs):
    assert runs["killed"]["versions"] == runs["exactly_once"]["versions"]
