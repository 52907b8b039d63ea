"""Run the worker: prepare topics and tables, serve /metrics, then run the Faust app."""

from __future__ import annotations

import asyncio
import logging

import faust
from prometheus_client import start_http_server

from handlers.sinks.postgres import migrate

from .app import create_app
from .settings import Settings
from .topics import ensure_topics

logger = logging.getLogger(__name__)


async def prepare(settings: Settings) -> None:
    """Create missing topics and apply Postgres migrations; both are idempotent."""
    await ensure_topics(settings)
    if settings.postgres_dsn is not None:
        await migrate(settings.postgres_dsn.get_secret_value())


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or Ctrl+C; Faust commits offsets and stops the agents on the way out."""
    asyncio.run(prepare(settings))
    start_http_server(settings.http_port, addr=settings.http_host)
    logger.info("metrics.serving address=http://%s:%s/metrics", settings.http_host, settings.http_port)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
