"""Readiness, the stall watchdog, rebalance tracking, the HTTP endpoints on a real worker, and `profilestream health`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from stream.health import NOT_ASSIGNED, RECOVERING, STALLED, WorkerStatus, readiness
from stream.http_server import HttpServer
from stream.importers import jsonl, stackexchange
from stream.kafka_metrics import ConsumerMonitor, RebalanceTracker, input_partitions
from stream.progress import consumed_topics, wait_until_caught_up
from stream.replay import replay
from stream.services.ports import free_port
from stream.settings import ENV_PREFIX, load_settings
from stream.watchdog import PartitionOffsets, Watchdog
from stream.worker import prepare
from tests.worker_harness import WorkerProcess, isolated_settings, settings_env

FIXTURE = Path(__file__).parent / "fixtures" / "stackexchange"
REPO = Path(__file__).parent.parent
STALL_S = 120.0
POSTS_0 = TopicPartition("posts", 0)
POSTS_1 = TopicPartition("posts", 1)
READY_TIMEOUT_S = 60
LAG_TIMEOUT_S = 20


class ManualClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ready_status(**changes) -> WorkerStatus:
    values = {"assigned_partitions": frozenset({POSTS_0}), "recovered": True, "stalled_partitions": frozenset()}
    values.update(changes)
    return WorkerStatus(**values)


def lagging(committed: int | None = 10, end: int = 50) -> PartitionOffsets:
    return PartitionOffsets(committed=committed, start=0, end=end)


# Readiness


def test_readiness_ready():
    verdict = readiness(ready_status())
    assert verdict.ready is True
    assert verdict.reasons == ()
    assert verdict.assigned_partitions == ("posts:0",)


def test_readiness_not_assigned():
    verdict = readiness(ready_status(assigned_partitions=frozenset()))
    assert verdict.ready is False
    assert verdict.reasons == (NOT_ASSIGNED,)


def test_readiness_recovery_pending():
    verdict = readiness(ready_status(recovered=False))
    assert verdict.ready is False
    assert verdict.reasons == (RECOVERING,)


def test_readiness_stalled():
    verdict = readiness(ready_status(stalled_partitions=frozenset({POSTS_0})))
    assert verdict.ready is False
    assert verdict.reasons == (STALLED,)
    assert verdict.stalled_partitions == ("posts:0",)


def test_readiness_every_reason():
    verdict = readiness(WorkerStatus(recovered=False, stalled_partitions=frozenset({POSTS_0})))
    assert verdict.reasons == (NOT_ASSIGNED, RECOVERING, STALLED)


def test_readiness_json_body():
    document = readiness(ready_status(recovered=False)).as_json()
    assert document == {"ready": False, "reasons": [RECOVERING], "assigned_partitions": ["posts:0"],
                        "stalled_partitions": []}


# Watchdog


def test_watchdog_stalls_after_stall_s():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging()})
    clock.advance(STALL_S - 1)
    assert watchdog.observe({POSTS_0: lagging()}) == frozenset()
    clock.advance(1)
    assert watchdog.observe({POSTS_0: lagging()}) == frozenset({POSTS_0})


def test_watchdog_warns_once_per_stall(caplog):
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    caplog.set_level(logging.INFO, logger="stream.watchdog")
    watchdog.observe({POSTS_0: lagging(committed=10)})
    for _ in range(5):
        clock.advance(STALL_S)
        watchdog.observe({POSTS_0: lagging(committed=10)})
    watchdog.observe({POSTS_0: lagging(committed=11)})
    clock.advance(STALL_S)
    watchdog.observe({POSTS_0: lagging(committed=11)})
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("watchdog.stalled topic=posts partition=0 lag=40")
    assert any(record.getMessage().startswith("watchdog.resumed") for record in caplog.records)


def test_watchdog_commit_advance_clears_stall():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging(committed=10)})
    clock.advance(STALL_S)
    watchdog.observe({POSTS_0: lagging(committed=10)})
    assert watchdog.observe({POSTS_0: lagging(committed=12)}) == frozenset()


def test_watchdog_idle_partition_not_stalled():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging(committed=50, end=50)})
    clock.advance(10 * STALL_S)
    watchdog.observe({POSTS_0: lagging(committed=50, end=50)})
    clock.advance(5)
    assert watchdog.observe({POSTS_0: lagging(committed=50, end=60)}) == frozenset()
    assert watchdog.committed_age_s(POSTS_0) == 10 * STALL_S + 5


def test_watchdog_only_lagging_partition_stalls():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    offsets = {POSTS_0: lagging(), POSTS_1: lagging(committed=50)}
    watchdog.observe(offsets)
    clock.advance(STALL_S)
    assert watchdog.observe(offsets) == frozenset({POSTS_0})


def test_watchdog_no_commit_yet_stalls():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging(committed=None)})
    clock.advance(STALL_S)
    assert watchdog.observe({POSTS_0: lagging(committed=None)}) == frozenset({POSTS_0})


def test_watchdog_forgets_revoked_partition():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging()})
    clock.advance(STALL_S)
    watchdog.observe({POSTS_0: lagging()})
    assert watchdog.observe({POSTS_1: lagging()}) == frozenset()
    assert watchdog.committed_age_s(POSTS_0) == 0.0


def test_watchdog_reset_restarts_timer():
    clock = ManualClock()
    watchdog = Watchdog(STALL_S, clock=clock)
    watchdog.observe({POSTS_0: lagging()})
    clock.advance(STALL_S - 1)
    watchdog.reset()
    watchdog.observe({POSTS_0: lagging()})
    clock.advance(STALL_S - 1)
    assert watchdog.observe({POSTS_0: lagging()}) == frozenset()


def test_partition_offsets_lag():
    assert PartitionOffsets(committed=7, start=0, end=10).lag == 3
    assert PartitionOffsets(committed=None, start=4, end=10).lag == 6
    assert PartitionOffsets(committed=12, start=0, end=10).lag == 0


# Rebalance tracking


def test_input_partitions_skip_changelogs():
    assigned = {("posts", 0), ("app-user-state-changelog", 0), ("likes", 1)}
    assert input_partitions(assigned, ["posts", "likes"]) == {TopicPartition("posts", 0), TopicPartition("likes", 1)}


def test_rebalance_tracker_cycle():
    clock = ManualClock()
    status = WorkerStatus(recovered=True)
    tracker = RebalanceTracker(status, ["posts"], clock=clock)
    observed_before = REGISTRY.get_sample_value("profilestream_kafka_rebalance_seconds_sum")
    tracker.record_revoked(set())
    assert status.recovered is False
    tracker.record_assigned({("posts", 0), ("posts-changelog", 0)})
    assert status.assigned_partitions == frozenset({POSTS_0})
    clock.advance(2.5)
    tracker.record_completed()
    assert status.recovered is True
    assert REGISTRY.get_sample_value("profilestream_kafka_rebalance_seconds_sum") - observed_before == 2.5


# The consumer monitor: broker offsets to the watchdog, /readyz and /metrics


class FakeOffsetReader:
    """The broker reads of ConsumerMonitor: a consumer's end and beginning offsets and an admin's committed offsets."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.ends: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {partition: self.ends[partition] for partition in partitions}

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {partition: 0 for partition in partitions}

    async def list_consumer_group_offsets(self, group_id: str, partitions: list[TopicPartition] | None = None,
                                          ) -> dict[TopicPartition, OffsetAndMetadata]:
        assert group_id == self.group_id
        # The broker returns offset -1 for a requested partition that the group has not committed.
        return {partition: OffsetAndMetadata(self.committed.get(partition, -1), "") for partition in partitions or ()}


@dataclass
class Monitored:
    """A ConsumerMonitor on fake broker offsets and a manual clock, with its status served by a real HttpServer."""

    clock: ManualClock
    offsets: FakeOffsetReader
    tracker: RebalanceTracker
    monitor: ConsumerMonitor
    server: HttpServer

    async def readyz(self) -> tuple[int, dict]:
        status, _, body = await fetch(f"http://127.0.0.1:{self.server.port}/readyz")
        return status, json.loads(body)

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Return the value of one sample in the server's /metrics text, or None when it is absent."""
        _, _, body = await fetch(f"http://127.0.0.1:{self.server.port}/metrics")
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and sample.labels == (labels or {}):
                    return sample.value
        return None

    def assign(self, *partitions: TopicPartition) -> None:
        """Run one rebalance through the tracker's signal handlers, with a changelog partition among the assigned ones."""
        assigned = {(partition.topic, partition.partition) for partition in partitions}
        self.tracker.record_revoked(set())
        self.tracker.record_assigned(assigned | {("profilestream-user-state-changelog", 0)})
        self.tracker.record_completed()


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "stream.watchdog" and record.getMessage().startswith("watchdog.stalled")]


@pytest_asyncio.fixture
async def monitored(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="stream.watchdog")
    clock = ManualClock()
    settings = load_settings(watchdog_stall_s=STALL_S)
    status = WorkerStatus()
    offsets = FakeOffsetReader(settings.app_id)
    monitor = ConsumerMonitor(settings, status, Watchdog(settings.watchdog_stall_s, clock=clock))

    async def clients() -> tuple[FakeOffsetReader, FakeOffsetReader]:
        return offsets, offsets

    # The monitor reads offsets through the (admin, consumer) pair this returns, so _fetch runs unchanged.
    monkeypatch.setattr(monitor, "_clients", clients)
    server = HttpServer(status, "127.0.0.1", 0)
    await server.start()
    try:
        yield Monitored(clock, offsets, RebalanceTracker(status, consumed_topics(settings), clock=clock), monitor, server)
    finally:
        # A poll without assigned partitions removes this test's lag series from the shared registry.
        status.assigned_partitions = frozenset()
        await monitor.poll()
        await server.stop()


async def stall_posts_0(monitored: Monitored) -> None:
    """Assign posts:0 (lagging, committed offset 10) and posts:1 (caught up), and poll until posts:0 stalls."""
    monitored.offsets.ends = {POSTS_0: 50, POSTS_1: 50}
    monitored.offsets.committed = {POSTS_0: 10, POSTS_1: 50}
    monitored.assign(POSTS_0, POSTS_1)
    await monitored.monitor.poll()
    monitored.clock.advance(STALL_S)
    await monitored.monitor.poll()


async def test_monitor_ready_before_stall_s(monitored):
    monitored.offsets.ends = {POSTS_0: 50, POSTS_1: 50}
    monitored.offsets.committed = {POSTS_0: 10, POSTS_1: 50}
    monitored.assign(POSTS_0, POSTS_1)
    await monitored.monitor.poll()
    monitored.clock.advance(STALL_S - 1)
    await monitored.monitor.poll()
    status, document = await monitored.readyz()
    assert status == 200
    assert document["reasons"] == []
    assert await monitored.metric("profilestream_kafka_stalled_partitions") == 0
    assert await monitored.metric("profilestream_kafka_consumer_lag", {"topic": "posts", "partition": "0"}) == 40


async def test_monitor_stall_fails_readiness(monitored):
    await stall_posts_0(monitored)
    status, document = await monitored.readyz()
    assert status == 503
    assert document["ready"] is False
    assert document["reasons"] == [STALLED]
    assert document["stalled_partitions"] == ["posts:0"]
    assert await monitored.metric("profilestream_kafka_stalled_partitions") == 1
    assert await monitored.metric("profilestream_kafka_committed_offset_age_seconds",
                                  {"topic": "posts", "partition": "0"}) == STALL_S


async def test_monitor_warns_once_per_stall(monitored, caplog):
    await stall_posts_0(monitored)
    for _ in range(3):
        monitored.clock.advance(STALL_S)
        await monitored.monitor.poll()
    warnings = stall_warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("watchdog.stalled topic=posts partition=0 lag=40 committed=10 ")
    assert (await monitored.readyz())[1]["stalled_partitions"] == ["posts:0"]


async def test_monitor_commit_restores_readiness(monitored, caplog):
    await stall_posts_0(monitored)
    monitored.offsets.committed[POSTS_0] = 20
    monitored.clock.advance(5)
    await monitored.monitor.poll()
    status, document = await monitored.readyz()
    assert status == 200
    assert document["stalled_partitions"] == []
    assert await monitored.metric("profilestream_kafka_stalled_partitions") == 0
    assert any(record.getMessage().startswith("watchdog.resumed topic=posts partition=0") for record in caplog.records)

    # The committed offset stops again with lag left, which is a new stall with its own warning.
    monitored.clock.advance(STALL_S)
    await monitored.monitor.poll()
    assert (await monitored.readyz())[1]["reasons"] == [STALLED]
    assert len(stall_warnings(caplog)) == 2


async def test_monitor_recovery_pending_not_stalled(monitored):
    await stall_posts_0(monitored)
    monitored.tracker.record_revoked({("posts", 0), ("posts", 1)})
    monitored.clock.advance(STALL_S)
    await monitored.monitor.poll()
    status, document = await monitored.readyz()
    assert status == 503
    assert document["reasons"] == [RECOVERING]
    assert document["stalled_partitions"] == []
    assert await monitored.metric("profilestream_kafka_stalled_partitions") == 0

    # Recovery restarts the stall timer, so the partition stalls again only STALL_S after it.
    monitored.tracker.record_assigned({("posts", 0), ("posts", 1)})
    monitored.tracker.record_completed()
    await monitored.monitor.poll()
    assert (await monitored.readyz())[0] == 200
    monitored.clock.advance(STALL_S)
    await monitored.monitor.poll()
    assert (await monitored.readyz())[1]["reasons"] == [STALLED]


# HTTP endpoints on a real worker


async def poll_readiness(worker: WorkerProcess, url: str) -> list[tuple[int, dict]]:
    """GET `url` every 50 ms from the worker's start until it returns 200, and return every response."""
    responses = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            worker.check_alive()
            try:
                async with session.get(url) as response:
                    responses.append((response.status, await response.json()))
            except aiohttp.ClientConnectionError:
                pass
            if responses and responses[-1][0] == 200:
                return responses
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} not ready after {READY_TIMEOUT_S} s; last responses: {responses[-3:]}; log:\n{worker.log_tail()}")


async def fetch(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(kafka_bootstrap, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("health")
    settings = isolated_settings(kafka_bootstrap, None, workdir, min_events_new_user=2)
    events, _ = stackexchange.convert(FIXTURE)
    events_path = workdir / "events.jsonl"
    jsonl.write_jsonl(events, events_path)
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        responses = await poll_readiness(worker, f"{base}/readyz")
        await wait_until_caught_up(settings, timeout_s=120, on_poll=lambda *_: worker.check_alive())
        yield {"settings": settings, "worker": worker, "base": base, "responses": responses}
    finally:
        worker.stop()


async def test_healthz_alive(served):
    status, content_type, body = await fetch(f"{served['base']}/healthz")
    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(body) == {"alive": True}


async def test_readyz_503_before_assignment(served):
    status, document = served["responses"][0]
    assert status == 503
    assert document["ready"] is False
    assert NOT_ASSIGNED in document["reasons"]


async def test_readyz_200_after_catch_up(served):
    status, _, body = await fetch(f"{served['base']}/readyz")
    document = json.loads(body)
    assert status == 200
    assert document["ready"] is True
    assert document["reasons"] == []
    assert len(document["assigned_partitions"]) == len(consumed_topics(served["settings"])) * 2


async def test_metrics_prometheus_text(served):
    status, content_type, body = await fetch(f"{served['base']}/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert "profilestream_events_total" in body


async def test_lag_metrics_labelled(served):
    expected = {(topic, str(partition)) for topic in consumed_topics(served["settings"]) for partition in range(2)}
    deadline = time.monotonic() + LAG_TIMEOUT_S
    while True:
        lag = {}
        age = {}
        for family in text_string_to_metric_families((await fetch(f"{served['base']}/metrics"))[2]):
            for sample in family.samples:
                labels = (sample.labels.get("topic"), sample.labels.get("partition"))
                if sample.name == "profilestream_kafka_consumer_lag":
                    lag[labels] = sample.value
                if sample.name == "profilestream_kafka_committed_offset_age_seconds":
                    age[labels] = sample.value
        # The monitor polls every few seconds, so its first values may predate the catch-up.
        if set(lag) == expected and not any(lag.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    assert set(lag) == expected
    assert set(age) == expected
    assert sum(lag.values()) == 0
    assert min(age.values()) >= 0


# profilestream health


async def run_health(*arguments: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `profilestream health` without blocking the event loop, which may serve the URL."""
    base_env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    base_env.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream", "health", *arguments, env=base_env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_health_command_ready(served):
    code, stdout, _ = await run_health("--url", f"{served['base']}/readyz")
    assert code == 0
    assert json.loads(stdout)["ready"] is True


async def test_health_command_default_url(served):
    code, stdout, _ = await run_health(env=settings_env(served["settings"]))
    assert code == 0
    assert json.loads(stdout)["ready"] is True


async def test_health_command_not_ready():
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0)
    await server.start()
    try:
        code, stdout, _ = await run_health("--url", f"http://127.0.0.1:{server.port}/readyz")
    finally:
        await server.stop()
    assert code == 1
    assert json.loads(stdout)["reasons"] == [NOT_ASSIGNED, RECOVERING]


async def test_health_command_unreachable():
    port = free_port()
    code, stdout, stderr = await run_health("--url", f"http://127.0.0.1:{port}/readyz")
    assert code == 2
    assert stdout == ""
    assert f"cannot reach http://127.0.0.1:{port}/readyz" in stderr


async def test_health_command_wrong_path():
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0)
    await server.start()
    try:
        code, _, stderr = await run_health("--url", f"http://127.0.0.1:{server.port}/nothing")
    finally:
        await server.stop()
    assert code == 2
    assert "HTTP 404" in stderr
