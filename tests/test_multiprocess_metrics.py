"""Prometheus multi-process mode: /metrics merges the files of several processes and drops dead ones' gauges."""

from __future__ import annotations

import os
import json
import math
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest, multiprocess
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


# A worker's LLM generation wiring as stream/app.py builds it: a ProfileGenerator over an
# LLMGenerator with a Budget, and a CircuitBreaker, aimed at a stub endpoint that the process
# serves itself. Both clocks are manual. After each step the process prints one JSON line
# with the step name and the budget's own view, then waits for a line on stdin.
LLM_WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import dataclasses
    import json
    import sys

    from handlers.generation.budget import Budget
    from handlers.generation.circuit import CircuitBreaker
    from handlers.generation.llm import LLMGenerator
    from handlers.generation.service import ProfileGenerator
    from stream.generate import refresh_budget_gauges
    from stream.multiprocess_metrics import mark_dead_at_exit
    from tests import llm_stub as stub
    from tests.llm_stub import TEST_API_KEY, LLMStub, build_test_request


    class ManualClock:
        def __init__(self, now):
            self.now = now

        def __call__(self):
            return self.now


    async def main():
        mark_dead_at_exit()
        server = LLMStub()
        await server.start()
        circuit_clock = ManualClock(1000.0)
        budget_clock = ManualClock(1_700_000_000.0)
        budget = Budget(requests_per_minute=5, tokens_per_minute=100_000, clock=budget_clock)
        llm = LLMGenerator(base_url=server.base_url, api_key=TEST_API_KEY, model="stub-model", language="en",
                           max_retries=0, budget=budget)
        circuit = CircuitBreaker(failure_threshold=5, cooldown_s=30.0, clock=circuit_clock)
        generator = ProfileGenerator(language="en", llm=llm, circuit=circuit)

        async def step(name):
            print(json.dumps({"step": name, "remaining": dataclasses.asdict(budget.remaining())}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)

        await step("started")
        server.script(stub.quota_exhausted())
        await generator.generate(build_test_request(user_id="user-1"))
        await step("circuit_opened")
        circuit_clock.now += 31.0
        probe = circuit.acquire()
        await step("circuit_half_open")
        circuit.release(probe)
        await generator.generate(build_test_request(user_id="user-2"))
        await step("probe_succeeded")
        budget_clock.now += 61.0
        # The worker's 5 s timer.
        refresh_budget_gauges()
        await step("window_rolled_over")
        await generator.close()
        await server.close()


    asyncio.run(main())
    """
)
LLM_STEPS = ("started", "circuit_opened", "circuit_half_open", "probe_succeeded", "window_rolled_over")


def merged_samples(folder: Path) -> dict[tuple[str, tuple], float]:
    """Render the merged view of `folder` as /metrics does and return {(sample name, sorted labels): value}."""
    text = generate_latest(scrape_registry()).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def run_llm_worker(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, tuple[dict, dict]]]:
    """Run LLM_WORKER_SCRIPT and return its pid and, per step, the budget it printed and the merged samples."""
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(folder))
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: str(folder)}
    process = subprocess.Popen(
        [sys.executable, "-c", LLM_WORKER_SCRIPT],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    steps = {}
    try:
        for expected in LLM_STEPS:
            line = process.stdout.readline()
            if not line:
                process.kill()
                _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
                raise AssertionError(f"LLM worker process stopped before step {expected}; stderr:\n{stderr}")
            printed = json.loads(line)
            assert printed["step"] == expected
            steps[expected] = (printed["remaining"], merged_samples(folder))
            process.stdin.write("\n")
            process.stdin.flush()
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=EXIT_TIMEOUT_S)
    return process.pid, steps


def test_circuit_state_reaches_merged_view(tmp_path, monkeypatch):
    _, steps = run_llm_worker(tmp_path, monkeypatch)

    circuit = "profilestream_llm_circuit_state"
    assert value(steps["started"][1], circuit, model=MODEL) == 0
    assert value(steps["circuit_opened"][1], circuit, model=MODEL) == 2
    assert value(steps["circuit_half_open"][1], circuit, model=MODEL) == 1
    assert value(steps["probe_succeeded"][1], circuit, model=MODEL) == 0


def test_budget_gauges_reach_merged_view(tmp_path, monkeypatch):
    pid, steps = run_llm_worker(tmp_path, monkeypatch)

    labels = {"model": MODEL, "pid": str(pid)}
    requests = "profilestream_llm_budget_requests_minute_remaining"
    tokens_minute = "profilestream_llm_budget_tokens_minute_remaining"
    tokens_day = "profilestream_llm_budget_tokens_day_remaining"
    day_limit = "profilestream_llm_budget_tokens_day_limit"
    for name, (remaining, samples) in steps.items():
        assert value(samples, requests, **labels) == remaining["requests_this_minute"], name
        assert value(samples, tokens_minute, **labels) == remaining["tokens_this_minute"], name
        assert value(samples, tokens_day, **labels) == math.inf, name
        assert value(samples, day_limit, **labels) == math.inf, name

    # Two calls reached the endpoint and used two requests of the minute window. The worker's refresh timer then showed it rolled over.
    assert steps["started"][0]["requests_this_minute"] == 5
    assert steps["probe_succeeded"][0]["requests_this_minute"] == 3
    assert steps["probe_succeeded"][0]["tokens_this_minute"] < 100_000
    assert steps["window_rolled_over"][0] == {"requests_this_minute": 5, "tokens_this_minute": 100_000, "tokens_today": math.inf}
