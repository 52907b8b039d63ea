"""The worker's HTTP server: /healthz, /readyz and /metrics.

It runs as a mode service inside Faust's event loop rather than in a thread, so /healthz
responds only while that loop runs, and a blocked loop fails the liveness probe.
"""

from __future__ import annotations

import logging

from aiohttp import web
from mode import Service
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from .health import WorkerStatus, readiness

logger = logging.getLogger(__name__)


class HttpServer(Service):
    """Serve /healthz, /readyz and /metrics on `host`:`port` (port 0 picks a free port)."""

    def __init__(self, status: WorkerStatus, host: str, port: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.status = status
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        application = web.Application()
        application.router.add_get("/healthz", self._healthz)
        application.router.add_get("/readyz", self._readyz)
        application.router.add_get("/metrics", self._metrics)
        # Probes and scrapes every few seconds would flood the log with access lines.
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        logger.info("http.serving address=http://%s:%s endpoints=/healthz,/readyz,/metrics", self.host, self.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            logger.info("http.stopped address=http://%s:%s", self.host, self.port)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        verdict = readiness(self.status)
        return web.json_response(verdict.as_json(), status=200 if verdict.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(REGISTRY), headers={"Content-Type": content_type})
