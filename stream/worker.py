"""Run the worker: prepare topics and tables, serve health, metrics and the read API over HTTP, then run the Faust app."""

from __future__ import annotations

import asyncio
import logging

import faust

from handlers.sinks.postgres import migrate

from .app import create_app
from .health import WorkerStatus
from .http_server import HttpServer
from .kafka_metrics import ConsumerMonitor, RebalanceTracker
from .logs import LogOptions, configure_logging, logging_config
from .multiprocess_metrics import mark_dead_at_exit
from .postgres_startup import PostgresMigration
from .postgres_tls import postgres_ssl
from .progress import consumed_topics
from .read_api import profile_store
from .settings import Settings
from .topics import ensure_topics
from .watchdog import Watchdog

logger = logging.getLogger(__name__)


async def prepare(settings: Settings) -> None:
    """Create missing topics and apply Postgres migrations; both are idempotent."""
    await ensure_topics(settings)
    if settings.postgres_dsn is not None:
        await migrate(settings.postgres_dsn.get_secret_value(), ssl=postgres_ssl(settings))


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM or Ctrl+C; Faust commits offsets and stops the agents on the way out.

    The HTTP server and the consumer monitor are mode services of the Faust worker, so they
    run in Faust's event loop, start before the app and stop after it. The Postgres migration
    runs as one of them too, so the worker waits for an unreachable Postgres with /readyz
    answering 503 instead of exiting.
    """
    log_options = LogOptions.from_settings(settings)
    configure_logging(log_options)
    mark_dead_at_exit()
    asyncio.run(ensure_topics(settings))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings)
    status = WorkerStatus()
    RebalanceTracker(status, consumed_topics(settings)).connect(app)
    services = [HttpServer(status, settings.http_host, settings.http_port, profiles=profile_store(settings), loop=loop)]
    if settings.postgres_dsn is not None:
        services.append(PostgresMigration(settings, loop=loop))
    services.append(ConsumerMonitor(settings, status, Watchdog(settings.watchdog_stall_s), loop=loop))
    # mode's Worker clears the root handlers and applies `logging_config` when it starts.
    worker = faust.Worker(app, *services, loop=loop, loglevel=settings.log_level, quiet=True, redirect_stdouts=False,
                          logging_config=logging_config(log_options))
    # With a spinner and a level of WARNING or above, Faust would set the root logger to DEBUG.
    worker.spinner = None
    worker.execute_from_commandline()
