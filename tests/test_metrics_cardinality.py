"""Metric labels never take user ids, post ids or text: the series count stays flat as users grow.

One test runs events of 100,000 distinct users through every stage in this process: ingest
(with distinct bad records for the dead-letter path), the post index, the audience records
back through ingest, generation and both sinks, and read-API requests. It counts the series
in the /metrics text that the worker's HTTP server returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from handlers.errors import InvalidRecord
from handlers.generation.circuit import CircuitBreaker
from handlers.generation.llm import LLMGenerator
from handlers.generation.service import ProfileGenerator
from handlers.sinks.postgres import PostgresSink
from handlers.sinks.topic import TopicSink
from stream.generate import GenerationStage
from stream.health import WorkerStatus
from stream.http_server import HttpServer
from stream.ingest import IngestStage
from stream.post_index import PostIndexStage
from stream.records import Record, dead_letter_headers
from stream.settings import load_settings
from tests.llm_stub import TEST_API_KEY, LLMStub, schema_breaking, server_error, truncated, ungrounded
from tests.llm_stub import llm_stub, llm_stub_server  # noqa: F401 (pytest fixtures)

USERS = 100_000
FIRST_USERS = 1_000
CHUNK_USERS = 10_000
# Every PATTERN_USERS users the same mix repeats: the three event kinds, deletions of users
# of each kind, and each kind of bad record. FIRST_USERS covers it several times, so every
# label value the later users reach already exists after the first users.
PATTERN_USERS = 300
DELETED = range(50, 53)
BAD_RECORDS = range(0, 7)
# Model calls, Postgres writes and HTTP requests cost far more than the rest, so only some
# users take them. One user in POSTGRES_EVERY has its profiles written to a real Postgres
# (2,000 users). Half of those get their profiles from the LLM generator through the LLM
# stub, and one user in READ_EVERY is read back through the read API. Each divides PATTERN_USERS.
POSTGRES_EVERY = 50
LLM_EVERY = 100
READ_EVERY = 100
GENERATION_BATCH = 1_000
# The default registry is shared with every test of the session, so the budget covers all of
# the project's series (this test alone reached 358). An id label would add up to 100,000.
SERIES_BUDGET = 1000
# Fragments of the ids and texts of the generated records, none of which may become a label value.
ID_FRAGMENT = re.compile(r"user-\d|post-\d|event-\d|word\d|tag\d|bad-\d|topic-\d")
CREATED_AT = "2024-06-01T12:00:00Z"
DELETED_AT = "2024-06-01T13:00:00Z"


def user_event(n: int) -> Record:
    """Return user n's one event: a post, a like of user n-1's post, or a follow of user n+1."""
    user = f"user-{n}"
    base = {"event_id": f"event-{n}", "created_at": CREATED_AT}
    kind = ("post", "like", "follow")[n % 3]
    if kind == "post":
        document = {**base, "schema": "post.v1", "user_id": user, "post_id": f"post-{n}",
                    "text": f"word{n} about distinct word{n + 1} things", "tags": [f"tag{n}"]}
        topic = "posts"
    elif kind == "like":
        document = {**base, "schema": "like.v1", "user_id": user, "post_id": f"post-{n - 1}", "post_author_id": f"user-{n - 1}"}
        topic = "likes"
    else:
        document = {**base, "schema": "follow.v1", "follower_id": user, "followee_id": f"user-{n + 1}"}
        topic = "follows"
    return Record(topic, 0, n, user.encode(), orjson.dumps(document))


def deletion(n: int) -> Record:
    document = {"schema": "user_deleted.v1", "event_id": f"event-{n}-deleted", "user_id": f"user-{n}", "deleted_at": DELETED_AT}
    return Record("users", 0, n, f"user-{n}".encode(), orjson.dumps(document))


def bad_record(n: int) -> Record:
    """Return a distinct bad record, which fails the check that n % PATTERN_USERS picks."""
    key = f"user-{n}".encode()
    post = {"schema": "post.v1", "event_id": f"bad-{n}", "user_id": f"user-{n}", "post_id": f"post-{n}-bad",
            "created_at": CREATED_AT, "text": f"word{n} bad"}
    variants = [
        Record("posts", 0, n, key, f'{{"broken bad-{n}'.encode()),
        Record("posts", 0, n, key, orjson.dumps({**post, "text": None})),
        Record("posts", 0, n, key, orjson.dumps({**post, "created_at": f"2024-02-30T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"})),
        Record("posts", 0, n, f"other-user-{n}".encode(), orjson.dumps(post)),
        Record("posts", 0, n, key, b"\xff" + f"bad-{n}".encode()),
        Record(f"topic-{n}", 0, n, key, orjson.dumps(post)),
        Record("posts", 0, n, key, None),
    ]
    return variants[n % PATTERN_USERS % len(variants)]


def user_number(key: bytes) -> int | None:
    match = re.fullmatch(rb"user-(\d+)", key)
    return None if match is None else int(match[1])


@dataclass
class CollectingEmitter:
    """The records that ingest and the post index send, kept for the next stages instead of a topic."""

    audience_topic: str
    audience_records: list[Record] = field(default_factory=list)
    regenerate_records: list[Record] = field(default_factory=list)
    post_index_records: list[Record] = field(default_factory=list)
    dead_letters: int = 0

    async def dead_letter(self, record: Record, error: InvalidRecord) -> None:
        dead_letter_headers(record, error.reason, error.detail)
        self.dead_letters += 1

    async def audience(self, user_id: str, message: dict) -> None:
        self.audience_records.append(self._record(self.audience_topic, user_id, message))

    async def regenerate(self, user_id: str, request: dict) -> None:
        self.regenerate_records.append(self._record("regenerate", user_id, request))

    async def post_index(self, post_id: str, message: dict) -> None:
        self.post_index_records.append(self._record("post-index", post_id, message))

    @staticmethod
    def _record(topic: str, key: str, message: dict) -> Record:
        return Record(topic, 0, 0, key.encode(), orjson.dumps(message))


async def discard(key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    """Drop a profile record, in place of the producer's send to the profile topic."""


@dataclass
class Pipeline:
    """Every stage of one worker, wired in this process, with the worker's HTTP server in front of Postgres."""

    emitter: CollectingEmitter
    ingest: IngestStage
    post_index: PostIndexStage
    rules_generation: GenerationStage
    postgres_generation: GenerationStage
    llm_generation: GenerationStage
    llm_stub: LLMStub
    base_url: str
    http: aiohttp.ClientSession

    async def run_users(self, start: int, stop: int) -> None:
        """Send users start..stop-1 through every stage, and some of them through Postgres, the model and the read API."""
        await self.ingest_events(start, stop)
        await self.index_posts(start)
        await self.apply_audience(start)
        await self.generate(start)
        await self.read_profiles(start, stop)

    async def ingest_events(self, start: int, stop: int) -> None:
        records = []
        for n in range(start, stop):
            records.append(user_event(n))
            if n % PATTERN_USERS in DELETED:
                records.append(deletion(n))
            if n % PATTERN_USERS in BAD_RECORDS:
                records.append(bad_record(n))
        await self.ingest.handle_batch(records)

    async def index_posts(self, start: int) -> None:
        records = self._take("post_index_records")
        records.append(Record("post-index", 0, start, b"bad", f"not json bad-{start}".encode()))
        await self.post_index.handle_batch(records)

    async def apply_audience(self, start: int) -> None:
        records = self._take("audience_records")
        records.append(Record(self.emitter.audience_topic, 0, start, b"bad", f'{{"bad-{start}": 1}}'.encode()))
        await self.ingest.handle_batch(records)

    async def generate(self, start: int) -> None:
        requests = self._take("regenerate_records")
        requests.append(Record("regenerate", 0, start, b"bad", f'{{"user_id": "bad-{start}"}}'.encode()))
        batches: dict[str, list[Record]] = {"rules": [], "postgres": [], "llm": []}
        for record in requests:
            n = user_number(record.key)
            if n is not None and n % LLM_EVERY == 0:
                batches["llm"].append(record)
            elif n is not None and n % POSTGRES_EVERY == 0:
                batches["postgres"].append(record)
            else:
                batches["rules"].append(record)
        failures = (server_error(), truncated(), ungrounded(), schema_breaking("extra"))
        self.llm_stub.script(*failures)
        model_requests_before = len(self.llm_stub.requests)
        for stage, records in ((self.llm_generation, batches["llm"]), (self.postgres_generation, batches["postgres"]),
                               (self.rules_generation, batches["rules"])):
            for first in range(0, len(records), GENERATION_BATCH):
                await stage.handle_batch(records[first:first + GENERATION_BATCH])
        # Every batch takes each failure path, so no outcome label first appears after FIRST_USERS.
        assert len(self.llm_stub.requests) - model_requests_before >= len(failures)

    async def read_profiles(self, start: int, stop: int) -> None:
        for n in range(start, stop, READ_EVERY):
            await self.read(f"/users/user-{n}/profile", (200, 404))
            await self.read(f"/users/user-{n}/profiles?limit=2", (200,))
            await self.read(f"/users/user-{n + 1}/profile", (404,))
        await self.read(f"/users/%FFbad-{start}/profile", (400,))
        await self.read(f"/users/user-{start}/profiles?limit=bad-{start}", (400,))

    async def read(self, path: str, expected: tuple[int, ...]) -> None:
        async with self.http.get(self.base_url + path) as response:
            await response.read()
            assert response.status in expected, f"GET {path} returned {response.status}"

    async def series(self) -> set[tuple[str, tuple]]:
        """Return the series of the HTTP server's /metrics text, each as (sample name, sorted labels)."""
        async with self.http.get(self.base_url + "/metrics") as response:
            text = await response.text()
        return {(sample.name, tuple(sorted(sample.labels.items())))
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def _take(self, name: str) -> list[Record]:
        records = getattr(self.emitter, name)
        setattr(self.emitter, name, [])
        return records


def id_labels(series: set[tuple[str, tuple]]) -> list[tuple[str, tuple]]:
    return [(name, labels) for name, labels in series if any(ID_FRAGMENT.search(value) for _, value in labels)]


async def test_series_flat_for_many_users(fresh_database, llm_stub):
    settings = load_settings(min_events_new_user=1)
    emitter = CollectingEmitter(settings.topic_audience)
    ingest = IngestStage(settings, {}, emitter, clock=lambda: datetime(2025, 1, 1, tzinfo=UTC))
    llm = LLMGenerator(base_url=llm_stub.base_url, api_key=TEST_API_KEY, model="stub-model", language="en", max_retries=0)
    # A threshold above the scripted failures per batch, so the circuit never opens and every batch takes the same paths.
    circuit = CircuitBreaker(failure_threshold=100)
    llm_generator = ProfileGenerator(language="en", llm=llm, circuit=circuit, max_concurrent_calls=8)
    rules_generator = ProfileGenerator(language="en")
    writes = PostgresSink(fresh_database)
    await writes.start()
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0, profiles=PostgresSink(fresh_database))
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            pipeline = Pipeline(
                emitter=emitter,
                ingest=ingest,
                post_index=PostIndexStage({}, emitter),
                rules_generation=GenerationStage(rules_generator, [TopicSink(discard)]),
                postgres_generation=GenerationStage(rules_generator, [TopicSink(discard), writes], concurrency=8),
                llm_generation=GenerationStage(llm_generator, [TopicSink(discard), writes], concurrency=8),
                llm_stub=llm_stub,
                base_url=f"http://127.0.0.1:{server.port}",
                http=http,
            )
            await pipeline.run_users(0, FIRST_USERS)
            after_first_users = await pipeline.series()
            for start in range(FIRST_USERS, USERS, CHUNK_USERS):
                await pipeline.run_users(start, min(start + CHUNK_USERS, USERS))
            after_all_users = await pipeline.series()
    finally:
        await server.stop()
        await writes.close()
        await llm_generator.close()

    assert emitter.dead_letters >= sum(n % PATTERN_USERS in BAD_RECORDS for n in range(USERS))
    assert len(llm_stub.requests) >= USERS // LLM_EVERY // 2
    assert id_labels(after_all_users) == []
    assert after_all_users - after_first_users == set()
    assert len(after_all_users) < SERIES_BUDGET
