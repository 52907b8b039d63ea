"""User erasure on the real broker and Postgres: tombstone, rows deleted, no resurrection by replay."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from handlers.sinks.postgres import PostgresSink
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.worker import prepare
from tests.test_end_to_end import metric, read_topic
from tests.worker_harness import WorkerProcess, isolated_settings

CATCH_UP_TIMEOUT_S = 120
PROFILE_TIMEOUT_S = 60
USERS = ("erase:alice", "erase:bob", "erase:carol")
DELETED = "erase:alice"
DELETED_AT = "2024-06-01T12:00:00Z"


def post(user: str, n: int, hour: int) -> bytes:
    return orjson.dumps({"schema": "post.v1", "event_id": f"{user}:e{n}", "user_id": user, "post_id": f"{user}:p{n}",
                         "created_at": f"2024-06-01T{hour:02d}:00:00Z", "text": "notes on qubits",
                         "tags": ["quantum", f"topic-{n % 2}"]})


def user_deleted(user: str) -> bytes:
    return orjson.dumps({"schema": "user_deleted.v1", "event_id": f"{user}:deleted", "user_id": user, "deleted_at": DELETED_AT})


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


async def stored(dsn: str, user: str) -> tuple[dict | None, list[dict]]:
    sink = PostgresSink(dsn, pool_max=1)
    await sink.start()
    try:
        return await sink.fetch_current(user), await sink.fetch_history(user)
    finally:
        await sink.close()


async def wait_for_profile(dsn: str, user: str, worker: WorkerProcess) -> dict:
    deadline = time.monotonic() + PROFILE_TIMEOUT_S
    while time.monotonic() < deadline:
        worker.check_alive()
        current, _ = await stored(dsn, user)
        if current is not None:
            return current
        await asyncio.sleep(0.5)
    raise AssertionError(f"no profile of {user} in Postgres after {PROFILE_TIMEOUT_S} s; worker log:\n{worker.log_tail()}")


async def records_of(settings, user: str) -> list:
    records = await read_topic(settings.kafka_bootstrap_servers, settings.topic_profiles)
    return [record for record in records if record.key == user.encode()]


async def test_erasure_survives_replay(kafka_bootstrap, fresh_database, tmp_path):
    settings = isolated_settings(kafka_bootstrap, fresh_database, tmp_path, min_events_new_user=3)
    old_events = write_lines(tmp_path / "old.jsonl", [post(user, n, hour=n) for user in USERS for n in range(5)])
    deletion = write_lines(tmp_path / "deletion.jsonl", [user_deleted(DELETED)])
    newer_events = write_lines(tmp_path / "newer.jsonl", [post(DELETED, n, hour=n + 8) for n in range(10, 13)])
    await prepare(settings)
    await replay(old_events, settings, progress=False)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()

    async def caught_up() -> None:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())

    try:
        await caught_up()
        for user in USERS:
            await wait_for_profile(fresh_database, user, worker)
        assert [record.value is not None for record in await records_of(settings, DELETED)] == [True]

        # The deletion: a tombstone on the profile topic, rows gone, the other users untouched.
        await replay(deletion, settings, progress=False)
        await caught_up()
        records = await records_of(settings, DELETED)
        assert records[-1].value is None
        assert await stored(fresh_database, DELETED) == (None, [])
        for user in USERS[1:]:
            current, history = await stored(fresh_database, user)
            assert current is not None
            assert len(history) == 1
        samples = worker.metrics()
        assert metric(samples, "profilestream_events_total", type="user_deleted", outcome="applied") == 1
        assert metric(samples, "profilestream_erasures_total", sink="postgres", outcome="ok") == 1
        assert metric(samples, "profilestream_erasures_total", sink="topic", outcome="ok") == 1

        # Replaying the old events and the deletion itself changes nothing.
        await replay(old_events, settings, progress=False)
        await replay(deletion, settings, progress=False)
        await caught_up()
        assert await stored(fresh_database, DELETED) == (None, [])
        assert len(await records_of(settings, DELETED)) == len(records)
        samples = worker.metrics()
        assert metric(samples, "profilestream_events_total", type="post", outcome="user_erased") == 5
        assert metric(samples, "profilestream_events_total", type="user_deleted", outcome="duplicate") == 1
        assert metric(samples, "profilestream_erasures_total", sink="topic", outcome="ok") == 1

        # Events stamped after deleted_at bring the user back as a new user.
        await replay(newer_events, settings, progress=False)
        await caught_up()
        profile = await wait_for_profile(fresh_database, DELETED, worker)
        assert profile["version"] == 1
        assert profile["activity"]["posts_total"] == 3
        assert profile["activity"]["first_seen"] == "2024-06-01T18:00:00Z"
        last = (await records_of(settings, DELETED))[-1]
        assert orjson.loads(last.value)["version"] == 1
        worker.check_alive()
    finally:
        worker.stop()
