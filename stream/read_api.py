"""The read API: users' stored profiles over HTTP, from Postgres.

Two servers mount these routes: the worker's HTTP server when Postgres is configured, and
`profilestream api` (stream.api_server), which needs no Kafka and suits read replicas.
Errors are JSON objects `{"error": code, "message": text}`. Metric labels carry the route
template, never the user id.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import unquote

import orjson
from aiohttp import web
from multidict import MultiMapping

from handlers.errors import SinkUnavailable
from handlers.sinks.postgres import PostgresSink

from . import metrics
from .openapi import (
    CURRENT_PROFILE_PATH,
    DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
    MAX_USER_ID_CHARS,
    MAX_VERSION,
    OPENAPI_PATH,
    PROFILE_HISTORY_PATH,
    openapi_document,
)
from .postgres_tls import postgres_ssl
from .settings import Settings

logger = logging.getLogger(__name__)

OPENAPI_DOCUMENT = web.AppKey("openapi_document", bytes)
# Only ASCII digits match, because int() would also accept signs, spaces, underscores and non-ASCII digits.
_DECIMAL = re.compile(r"[0-9]{1,20}")
_SHOWN_VALUE_CHARS = 40

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProfileStore(Protocol):
    """The reads the API needs; PostgresSink provides them."""

    async def fetch_current(self, user_id: str) -> dict | None: ...

    async def fetch_history_page(self, user_id: str, *, limit: int, before_version: int | None = None) -> list[dict]: ...


def profile_store(settings: Settings) -> PostgresSink | None:
    """Create an unstarted PostgresSink for reads from the settings, or None when no DSN is set."""
    if settings.postgres_dsn is None:
        return None
    return PostgresSink(
        settings.postgres_dsn.get_secret_value(),
        pool_max=settings.postgres_pool_max,
        acquire_timeout_s=settings.postgres_acquire_timeout_s,
        ssl=postgres_ssl(settings),
    )


def add_routes(application: web.Application, store: ProfileStore) -> None:
    """Add the profile routes and /openapi.json to `application`.

    The document is built when the application starts, so it lists every route added
    before then, this module's and the caller's.
    """
    routes = _Routes(store)
    application.router.add_get(CURRENT_PROFILE_PATH, _instrumented(CURRENT_PROFILE_PATH, routes.current), allow_head=False)
    application.router.add_get(PROFILE_HISTORY_PATH, _instrumented(PROFILE_HISTORY_PATH, routes.history), allow_head=False)
    application.router.add_get(OPENAPI_PATH, _instrumented(OPENAPI_PATH, _openapi), allow_head=False)
    application.on_startup.append(_build_openapi_document)


class _Routes:
    def __init__(self, store: ProfileStore) -> None:
        self._store = store

    async def current(self, request: web.Request) -> web.Response:
        user_id = user_id_of(request)
        _reject_unknown_parameters(request.query, allowed=())
        try:
            profile = await self._store.fetch_current(user_id)
        except SinkUnavailable as error:
            raise _store_unavailable(CURRENT_PROFILE_PATH, error) from error
        if profile is None:
            raise _error(web.HTTPNotFound, "not_found", f"no profile is stored for user {user_id!r}")
        return _json_body(profile)

    async def history(self, request: web.Request) -> web.Response:
        user_id = user_id_of(request)
        _reject_unknown_parameters(request.query, allowed=("limit", "before_version"))
        limit = _integer_parameter(request.query, "limit", MAX_HISTORY_LIMIT, default=DEFAULT_HISTORY_LIMIT)
        before_version = _integer_parameter(request.query, "before_version", MAX_VERSION)
        try:
            # A row beyond the page means that another page follows.
            rows = await self._store.fetch_history_page(user_id, limit=limit + 1, before_version=before_version)
        except SinkUnavailable as error:
            raise _store_unavailable(PROFILE_HISTORY_PATH, error) from error
        page = rows[:limit]
        next_before_version = page[-1]["version"] if len(rows) > limit else None
        return _json_body({"user_id": user_id, "profiles": page, "next_before_version": next_before_version})


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_DOCUMENT], content_type="application/json")


async def _build_openapi_document(application: web.Application) -> None:
    application[OPENAPI_DOCUMENT] = orjson.dumps(openapi_document(application.router))


def user_id_of(request: web.Request) -> str:
    """Return the percent-decoded user id of a /users/{user_id}/... request, or raise HTTPBadRequest.

    aiohttp leaves an invalid UTF-8 escape such as `%FF` undecoded in `match_info`, which would
    make `%FF` and `%25FF` the same user, so the raw path segment is decoded strictly here.
    U+0000 is removed because the Postgres sink removes it from stored user ids.
    """
    raw_parts = request.rel_url.raw_parts
    if len(raw_parts) == 4 and raw_parts[1] == "users":
        try:
            decoded = unquote(raw_parts[2], errors="strict")
        except UnicodeDecodeError:
            raise _error(web.HTTPBadRequest, "bad_request",
                         f"user id {_shown(raw_parts[2])!r} is not valid UTF-8 after percent-decoding;"
                         " percent-encode the UTF-8 bytes of the id") from None
    else:
        decoded = request.match_info["user_id"]
    user_id = decoded.replace("\x00", "")
    if not user_id:
        raise _error(web.HTTPBadRequest, "bad_request", "user id is empty after removing U+0000 characters")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise _error(web.HTTPBadRequest, "bad_request",
                     f"user id {_shown(user_id)!r} is {len(user_id)} characters long;"
                     f" user ids have 1 to {MAX_USER_ID_CHARS} characters")
    return user_id


def _reject_unknown_parameters(query: MultiMapping[str], *, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        expected = ", ".join(allowed) if allowed else "none"
        raise _error(web.HTTPBadRequest, "bad_request",
                     f"unknown query parameter {_shown(unknown[0])!r}; this route accepts: {expected}")


def _integer_parameter(query: MultiMapping[str], name: str, maximum: int, *, default: int | None = None) -> int | None:
    """Return the query parameter `name` as an integer from 1 to `maximum`, `default` when absent, or raise HTTPBadRequest."""
    values = query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise _error(web.HTTPBadRequest, "bad_request", f"{name} is given {len(values)} times; give it at most once")
    raw = values[0]
    if _DECIMAL.fullmatch(raw) is None or not 1 <= int(raw) <= maximum:
        raise _error(web.HTTPBadRequest, "bad_request",
                     f"{name} is {_shown(raw)!r}; expected an integer from 1 to {maximum}")
    return int(raw)


def _shown(value: str) -> str:
    """Shorten a client-supplied value for an error message."""
    return value if len(value) <= _SHOWN_VALUE_CHARS else value[:_SHOWN_VALUE_CHARS] + "..."


def _json_body(document: object) -> web.Response:
    return web.Response(body=orjson.dumps(document), content_type="application/json")


def _error(kind: type[web.HTTPError], code: str, message: str) -> web.HTTPError:
    return kind(body=orjson.dumps({"error": code, "message": message}), content_type="application/json")


def _store_unavailable(route: str, error: SinkUnavailable) -> web.HTTPError:
    # The sink's message names the database host, which clients need not see.
    logger.warning("read_api.store_unavailable route=%s error=%s", route, error)
    return _error(web.HTTPServiceUnavailable, "store_unavailable",
                  "the profile store (Postgres) is unavailable or timed out; retry later")


def _instrumented(route: str, handler: Handler) -> Handler:
    """Wrap `handler` to count requests by status and time them, labelled with the route template only."""

    async def instrumented(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            metrics.READ_REQUESTS.labels(route, str(status)).inc()
            metrics.READ_SECONDS.labels(route).observe(time.perf_counter() - started)

    return instrumented
