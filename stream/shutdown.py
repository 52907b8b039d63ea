"""The end of a worker run: a deadline for the stop, and one summary line with the run's counts.

mode (mode-streaming 0.7) and Faust (faust-streaming 0.15) have no bound on the whole stop:
mode's `Service.shutdown_timeout` only applies to services with `wait_for_shutdown` set,
which the Faust worker does not set. A stop can hang, for example in a sink write that
retries while Postgres is down, so `ShutdownDeadline` ends the process when the stop takes
longer than PROFILESTREAM_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

from prometheus_client import Counter as PrometheusCounter

from . import metrics

logger = logging.getLogger(__name__)

EXIT_SHUTDOWN_TIMED_OUT = 1

_summary_lock = threading.Lock()
_summary_logged = False


class ShutdownDeadline:
    """Exit the process with status 1 when a stop started by `arm()` takes longer than `timeout_s`.

    The deadline runs in a daemon thread, so it holds even when the event loop is blocked.
    Before exiting it logs `worker.shutdown_timed_out` and the summary line. Offsets not
    committed by then are processed again after the restart.
    """

    def __init__(self, timeout_s: float, started: float) -> None:
        self._timeout_s = timeout_s
        self._started = started
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def arm(self, reason: str) -> None:
        """Start the deadline. Later calls do nothing."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self._timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        logger.info("worker.stopping reason=%s timeout_s=%s", reason, self._timeout_s)

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    def _expire(self) -> None:
        logger.error("worker.shutdown_timed_out timeout_s=%s action=exit status=%d", self._timeout_s,
                     EXIT_SHUTDOWN_TIMED_OUT)
        log_summary(self._started)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_SHUTDOWN_TIMED_OUT)


def log_summary(started: float) -> None:
    """Log the `worker.stopped` line once per process. Later calls do nothing.

    `started` is the time.monotonic() value at the start of the run.
    """
    global _summary_logged
    with _summary_lock:
        if _summary_logged:
            return
        _summary_logged = True
    logger.info("worker.stopped %s", summary_fields(time.monotonic() - started))


def summary_fields(uptime_s: float) -> str:
    """Render the run's counts from this process's Prometheus counters as key=value pairs."""
    fields = {"uptime_s": f"{uptime_s:.1f}"}
    events = _totals(metrics.EVENTS, "outcome")
    fields["events_total"] = sum(events.values())
    for outcome in sorted(events.keys() | {"applied", "duplicate", "dead_letter"}):
        fields[f"events_{outcome}"] = events[outcome]
    fields["dead_letters"] = sum(_totals(metrics.DEAD_LETTERS, "reason").values())
    generations = _totals(metrics.GENERATIONS, "generator")
    # Generator "none" counts requests skipped without a generation (stored, erased, invalid).
    fields["generations"] = sum(count for generator, count in generations.items() if generator != "none")
    fields["generations_skipped"] = generations["none"]
    fields["regenerations_resent"] = sum(_totals(metrics.REQUESTS_RESENT, None).values())
    writes = _samples(metrics.SINK_WRITES)
    for sink in sorted({labels["sink"] for labels, _ in writes} | {"topic", "postgres"}):
        fields[f"sink_writes_{sink}"] = sum(value for labels, value in writes if labels == {"sink": sink, "outcome": "ok"})
    fields["sink_write_retries"] = sum(value for labels, value in writes if labels["outcome"] == "retry")
    fields["sink_writes_rejected"] = sum(value for labels, value in writes if labels["outcome"] == "rejected")
    return " ".join(f"{key}={_number(value)}" for key, value in fields.items())


def _samples(counter: PrometheusCounter) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    ]


def _totals(counter: PrometheusCounter, label: str | None) -> Counter:
    totals: Counter = Counter()
    for labels, value in _samples(counter):
        totals[labels[label] if label else ""] += value
    return totals


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
