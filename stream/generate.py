"""The generation stage: a regeneration request in, one profile version out to every sink."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import orjson

from handlers.errors import ProfilestreamError

from . import metrics
from .records import Record

logger = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


class Generator(Protocol):
    async def generate(self, request: dict) -> tuple[dict, str]: ...


class ProfileSinkLike(Protocol):
    name: str

    async def write(self, profiles: list[dict]) -> int: ...


class GenerationRateLimit:
    """A token bucket of `per_minute` generations; `acquire` waits for a token (0 = no limit)."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._tokens = float(per_minute)
        self._updated = clock()

    def wait_s(self) -> float:
        """Take a token if one is free and return 0, else return the seconds until one is."""
        if self._per_minute <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self._per_minute), self._tokens + (now - self._updated) * self._per_minute / 60.0)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * 60.0 / self._per_minute

    async def acquire(self) -> None:
        while (delay_s := self.wait_s()) > 0:
            metrics.BUDGET_WAITS.inc()
            await asyncio.sleep(delay_s)


class GenerationStage:
    """Generate the requested profile versions and write each to every sink.

    Requests for one user in the same batch are coalesced: only the highest version is
    generated, so a burst of triggers costs one generation. A global budget caps generations
    per minute. A sink failure that may pass (`retriable`) is retried with capped exponential
    backoff until it succeeds, so a Postgres or broker outage delays profiles but loses none.
    """

    def __init__(self, generator: Generator, sinks: list[ProfileSinkLike], budget: GenerationRateLimit | None = None,
                 concurrency: int = 1) -> None:
        self._generator = generator
        self._sinks = sinks
        self._budget = budget or GenerationRateLimit(0)
        self._slots = asyncio.Semaphore(concurrency)

    async def handle(self, record: Record) -> dict | None:
        profiles = await self.handle_batch([record])
        return profiles[0] if profiles else None

    async def handle_batch(self, records: list[Record]) -> list[dict]:
        latest: dict[str, dict] = {}
        for record in records:
            request = _parse_request(record)
            if request is None:
                continue
            previous = latest.get(request["user_id"])
            if previous is not None:
                metrics.COALESCED.inc()
                if previous["version"] > request["version"]:
                    continue
            latest[request["user_id"]] = request
        profiles = await asyncio.gather(*(self._generate(request) for request in latest.values()))
        return [profile for profile in profiles if profile is not None]

    async def _generate(self, request: dict) -> dict | None:
        async with self._slots:
            await self._budget.acquire()
            started = time.perf_counter()
            profile, outcome = await self._generator.generate(request)
            metrics.GENERATION_SECONDS.observe(time.perf_counter() - started)
            metrics.GENERATIONS.labels("rules" if profile["generator"] == "rules" else "llm", outcome).inc()
            for sink in self._sinks:
                try:
                    await self._write_with_retry(sink, profile)
                except ProfilestreamError as error:
                    # Not retriable: retrying cannot help, and raising would crash the agent.
                    metrics.SINK_WRITES.labels(sink.name, "rejected").inc()
                    logger.error("sink.write_rejected sink=%s user_id=%s version=%s error=%s",
                                 sink.name, request["user_id"], request["version"], error)
                    return None
            logger.debug("profile.written user_id=%s version=%s generator=%s", request["user_id"], request["version"], profile["generator"])
            return profile

    async def _write_with_retry(self, sink: ProfileSinkLike, profile: dict) -> None:
        delay_s = RETRY_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await sink.write([profile])
            except ProfilestreamError as error:
                if not error.retriable:
                    raise
                metrics.SINK_WRITES.labels(sink.name, "retry").inc()
                logger.warning(
                    "sink.write_failed sink=%s user_id=%s version=%s attempt=%s retry_in_s=%.1f error=%s",
                    sink.name, profile["user_id"], profile["version"], attempt, delay_s, error,
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            metrics.SINK_SECONDS.labels(sink.name).observe(time.perf_counter() - started)
            metrics.SINK_WRITES.labels(sink.name, "ok").inc()
            return


def _parse_request(record: Record) -> dict | None:
    try:
        request = orjson.loads(record.value or b"")
        if not isinstance(request["user_id"], str) or not isinstance(request["version"], int):
            raise TypeError("user_id must be a string and version an integer")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        logger.error("regeneration.invalid position=%s error=%r", record.position(), exc)
        metrics.GENERATIONS.labels("none", "invalid_request").inc()
        return None
    return request
