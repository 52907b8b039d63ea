"""The generation stage: a regeneration request in, one profile version out to every sink."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Protocol

import orjson
from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from handlers import erasure
from handlers.errors import ProfilestreamError, ProfileTooLarge
from handlers.generation.telemetry import refresh_default_budget_gauges

from . import faults, metrics
from .records import Record

logger = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
RETRY_LOG_INTERVAL_S = 30.0  # at most one sink.write_failed line per sink in this interval


class Generator(Protocol):
    async def generate(self, request: dict) -> tuple[dict, str]: ...


class ProfileSinkLike(Protocol):
    name: str

    async def write(self, profiles: list[dict]) -> int: ...

    async def erase(self, user_id: str) -> None: ...


_rate_limits: weakref.WeakSet[GenerationRateLimit] = weakref.WeakSet()


def refresh_generation_budget_gauge() -> None:
    """Refresh the gauge of every live GenerationRateLimit, so an idle worker shows its refilled budget."""
    for rate_limit in list(_rate_limits):
        rate_limit.refresh_gauge()


def refresh_budget_gauges() -> None:
    """Refresh the LLM and generation budget gauges, whose windows refill with time alone.

    The worker calls this every 5 s, because the gauges otherwise change only at a generation.
    """
    refresh_default_budget_gauges()
    refresh_generation_budget_gauge()


class GenerationRateLimit:
    """A token bucket of `per_minute` generations; `acquire` waits for a token (0 = no limit)."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._tokens = float(per_minute)
        self._updated = clock()
        metrics.BUDGET_REMAINING.set(per_minute if per_minute > 0 else -1)
        _rate_limits.add(self)

    def wait_s(self) -> float:
        """Take a token if one is free and return 0, else return the seconds until one is."""
        if self._per_minute <= 0:
            return 0.0
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            metrics.BUDGET_REMAINING.set(int(self._tokens))
            return 0.0
        metrics.BUDGET_REMAINING.set(0)
        return (1.0 - self._tokens) * 60.0 / self._per_minute

    def refresh_gauge(self) -> None:
        """Add the tokens earned since the last call and set the remaining-budget gauge."""
        if self._per_minute > 0:
            self._refill()
            metrics.BUDGET_REMAINING.set(int(self._tokens))

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self._per_minute), self._tokens + (now - self._updated) * self._per_minute / 60.0)
        self._updated = now

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

    An erasure request (handlers.erasure) erases the user in every sink before the batch's
    generations run, and drops the user's regeneration requests in the batch that were built
    before the erasure, so no pending request brings the profile back after the tombstone.
    """

    def __init__(self, generator: Generator, sinks: list[ProfileSinkLike], budget: GenerationRateLimit | None = None,
                 concurrency: int = 1) -> None:
        self._generator = generator
        self._sinks = sinks
        self._budget = budget or GenerationRateLimit(0)
        self._slots = asyncio.Semaphore(concurrency)
        # Per sink name: when the last sink.write_failed line was logged, and the failures since then.
        self._retry_logged_at: dict[str, float] = {}
        self._retries_not_logged: dict[str, int] = {}

    async def handle(self, record: Record) -> dict | None:
        profiles = await self.handle_batch([record])
        return profiles[0] if profiles else None

    async def handle_batch(self, records: list[Record]) -> list[dict]:
        latest: dict[str, dict] = {}
        erasures: dict[str, dict] = {}
        for record in records:
            request = _parse_request(record)
            if request is None:
                continue
            if erasure.is_erase_request(request):
                self._add_erasure(request, erasures, latest)
                continue
            pending_erasure = erasures.get(request["user_id"])
            if pending_erasure is not None and erasure.predates_erasure(request, pending_erasure):
                metrics.GENERATIONS.labels("none", "erased").inc()
                continue
            previous = latest.get(request["user_id"])
            if previous is not None:
                metrics.COALESCED.inc()
                # For one version, the original request wins over one resent after a crash,
                # whose features were rebuilt from a later state.
                if _rank(previous) >= _rank(request):
                    continue
            latest[request["user_id"]] = request
        await asyncio.gather(*(self._erase(request) for request in erasures.values()))
        await self._skip_stored(latest)
        profiles = await asyncio.gather(*(self._generate(request) for request in latest.values()))
        return [profile for profile in profiles if profile is not None]

    async def _skip_stored(self, latest: dict[str, dict]) -> None:
        """Drop requests whose version a sink already stored: a batch processed again after a crash.

        Sinks are written in order and the one that reports stored versions (Postgres) is last,
        so a stored version has reached every sink before it.
        """
        sink = next((sink for sink in self._sinks if hasattr(sink, "stored_versions")), None)
        if sink is None or not latest:
            return
        try:
            stored = await sink.stored_versions(sorted(latest))
        except ProfilestreamError as error:
            # Generating again is safe (writes are idempotent), only slower.
            logger.warning("generation.stored_versions_unknown sink=%s error=%s", sink.name, error)
            return
        for user_id, version in stored.items():
            if latest[user_id]["version"] <= version:
                del latest[user_id]
                metrics.GENERATIONS.labels("none", "already_stored").inc()

    @staticmethod
    def _add_erasure(request: dict, erasures: dict[str, dict], latest: dict[str, dict]) -> None:
        user_id = request["user_id"]
        known = erasures.get(user_id)
        if known is None or request["deleted_at"] >= known["deleted_at"]:
            erasures[user_id] = request
        pending = latest.get(user_id)
        if pending is not None and erasure.predates_erasure(pending, erasures[user_id]):
            del latest[user_id]
            metrics.GENERATIONS.labels("none", "erased").inc()

    async def _erase(self, request: dict) -> None:
        user_id = request["user_id"]
        for sink in self._sinks:
            try:
                await self._erase_with_retry(sink, user_id)
            except ProfilestreamError as error:
                # Not retriable: the other sinks still erase, and the log line and metric tell an operator.
                metrics.ERASURES.labels(sink.name, "rejected").inc()
                logger.error("sink.erase_rejected sink=%s user_id=%s event_id=%s error=%s",
                             sink.name, user_id, request.get("event_id"), error)
                continue
            metrics.ERASURES.labels(sink.name, "ok").inc()
        logger.info("user.erased_in_sinks user_id=%s event_id=%s", user_id, request.get("event_id"))

    async def _erase_with_retry(self, sink: ProfileSinkLike, user_id: str) -> None:
        delay_s = RETRY_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await sink.erase(user_id)
            except ProfilestreamError as error:
                if not error.retriable:
                    raise
                metrics.ERASURES.labels(sink.name, "retry").inc()
                logger.warning("sink.erase_failed sink=%s user_id=%s attempt=%s retry_in_s=%.1f error=%s",
                               sink.name, user_id, attempt, delay_s, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            return

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
            faults.crash_point("after_postgres_write", user_id=request["user_id"], version=request["version"])
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
            except (MessageSizeTooLargeError, ProducerSendError) as error:
                if not _caused_by_record_size(error):
                    raise
                raise ProfileTooLarge(
                    f"the Kafka producer rejected version {profile['version']} of user {profile['user_id']!r}"
                    f" as larger than its max_request_size: {error}; set the producer's max_request_size"
                    " (Faust reads PRODUCER_MAX_REQUEST_SIZE) to at least the topic sink's max_record_bytes"
                ) from error
            except ProfilestreamError as error:
                if not error.retriable:
                    raise
                metrics.SINK_WRITES.labels(sink.name, "retry").inc()
                self._log_retry(sink.name, profile, attempt, delay_s, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)
                continue
            metrics.SINK_SECONDS.labels(sink.name).observe(time.perf_counter() - started)
            metrics.SINK_WRITES.labels(sink.name, "ok").inc()
            if self._retry_logged_at.pop(sink.name, None) is not None:
                logger.info("sink.write_recovered sink=%s user_id=%s version=%s attempts=%s retries_not_logged=%s",
                            sink.name, profile["user_id"], profile["version"], attempt,
                            self._retries_not_logged.pop(sink.name, 0))
            return

    def _log_retry(self, sink_name: str, profile: dict, attempt: int, delay_s: float, error: Exception) -> None:
        """Log a failed write at most once per RETRY_LOG_INTERVAL_S and sink, with the count of failures skipped since."""
        now = time.monotonic()
        logged_at = self._retry_logged_at.get(sink_name)
        if logged_at is not None and now - logged_at < RETRY_LOG_INTERVAL_S:
            self._retries_not_logged[sink_name] = self._retries_not_logged.get(sink_name, 0) + 1
            return
        self._retry_logged_at[sink_name] = now
        logger.warning(
            "sink.write_failed sink=%s user_id=%s version=%s attempt=%s retry_in_s=%.1f retries_not_logged=%s error=%s",
            sink_name, profile["user_id"], profile["version"], attempt, delay_s,
            self._retries_not_logged.pop(sink_name, 0), error,
        )


def _caused_by_record_size(error: BaseException | None) -> bool:
    """Return whether `error` or one of its causes is the producer's record size check."""
    while error is not None:
        if isinstance(error, MessageSizeTooLargeError):
            return True
        error = error.__cause__
    return False


def _rank(request: dict) -> tuple[int, bool]:
    return request["version"], not request.get("replayed", False)


def _parse_request(record: Record) -> dict | None:
    try:
        request = orjson.loads(record.value or b"")
        if not isinstance(request, dict):
            raise TypeError(f"request is JSON {type(request).__name__}, expected an object")
        if erasure.is_erase_request(request):
            if not isinstance(request["user_id"], str) or not isinstance(request["deleted_at"], (int, float)):
                raise TypeError("an erasure request needs a string user_id and a numeric deleted_at")
        elif not isinstance(request["user_id"], str) or not isinstance(request["version"], int):
            raise TypeError("user_id must be a string and version an integer")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        logger.error("regeneration.invalid position=%s error=%r", record.position(), exc)
        metrics.GENERATIONS.labels("none", "invalid_request").inc()
        return None
    return request
