"""The whole path on real Kafka and Postgres: the bundled Stack Exchange data, replayed.

One worker run serves every test in this module; the last test replays the file a second
time, so the tests run in file order.
"""

from __future__ import annotations

import collections
import gzip
import shutil
from datetime import UTC, datetime

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from handlers.errors import InvalidRecord
from handlers.events import decode_event
from handlers.sinks.postgres import PostgresSink
from stream.demo import bundled_data_path
from stream.progress import wait_until_caught_up
from stream.replay import replay, route
from stream.worker import prepare

from tests.worker_harness import WorkerProcess, isolated_settings

CATCH_UP_TIMEOUT_S = 300
EDGE_USER = "edge:u1"

# Records every worker must survive: each is dead-lettered with the reason on the right.
BAD_LINES = [
    (b'{"schema": "post.v1", "event_id": "bad:1", "user_id": "edge:u2", "post_id": "x", "crea', "invalid_json"),
    (b'{"schema": "post.v1", "event_id": "bad:2", "user_id": "edge:u2", "post_id": "x",'
     b' "created_at": "2018-09-02T00:00:00Z", "text": "broken \\ud800 text"}', "lone_surrogate"),
    (b'{"schema": "post.v1", "event_id": "bad:3", "user_id": "edge:u2", "post_id": "x",'
     b' "created_at": "2024-02-30T25:00:00Z", "text": "impossible"}', "invalid_timestamp"),
    (b'{"schema": "post.v1", "event_id": "bad:4", "user_id": "edge:u2", "post_id": "x",'
     b' "created_at": "2099-01-01T00:00:00Z", "text": "from the future"}', "future_timestamp"),
    (b'{"schema": "post.v9", "event_id": "bad:5", "user_id": "edge:u2", "post_id": "x",'
     b' "created_at": "2018-09-02T00:00:00Z", "text": "newer producer"}', "unknown_version"),
    (b'{"schema": "like.v1", "event_id": "bad:6", "user_id": "edge:u2", "post_id": 7,'
     b' "post_author_id": "se:1", "created_at": "2018-09-02T00:00:00Z"}', "invalid_schema"),
]

# Valid edge cases, all by one user so that user gets a profile.
EDGE_LINES = [
    b'{"schema": "post.v1", "event_id": "edge:1", "user_id": "edge:u1", "post_id": "edge:p1",'
    b' "created_at": "2018-09-02T10:00:00Z", "text": "zulu time", "tags": ["edge-cases"]}',
    b'{"schema": "post.v1", "event_id": "edge:2", "user_id": "edge:u1", "post_id": "edge:p2",'
    b' "created_at": "2018-09-02T18:00:00+08:00", "text": "offset time", "tags": ["edge-cases"]}',
    b'{"schema": "post.v1", "event_id": "edge:3", "user_id": "edge:u1", "post_id": "edge:p3",'
    b' "created_at": "2018-09-02T12:00:00", "text": "naive time read as UTC", "tags": ["edge-cases"]}',
    b'{"schema": "post.v1", "event_id": "edge:4", "user_id": "edge:u1", "post_id": "edge:p4",'
    b' "created_at": "2018-09-02T13:00:00Z", "text": "emoji \\ud83d\\ude00 pair", "tags": ["edge-cases"]}',
    b'{"schema": "post.v1", "event_id": "edge:5", "user_id": "edge:u1", "post_id": "edge:p5",'
    b' "created_at": "2018-09-02T14:00:00Z", "text": "nul \\u0000 inside", "tags": ["edge-cases"]}',
]


def expected_outcomes(lines: list[bytes], settings) -> dict:
    """Decode the file the way the worker must, and count what it should apply."""
    now = datetime.now(UTC)
    applied = collections.Counter()
    own_events = collections.Counter()
    tags = collections.defaultdict(collections.Counter)
    audience = 0
    likes_by_post = collections.Counter()
    posted = set()
    seen = set()

    for line in lines:
        topic, _ = route(line, settings)
        try:
            event = decode_event(settings.input_topics[topic], line, now=now)
        except InvalidRecord:
            continue
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        applied[event.kind] += 1
        own_events[event.user_id] += 1
        if event.kind == "post":
            tags[event.user_id].update(event.tags)
            posted.add(event.post_id)
        if event.kind == "like" and event.post_author_id != event.user_id:
            audience += 1
        if event.kind == "like":
            likes_by_post[event.post_id] += 1

    # Every like of a post in the file also comes back from the post index as liked topics.
    audience += sum(count for post_id, count in likes_by_post.items() if post_id in posted)
    return {"applied": applied, "own_events": own_events, "tags": tags, "audience": audience}


async def read_topic(bootstrap: str, topic: str) -> list:
    """Read every record of `topic` from the beginning to its current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await _partitions(bootstrap, topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        while [p for p in partitions if await consumer.position(p) < ends[p]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for messages in batch.values():
                records.extend(messages)
        return records
    finally:
        await consumer.stop()


async def _partitions(bootstrap: str, topic: str) -> set[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [entry] = await admin.describe_topics([topic])
        return {partition["partition"] for partition in entry["partitions"]}
    finally:
        await admin.close()


async def fetch_all(dsn: str) -> tuple[dict[str, dict], int]:
    sink = PostgresSink(dsn, pool_max=1)
    await sink.start()
    try:
        current = {profile["user_id"]: profile for profile in await sink.fetch_top(100_000)}
        history = sum([len(await sink.fetch_history(user_id)) for user_id in current])
        return current, history
    finally:
        await sink.close()


@pytest_asyncio.fixture(scope="module")
async def run(kafka_bootstrap, module_database, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("end-to-end")
    settings = isolated_settings(kafka_bootstrap, module_database, workdir, min_events_new_user=5)
    events_path = workdir / "events.jsonl.gz"
    with gzip.open(bundled_data_path(), "rb") as source, gzip.open(events_path, "wb") as target:
        shutil.copyfileobj(source, target)
        for line in EDGE_LINES + [line for line, _ in BAD_LINES]:
            target.write(line + b"\n")
    with gzip.open(events_path, "rb") as file:
        lines = [line.rstrip(b"\n") for line in file if line.strip()]
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    try:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
        yield {"settings": settings, "worker": worker, "path": events_path, "expected": expected_outcomes(lines, settings)}
    finally:
        worker.stop()


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_every_valid_event_counted(run):
    samples = run["worker"].metrics()
    applied = run["expected"]["applied"]
    assert metric(samples, "profilestream_events_total", type="post", outcome="applied") == applied["post"]
    assert metric(samples, "profilestream_events_total", type="like", outcome="applied") == applied["like"]
    assert metric(samples, "profilestream_events_total", type="audience", outcome="applied") == run["expected"]["audience"]


async def test_profiles_exist_for_active_users(run):
    current, _ = await fetch_all(run["settings"].postgres_dsn.get_secret_value())
    minimum = run["settings"].min_events_new_user
    active = {user for user, count in run["expected"]["own_events"].items() if count >= minimum}
    assert len(active) > 50
    assert active <= set(current)


async def test_postgres_and_topic_versions_agree(run):
    settings = run["settings"]
    current, history = await fetch_all(settings.postgres_dsn.get_secret_value())
    records = await read_topic(settings.kafka_bootstrap_servers, settings.topic_profiles)
    on_topic = {}
    for record in records:
        version = int(dict(record.headers)["profile-version"])
        assert orjson.loads(record.value)["version"] == version
        on_topic[record.key.decode()] = max(version, on_topic.get(record.key.decode(), 0))
    assert on_topic == {user: profile["version"] for user, profile in current.items()}
    assert history == len({(record.key, dict(record.headers)["profile-version"]) for record in records})


async def test_top_interests_include_most_used_tag(run):
    current, _ = await fetch_all(run["settings"].postgres_dsn.get_secret_value())
    most_active = [user for user, _ in run["expected"]["own_events"].most_common(10)]
    for user in most_active:
        favourite_tag, _ = run["expected"]["tags"][user].most_common(1)[0]
        topics = [interest["topic"] for interest in current[user]["interests"]]
        assert favourite_tag in topics, f"{user}: most used tag {favourite_tag!r} missing from {topics}"


async def test_bad_records_dead_lettered(run):
    settings = run["settings"]
    records = await read_topic(settings.kafka_bootstrap_servers, settings.topic_dead_letter)
    by_value = {record.value: dict(record.headers) for record in records}
    assert len(records) == len(BAD_LINES)
    for line, reason in BAD_LINES:
        headers = by_value[line]
        assert headers["dlq-reason"].decode() == reason
        assert headers["dlq-source-topic"].decode() == settings.topic_posts or reason == "invalid_schema"
        assert int(headers["dlq-source-offset"]) >= 0


async def test_edge_timestamps_and_text_stored(run):
    current, _ = await fetch_all(run["settings"].postgres_dsn.get_secret_value())
    profile = current[EDGE_USER]
    assert profile["activity"]["posts_total"] == len(EDGE_LINES)
    assert profile["activity"]["first_seen"] == "2018-09-02T10:00:00Z"
    assert profile["activity"]["last_seen"] == "2018-09-02T14:00:00Z"


async def test_second_replay_creates_no_versions(run):
    settings = run["settings"]
    before, history_before = await fetch_all(settings.postgres_dsn.get_secret_value())
    duplicates_before = metric(run["worker"].metrics(), "profilestream_events_total", type="post", outcome="duplicate")
    await replay(run["path"], settings, progress=False)
    await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: run["worker"].check_alive())
    after, history_after = await fetch_all(settings.postgres_dsn.get_secret_value())
    samples = run["worker"].metrics()
    assert {u: p["version"] for u, p in after.items()} == {u: p["version"] for u, p in before.items()}
    assert history_after == history_before
    assert metric(samples, "profilestream_events_total", type="post", outcome="applied") == run["expected"]["applied"]["post"]
    assert metric(samples, "profilestream_events_total", type="post", outcome="duplicate") > duplicates_before
