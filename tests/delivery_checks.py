"""Shared steps of the delivery tests (crash, rebalance, shutdown) on the real broker and Postgres.

They read back what a run left behind: the profiles in Postgres, the profile records on the
topic, and the last user state of each user in the state table's changelog topic.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from handlers.sinks.postgres import migrate
from handlers.sinks.topic import VERSION_HEADER
from stream.app import STATE_TABLE
from stream.demo import bundled_data_path
from stream.progress import wait_until_caught_up
from stream.settings import Settings
from tests.conftest import with_database
from tests.worker_harness import WorkerProcess

CATCH_UP_TIMEOUT_S = 180


# Input


def bundled_posts() -> list[bytes]:
    """Return the post.v1 lines of the bundled data, in file order.

    Posts arrive on one topic, so each user's posts are processed in file order in every run
    and a run's decisions can be compared exactly with another run's.
    """
    with gzip.open(bundled_data_path(), "rb") as file:
        return [line.rstrip(b"\n") for line in file if b'"post.v1"' in line]


def write_lines(path: Path, lines: Iterable[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def distinct_events_per_user(lines: Iterable[bytes]) -> collections.Counter:
    """Count the distinct event ids of each acting user in post lines."""
    seen: set[str] = set()
    counts: collections.Counter = collections.Counter()
    for line in lines:
        document = orjson.loads(line)
        if document["event_id"] not in seen:
            seen.add(document["event_id"])
            counts[document["user_id"]] += 1
    return counts


# Databases


async def create_database(postgres_dsn: str) -> str:
    """Create and migrate a database with a random name, and return its DSN."""
    name = f"delivery_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    dsn = with_database(postgres_dsn, name)
    await migrate(dsn)
    return dsn


async def drop_database(postgres_dsn: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[-1]
    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@dataclass
class StoredProfiles:
    """What Postgres contains after a run."""

    # user id -> (version, [(topic, weight), ...]) of profiles_current
    current: dict[str, tuple[int, list[tuple[str, float]]]]
    # (user id, version) -> rows in profiles_history
    history: collections.Counter
    # (user id, version) -> interests of that profiles_history row
    history_interests: dict[tuple[str, int], list[tuple[str, float]]]


def interests_of(profile: dict) -> list[tuple[str, float]]:
    return [(item["topic"], item["weight"]) for item in profile["interests"]]


async def read_postgres(dsn: str) -> StoredProfiles:
    connection = await asyncpg.connect(dsn)
    try:
        current_rows = await connection.fetch("SELECT user_id, version, profile::text AS profile FROM profiles_current")
        history_rows = await connection.fetch("SELECT user_id, version, profile::text AS profile FROM profiles_history")
    finally:
        await connection.close()
    current = {row["user_id"]: (row["version"], interests_of(orjson.loads(row["profile"]))) for row in current_rows}
    history = collections.Counter((row["user_id"], row["version"]) for row in history_rows)
    history_interests = {(row["user_id"], row["version"]): interests_of(orjson.loads(row["profile"])) for row in history_rows}
    return StoredProfiles(current, history, history_interests)


# Topics


async def read_topic(bootstrap: str, topic: str) -> list:
    """Read every record of `topic` from the beginning to its current end, in offset order per partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [entry] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, partition["partition"]) for partition in entry["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        while [partition for partition in partitions if await consumer.position(partition) < ends[partition]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for messages in batch.values():
                records.extend(messages)
        return records
    finally:
        await consumer.stop()


@dataclass
class TopicProfiles:
    """The profile topic as read by a consumer that ignores versions not above the last one it accepted."""

    # (user id, version) -> records with that version header
    copies: collections.Counter = field(default_factory=collections.Counter)
    # user id -> the versions the consumer accepts, in offset order
    visible: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    # (user id, version) -> interests of the first record with that version
    interests: dict[tuple[str, int], list[tuple[str, float]]] = field(default_factory=dict)
    # records whose version header differs from the version in the value
    header_mismatches: list[tuple[str, int, int]] = field(default_factory=list)
    ignored: int = 0  # records a consumer ignores: a repeated or an older version

    @property
    def duplicates(self) -> int:
        """Records beyond the first of each (user, version)."""
        return sum(count - 1 for count in self.copies.values())


async def read_profile_topic(settings: Settings) -> TopicProfiles:
    result = TopicProfiles()
    for record in await read_topic(settings.kafka_bootstrap_servers, settings.topic_profiles):
        user_id = record.key.decode()
        version = int(dict(record.headers)[VERSION_HEADER])
        profile = orjson.loads(record.value)
        if profile["version"] != version:
            result.header_mismatches.append((user_id, version, profile["version"]))
        result.copies[(user_id, version)] += 1
        result.interests.setdefault((user_id, version), interests_of(profile))
        seen = result.visible[user_id]
        if seen and version <= seen[-1]:
            result.ignored += 1
        else:
            seen.append(version)
    return result


async def committed_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Return partition -> the offset the worker's group committed in `topic` (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        [entry] = await admin.describe_topics([topic])
        partitions = [TopicPartition(topic, partition["partition"]) for partition in entry["partitions"]]
        committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=partitions)
    finally:
        await admin.close()
    return {partition.partition: committed[partition].offset if partition in committed else -1 for partition in partitions}


def changelog_topic(settings: Settings) -> str:
    return f"{settings.app_id}-{STATE_TABLE}-changelog"


async def read_user_states(settings: Settings) -> dict[str, dict]:
    """Return the last value of each key in the state table's changelog: the state a restart recovers."""
    states: dict[str, dict] = {}
    for record in await read_topic(settings.kafka_bootstrap_servers, changelog_topic(settings)):
        user_id = record.key.decode()
        if record.value is None:
            states.pop(user_id, None)
        else:
            states[user_id] = orjson.loads(record.value)
    return states


def state_counts(states: dict[str, dict]) -> dict[str, tuple[int, dict]]:
    """Return user id -> (events_applied, totals)."""
    return {user_id: (state["events_applied"], state["totals"]) for user_id, state in states.items()}


# Checks shared by the tests


def check_topic_matches_postgres(stored: StoredProfiles, topic: TopicProfiles) -> None:
    """Assert that Postgres and the profile topic hold the same versions, each once in Postgres."""
    repeated_rows = {key: count for key, count in stored.history.items() if count > 1}
    assert repeated_rows == {}, "profiles_history has a (user, version) more than once"
    assert topic.header_mismatches == [], "profile-version header differs from the value's version"
    assert set(topic.copies) == set(stored.history), (
        f"versions only on the topic: {sorted(set(topic.copies) - set(stored.history))[:10]};"
        f" versions only in Postgres: {sorted(set(stored.history) - set(topic.copies))[:10]}"
    )
    latest_visible = {user_id: versions[-1] for user_id, versions in topic.visible.items()}
    assert latest_visible == {user_id: version for user_id, (version, _) in stored.current.items()}, (
        "the last version a topic consumer accepts is not the current version in Postgres"
    )
    latest_history: dict[str, int] = {}
    for user_id, version in stored.history:
        latest_history[user_id] = max(version, latest_history.get(user_id, 0))
    assert latest_history == {user_id: version for user_id, (version, _) in stored.current.items()}
    for key, interests in topic.interests.items():
        assert interests == stored.history_interests[key], f"topic and Postgres disagree on the interests of {key}"


# Workers


async def run_until_caught_up(settings: Settings, log_path: Path, **worker_options) -> WorkerProcess:
    """Start a worker and wait until the group has committed every record; the worker keeps running."""
    worker = WorkerProcess(settings, log_path, **worker_options).start()
    try:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
    except BaseException:
        worker.stop()
        raise
    return worker


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum the samples named `name` whose labels include `labels`."""
    return sum(
        value for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


async def wait_for(condition: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.2, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description} did not happen within {timeout_s} s")
        await asyncio.sleep(poll_s)


def scrape(worker: WorkerProcess) -> dict:
    """Return the worker's samples, or {} while its HTTP server is not up; fail if the worker exited."""
    worker.check_alive()
    try:
        return worker.metrics()
    except OSError:
        return {}


def events_processed(worker: WorkerProcess) -> float:
    """Input records the worker has processed so far, any outcome."""
    return metric_sum(scrape(worker), "profilestream_events_total")


def kill(worker: WorkerProcess) -> int:
    """SIGKILL the worker and return its exit status."""
    assert worker.process is not None
    worker.process.send_signal(signal.SIGKILL)
    try:
        return worker.process.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker did not die within 10 s of SIGKILL") from None
