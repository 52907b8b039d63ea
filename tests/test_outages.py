"""Outages in the middle of a replay of the bundled data: the worker pauses, retries and resumes by itself.

Each test runs one whole worker against a service of its own, which the test stops and starts
again on the same port and data folder. The outage of Postgres lasts OUTAGE_S seconds (15, or
60 with PROFILESTREAM_TEST_LONG=1); the broker is down for BROKER_OUTAGE_S seconds. Recovery
times are printed (run with -s to see them); they are measurements, not assertions.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time

import aiohttp
import pytest
from aiokafka.errors import KafkaError

from handlers.sinks.postgres import migrate
from stream.demo import bundled_data_path
from stream.progress import group_lag, group_lag_when_ready, wait_until_caught_up
from stream.replay import replay
from stream.services.kafka import KafkaBroker
from stream.services.postgres import PostgresCluster
from stream.worker import prepare
from tests.test_end_to_end import expected_outcomes, fetch_all, read_topic
from tests.worker_harness import WorkerProcess, isolated_settings

OUTAGE_S = 60.0 if os.environ.get("PROFILESTREAM_TEST_LONG") == "1" else 15.0
BROKER_OUTAGE_S = 10.0
RESUME_WITHIN_S = 60.0
CATCH_UP_TIMEOUT_S = 300.0
POLL_S = 0.5
STALL_S = 20.0  # the watchdog's stall time in the broker test, so /readyz can report a stall within RESUME_WITHIN_S


def bundled_lines() -> list[bytes]:
    with gzip.open(bundled_data_path(), "rb") as file:
        return [line.rstrip(b"\n") for line in file if line.strip()]


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def postgres_writes(worker: WorkerProcess, outcome: str) -> float:
    return metric(worker.metrics(), "profilestream_sink_writes_total", sink="postgres", outcome=outcome)


async def sleep_alive(worker: WorkerProcess, seconds: float) -> None:
    """Sleep `seconds`, failing as soon as the worker exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        worker.check_alive()
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    worker.check_alive()


async def wait_for(condition, worker: WorkerProcess, timeout_s: float, description: str) -> float:
    """Poll `condition()` until it is true and return the seconds it took."""
    started = time.monotonic()
    while not await condition():
        worker.check_alive()
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{description} did not happen within {timeout_s:.0f} s; worker log:\n{worker.log_tail()}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started


async def topic_versions(bootstrap: str, topic: str) -> tuple[dict[str, int], int]:
    """Return each user's highest profile version on `topic`, and the count of distinct (user, version) pairs."""
    records = await read_topic(bootstrap, topic)
    latest: dict[str, int] = {}
    for record in records:
        user = record.key.decode()
        latest[user] = max(int(dict(record.headers)["profile-version"]), latest.get(user, 0))
    return latest, len({(record.key, dict(record.headers)["profile-version"]) for record in records})


async def readiness(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


@pytest.mark.slow
@pytest.mark.timeout(CATCH_UP_TIMEOUT_S + 4 * OUTAGE_S + 240)
async def test_postgres_outage_mid_replay(kafka_bootstrap, tmp_path):
    lines = bundled_lines()
    events_path = tmp_path / "events.jsonl"
    events_path.write_bytes(b"".join(line + b"\n" for line in lines))
    # The replay lasts about twice the outage plus 20 s, so events keep arriving before, during and after it.
    rate_per_s = len(lines) / (2 * OUTAGE_S + 20)

    with PostgresCluster() as cluster:
        dsn = cluster.dsn
        await migrate(dsn)
        settings = isolated_settings(kafka_bootstrap, dsn, tmp_path, min_events_new_user=5)
        await prepare(settings)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        replaying = asyncio.create_task(replay(events_path, settings, rate_per_s=rate_per_s, progress=False))
        try:
            await wait_for(lambda: _has_profiles(dsn), worker, 120, "a first profile in Postgres")
            cluster.stop_server()
            await sleep_alive(worker, OUTAGE_S)
            retries = postgres_writes(worker, "retry")
            written_before = postgres_writes(worker, "ok")
            assert not replaying.done(), "the replay ended before the outage did; lower rate_per_s"

            cluster.start_server()
            first_write_s = await wait_for(lambda: _more_writes(worker, written_before), worker, 120,
                                           "a Postgres write after the restart")
            await replaying
            await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
            current, history = await fetch_all(dsn)
            on_topic, distinct_on_topic = await topic_versions(kafka_bootstrap, settings.topic_profiles)
        finally:
            replaying.cancel()
            exit_code = worker.stop()
    print(f"\npostgres outage {OUTAGE_S:.0f} s: first write {first_write_s:.1f} s after the restart,"
          f" {retries:.0f} write retries, {len(current)} profiles")

    assert exit_code == 0
    assert retries > 0
    assert len(on_topic) > 50
    assert {user: profile["version"] for user, profile in current.items()} == on_topic
    assert history == distinct_on_topic


@pytest.mark.slow
@pytest.mark.timeout(CATCH_UP_TIMEOUT_S + RESUME_WITHIN_S + 300)
async def test_broker_restart_mid_replay(fresh_database, tmp_path):
    lines = bundled_lines()
    events_path = tmp_path / "events.jsonl"
    events_path.write_bytes(b"".join(line + b"\n" for line in lines))

    with KafkaBroker() as broker:
        settings = isolated_settings(broker.bootstrap_servers, fresh_database, tmp_path, min_events_new_user=5,
                                     watchdog_stall_s=STALL_S)
        expected = expected_outcomes(lines, settings)
        await prepare(settings)
        await replay(events_path, settings, progress=False)
        worker = WorkerProcess(settings, tmp_path / "worker.log").start()
        try:
            await wait_for(lambda: _committed_at_least(settings, len(lines) // 4), worker, 180,
                           "a quarter of the input committed")
            lag_before, committed_before = await group_lag_when_ready(settings)
            broker.stop_server()
            await sleep_alive(worker, BROKER_OUTAGE_S)
            broker.start_server()
            back_at = time.monotonic()
            try:
                resumed_s = await wait_for(lambda: _committed_at_least(settings, committed_before + 1), worker,
                                           RESUME_WITHIN_S, "a commit after the broker restart")
            except AssertionError:
                status, document = await readiness(settings.http_port)
                assert status == 503, f"the worker neither resumed nor reported not ready: {document}"
                pytest.xfail(f"consumption did not resume within {RESUME_WITHIN_S:.0f} s; /readyz reports {document['reasons']}")
            await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
            caught_up_s = time.monotonic() - back_at
            samples = worker.metrics()
            current, history = await fetch_all(settings.postgres_dsn.get_secret_value())
            on_topic, distinct_on_topic = await topic_versions(broker.bootstrap_servers, settings.topic_profiles)
            status, _ = await readiness(settings.http_port)
        finally:
            exit_code = worker.stop()
    print(f"\nbroker down {BROKER_OUTAGE_S:.0f} s: first commit {resumed_s:.1f} s after the restart,"
          f" caught up after {caught_up_s:.1f} s")

    assert exit_code == 0
    assert lag_before > 0, "the worker had caught up before the broker stopped"
    assert status == 200
    for kind in ("post", "like"):
        applied = metric(samples, "profilestream_events_total", type=kind, outcome="applied")
        assert applied == expected["applied"][kind], kind
    assert metric(samples, "profilestream_events_total", type="audience", outcome="applied") == expected["audience"]
    assert {user: profile["version"] for user, profile in current.items()} == on_topic
    assert history == distinct_on_topic


async def _has_profiles(dsn: str) -> bool:
    current, _ = await fetch_all(dsn)
    return bool(current)


async def _more_writes(worker: WorkerProcess, before: float) -> bool:
    return postgres_writes(worker, "ok") > before


async def _committed_at_least(settings, count: int) -> bool:
    try:
        _, committed = await asyncio.wait_for(group_lag(settings), 20)
    except (KafkaError, OSError, TimeoutError):
        # The broker may still be starting, or its group coordinator still loading.
        return False
    return committed >= count
