"""The Faust application: topics, the state and post-index tables, and the agents.

Agents are thin: they turn Faust events into `Record`s and hand them to the ingest and
generation stages, which hold the logic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path

import faust
import orjson
from aiokafka.errors import KafkaError

from handlers.errors import InvalidRecord
from handlers.generation.budget import Budget
from handlers.generation.circuit import CircuitBreaker
from handlers.generation.llm import LLMGenerator
from handlers.generation.service import ProfileGenerator
from handlers.sinks.postgres import PostgresSink
from handlers.sinks.topic import TopicSink

from . import faust_acks, metrics
from .generate import GenerationStage, GenerationRateLimit, refresh_budget_gauges
from .ingest import IngestStage
from .kafka_security import faust_broker_credentials
from .postgres_tls import postgres_ssl
from .post_index import PostIndexStage
from .postgres_startup import retry_until_available
from .producer_metrics import ProducerErrorSensor
from .records import Record, dead_letter_headers
from .settings import Settings
from .state_size import estimate_json_bytes

logger = logging.getLogger(__name__)

AGENT_RETRY_INITIAL_S = 1.0
AGENT_RETRY_MAX_S = 30.0
METADATA_TIMEOUT_S = 30.0
STATE_TABLE = "user-state"
POST_INDEX_TABLE = "post-index"


def create_app(settings: Settings) -> faust.App:
    """Build the worker's Faust app from validated settings."""
    faust_acks.install()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        broker_credentials=faust_broker_credentials(settings),
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        web_enabled=False,
        datadir=settings.data_dir,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        consumer_auto_offset_reset="earliest",
        processing_guarantee=settings.processing_guarantee,
        table_cleanup_interval=timedelta(minutes=1).total_seconds(),
    )
    app.sensors.add(ProducerErrorSensor())
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    ingest_channel = app.topic(*settings.input_topics, settings.topic_audience, **raw)
    audience_topic = app.topic(settings.topic_audience, **raw)
    regenerate_topic = app.topic(settings.topic_regenerate, **raw)
    post_index_topic = app.topic(settings.topic_post_index, **raw)
    dead_letter_topic = app.topic(settings.topic_dead_letter, **raw)
    profile_topic = app.topic(settings.topic_profiles, **raw)
    # Keys are the raw user id bytes and the producer's partitioner places each changelog
    # record, so a user's state lands in the partition of the user's input records even
    # when one batch spans several partitions.
    # Faust derives the changelog serializers from these types (bytes: raw; no value type:
    # json), for writes and for the reads of table recovery alike. A Schema argument would
    # change the writes only, and recovery would then fail to decode the keys.
    keyed_by_bytes = {"key_type": bytes, "use_partitioner": True, "partitions": settings.partitions}
    table = app.Table(STATE_TABLE, default=None, **keyed_by_bytes)
    post_index_table = app.Table(POST_INDEX_TABLE, default=None, **keyed_by_bytes)

    emitter = _FaustEmitter(audience_topic, regenerate_topic, dead_letter_topic, post_index_topic)
    ingest = IngestStage(settings, _StrKeyedTable(table), emitter)
    post_index = PostIndexStage(_StrKeyedTable(post_index_table), emitter, retention_s=settings.post_index_retention_s)
    resources = _Resources(settings, profile_topic)

    changelogs = [table.changelog_topic.get_topic_name(), post_index_table.changelog_topic.get_topic_name()]

    async def changelog_metadata() -> None:
        await _load_producer_metadata(app, changelogs)

    @app.agent(ingest_channel, name="ingest")
    async def ingest_agent(stream: faust.StreamT) -> None:
        await changelog_metadata()
        async for events in stream.take_events(settings.ingest_batch_max, within=settings.ingest_batch_within_s):
            await _handle_until_done("ingest", ingest.handle_batch, [_record(event) for event in events],
                                     on_error=changelog_metadata)

    @app.agent(post_index_topic, name="post-index")
    async def post_index_agent(stream: faust.StreamT) -> None:
        await changelog_metadata()
        async for events in stream.take_events(settings.ingest_batch_max, within=settings.ingest_batch_within_s):
            await _handle_until_done("post-index", post_index.handle_batch, [_record(event) for event in events],
                                     on_error=changelog_metadata)

    # One actor, so a batch contains every pending request and coalescing covers them all.
    # The stage itself generates up to PROFILESTREAM_GENERATION_CONCURRENCY profiles at once.
    @app.agent(regenerate_topic, name="generate")
    async def generate_agent(stream: faust.StreamT) -> None:
        stage = await resources.stage()
        async for events in stream.take_events(settings.ingest_batch_max, within=settings.ingest_batch_within_s):
            await _handle_until_done("generate", stage.handle_batch, [_record(event) for event in events])

    @app.timer(interval=5.0)
    async def report_budgets() -> None:
        refresh_budget_gauges()

    @app.timer(interval=5.0)
    async def reissue_overdue_seeks() -> None:
        await faust_acks.reissue_overdue_seeks(app.consumer)

    @app.timer(interval=10.0)
    async def report_state_size() -> None:
        metrics.STATE_USERS.set(len(table))
        metrics.STATE_BYTES.set(estimate_json_bytes(table))

    @app.on_before_shutdown.connect
    async def close_resources(app: faust.App, **kwargs: object) -> None:
        await resources.close()

    return app


class _StrKeyedTable(MutableMapping[str, dict]):
    """A table seen with str keys; the table itself keys by the UTF-8 bytes."""

    def __init__(self, table: faust.Table) -> None:
        self._table = table

    def __getitem__(self, key: str) -> dict:
        value = self._table.get(key.encode())
        if value is None:
            raise KeyError(key)
        # A copy, so a batch that fails halfway leaves the table as it was and can run again.
        return orjson.loads(orjson.dumps(value))

    def __setitem__(self, key: str, value: dict) -> None:
        self._table[key.encode()] = value

    def __delitem__(self, key: str) -> None:
        del self._table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self._table)

    def __len__(self) -> int:
        return len(self._table)


class _FaustEmitter:
    def __init__(self, audience: faust.TopicT, regenerate: faust.TopicT, dead_letter: faust.TopicT,
                 post_index: faust.TopicT) -> None:
        self._audience = audience
        self._regenerate = regenerate
        self._dead_letter = dead_letter
        self._post_index = post_index

    async def dead_letter(self, record: Record, error: InvalidRecord) -> None:
        headers = dead_letter_headers(record, error.reason, error.detail)
        await self._dead_letter.send(key=record.key, value=record.value, headers=headers)

    async def audience(self, user_id: str, message: dict) -> None:
        await self._audience.send(key=user_id.encode(), value=orjson.dumps(message))

    async def regenerate(self, user_id: str, request: dict) -> None:
        await self._regenerate.send(key=user_id.encode(), value=orjson.dumps(request))

    async def post_index(self, post_id: str, message: dict) -> None:
        await self._post_index.send(key=post_id.encode(), value=orjson.dumps(message))


class _Resources:
    """Connections the generation stage needs, opened once inside Faust's event loop."""

    def __init__(self, settings: Settings, profile_topic: faust.TopicT) -> None:
        self._settings = settings
        self._profile_topic = profile_topic
        self._lock = asyncio.Lock()
        self._stage: GenerationStage | None = None
        self._closers: list = []

    async def stage(self) -> GenerationStage:
        async with self._lock:
            if self._stage is None:
                self._stage = await self._open()
        return self._stage

    async def _open(self) -> GenerationStage:
        settings = self._settings
        llm = None
        circuit = None
        if settings.llm_base_url:
            llm = LLMGenerator(
                base_url=settings.llm_base_url,
                api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unused",
                model=settings.llm_model or "",
                language=settings.profile_language,
                timeout_s=settings.llm_timeout_s,
                max_retries=settings.llm_max_retries,
                budget=Budget(
                    requests_per_minute=settings.llm_requests_per_minute,
                    tokens_per_minute=settings.llm_tokens_per_minute,
                    tokens_per_day=settings.llm_tokens_per_day,
                ),
                prompt_price_per_1k_usd=settings.llm_prompt_price_per_1k_usd,
                completion_price_per_1k_usd=settings.llm_completion_price_per_1k_usd,
            )
            circuit = CircuitBreaker(
                failure_threshold=settings.llm_circuit_failure_threshold,
                cooldown_s=settings.llm_circuit_cooldown_s,
                max_cooldown_s=settings.llm_circuit_max_cooldown_s,
            )
        generator = ProfileGenerator(language=settings.profile_language, llm=llm, circuit=circuit,
                                     max_concurrent_calls=settings.llm_max_concurrent_calls)
        self._closers.append(generator.close)
        # The topic first, Postgres last: a version stored in Postgres has reached the topic,
        # so the generation stage can skip requests whose version Postgres already holds.
        sinks: list = [TopicSink(self._send_profile)]
        if settings.postgres_dsn is not None:
            postgres = PostgresSink(
                settings.postgres_dsn.get_secret_value(),
                pool_max=settings.postgres_pool_max,
                acquire_timeout_s=settings.postgres_acquire_timeout_s,
                ssl=postgres_ssl(settings),
            )
            # Postgres can go away again after the start-up migration. The generate agent then waits here while ingest runs on.
            await retry_until_available(postgres.start, action="open_sink_pool", target=postgres.target)
            self._closers.append(postgres.close)
            sinks.append(postgres)
        logger.info("generation.ready generator=%s sinks=%s", "llm" if llm else "rules", ",".join(sink.name for sink in sinks))
        return GenerationStage(generator, sinks, GenerationRateLimit(settings.generation_budget_per_minute),
                               concurrency=settings.generation_concurrency)

    async def _send_profile(self, key: bytes, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        pending = await self._profile_topic.send(key=key, value=value, headers=headers)
        await pending

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()
        self._closers.clear()


async def _load_producer_metadata(app: faust.App, topics: list[str]) -> None:
    """Make the producer load the partitions of `topics`.

    A table write picks its changelog partition from the producer's metadata without waiting
    for it (Faust's `key_partition`). Faust creates the changelog topics after the producer
    started, so without this the first writes can fail with a TypeError in the partitioner.
    """
    producer = app.producer._ensure_producer()
    for topic in topics:
        try:
            await asyncio.wait_for(producer.client._wait_on_metadata(topic), METADATA_TIMEOUT_S)
        except (KafkaError, TimeoutError) as error:
            logger.warning("producer.metadata_missing topic=%s error=%r", topic, error)


async def _handle_until_done(agent: str, handler: Callable[[list[Record]], Awaitable[object]], records: list[Record],
                             on_error: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run `handler` on one batch until it succeeds, retrying unexpected errors with capped backoff.

    Bad records never get here as errors: the stages dead-letter them. An exception is a bug
    or an outage (for example a producer without metadata after a rebalance). Letting it
    escape would make Faust acknowledge the batch and restart the agent, so the batch would
    be committed without being processed. The stages are idempotent per record, so running
    the batch again is safe. While it fails, the partition stalls and the watchdog reports it.
    """
    delay_s = AGENT_RETRY_INITIAL_S
    attempt = 0
    while True:
        attempt += 1
        try:
            await handler(records)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.BATCH_RETRIES.labels(agent).inc()
            first = records[0] if records else None
            logger.exception("agent.batch_failed agent=%s attempt=%d records=%d first=%s retry_in_s=%.1f",
                             agent, attempt, len(records), first.position() if first else None, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, AGENT_RETRY_MAX_S)
            if on_error is not None:
                await on_error()


def _record(event: faust.EventT) -> Record:
    message = event.message
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
    )
