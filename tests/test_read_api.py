"""The read API and its OpenAPI document, against a real Postgres: the standalone app, the worker's HTTP server and `profilestream api`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from prometheus_client import REGISTRY
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from yarl import URL

import schemas
from handlers.sinks.postgres import PostgresSink
from stream.api_server import build_application
from stream.health import WorkerStatus
from stream.http_server import HttpServer
from stream.openapi import MAX_VERSION, OPERATIONS, openapi_document
from stream.services.ports import free_port
from stream.settings import ENV_PREFIX
from tests.conftest import with_database
from tests.test_postgres_sink import make_profile
from tests.worker_harness import WorkerProcess, isolated_settings

REPO = Path(__file__).parent.parent
READ_ROUTES = {"/users/{user_id}/profile", "/users/{user_id}/profiles", "/openapi.json"}
STARTUP_TIMEOUT_S = 60
MANY_VERSIONS = 25
# Free-text ids that need percent-encoding, or that clients would otherwise treat as dot segments.
TRICKY_USER_IDS = ["se:55", "a/b", "a b", "?x#y", "%", "%2F", "+", ".", "..", "été", "\u2028", "用户", "é" * 249]


def user_path(user_id: str, suffix: str = "profile") -> URL:
    """Return the encoded URL path of a user route, with dots encoded so that clients keep "." and ".." ids."""
    return URL(f"/users/{quote(user_id, safe='').replace('.', '%2E')}/{suffix}", encoded=True)


async def write_versions(store: PostgresSink, user_id: str, count: int) -> None:
    await store.write([make_profile(user_id, version, posts_total=version) for version in range(1, count + 1)])


@pytest.fixture
async def store(fresh_database: str) -> AsyncIterator[PostgresSink]:
    async with PostgresSink(fresh_database, pool_max=2) as opened:
        yield opened


@pytest.fixture
async def client(store: PostgresSink) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_application(store), host="127.0.0.1", port=0)) as opened:
        yield opened


async def get_json(client: TestClient, path: str | URL) -> tuple[int, dict]:
    response = await client.get(path)
    assert response.content_type == "application/json", await response.text()
    return response.status, await response.json()


def assert_bad_request(status: int, body: dict, *fragments: str) -> None:
    assert status == 400, body
    assert body["error"] == "bad_request"
    for fragment in fragments:
        assert fragment in body["message"]


def openapi_validator(document: dict, schema_name: str) -> Draft202012Validator:
    """Return a validator of one component schema of `document`, with its `$ref`s resolved inside the document."""
    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(document))
    return Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{schema_name}"}, registry=registry,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def served_operations(router: web.UrlDispatcher) -> set[tuple[str, str]]:
    return {(route.method.lower(), route.resource.canonical) for route in router.routes() if route.method != "HEAD"}


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


# Current profile


async def test_current_profile_body(client, store):
    await write_versions(store, "se:55", 3)
    response = await client.get(user_path("se:55"))
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == make_profile("se:55", 3, posts_total=3)


async def test_current_profile_unknown_user(client):
    status, body = await get_json(client, user_path("nobody"))
    assert status == 404
    assert body["error"] == "not_found"
    assert "'nobody'" in body["message"]


async def test_current_profile_tricky_ids(client, store):
    for user_id in TRICKY_USER_IDS:
        await store.write([make_profile(user_id, 1)])
    for user_id in TRICKY_USER_IDS:
        status, body = await get_json(client, user_path(user_id))
        assert (status, body.get("user_id")) == (200, user_id), body


async def test_current_profile_nul_removed(client, store):
    await store.write([make_profile("nul\x00user", 1)])
    status, body = await get_json(client, user_path("nul\x00user"))
    assert status == 200
    assert body["user_id"] == "nuluser"


async def test_user_id_only_nul(client):
    status, body = await get_json(client, URL("/users/%00/profile", encoded=True))
    assert_bad_request(status, body, "empty")


async def test_user_id_too_long(client):
    status, body = await get_json(client, user_path("x" * 257))
    assert_bad_request(status, body, "257 characters", "1 to 256")
    status, body = await get_json(client, user_path("x" * 257, "profiles"))
    assert_bad_request(status, body, "257 characters")


async def test_user_id_max_length_accepted(client):
    status, body = await get_json(client, user_path("x" * 256))
    assert status == 404
    assert body["error"] == "not_found"


async def test_user_id_invalid_utf8(client):
    status, body = await get_json(client, URL("/users/%FF/profile", encoded=True))
    assert_bad_request(status, body, "'%FF'", "UTF-8")


async def test_current_profile_unknown_parameter(client):
    status, body = await get_json(client, URL("/users/u/profile?version=2", encoded=True))
    assert_bad_request(status, body, "'version'", "accepts: none")


# History


async def test_history_default_limit(client, store):
    await write_versions(store, "many", MANY_VERSIONS)
    status, body = await get_json(client, user_path("many", "profiles"))
    assert status == 200
    assert body["user_id"] == "many"
    assert [profile["version"] for profile in body["profiles"]] == list(range(MANY_VERSIONS, MANY_VERSIONS - 20, -1))
    assert body["next_before_version"] == MANY_VERSIONS - 19
    assert body["profiles"][0] == make_profile("many", MANY_VERSIONS, posts_total=MANY_VERSIONS)


async def test_history_pages_cover_every_version(client, store):
    await write_versions(store, "many", MANY_VERSIONS)
    await write_versions(store, "other", 3)
    seen = []
    url = user_path("many", "profiles").with_query(limit=7)
    pages = 0
    while True:
        status, body = await get_json(client, url)
        assert status == 200
        pages += 1
        seen.extend(profile["version"] for profile in body["profiles"])
        if body["next_before_version"] is None:
            break
        url = url.update_query(before_version=body["next_before_version"])
    assert seen == list(range(MANY_VERSIONS, 0, -1))
    assert pages == 4


async def test_history_last_page_exactly_full(client, store):
    await write_versions(store, "five", 5)
    status, body = await get_json(client, user_path("five", "profiles").with_query(limit=5))
    assert status == 200
    assert len(body["profiles"]) == 5
    assert body["next_before_version"] is None


async def test_history_before_version(client, store):
    await write_versions(store, "five", 5)
    status, body = await get_json(client, user_path("five", "profiles").with_query(before_version=3, limit=1))
    assert [profile["version"] for profile in body["profiles"]] == [2]
    assert body["next_before_version"] == 2
    status, body = await get_json(client, user_path("five", "profiles").with_query(before_version=1))
    assert (status, body["profiles"], body["next_before_version"]) == (200, [], None)


async def test_history_limits_accepted(client, store):
    await write_versions(store, "five", 5)
    for query in ({"limit": 1}, {"limit": 100}, {"limit": "007"}, {"before_version": MAX_VERSION}):
        status, body = await get_json(client, user_path("five", "profiles").with_query(query))
        assert status == 200, (query, body)
        assert body["profiles"][0]["version"] == 5


async def test_history_unknown_user_empty(client):
    status, body = await get_json(client, user_path("nobody", "profiles"))
    assert (status, body) == (200, {"user_id": "nobody", "profiles": [], "next_before_version": None})


@pytest.mark.parametrize("value", ["0", "101", "-1", "abc", "1.5", "", " 5", "1_0", "\u0663", "1e2", "9" * 30])
async def test_history_bad_limit(client, value):
    status, body = await get_json(client, user_path("u", "profiles").with_query(limit=value))
    assert_bad_request(status, body, f"limit is {value!r}", "from 1 to 100")


@pytest.mark.parametrize("value", ["0", "-3", "x", str(MAX_VERSION + 1)])
async def test_history_bad_before_version(client, value):
    status, body = await get_json(client, user_path("u", "profiles").with_query(before_version=value))
    assert_bad_request(status, body, f"before_version is {value!r}", f"from 1 to {MAX_VERSION}")


async def test_history_long_value_shortened(client):
    status, body = await get_json(client, user_path("u", "profiles").with_query(limit="7" * 500))
    assert_bad_request(status, body, "from 1 to 100")
    assert len(body["message"]) < 200


async def test_history_repeated_limit(client):
    status, body = await get_json(client, URL("/users/u/profiles?limit=1&limit=2", encoded=True))
    assert_bad_request(status, body, "limit is given 2 times")


async def test_history_unknown_parameter(client):
    status, body = await get_json(client, URL("/users/u/profiles?before=3", encoded=True))
    assert_bad_request(status, body, "'before'", "limit, before_version")


# Postgres failures


async def test_store_timeout_gives_503(fresh_database, caplog):
    caplog.set_level(logging.WARNING, logger="stream.read_api")
    blocker = await asyncpg.connect(fresh_database)
    try:
        async with PostgresSink(fresh_database, command_timeout_s=0.5) as store:
            async with TestClient(TestServer(build_application(store), host="127.0.0.1", port=0)) as client:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE profiles_current, profiles_history IN ACCESS EXCLUSIVE MODE")
                    status, body = await get_json(client, user_path("u"))
                    history_status, _ = await get_json(client, user_path("u", "profiles"))
                status_after, _ = await get_json(client, user_path("u"))
    finally:
        await blocker.close()
    assert status == 503
    assert history_status == 503
    assert body["error"] == "store_unavailable"
    assert fresh_database.rsplit("/", 1)[1] not in body["message"]
    assert status_after == 404
    assert any(record.getMessage().startswith("read_api.store_unavailable") for record in caplog.records)


# OpenAPI document


async def test_openapi_document_valid(client):
    status, document = await get_json(client, "/openapi.json")
    assert status == 200
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)


async def test_openapi_lists_every_served_route(client):
    _, document = await get_json(client, "/openapi.json")
    served = served_operations(client.server.app.router)
    assert documented_operations(document) == served
    assert {path for _, path in served} == READ_ROUTES | {"/healthz", "/metrics"}


async def test_openapi_profile_schema_inlined(client):
    _, document = await get_json(client, "/openapi.json")
    expected = {key: value for key, value in schemas.load("profile.v1").items() if key not in ("$id", "$schema")}
    assert document["components"]["schemas"]["Profile"] == expected


async def test_openapi_schemas_match_responses(client, store):
    await write_versions(store, "se:55", 3)
    _, document = await get_json(client, "/openapi.json")
    cases = [
        (user_path("se:55"), "Profile"),
        (user_path("se:55", "profiles").with_query(limit=2), "ProfilePage"),
        (user_path("nobody"), "Error"),
        (user_path("se:55", "profiles").with_query(limit=0), "Error"),
        ("/healthz", "Liveness"),
    ]
    for path, schema_name in cases:
        _, body = await get_json(client, path)
        openapi_validator(document, schema_name).validate(body)


async def respond_empty(request: web.Request) -> web.Response:
    return web.Response()


def test_openapi_rejects_undocumented_route():
    application = web.Application()
    application.router.add_get("/undocumented", respond_empty)
    with pytest.raises(LookupError, match="GET /undocumented"):
        openapi_document(application.router)


def test_openapi_operations_have_responses():
    for (method, path), operation in OPERATIONS.items():
        assert operation["responses"], (method, path)
        assert operation["operationId"]


# Metrics


async def test_metric_labels_are_route_templates(client, store):
    await write_versions(store, "secret-user-id", 1)
    await client.get(user_path("secret-user-id"))
    await client.get(user_path("secret-user-id", "profiles"))
    await client.get(user_path("secret-user-id", "profiles").with_query(limit=0))
    labels = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            assert "secret-user-id" not in str(sample.labels)
            if sample.name == "profilestream_read_api_requests_total":
                labels.add((sample.labels["route"], sample.labels["status"]))
    assert ("/users/{user_id}/profile", "200") in labels
    assert ("/users/{user_id}/profiles", "400") in labels
    assert {route for route, _ in labels} <= READ_ROUTES


# The worker's HTTP server


async def test_http_server_serves_read_api(fresh_database):
    writer = PostgresSink(fresh_database, pool_max=1)
    async with writer:
        await write_versions(writer, "se:55", 2)
    profiles = PostgresSink(fresh_database, pool_max=1)
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0, profiles=profiles)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/users/se%3A55/profile") as response:
                assert response.status == 200
                assert (await response.json())["version"] == 2
            async with session.get(f"{base}/healthz") as response:
                assert await response.json() == {"alive": True}
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 503
            async with session.get(f"{base}/openapi.json") as response:
                document = await response.json()
    finally:
        await server.stop()
    validate(document, cls=OpenAPIV31SpecValidator)
    assert set(document["paths"]) == READ_ROUTES | {"/healthz", "/readyz", "/metrics"}
    with pytest.raises(RuntimeError, match="not started"):
        async with profiles.acquire():
            pass


async def test_http_server_without_postgres():
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/users/u/profile", "/openapi.json"):
                async with session.get(f"http://127.0.0.1:{server.port}{path}") as response:
                    assert response.status == 404, path
            async with session.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                assert response.status == 200
    finally:
        await server.stop()


async def test_worker_serves_read_api(kafka_bootstrap, fresh_database, tmp_path):
    settings = isolated_settings(kafka_bootstrap, fresh_database, tmp_path)
    async with PostgresSink(fresh_database, pool_max=1) as writer:
        await write_versions(writer, "se:7", 1)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        await wait_until_serving(f"{base}/healthz", worker.check_alive)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/users/se%3A7/profile") as response:
                assert response.status == 200
                assert (await response.json())["user_id"] == "se:7"
            async with session.get(f"{base}/openapi.json") as response:
                assert "/readyz" in (await response.json())["paths"]
    finally:
        assert worker.stop() == 0, worker.log_tail()


# profilestream api


async def wait_until_serving(url: str, check_alive) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            check_alive()
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {STARTUP_TIMEOUT_S} s")


async def start_api(dsn: str, *arguments: str) -> asyncio.subprocess.Process:
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env[f"{ENV_PREFIX}POSTGRES_DSN"] = dsn
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream", "api", *arguments, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_api_command_serves_and_stops(fresh_database):
    async with PostgresSink(fresh_database, pool_max=1) as writer:
        await write_versions(writer, "se:9", 3)
    port = free_port()
    process = await start_api(fresh_database, "--host", "127.0.0.1", "--port", str(port))
    base = f"http://127.0.0.1:{port}"

    def check_alive() -> None:
        assert process.returncode is None, f"profilestream api exited with {process.returncode}"

    try:
        await wait_until_serving(f"{base}/healthz", check_alive)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/users/se%3A9/profiles?limit=2") as response:
                body = await response.json()
            async with session.get(f"{base}/metrics") as response:
                metrics_text = await response.text()
    finally:
        if process.returncode is None:
            process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert [profile["version"] for profile in body["profiles"]] == [3, 2]
    assert "profilestream_read_api_requests_total" in metrics_text
    assert process.returncode == 0, stderr.decode()
    assert f"api.serving address=http://127.0.0.1:{port}" in stderr.decode()


async def test_api_command_missing_tables(postgres_dsn):
    database = f"test_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    try:
        process = await start_api(with_database(postgres_dsn, database), "--port", "0")
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    assert process.returncode == 2
    assert "has no table profiles_current" in stderr.decode()
    assert "profilestream migrate" in stderr.decode()
