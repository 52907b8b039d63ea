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


class GenerationStage:
    """Generate the requested profile version and write it to every sink.

    A sink failure that may pass (`retriable`) is retried with capped exponential backoff
    until it succeeds, so a Postgres or broker outage delays profiles but loses none.
    """

    def __init__(self, generator: Generator, sinks: list[ProfileSinkLike]) -> None:
        self._generator = generator
        self._sinks = sinks

    async def handle(self, record: Record) -> dict | None:
        try:
            request = orjson.loads(record.value or b"")
            user_id, version = request["user_id"], request["version"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            logger.error("regeneration.invalid position=%s error=%r", record.position(), exc)
            metrics.GENERATIONS.labels("none", "invalid_request").inc()
            return None
        started = time.perf_counter()
        profile, outcome = await self._generator.generate(request)
        metrics.GENERATION_SECONDS.observe(time.perf_counter() - started)
        metrics.GENERATIONS.labels("rules" if profile["generator"] == "rules" else "llm", outcome).inc()
        for sink in self._sinks:
            await self._write_with_retry(sink, profile)
        logger.debug("profile.written user_id=%s version=%s generator=%s", user_id, version, profile["generator"])
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
