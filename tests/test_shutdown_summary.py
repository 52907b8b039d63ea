"""The worker's stop: the summary line's counts and the deadline that ends a stop taking too long."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stream import metrics
from stream.shutdown import EXIT_SHUTDOWN_TIMED_OUT, summary_fields

ROOT = Path(__file__).parent.parent


def parse(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split())


def test_summary_counts_grow_with_counters():
    before = parse(summary_fields(1.0))
    metrics.EVENTS.labels("post", "applied").inc(3)
    metrics.EVENTS.labels("like", "applied").inc(2)
    metrics.EVENTS.labels("post", "duplicate").inc()
    metrics.DEAD_LETTERS.labels("invalid_json").inc()
    metrics.GENERATIONS.labels("rules", "ok").inc(4)
    metrics.GENERATIONS.labels("none", "already_stored").inc()
    metrics.SINK_WRITES.labels("postgres", "ok").inc(4)
    metrics.SINK_WRITES.labels("postgres", "retry").inc(2)
    after = parse(summary_fields(12.34))

    def grew(field: str) -> int:
        return int(after[field]) - int(before[field])

    assert after["uptime_s"] == "12.3"
    assert grew("events_total") == 6
    assert grew("events_applied") == 5
    assert grew("events_duplicate") == 1
    assert grew("dead_letters") == 1
    assert grew("generations") == 4
    assert grew("generations_skipped") == 1
    assert grew("sink_writes_postgres") == 4
    assert grew("sink_write_retries") == 2
    assert grew("sink_writes_topic") == 0


def test_summary_lists_fixed_fields_before_any_event():
    fields = parse(summary_fields(0.0))
    for field in ("events_applied", "events_duplicate", "events_dead_letter", "dead_letters", "generations",
                  "sink_writes_topic", "sink_writes_postgres", "sink_writes_rejected"):
        assert field in fields


# Arms a 0.5 s deadline, then blocks the main thread for longer, as a hung stop would.
DEADLINE_SCRIPT = """
import logging, time
from stream.shutdown import ShutdownDeadline, log_summary
logging.basicConfig(level=logging.INFO, format="%(message)s")
deadline = ShutdownDeadline(0.5, time.monotonic())
deadline.arm("SIGTERM")
time.sleep(30)
print("not reached", flush=True)
"""


def test_deadline_exits_hung_stop():
    result = subprocess.run([sys.executable, "-c", DEADLINE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_SHUTDOWN_TIMED_OUT
    assert "not reached" not in result.stdout
    lines = result.stderr.splitlines()
    assert "worker.stopping reason=SIGTERM timeout_s=0.5" in lines
    assert any(line.startswith("worker.shutdown_timed_out timeout_s=0.5") for line in lines)
    assert len([line for line in lines if line.startswith("worker.stopped ")]) == 1


# A stop that finishes in time cancels the deadline, and the summary is logged once.
CANCEL_SCRIPT = """
import logging, time
from stream.shutdown import ShutdownDeadline, log_summary
logging.basicConfig(level=logging.INFO, format="%(message)s")
deadline = ShutdownDeadline(0.5, time.monotonic())
deadline.arm("SIGTERM")
deadline.cancel()
log_summary(time.monotonic())
log_summary(time.monotonic())
time.sleep(1)
print("finished", flush=True)
"""


def test_cancelled_deadline_lets_stop_finish():
    result = subprocess.run([sys.executable, "-c", CANCEL_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == "finished"
    assert "worker.shutdown_timed_out" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("worker.stopped ")]) == 1
