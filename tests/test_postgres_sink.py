"""Tests of the Postgres sink against a real server, one fresh database per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

import schemas
from handlers.errors import InvalidRecord, SinkUnavailable
from handlers.sinks.postgres import MIGRATIONS, PostgresSink, migrate, strip_nul
from stream.services.ports import free_port
from stream.services.postgres import PostgresCluster

CONCURRENT_ROUNDS = 50


def make_profile(user_id: str, version: int, *, posts_total: int = 0, summary: str = "Writes about tea.") -> dict:
    """Build a minimal profile.v1 document and check it against the schema."""
    profile = {
        "schema": "profile.v1",
        "user_id": user_id,
        "version": version,
        "generated_at": f"2024-05-01T12:00:{version % 60:02d}Z",
        "generator": "rules",
        "fallback_reason": None,
        "trigger_reasons": ["new_user"],
        "interests": [{"topic": "tea", "weight": 0.8, "evidence": [f"post-{user_id}-{version}"]}],
        "activity": {
            "posts_total": posts_total,
            "replies_total": 0,
            "likes_given_total": 0,
            "likes_received_total": 0,
            "posts_7d": 0,
            "first_seen": "2024-04-01T00:00:00Z",
            "last_seen": "2024-05-01T11:00:00Z",
            "active_hours_utc": [11],
        },
        "social": {"followers": 0, "following": 0},
        "traits": [],
        "summary": summary,
        "language": "en",
        "confidence": 0.5,
        "watermark": {"event_time": "2024-05-01T11:00:00Z", "events_applied": version},
    }
    schemas.validator("profile.v1").validate(profile)
    return profile


@pytest.fixture
async def sink(fresh_database: str) -> AsyncIterator[PostgresSink]:
    async with PostgresSink(fresh_database, pool_max=4) as opened:
        yield opened


async def fetch_versions(sink: PostgresSink, user_id: str) -> list[int]:
    return [profile["version"] for profile in await sink.fetch_history(user_id)]


# Migrations


async def test_migrate_twice(fresh_database: str) -> None:
    await migrate(fresh_database)

    connection = await asyncpg.connect(fresh_database)
    try:
        versions = [row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")]
        tables = {
            row["tablename"]
            for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await connection.close()

    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert {"profiles_current", "profiles_history", "schema_migrations"} <= tables


async def test_migrate_concurrently(fresh_database: str) -> None:
    await asyncio.gather(*(migrate(fresh_database) for _ in range(4)))


# Writes


async def test_write_then_read(sink: PostgresSink) -> None:
    profile = make_profile("u1", 1)

    changed = await sink.write([profile])

    assert changed == 1
    assert await sink.fetch_current("u1") == profile
    assert await sink.fetch_history("u1") == [profile]


async def test_fetch_current_unknown_user(sink: PostgresSink) -> None:
    assert await sink.fetch_current("nobody") is None
    assert await sink.fetch_history("nobody") == []


async def test_write_same_profile_twice(sink: PostgresSink) -> None:
    profile = make_profile("u1", 1)

    first = await sink.write([profile])
    second = await sink.write([profile])

    assert first == 1
    assert second == 0
    assert await fetch_versions(sink, "u1") == [1]


async def test_lower_version_never_overwrites(sink: PostgresSink) -> None:
    await sink.write([make_profile("u1", 3, posts_total=30)])

    changed = await sink.write([make_profile("u1", 2, posts_total=20)])

    current = await sink.fetch_current("u1")
    assert changed == 0
    assert current is not None
    assert current["version"] == 3
    assert current["activity"]["posts_total"] == 30
    assert await fetch_versions(sink, "u1") == [2, 3]


async def test_equal_version_never_overwrites(sink: PostgresSink) -> None:
    await sink.write([make_profile("u1", 2, summary="First copy.")])

    changed = await sink.write([make_profile("u1", 2, summary="Second copy.")])

    current = await sink.fetch_current("u1")
    history = await sink.fetch_history("u1")
    assert changed == 0
    assert current is not None
    assert current["summary"] == "First copy."
    assert [profile["summary"] for profile in history] == ["First copy."]


async def test_batch_with_versions_of_one_user(sink: PostgresSink) -> None:
    changed = await sink.write([make_profile("u1", 2), make_profile("u1", 1), make_profile("u2", 1)])

    current = await sink.fetch_current("u1")
    assert changed == 2
    assert current is not None
    assert current["version"] == 2
    assert await fetch_versions(sink, "u1") == [1, 2]


async def test_write_empty_batch(sink: PostgresSink) -> None:
    assert await sink.write([]) == 0


async def test_crossed_batches_never_deadlock(sink: PostgresSink) -> None:
    for round_number in range(CONCURRENT_ROUNDS):
        first_user, second_user = f"a-{round_number}", f"b-{round_number}"
        batch_one = [make_profile(first_user, 2), make_profile(second_user, 1)]
        batch_two = [make_profile(second_user, 2), make_profile(first_user, 1)]

        await asyncio.gather(sink.write(batch_one), sink.write(batch_two))

        for user_id in (first_user, second_user):
            current = await sink.fetch_current(user_id)
            assert current is not None
            assert current["version"] == 2, f"round {round_number}, user {user_id}"
    assert sink.retries == 0


async def test_write_retries_after_deadlock(sink: PostgresSink, fresh_database: str) -> None:
    await sink.write([make_profile("u1", 1), make_profile("u2", 1)])
    blocker = await asyncpg.connect(fresh_database)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("UPDATE profiles_current SET updated_at = now() WHERE user_id = 'u2'")
        write = asyncio.create_task(sink.write([make_profile("u1", 2), make_profile("u2", 2)]))
        await wait_for_lock_wait(blocker)

        # The sink has locked u1 and waits for u2, so this closes a cycle. The sink waited first,
        # so its deadlock check runs first and Postgres aborts the sink's transaction.
        await blocker.execute("UPDATE profiles_current SET updated_at = now() WHERE user_id = 'u1'")
        await transaction.commit()
        changed = await asyncio.wait_for(write, timeout=30)
    finally:
        await blocker.close()

    assert changed == 2
    assert sink.retries == 1
    assert await fetch_versions(sink, "u2") == [1, 2]


async def wait_for_lock_wait(connection: asyncpg.Connection, timeout_s: float = 10.0) -> None:
    """Wait until another session of this database waits for a row lock."""
    query = """
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
    """
    async with asyncio.timeout(timeout_s):
        while await connection.fetchval(query) == 0:
            await asyncio.sleep(0.02)


async def test_write_strips_nul(sink: PostgresSink) -> None:
    profile = make_profile("u1", 1, summary="before\x00after")
    profile["interests"][0]["topic"] = "t\x00ea"

    changed = await sink.write([profile])

    current = await sink.fetch_current("u1")
    assert changed == 1
    assert current is not None
    assert current["summary"] == "beforeafter"
    assert current["interests"][0]["topic"] == "tea"


def test_strip_nul_nested_keys() -> None:
    cleaned = strip_nul({"a\x00b": ["x\x00", ("y",), 1, None]})

    assert cleaned == {"ab": ["x", ["y"], 1, None]}


async def test_malformed_profile_rejected(sink: PostgresSink) -> None:
    profile = make_profile("u1", 1)
    profile["generated_at"] = "yesterday"

    with pytest.raises(InvalidRecord, match="generated_at"):
        await sink.write([profile])


async def test_erase_user(sink: PostgresSink) -> None:
    await sink.write([make_profile("u1", 1), make_profile("u1", 2), make_profile("u2", 1)])

    await sink.erase("u1")

    assert await sink.fetch_current("u1") is None
    assert await sink.fetch_history("u1") == []
    assert await sink.fetch_current("u2") is not None


# Reads


async def test_fetch_top_order(sink: PostgresSink) -> None:
    await sink.write(
        [
            make_profile("u-low", 1, posts_total=2),
            make_profile("u-high", 1, posts_total=90),
            make_profile("u-tie-b", 1, posts_total=10),
            make_profile("u-tie-a", 1, posts_total=10),
        ]
    )

    top = await sink.fetch_top(3)

    assert [profile["user_id"] for profile in top] == ["u-high", "u-tie-a", "u-tie-b"]


async def test_fetch_top_rejects_negative_limit(sink: PostgresSink) -> None:
    with pytest.raises(ValueError, match="limit"):
        await sink.fetch_top(-1)


# Availability


async def test_acquire_timeout_raises_unavailable(fresh_database: str) -> None:
    dsn_with_password = fresh_database.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@")
    assert dsn_with_password != fresh_database
    async with PostgresSink(dsn_with_password, pool_max=1, acquire_timeout_s=0.2) as small:
        async with small.acquire():
            with pytest.raises(SinkUnavailable) as raised:
                await small.write([make_profile("u1", 1)])

    message = str(raised.value)
    assert "127.0.0.1" in message
    assert "PROFILESTREAM_POSTGRES_ACQUIRE_TIMEOUT_S" in message
    assert "s3cret-pw" not in message
    assert raised.value.retriable


async def test_unreachable_server_raises_unavailable() -> None:
    port = free_port()
    unreachable = PostgresSink(f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/profilestream", acquire_timeout_s=2)

    with pytest.raises(SinkUnavailable) as raised:
        await unreachable.start()

    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message
    assert "PROFILESTREAM_POSTGRES_DSN" in message
    assert "s3cret-pw" not in message


async def test_migrate_unreachable_raises_unavailable() -> None:
    port = free_port()

    with pytest.raises(SinkUnavailable, match=f"127.0.0.1:{port}"):
        await migrate(f"postgresql://postgres@127.0.0.1:{port}/profilestream", timeout_s=2)


async def test_write_before_start_raises(fresh_database: str) -> None:
    unstarted = PostgresSink(fresh_database)

    with pytest.raises(RuntimeError, match="start"):
        await unstarted.write([make_profile("u1", 1)])


async def test_stopped_server_raises_unavailable() -> None:
    cluster = PostgresCluster().start()
    try:
        await migrate(cluster.dsn)
        async with PostgresSink(cluster.dsn, acquire_timeout_s=2) as stopped:
            cluster.stop()

            with pytest.raises(SinkUnavailable, match="127.0.0.1"):
                await stopped.write([make_profile("u1", 1)])
    finally:
        cluster.stop()
