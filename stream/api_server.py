"""`profilestream api`: the read API on its own, with /healthz and /metrics, and no Kafka or worker.

It only reads, so it can point at a Postgres read replica. It never migrates the schema, and
it exits with a ConfigError when the profile tables are missing.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from handlers.errors import ConfigError
from handlers.sinks.postgres import PostgresSink

from . import read_api
from .http_server import healthz, metrics
from .settings import Settings

logger = logging.getLogger(__name__)

PROFILE_TABLES = ("profiles_current", "profiles_history")


def build_application(store: read_api.ProfileStore) -> web.Application:
    """Build the standalone server's application: /healthz, /metrics and the read API."""
    application = web.Application()
    application.router.add_get("/healthz", healthz)
    application.router.add_get("/metrics", metrics)
    read_api.add_routes(application, store)
    return application


async def check_tables(store: PostgresSink) -> None:
    """Raise ConfigError when the database lacks a profile table, naming the fix."""
    async with store.acquire() as connection:
        for table in PROFILE_TABLES:
            if await connection.fetchval("SELECT to_regclass($1)::text", table) is None:
                raise ConfigError(
                    f"Postgres at {store.target} has no table {table}; run `profilestream migrate` against it"
                    " (or against its primary), or point PROFILESTREAM_POSTGRES_DSN at the profilestream database"
                )


async def serve_api(settings: Settings, host: str, port: int) -> None:
    """Serve the read API on `host`:`port` until SIGTERM or SIGINT; port 0 picks a free port."""
    store = read_api.profile_store(settings)
    if store is None:
        raise ConfigError("PROFILESTREAM_POSTGRES_DSN is not set; set it to the Postgres connection string")
    await store.start()
    try:
        await check_tables(store)
        runner = web.AppRunner(build_application(store), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            port = runner.addresses[0][1]
            logger.info("api.serving address=http://%s:%s target=%s", host, port, store.target)
            await _wait_for_stop_signal()
        finally:
            await runner.cleanup()
            logger.info("api.stopped address=http://%s:%s", host, port)
    finally:
        await store.close()


async def _wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    try:
        await stop.wait()
    finally:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(number)
