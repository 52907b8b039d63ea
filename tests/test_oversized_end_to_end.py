"""Oversized records on the real broker and Postgres: a 3 MB post and profiles over the record limit."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import schemas
from handlers.sinks.postgres import PostgresSink
from handlers.sinks.topic import TRIMMED_HEADER, TopicSink
from stream.dead_letters import DEAD_LETTER_VALUE_MAX_BYTES, ORIGINAL_BYTES_HEADER
from stream.generate import GenerationStage
from stream.progress import wait_until_caught_up
from stream.records import Record
from stream.worker import prepare
from tests.test_end_to_end import metric, read_topic
from tests.test_topic_sink import big_profile
from tests.worker_harness import WorkerProcess, isolated_settings

CATCH_UP_TIMEOUT_S = 120
PROFILE_TIMEOUT_S = 60
BIG_POST_BYTES = 3 * 1024 * 1024
# Room for the 3 MB post on the posts topic and in the test's producer; the broker default is about 1 MiB.
LARGE_LIMIT_BYTES = 8 * 1024 * 1024


def post(user: str, n: int, text: str = "notes on qubits") -> bytes:
    return orjson.dumps({"schema": "post.v1", "event_id": f"{user}:e{n}", "user_id": user, "post_id": f"{user}:p{n}",
                         "created_at": f"2024-06-01T{n:02d}:00:00Z", "text": text, "tags": ["quantum"]})


async def create_large_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs={"max.message.bytes": str(LARGE_LIMIT_BYTES)})])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=LARGE_LIMIT_BYTES, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def current_profile(dsn: str, user: str) -> dict | None:
    sink = PostgresSink(dsn, pool_max=1)
    await sink.start()
    try:
        return await sink.fetch_current(user)
    finally:
        await sink.close()


async def test_big_post_dead_lettered_without_stall(kafka_bootstrap, fresh_database, tmp_path):
    settings = isolated_settings(kafka_bootstrap, fresh_database, tmp_path, min_events_new_user=3)
    await create_large_topic(kafka_bootstrap, settings.topic_posts, settings.partitions)
    await prepare(settings)
    big = post("big:u1", 3, text="y" * BIG_POST_BYTES)
    before = [(b"big:u1", post("big:u1", n)) for n in range(3)]
    after = [(b"big:u1", post("big:u1", n)) for n in range(4, 7)]
    others = [(f"big:u{m}".encode(), post(f"big:u{m}", n)) for m in range(2, 6) for n in range(4)]
    await produce(kafka_bootstrap, settings.topic_posts, [*before, (b"big:u1", big), *after, *others])

    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
        samples = worker.metrics()
        assert metric(samples, "profilestream_events_total", type="post", outcome="applied") == len(before) + len(after) + len(others)
        assert metric(samples, "profilestream_dead_letters_total", reason="oversized") == 1

        [letter] = await read_topic(kafka_bootstrap, settings.topic_dead_letter)
        headers = dict(letter.headers)
        assert headers["dlq-reason"] == b"oversized"
        assert b"PROFILESTREAM_MAX_EVENT_BYTES" in headers["dlq-error"]
        assert headers[ORIGINAL_BYTES_HEADER] == str(len(big)).encode()
        assert letter.value == big[:DEAD_LETTER_VALUE_MAX_BYTES]
        assert letter.key == b"big:u1"

        deadline = time.monotonic() + PROFILE_TIMEOUT_S
        while (profile := await current_profile(fresh_database, "big:u1")) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert profile is not None
        assert profile["activity"]["posts_total"] >= 3
        worker.check_alive()
    finally:
        worker.stop()


class FixedGenerator:
    """Return a prepared profile for each user, ignoring the request's features."""

    def __init__(self, profiles: dict[str, dict]) -> None:
        self.profiles = profiles

    async def generate(self, request: dict) -> tuple[dict, str]:
        return self.profiles[request["user_id"]], "rules"


def profile_of(user: str, **changes) -> dict:
    return {**big_profile(), "user_id": user, **changes}


def regeneration(user: str) -> Record:
    return Record("regenerate", 0, 0, user.encode(), orjson.dumps({"user_id": user, "version": 1}))


async def test_large_profiles_trimmed_or_rejected(kafka_bootstrap, fresh_database):
    topic = f"profiles-oversized-{datetime.now(UTC).strftime('%H%M%S%f')}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        await admin.close()
    trimmed = profile_of("size:trimmed")
    full = profile_of("size:fits", interests=trimmed["interests"][:2], traits=[])
    # The summaries break the schema's 1000-character bound on purpose: nothing else makes a profile this large.
    no_room = profile_of("size:no-room", summary="s" * 3000)
    over_producer = profile_of("size:over-producer", summary="p" * 1_100_000)
    sink_limit = len(orjson.dumps(full)) + 400
    assert len(orjson.dumps(trimmed)) > sink_limit

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    postgres = PostgresSink(fresh_database, pool_max=2)
    await postgres.start()
    try:
        async def send(key: bytes, value: bytes | None, headers: list) -> None:
            await producer.send_and_wait(topic, value, key=key, headers=headers)

        small_sink = TopicSink(send, max_record_bytes=sink_limit)
        generator = FixedGenerator({profile["user_id"]: profile for profile in (full, trimmed, no_room)})
        written = await GenerationStage(generator, [postgres, small_sink]).handle_batch(
            [regeneration("size:fits"), regeneration("size:no-room"), regeneration("size:trimmed")])
        assert sorted(profile["user_id"] for profile in written) == ["size:fits", "size:trimmed"]

        # A sink limit above the producer's max_request_size (aiokafka's default 1 MiB) meets the producer's own check.
        loose_sink = TopicSink(send, max_record_bytes=4 * 1024 * 1024)
        generator = FixedGenerator({profile["user_id"]: profile for profile in (full, over_producer)})
        written = await GenerationStage(generator, [loose_sink]).handle_batch(
            [regeneration("size:over-producer"), regeneration("size:fits")])
        assert [profile["user_id"] for profile in written] == ["size:fits"]

        records = {record.key.decode(): record for record in await read_topic(kafka_bootstrap, topic)}
        assert sorted(records) == ["size:fits", "size:trimmed"]
        assert TRIMMED_HEADER not in dict(records["size:fits"].headers)
        assert dict(records["size:trimmed"].headers)[TRIMMED_HEADER].startswith(b"evidence")
        assert schemas.validator("profile.v1").is_valid(orjson.loads(records["size:trimmed"].value))
        assert len(records["size:trimmed"].value) < len(orjson.dumps(trimmed))
        # Postgres is written before the topic sink, so it keeps the full profiles.
        assert (await postgres.fetch_current("size:trimmed"))["interests"] == trimmed["interests"]
        assert (await postgres.fetch_current("size:no-room"))["summary"] == "s" * 3000
    finally:
        await postgres.close()
        await producer.stop()
