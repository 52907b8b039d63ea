"""The worker's HTTP server: /healthz, /readyz and /metrics, plus the read API when Postgres is configured.

It runs as a mode service inside Faust's event loop rather than in a thread, so /healthz
responds only while that loop runs, and a blocked loop fails the liveness probe.
"""

from __future__ import annotations

import logging

from aiohttp import web
from mode import Service
from prometheus_client.exposition import choose_encoder

from handlers.errors import SinkUnavailable
from handlers.sinks.postgres import PostgresSink

from . import read_api
from .health import WorkerStatus, readiness
from .multiprocess_metrics import scrape_registry
from .postgres_startup import retry_until_available

logger = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(scrape_registry()), headers={"Content-Type": content_type})


class HttpServer(Service):
    """Serve /healthz, /readyz and /metrics on `host`:`port` (port 0 picks a free port).

    With a `profiles` sink it also serves the read API (stream.read_api), opening the sink's
    pool in the background after start and closing it on stop. Until the pool opens, the read
    API responds with 503, and an unreachable Postgres is retried with capped backoff.
    """

    def __init__(self, status: WorkerStatus, host: str, port: int, *, profiles: PostgresSink | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.status = status
        self.host = host
        self.port = port
        self.profiles = profiles
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        application = web.Application()
        application.router.add_get("/healthz", healthz)
        application.router.add_get("/readyz", self._readyz)
        application.router.add_get("/metrics", metrics)
        if self.profiles is not None:
            store = _StoreOnceOpen(self.profiles)
            read_api.add_routes(application, store)
            try:
                await self.profiles.start()
                store.opened = True
            except SinkUnavailable:
                # Retried in the background, so /healthz and /readyz respond while Postgres is unreachable.
                self.add_future(self._open_profiles(store))
        # Probes and scrapes every few seconds would flood the log with access lines.
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        endpoints = ",".join(sorted({route.resource.canonical for route in application.router.routes() if route.resource}))
        logger.info("http.serving address=http://%s:%s endpoints=%s", self.host, self.port, endpoints)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("http.stopped address=http://%s:%s", self.host, self.port)
        if self.profiles is not None:
            await self.profiles.close()

    async def _open_profiles(self, store: _StoreOnceOpen) -> None:
        assert self.profiles is not None
        await retry_until_available(self.profiles.start, action="open_read_pool", target=self.profiles.target)
        store.opened = True

    async def _readyz(self, request: web.Request) -> web.Response:
        verdict = readiness(self.status)
        return web.json_response(verdict.as_json(), status=200 if verdict.ready else 503)


class _StoreOnceOpen:
    """The read API's view of the profiles sink: every read raises SinkUnavailable (HTTP 503) until the pool is open."""

    def __init__(self, sink: PostgresSink) -> None:
        self._sink = sink
        self.opened = False

    async def fetch_current(self, user_id: str) -> dict | None:
        self._require_open()
        return await self._sink.fetch_current(user_id)

    async def fetch_history_page(self, user_id: str, *, limit: int, before_version: int | None = None) -> list[dict]:
        self._require_open()
        return await self._sink.fetch_history_page(user_id, limit=limit, before_version=before_version)

    def _require_open(self) -> None:
        if not self.opened:
            raise SinkUnavailable(f"the connection pool to Postgres at {self._sink.target} is not open yet; retry later")
