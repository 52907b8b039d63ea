"""Run the worker: prepare topics and tables, serve health, metrics and the read API over HTTP, then run the Faust app."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

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
from .shutdown import ShutdownDeadline, log_summary
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
    responding 503 instead of exiting. A stop that takes longer than PROFILESTREAM_SHUTDOWN_TIMEOUT_S
    ends the process (stream.shutdown). Either way the worker logs one `worker.stopped` line
    with the run's counts.
    """
    started = time.monotonic()
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
    deadline = ShutdownDeadline(settings.shutdown_timeout_s, started)
    worker = _Worker(app, *services, deadline=deadline, loop=loop, loglevel=settings.log_level, quiet=True,
                     redirect_stdouts=False, logging_config=logging_config(log_options))
    # With a spinner and a level of WARNING or above, Faust would set the root logger to DEBUG.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    finally:
        deadline.cancel()
        log_summary(started)


class _Worker(faust.Worker):
    """Faust's worker with a deadline on its stop, armed by SIGTERM, SIGINT or any other way out."""

    def __init__(self, *services, deadline: ShutdownDeadline, **kwargs) -> None:
        super().__init__(*services, **kwargs)
        self._deadline = deadline

    def _schedule_shutdown(self, received: signal.Signals) -> None:
        # mode-streaming 0.7 calls this for SIGTERM and SIGINT.
        self._deadline.arm(received.name)
        super()._schedule_shutdown(received)

    def on_worker_shutdown(self) -> None:
        # Called on every way out of execute_from_commandline, a crash included.
        self._deadline.arm("exit")
        super().on_worker_shutdown()
