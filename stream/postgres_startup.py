"""Wait for Postgres when the worker starts: retry with capped backoff instead of exiting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mode import Service

from handlers.errors import ProfilestreamError
from handlers.sinks.postgres import describe_target, migrate

from .postgres_tls import postgres_ssl
from .settings import Settings

logger = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 10.0
RETRY_LOG_INTERVAL_S = 30.0  # at most one postgres.unavailable line per action in this interval

T = TypeVar("T")


async def retry_until_available(
    operation: Callable[[], Awaitable[T]],
    *,
    action: str,
    target: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Await `operation()` until it succeeds, retrying a retriable ProfilestreamError with capped exponential backoff.

    The delay starts at RETRY_INITIAL_S and doubles up to RETRY_MAX_S. The first failure is
    logged, then at most one failure per RETRY_LOG_INTERVAL_S with the count of the skipped
    ones. A non-retriable error is raised at once.
    """
    delay_s = RETRY_INITIAL_S
    attempt = 0
    started = clock()
    logged_at: float | None = None
    not_logged = 0
    while True:
        attempt += 1
        try:
            result = await operation()
        except ProfilestreamError as error:
            if not error.retriable:
                raise
            now = clock()
            if logged_at is None or now - logged_at >= RETRY_LOG_INTERVAL_S:
                logger.warning(
                    "postgres.unavailable action=%s target=%s attempt=%s waited_s=%.1f retry_in_s=%.1f"
                    " retries_not_logged=%s error=%s",
                    action, target, attempt, now - started, delay_s, not_logged, error,
                )
                logged_at = now
                not_logged = 0
            else:
                not_logged += 1
            await sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)
            continue
        if attempt > 1:
            logger.info("postgres.available action=%s target=%s attempts=%s waited_s=%.1f",
                        action, target, attempt, clock() - started)
        return result


class PostgresMigration(Service):
    """Apply the Postgres migrations as the worker starts, waiting for the server as long as it takes.

    Listed among the worker's services before the Faust app, so the app starts consuming only
    after the schema is in place. Meanwhile the HTTP server, started earlier, responds to
    /readyz with 503 because no partition is assigned yet.
    """

    def __init__(self, settings: Settings, **kwargs) -> None:
        super().__init__(**kwargs)
        if settings.postgres_dsn is None:
            raise ValueError("PostgresMigration needs settings.postgres_dsn")
        self._dsn = settings.postgres_dsn.get_secret_value()
        self._ssl = postgres_ssl(settings)

    async def on_start(self) -> None:
        await retry_until_available(lambda: migrate(self._dsn, ssl=self._ssl), action="migrate",
                                    target=describe_target(self._dsn))
