"""Waiting for Postgres at worker start: the retry loop, and a real worker started while Postgres is down."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time

import aiohttp
import pytest

from handlers.errors import ConfigError, SinkUnavailable
from stream import postgres_startup
from stream.demo import bundled_data_path
from stream.postgres_startup import RETRY_INITIAL_S, RETRY_LOG_INTERVAL_S, RETRY_MAX_S, retry_until_available
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.services.postgres import PostgresCluster
from stream.topics import ensure_topics
from tests.test_end_to_end import fetch_all, read_topic
from tests.worker_harness import WorkerProcess, isolated_settings

WAIT_LOGGED_TIMEOUT_S = 60
CATCH_UP_TIMEOUT_S = 240
POSTS = 1500  # enough for a few dozen profiles, few enough for a short test


class FakeTime:
    """A clock that only `sleep` advances, so the retry loop runs without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, error: Exception):
    calls = []

    async def operation() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return operation, calls


# The retry loop


async def test_retry_returns_after_failures():
    fake = FakeTime()
    operation, calls = failing(3, SinkUnavailable("connection refused"))

    result = await retry_until_available(operation, action="migrate", target="db", sleep=fake.sleep, clock=fake.clock)

    assert result == "done"
    assert len(calls) == 4
    assert fake.sleeps == [RETRY_INITIAL_S, RETRY_INITIAL_S * 2, RETRY_INITIAL_S * 4]


async def test_retry_backoff_capped():
    fake = FakeTime()
    operation, _ = failing(12, SinkUnavailable("connection refused"))

    await retry_until_available(operation, action="migrate", target="db", sleep=fake.sleep, clock=fake.clock)

    assert max(fake.sleeps) == RETRY_MAX_S
    assert fake.sleeps[-3:] == [RETRY_MAX_S] * 3


async def test_retry_raises_non_retriable():
    fake = FakeTime()
    operation, calls = failing(1, ConfigError("bad DSN"))

    with pytest.raises(ConfigError, match="bad DSN"):
        await retry_until_available(operation, action="migrate", target="db", sleep=fake.sleep, clock=fake.clock)
    assert len(calls) == 1
    assert fake.sleeps == []


async def test_retry_logs_at_most_every_interval(caplog):
    fake = FakeTime()
    # 40 failures at the 10 s cap span about 6 minutes.
    operation, _ = failing(40, SinkUnavailable("connection refused"))

    with caplog.at_level(logging.INFO, logger=postgres_startup.__name__):
        await retry_until_available(operation, action="migrate", target="db", sleep=fake.sleep, clock=fake.clock)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    waited_s = sum(fake.sleeps)
    assert len(warnings) <= waited_s / RETRY_LOG_INTERVAL_S + 1
    assert len(warnings) >= 2
    assert "attempt=1 " in warnings[0].getMessage()
    assert "retries_not_logged=0" not in warnings[-1].getMessage()
    recovered = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert recovered == [f"postgres.available action=migrate target=db attempts=41 waited_s={waited_s:.1f}"]


async def test_retry_silent_on_first_success(caplog):
    fake = FakeTime()
    operation, _ = failing(0, SinkUnavailable("unused"))

    with caplog.at_level(logging.INFO, logger=postgres_startup.__name__):
        await retry_until_available(operation, action="migrate", target="db", sleep=fake.sleep, clock=fake.clock)

    assert caplog.records == []


# A real worker started while Postgres is down


async def readiness(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


async def http_status(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status


async def wait_for_log(worker: WorkerProcess, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.log_path.read_text(errors="replace"):
        worker.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout_s} s; log:\n{worker.log_tail()}")
        await asyncio.sleep(0.5)


@pytest.mark.timeout(420)
async def test_worker_waits_for_postgres_at_start(kafka_bootstrap, tmp_path):
    with PostgresCluster() as cluster:
        cluster.stop_server()
        settings = isolated_settings(kafka_bootstrap, cluster.dsn, tmp_path, min_events_new_user=5)
        with gzip.open(bundled_data_path(), "rb") as source:
            posts = [line for line in source if b'"post.v1"' in line][:POSTS]
        events_path = tmp_path / "posts.jsonl"
        events_path.write_bytes(b"".join(posts))
        await ensure_topics(settings)
        await replay(events_path, settings, progress=False)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        try:
            await wait_for_log(worker, "postgres.unavailable action=migrate", WAIT_LOGGED_TIMEOUT_S)
            # Several retries later the worker still runs, is not ready, and its read API responds with 503.
            await asyncio.sleep(3 * RETRY_INITIAL_S * 4)
            worker.check_alive()
            status, document = await readiness(settings.http_port)
            assert status == 503
            assert document["ready"] is False
            assert await http_status(settings.http_port, "/healthz") == 200
            assert await http_status(settings.http_port, "/users/se%3A1/profile") == 503

            cluster.start_server()
            back_at = time.monotonic()
            await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
            print(f"caught up {time.monotonic() - back_at:.1f} s after Postgres started")
            status, _ = await readiness(settings.http_port)
            current, history = await fetch_all(cluster.dsn)
            records = await read_topic(settings.kafka_bootstrap_servers, settings.topic_profiles)
        finally:
            exit_code = worker.stop()
        log = worker.log_path.read_text(errors="replace")

    on_topic: dict[str, int] = {}
    for record in records:
        version = int(dict(record.headers)["profile-version"])
        on_topic[record.key.decode()] = max(version, on_topic.get(record.key.decode(), 0))
    assert exit_code == 0
    assert status == 200
    assert "postgres.available action=migrate" in log
    print("\n".join(line for line in log.splitlines() if "postgres.available" in line or "postgres.unavailable" in line))
    assert len(current) > 10
    assert {user: profile["version"] for user, profile in current.items()} == on_topic
    assert history == len({(record.key, dict(record.headers)["profile-version"]) for record in records})
