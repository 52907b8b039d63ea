"""Guarantees of the Postgres sink under load, lock contention and a server outage, on a real server.

PROFILESTREAM_TEST_LONG=1 makes the outage last 60 s instead of 15 s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry

import stream.generate
from handlers.errors import SinkUnavailable
from handlers.sinks.postgres import PostgresSink, _latest_per_user, _Row, migrate
from handlers.sinks.postgres_metrics import PostgresMetrics
from stream.generate import GenerationStage
from stream.records import Record
from stream.services import run_tool, spawn, stop_process
from stream.services.postgres import PostgresCluster, find_server_binaries, server_account
from tests.test_postgres_sink import make_profile

OUTAGE_S = 60.0 if os.environ.get("PROFILESTREAM_TEST_LONG") == "1" else 15.0
# A bound against a hang only, far above the normal run time. No test asserts a duration.
HANG_GUARD_S = 120.0

BURST_WRITES = 200
BURST_USERS = 20
BURST_POOL_MAX = 5
BURST_ACQUIRE_TIMEOUT_S = 0.05
CROSSED_ROUNDS = 500
ERROR_KINDS = {"deadlock", "serialization_failure", "acquire_timeout", "connection_failed", "statement_timeout"}


def metric_value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


async def stored_rows(dsn: str) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Return {user_id: version} of profiles_current and the sorted (user_id, version) pairs of profiles_history."""
    connection = await asyncpg.connect(dsn)
    try:
        current = await connection.fetch("SELECT user_id, version FROM profiles_current")
        history = await connection.fetch("SELECT user_id, version FROM profiles_history ORDER BY user_id, version")
    finally:
        await connection.close()
    return {row["user_id"]: row["version"] for row in current}, [(row["user_id"], row["version"]) for row in history]


def max_version_per_user(pairs) -> dict[str, int]:
    latest: dict[str, int] = {}
    for user_id, version in pairs:
        latest[user_id] = max(version, latest.get(user_id, version))
    return latest


# Bounded pool

TIMEOUTS = "profilestream_postgres_pool_acquire_timeouts_total"
WAITS = "profilestream_postgres_pool_acquire_waits_total"
WRITE_ERRORS = "profilestream_postgres_write_errors_total"


@contextlib.asynccontextmanager
async def opened_patiently(sink: PostgresSink) -> AsyncIterator[PostgresSink]:
    """Start `sink`, retrying because its first connection can take longer than a short acquire_timeout_s."""
    async with asyncio.timeout(HANG_GUARD_S):
        while True:
            try:
                await sink.start()
                break
            except SinkUnavailable:
                await asyncio.sleep(0.01)
    try:
        yield sink
    finally:
        await sink.close()


async def acquire_patiently(sink: PostgresSink, stack: contextlib.AsyncExitStack) -> None:
    """Borrow a connection into `stack`, retrying because connecting can take longer than a short acquire_timeout_s."""
    while True:
        try:
            await stack.enter_async_context(sink.acquire())
            return
        except SinkUnavailable:
            await asyncio.sleep(0.01)


async def test_burst_on_small_pool_ends(fresh_database: str) -> None:
    registry = CollectorRegistry()
    rng = random.Random(1)
    versions = rng.sample(range(1, 100_000), BURST_WRITES)
    profiles = [make_profile(f"user-{n % BURST_USERS}", version) for n, version in enumerate(versions)]
    failures: list[SinkUnavailable] = []

    async with opened_patiently(
        PostgresSink(
            fresh_database,
            pool_max=BURST_POOL_MAX,
            acquire_timeout_s=BURST_ACQUIRE_TIMEOUT_S,
            metrics=PostgresMetrics(registry),
        )
    ) as sink:

        async def write_until_stored(profile: dict) -> None:
            # Any exception other than SinkUnavailable ends the gather below and fails the test.
            while True:
                try:
                    await sink.write([profile])
                    return
                except SinkUnavailable as error:
                    failures.append(error)
                    await asyncio.sleep(rng.uniform(0, 0.02))

        # Long transactions pin every connection while the burst arrives, so each write waits
        # longer than acquire_timeout_s at least once.
        async with contextlib.AsyncExitStack() as pinned:
            for _ in range(BURST_POOL_MAX):
                await asyncio.wait_for(acquire_patiently(sink, pinned), HANG_GUARD_S)
            timeouts_before = metric_value(registry, TIMEOUTS)
            timeout_errors_before = metric_value(registry, WRITE_ERRORS, {"kind": "acquire_timeout"})
            waits_before = metric_value(registry, WAITS)
            burst = [asyncio.create_task(write_until_stored(profile)) for profile in profiles]
            await asyncio.sleep(BURST_ACQUIRE_TIMEOUT_S * 4)
        await asyncio.wait_for(asyncio.gather(*burst), HANG_GUARD_S)

    current, history = await stored_rows(fresh_database)
    expected_pairs = sorted((profile["user_id"], profile["version"]) for profile in profiles)
    assert len(failures) >= BURST_WRITES
    assert {failure.kind for failure in failures} == {"acquire_timeout"}
    assert metric_value(registry, TIMEOUTS) - timeouts_before == len(failures)
    assert metric_value(registry, WRITE_ERRORS, {"kind": "acquire_timeout"}) - timeout_errors_before == len(failures)
    assert metric_value(registry, WAITS) - waits_before >= len(failures)
    assert metric_value(registry, "profilestream_postgres_write_seconds_count") == BURST_WRITES
    assert current == max_version_per_user(expected_pairs)
    assert history == expected_pairs


async def test_acquire_timeout_message_names_settings(fresh_database: str) -> None:
    async with PostgresSink(fresh_database, pool_max=1, acquire_timeout_s=0.5, metrics=PostgresMetrics(CollectorRegistry())) as sink:
        async with sink.acquire():
            with pytest.raises(SinkUnavailable) as raised:
                await sink.write([make_profile("u1", 1)])

    assert raised.value.kind == "acquire_timeout"
    assert "PROFILESTREAM_POSTGRES_POOL_MAX" in str(raised.value)
    assert "PROFILESTREAM_POSTGRES_ACQUIRE_TIMEOUT_S" in str(raised.value)


async def test_metric_labels_never_name_users(fresh_database: str) -> None:
    registry = CollectorRegistry()
    async with PostgresSink(fresh_database, pool_max=1, acquire_timeout_s=0.5, metrics=PostgresMetrics(registry)) as sink:
        await sink.write([make_profile("user-secret-id", 1)])
        async with sink.acquire():
            with pytest.raises(SinkUnavailable):
                await sink.write([make_profile("user-secret-id", 2)])

    labels = {(name, value) for family in registry.collect() for sample in family.samples for name, value in sample.labels.items()}
    assert not any("user-secret-id" in value for _, value in labels)
    assert {name for name, _ in labels} == {"kind", "le"}
    assert {value for name, value in labels if name == "kind"} <= ERROR_KINDS
    assert metric_value(registry, "profilestream_postgres_write_errors_total", {"kind": "acquire_timeout"}) == 1


# Lock order


async def test_crossed_writers_never_deadlock(fresh_database: str) -> None:
    registry = CollectorRegistry()
    sink_metrics = PostgresMetrics(registry)
    rng = random.Random(2)
    written: list[tuple[str, int]] = []

    async with (
        PostgresSink(fresh_database, pool_max=1, metrics=sink_metrics) as forward_writer,
        PostgresSink(fresh_database, pool_max=1, metrics=sink_metrics) as backward_writer,
    ):
        for _ in range(CROSSED_ROUNDS):
            forward = [("u1", rng.randint(1, 1000)), ("u2", rng.randint(1, 1000))]
            backward = [("u2", rng.randint(1, 1000)), ("u1", rng.randint(1, 1000))]
            written += forward + backward

            await asyncio.wait_for(
                asyncio.gather(
                    forward_writer.write([make_profile(user_id, version) for user_id, version in forward]),
                    backward_writer.write([make_profile(user_id, version) for user_id, version in backward]),
                ),
                HANG_GUARD_S,
            )
        retries = forward_writer.retries + backward_writer.retries

    current, history = await stored_rows(fresh_database)
    # The sink sorts rows by user_id, so both transactions lock u1 before u2 and never wait in a cycle.
    assert metric_value(registry, "profilestream_postgres_write_errors_total", {"kind": "deadlock"}) == 0
    assert metric_value(registry, "profilestream_postgres_write_errors_total", {"kind": "serialization_failure"}) == 0
    assert retries == 0
    assert current == max_version_per_user(written)
    assert history == sorted(set(written))


# In-batch reduction

users = st.text(alphabet="abc", min_size=1, max_size=2)
versions = st.one_of(st.integers(1, 4), st.integers(1, 2**63 - 1))
row_lists = st.lists(st.tuples(users, versions), max_size=30)


@given(rows=row_lists)
def test_latest_per_user_keeps_max(rows: list[tuple[str, int]]) -> None:
    generated_at = datetime(2024, 5, 1, tzinfo=UTC)
    given_rows = [_Row(user_id, version, generated_at, "rules", {"index": index}) for index, (user_id, version) in enumerate(rows)]

    latest = _latest_per_user(given_rows)

    assert {row.user_id: row.version for row in latest} == max_version_per_user(rows)
    assert len(latest) == len({user_id for user_id, _ in rows})
    for row in latest:
        first_index = rows.index((row.user_id, row.version))
        assert row.profile == {"index": first_index}


@pytest.fixture(scope="module")
async def property_sink(module_database: str) -> AsyncIterator[PostgresSink]:
    async with PostgresSink(module_database, pool_max=1, metrics=PostgresMetrics(CollectorRegistry())) as sink:
        yield sink


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(row_lists, min_size=1, max_size=4))
async def test_written_current_is_max_per_user(property_sink: PostgresSink, batches: list[list[tuple[str, int]]]) -> None:
    async with property_sink.acquire() as connection:
        await connection.execute("TRUNCATE profiles_current, profiles_history")
    all_rows = [row for batch in batches for row in batch]
    first_copy: dict[tuple[str, int], int] = {}
    for index, pair in enumerate(all_rows):
        first_copy.setdefault(pair, index)

    index = 0
    for batch in batches:
        profiles = []
        for user_id, version in batch:
            profile = make_profile(user_id, version, summary=f"Copy {index}.")
            profiles.append(profile)
            index += 1
        await property_sink.write(profiles)

    async with property_sink.acquire() as connection:
        current = await connection.fetch("SELECT user_id, version, profile FROM profiles_current")
        history = await connection.fetch("SELECT user_id, version FROM profiles_history ORDER BY user_id, version")
    expected = max_version_per_user(all_rows)
    assert {row["user_id"]: row["version"] for row in current} == expected
    for row in current:
        assert row["profile"]["version"] == row["version"]
        assert row["profile"]["summary"] == f"Copy {first_copy[(row['user_id'], row['version'])]}."
    assert [(row["user_id"], row["version"]) for row in history] == sorted(set(all_rows))


# Retry logging of the generation stage


class FlakySink:
    """A sink that raises SinkUnavailable on its first `failures` writes."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[dict] = []

    async def write(self, profiles: list[dict]) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise SinkUnavailable("the test sink is down", kind="connection_failed")
        self.written.extend(profiles)
        return len(profiles)


class EchoGenerator:
    async def generate(self, request: dict) -> tuple[dict, str]:
        return make_profile(request["user_id"], request["version"]), "rules"


def regeneration_request(user_id: str, version: int) -> Record:
    return Record("regenerate", 0, version, user_id.encode(), orjson.dumps({"user_id": user_id, "version": version}))


def stage_messages(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(event + " ")]


async def test_stage_logs_retries_once_per_interval(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(stream.generate, "RETRY_INITIAL_S", 0.0)
    monkeypatch.setattr(stream.generate, "RETRY_LOG_INTERVAL_S", 3600.0)
    caplog.set_level(logging.INFO, logger="stream.generate")
    sink = FlakySink(failures=50)

    written = await GenerationStage(EchoGenerator(), [sink]).handle_batch([regeneration_request("u1", 1)])

    failed = stage_messages(caplog, "sink.write_failed")
    recovered = stage_messages(caplog, "sink.write_recovered")
    assert [profile["version"] for profile in written] == [1]
    assert len(sink.written) == 1
    assert len(failed) == 1
    assert "attempt=1 " in failed[0]
    assert len(recovered) == 1
    assert "attempts=51 " in recovered[0]
    assert "retries_not_logged=49" in recovered[0]


async def test_stage_logs_every_retry_without_interval(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(stream.generate, "RETRY_INITIAL_S", 0.0)
    monkeypatch.setattr(stream.generate, "RETRY_LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="stream.generate")

    await GenerationStage(EchoGenerator(), [FlakySink(failures=5)]).handle_batch([regeneration_request("u1", 1)])

    assert len(stage_messages(caplog, "sink.write_failed")) == 5
    assert len(stage_messages(caplog, "sink.write_recovered")) == 1


# Outage


class OutageCluster:
    """A throwaway cluster whose server stops with `pg_ctl stop` and starts again on the same port and data."""

    def __init__(self) -> None:
        self.cluster = PostgresCluster()
        self._restarted: subprocess.Popen[bytes] | None = None

    def start(self) -> OutageCluster:
        self.cluster.start()
        return self

    @property
    def dsn(self) -> str:
        return self.cluster.dsn

    def stop_server(self) -> None:
        """Stop the server with `pg_ctl stop --mode fast`, which ends open sessions, and wait until it is down."""
        work_dir = self.cluster.work_dir
        assert work_dir is not None
        pg_ctl = find_server_binaries() / "pg_ctl"
        run_tool(
            [pg_ctl, "stop", "--pgdata", work_dir / "data", "--mode", "fast", "--wait", "--timeout", "60"],
            cwd=work_dir, timeout_s=90, user=server_account(),
        )

    def start_server(self) -> None:
        """Start the server again as a child of this process, so it dies with the test run."""
        work_dir = self.cluster.work_dir
        assert work_dir is not None and self.cluster.log_path is not None
        server_settings = {**self.cluster.settings, "unix_socket_directories": str(work_dir / "socket")}
        command: list = [find_server_binaries() / "postgres", "-D", work_dir / "data", "-p", str(self.cluster.port)]
        for name, value in server_settings.items():
            command += ["-c", f"{name}={value}"]
        self._restarted = spawn(
            command, log_path=self.cluster.log_path, cwd=work_dir, death_signal=signal.SIGQUIT, user=server_account()
        )

    async def wait_until_accepting(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                connection = await asyncpg.connect(self.dsn, timeout=2)
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() >= deadline:
                    raise AssertionError(f"the restarted server did not accept connections within {timeout_s} s: {exc}")
                await asyncio.sleep(0.1)
                continue
            await connection.close()
            return

    def close(self) -> None:
        if self._restarted is not None:
            stop_process(self._restarted, stop_signal=signal.SIGINT, timeout_s=20, name="postgres")
            self._restarted = None
        self.cluster.stop()


class CountingSink:
    """Wrap a sink and count the successful writes of each (user_id, version)."""

    def __init__(self, inner: PostgresSink) -> None:
        self.inner = inner
        self.name = inner.name
        self.successes: collections.Counter[tuple[str, int]] = collections.Counter()

    async def write(self, profiles: list[dict]) -> int:
        changed = await self.inner.write(profiles)
        self.successes.update((profile["user_id"], profile["version"]) for profile in profiles)
        return changed


def stage_retry_count() -> float:
    return REGISTRY.get_sample_value("profilestream_sink_writes_total", {"sink": "postgres", "outcome": "retry"}) or 0.0


OUTAGE_BATCH_USERS = 5
OUTAGE_BATCH_PAUSE_S = 0.05
BATCHES_AFTER_RESTART = 20


async def test_stage_survives_postgres_outage(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(stream.generate, "RETRY_INITIAL_S", 0.2)
    monkeypatch.setattr(stream.generate, "RETRY_MAX_S", 2.0)
    monkeypatch.setattr(stream.generate, "RETRY_LOG_INTERVAL_S", 5.0)
    caplog.set_level(logging.INFO, logger="stream.generate")
    stage_retries_before = stage_retry_count()
    registry = CollectorRegistry()
    outage = OutageCluster().start()
    try:
        await migrate(outage.dsn)
        async with PostgresSink(outage.dsn, pool_max=4, acquire_timeout_s=2, metrics=PostgresMetrics(registry)) as inner:
            sink = CountingSink(inner)
            stage = GenerationStage(EchoGenerator(), [sink], concurrency=4)
            requested: list[tuple[str, int]] = []
            returned: list[tuple[str, int]] = []
            restarted = asyncio.Event()

            async def produce() -> int:
                """Send batches until BATCHES_AFTER_RESTART batches have been sent after the restart."""
                batch_number = 0
                after_restart = 0
                while after_restart < BATCHES_AFTER_RESTART:
                    batch_number += 1
                    if restarted.is_set():
                        after_restart += 1
                    batch = [(f"user-{(batch_number * OUTAGE_BATCH_USERS + n) % 17}", batch_number) for n in range(OUTAGE_BATCH_USERS)]
                    requested.extend(batch)
                    profiles = await stage.handle_batch([regeneration_request(*pair) for pair in batch])
                    returned.extend((profile["user_id"], profile["version"]) for profile in profiles)
                    await asyncio.sleep(OUTAGE_BATCH_PAUSE_S)
                return batch_number

            writer = asyncio.create_task(produce())
            await asyncio.sleep(1.0)
            await asyncio.to_thread(outage.stop_server)
            stopped_at = time.monotonic()
            await asyncio.sleep(OUTAGE_S)
            outage.start_server()
            outage_s = time.monotonic() - stopped_at
            await outage.wait_until_accepting()
            restarted.set()
            batches = await asyncio.wait_for(writer, HANG_GUARD_S + OUTAGE_S)

            # Connections that broke in the outage went back to the pool, so all pool_max can be borrowed at once.
            async with contextlib.AsyncExitStack() as borrowed:
                for _ in range(inner.pool_max):
                    connection = await borrowed.enter_async_context(inner.acquire())
                    assert await connection.fetchval("SELECT 1") == 1

        current, history = await stored_rows(outage.dsn)
    finally:
        outage.close()

    failed = stage_messages(caplog, "sink.write_failed")
    assert batches > BATCHES_AFTER_RESTART
    assert sorted(returned) == sorted(requested)
    assert set(sink.successes) == set(requested)
    assert set(sink.successes.values()) == {1}
    assert history == sorted(requested)
    assert current == max_version_per_user(requested)
    assert stage_retry_count() > stage_retries_before
    assert metric_value(registry, "profilestream_postgres_write_errors_total", {"kind": "connection_failed"}) > 0
    assert len(stage_messages(caplog, "sink.write_recovered")) >= 1
    assert 1 <= len(failed) <= outage_s / stream.generate.RETRY_LOG_INTERVAL_S + 2
