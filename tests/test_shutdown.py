"""SIGTERM during load: the worker stops in time, logs one summary line, and loses nothing.

The posts of the bundled data are replayed first, so the worker has a backlog when the
signal arrives. A second worker then processes the rest. Only post events are used (one
input topic), so every event counts exactly once in its user's state.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import pytest_asyncio

from stream.replay import replay
from stream.worker import prepare
from tests.delivery_checks import (
    bundled_posts,
    create_database,
    distinct_events_per_user,
    drop_database,
    metric_sum,
    read_user_states,
    run_until_caught_up,
    scrape,
    wait_for,
    write_lines,
)
from tests.worker_harness import WorkerProcess, isolated_settings

BATCH_MAX = 20
SHUTDOWN_TIMEOUT_S = 20.0
# Time the process may still need after the deadline thread fired: logging and os._exit.
EXIT_MARGIN_S = 5.0
# The signal is sent once the worker has processed this many records and written a profile,
# so the ingest and the generate agents are both busy then.
STOP_AFTER_EVENTS = 1000
SUMMARY_FIELDS = ("uptime_s", "events_total", "events_applied", "events_duplicate", "events_dead_letter",
                  "dead_letters", "generations", "generations_skipped", "sink_writes_topic", "sink_writes_postgres")


def busy(worker: WorkerProcess) -> bool:
    samples = scrape(worker)
    return (metric_sum(samples, "profilestream_events_total") >= STOP_AFTER_EVENTS
            and metric_sum(samples, "profilestream_sink_writes_total", sink="postgres", outcome="ok") >= 1)


def summary_lines(log_text: str) -> list[dict[str, str]]:
    """Return the key=value fields of each worker.stopped line."""
    summaries = []
    for line in log_text.splitlines():
        _, marker, fields = line.partition(" worker.stopped ")
        if marker:
            summaries.append(dict(pair.split("=", 1) for pair in fields.split()))
    return summaries


@pytest_asyncio.fixture(scope="module")
async def stopped_run(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shutdown")
    posts = bundled_posts()
    dsn = await create_database(postgres_dsn)
    settings = isolated_settings(kafka_bootstrap, dsn, workdir, ingest_batch_max=BATCH_MAX,
                                 shutdown_timeout_s=SHUTDOWN_TIMEOUT_S)
    await prepare(settings)
    await replay(write_lines(workdir / "posts.jsonl", posts), settings, progress=False)

    first = WorkerProcess(settings, workdir / "first.log").start()
    try:
        await wait_for(lambda: busy(first), timeout_s=180,
                       description=f"processing of {STOP_AFTER_EVENTS} records and a profile write")
        before_signal = first.metrics()
        signalled = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        try:
            status = first.process.wait(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker still ran {SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S} s after SIGTERM:\n{first.log_tail()}")
        stop_s = time.monotonic() - signalled
    finally:
        first.stop()

    second = await run_until_caught_up(settings, workdir / "second.log")
    try:
        after_restart = second.metrics()
    finally:
        second.stop()
    run = {
        "posts": posts,
        "status": status,
        "stop_s": stop_s,
        "before_signal": before_signal,
        "first_log": first.log_path.read_text(errors="replace"),
        "after_restart": after_restart,
        "states": await read_user_states(settings),
    }
    print(f"shutdown: stop_s={stop_s:.1f} status={status}"
          f" applied_before_signal={metric_sum(before_signal, 'profilestream_events_total', outcome='applied'):.0f}"
          f" duplicates_after_restart={metric_sum(after_restart, 'profilestream_events_total', outcome='duplicate'):.0f}"
          f" summaries={summary_lines(run['first_log'])}")
    yield run
    await drop_database(postgres_dsn, dsn)


async def test_sigterm_stops_before_deadline(stopped_run):
    # Status 1 would mean the deadline ended the stop.
    assert stopped_run["status"] == 0, stopped_run["first_log"][-3000:]
    assert stopped_run["stop_s"] < SHUTDOWN_TIMEOUT_S


async def test_sigterm_logs_one_summary(stopped_run):
    summaries = summary_lines(stopped_run["first_log"])
    assert len(summaries) == 1
    [summary] = summaries
    for field in SUMMARY_FIELDS:
        assert field in summary, field


async def test_summary_counts_match_metrics(stopped_run):
    [summary] = summary_lines(stopped_run["first_log"])
    before = stopped_run["before_signal"]
    # The counters only grow, so the summary shows at least what /metrics showed before the signal.
    assert int(summary["events_applied"]) >= metric_sum(before, "profilestream_events_total", outcome="applied")
    assert int(summary["events_total"]) >= metric_sum(before, "profilestream_events_total")
    assert int(summary["sink_writes_postgres"]) >= metric_sum(before, "profilestream_sink_writes_total", sink="postgres", outcome="ok")
    assert int(summary["dead_letters"]) == 0


async def test_events_applied_once_across_restart(stopped_run):
    [summary] = summary_lines(stopped_run["first_log"])
    applied_after_restart = metric_sum(stopped_run["after_restart"], "profilestream_events_total", outcome="applied")
    assert int(summary["events_applied"]) + applied_after_restart == len(stopped_run["posts"])


async def test_restart_reprocesses_at_most_one_batch(stopped_run):
    duplicates = metric_sum(stopped_run["after_restart"], "profilestream_events_total", outcome="duplicate")
    assert duplicates <= BATCH_MAX


async def test_user_states_count_each_event_once(stopped_run):
    expected = distinct_events_per_user(stopped_run["posts"])
    applied = {user_id: state["events_applied"] for user_id, state in stopped_run["states"].items()}
    posts = {user_id: state["totals"]["posts"] for user_id, state in stopped_run["states"].items()}
    assert applied == dict(expected)
    assert posts == dict(expected)
