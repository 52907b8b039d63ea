"""Prometheus multi-process mode: /metrics merges the files of several processes and drops dead ones' gauges."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from handlers.generation.telemetry import LLMTelemetry
from stream import metrics
from stream.health import WorkerStatus
from stream.http_server import HttpServer
from stream.multiprocess_metrics import MULTIPROC_DIR_VARIABLE, scrape_registry

REPO = Path(__file__).parent.parent
START_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 30
MODEL = "stub-model"

# Process INDEX (1, 2 or 3) counts 10 * INDEX events and reports INDEX users in state. Process 1 also
# clears a lag series, which prometheus-client cannot remove in multi-process mode. With -W
# error, the warning that remove() gives there would stop the process.
WORKER_SCRIPT = textwrap.dedent(
    """
    import sys

    from handlers.generation.telemetry import default_telemetry
    from stream import metrics
    from stream.multiprocess_metrics import clear_gauge_series, mark_dead_at_exit

    index = int(sys.argv[1])
    mark_dead_at_exit()
    metrics.EVENTS.labels("post", "applied").inc(10 * index)
    metrics.STATE_USERS.set(index)
    metrics.CONSUMER_LAG.labels("posts", str(index)).set(100 * index)
    telemetry = default_telemetry()
    telemetry.circuit_state.labels("stub-model").set(index % 3)
    telemetry.budget_tokens_day.labels("stub-model").set(1000 * index)
    if index == 1:
        metrics.CONSUMER_LAG.labels("posts", "99").set(7)
        clear_gauge_series(metrics.CONSUMER_LAG, "posts", "99")
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def start_worker(index: int, folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: str(folder)}
    process = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", WORKER_SCRIPT, str(index)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        raise AssertionError(f"metrics process {index} failed to start: {line!r}; stderr:\n{stderr}")
    return process


@pytest.fixture
def processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(folder))
    started: list[subprocess.Popen[str]] = []
    try:
        for index in (1, 2, 3):
            started.append(start_worker(index, folder))
        yield folder, started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=EXIT_TIMEOUT_S)


async def scrape(server: HttpServer) -> dict[tuple[str, tuple], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: dict[tuple[str, tuple], float], name: str) -> dict[tuple, float]:
    return {labels: sample for (sample_name, labels), sample in samples.items() if sample_name == name}


def budget_pids(samples: dict[tuple[str, tuple], float]) -> set[str]:
    return {dict(labels)["pid"] for labels in series(samples, "profilestream_llm_budget_tokens_day_remaining")}


def assert_counters_kept(before: dict[tuple[str, tuple], float], after: dict[tuple[str, tuple], float]) -> None:
    for key, earlier in before.items():
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after.get(key, -1.0) >= earlier, f"counter {key} fell from {earlier} to {after.get(key)}"


async def test_dead_processes_leave_live_gauges(processes):
    folder, (first, second, third) = processes
    server = HttpServer(WorkerStatus(), "127.0.0.1", 0)
    await server.start()
    try:
        all_alive = await scrape(server)

        second.send_signal(signal.SIGKILL)
        second.wait(EXIT_TIMEOUT_S)
        # A killed process runs no exit hook, so its supervisor marks it dead.
        multiprocess.mark_process_dead(second.pid, str(folder))
        one_killed = await scrape(server)

        # A process that exits normally marks itself dead in its exit hook.
        _, stderr = third.communicate("\n", timeout=EXIT_TIMEOUT_S)
        assert third.returncode == 0, stderr
        one_left = await scrape(server)
    finally:
        await server.stop()

    events = "profilestream_events_total"
    assert value(all_alive, events, type="post", outcome="applied") == 60
    assert value(one_killed, events, type="post", outcome="applied") == 60
    assert value(one_left, events, type="post", outcome="applied") == 60
    assert_counters_kept(all_alive, one_killed)
    assert_counters_kept(one_killed, one_left)

    assert value(all_alive, "profilestream_state_users") == 6
    assert value(one_killed, "profilestream_state_users") == 4
    assert value(one_left, "profilestream_state_users") == 1

    lag = "profilestream_kafka_consumer_lag"
    assert value(all_alive, lag, topic="posts", partition="2") == 200
    assert value(one_killed, lag, topic="posts", partition="2") is None
    assert value(one_left, lag, topic="posts", partition="3") is None
    assert value(one_left, lag, topic="posts", partition="1") == 100
    assert value(all_alive, lag, topic="posts", partition="99") == 0

    circuit = "profilestream_llm_circuit_state"
    assert value(all_alive, circuit, model=MODEL) == 2
    assert value(one_killed, circuit, model=MODEL) == 1

    assert budget_pids(all_alive) == {str(first.pid), str(second.pid), str(third.pid)}
    assert budget_pids(one_killed) == {str(first.pid), str(third.pid)}
    assert budget_pids(one_left) == {str(first.pid)}


def test_scrape_registry_default_without_folder(monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR_VARIABLE, raising=False)
    assert scrape_registry() is REGISTRY


def test_scrape_registry_fresh_in_multiprocess_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(tmp_path))
    first = scrape_registry()
    second = scrape_registry()
    assert first is not REGISTRY
    assert first is not second


def test_every_gauge_declares_live_mode():
    gauges = [item for item in vars(metrics).values() if isinstance(item, Gauge)]
    telemetry = LLMTelemetry(CollectorRegistry())
    gauges += [item for item in vars(telemetry).values() if isinstance(item, Gauge)]
    assert len(gauges) >= 8
    for gauge in gauges:
        assert gauge._multiprocess_mode.startswith("live"), f"{gauge._name} keeps dead processes' values"
