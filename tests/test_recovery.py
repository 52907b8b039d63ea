"""A restarted worker recovers user state from the changelog and makes the same decisions.

Only post events are used: they arrive on one topic, so each user's events are processed in
the same order in every run, and decisions must match exactly.
"""

from __future__ import annotations

import gzip
import uuid

import pytest_asyncio

from handlers.sinks.postgres import PostgresSink
from stream.demo import bundled_data_path
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.worker import prepare
from tests.worker_harness import WorkerProcess, isolated_settings

CATCH_UP_TIMEOUT_S = 120


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


async def run_worker_until_caught_up(settings, log_path) -> WorkerProcess:
    worker = WorkerProcess(settings, log_path).start()
    try:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
    except BaseException:
        worker.stop()
        raise
    return worker


async def stored_profiles(dsn: str) -> dict[str, dict]:
    sink = PostgresSink(dsn, pool_max=1)
    await sink.start()
    try:
        return {profile["user_id"]: profile for profile in await sink.fetch_top(100_000)}
    finally:
        await sink.close()


async def database(postgres_dsn: str, name: str) -> str:
    import asyncpg

    from handlers.sinks.postgres import migrate
    from tests.conftest import with_database

    connection = await asyncpg.connect(postgres_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    dsn = with_database(postgres_dsn, name)
    await migrate(dsn)
    return dsn


@pytest_asyncio.fixture(scope="module")
async def runs(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recovery")
    with gzip.open(bundled_data_path(), "rb") as file:
        posts = [line.rstrip(b"\n") for line in file if b'"post.v1"' in line]
    half = len(posts) // 2
    write_lines(workdir / "all.jsonl", posts)
    write_lines(workdir / "first.jsonl", posts[:half])
    write_lines(workdir / "second.jsonl", posts[half:])

    clean = isolated_settings(kafka_bootstrap, await database(postgres_dsn, f"{workdir.name}_clean_{uuid.uuid4().hex[:6]}".lower()), workdir / "clean")
    await prepare(clean)
    await replay(workdir / "all.jsonl", clean, progress=False)
    (await run_worker_until_caught_up(clean, workdir / "clean.log")).stop()

    restarted = isolated_settings(kafka_bootstrap, await database(postgres_dsn, f"{workdir.name}_restart_{uuid.uuid4().hex[:6]}".lower()), workdir / "restart")
    await prepare(restarted)
    await replay(workdir / "first.jsonl", restarted, progress=False)
    first = await run_worker_until_caught_up(restarted, workdir / "first.log")
    assert first.stop() == 0
    await replay(workdir / "second.jsonl", restarted, progress=False)
    second = await run_worker_until_caught_up(restarted, workdir / "second.log")
    samples = second.metrics()
    second.stop()
    yield {
        "clean": await stored_profiles(clean.postgres_dsn.get_secret_value()),
        "restarted": await stored_profiles(restarted.postgres_dsn.get_secret_value()),
        "second_half": len(posts) - half,
        "samples": samples,
    }


async def test_restart_gives_same_versions(runs):
    clean = {user: profile["version"] for user, profile in runs["clean"].items()}
    restarted = {user: profile["version"] for user, profile in runs["restarted"].items()}
    assert restarted == clean


async def test_restart_gives_same_interests(runs):
    for user, profile in runs["clean"].items():
        expected = [(item["topic"], item["weight"]) for item in profile["interests"]]
        actual = [(item["topic"], item["weight"]) for item in runs["restarted"][user]["interests"]]
        assert actual == expected, user


async def test_restarted_worker_applies_only_new_events(runs):
    key = ("profilestream_events_total", (("outcome", "applied"), ("type", "post")))
    assert runs["samples"][key] == runs["second_half"]
