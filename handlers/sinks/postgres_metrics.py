"""Prometheus metrics of the Postgres sink.

Labels take only fixed error kinds, never a user id or free text. Production code shares
`default_postgres_metrics()`, registered once in the default registry. Tests build a
PostgresMetrics with their own CollectorRegistry.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Values of the `kind` label of profilestream_postgres_write_errors.
DEADLOCK = "deadlock"
SERIALIZATION_FAILURE = "serialization_failure"
ACQUIRE_TIMEOUT = "acquire_timeout"
CONNECTION_FAILED = "connection_failed"
STATEMENT_TIMEOUT = "statement_timeout"


class PostgresMetrics:
    """The profilestream_postgres_* metrics, registered in `registry`.

    Registering twice in one registry raises ValueError, so create one instance per registry.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.write_seconds = Histogram(
            "profilestream_postgres_write_seconds",
            "Duration of one successful batch write, retries after deadlocks and their waits included.",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.write_errors = Counter(
            "profilestream_postgres_write_errors",
            "Failed batch write attempts by kind. The sink retries deadlocks and serialization failures itself,"
            " so a count here is not a lost batch.",
            ["kind"], registry=registry,
        )
        # Every kind exports 0 from the start, so Prometheus has the series before the first error.
        for kind in (DEADLOCK, SERIALIZATION_FAILURE, ACQUIRE_TIMEOUT, CONNECTION_FAILED, STATEMENT_TIMEOUT):
            self.write_errors.labels(kind)
        self.acquire_seconds = Histogram(
            "profilestream_postgres_pool_acquire_seconds",
            "Time to borrow a pooled connection, waiting and connecting included; only successful acquires.",
            buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.acquire_waits = Counter(
            "profilestream_postgres_pool_acquire_waits",
            "Connection requests that found all pool_max connections borrowed or requested, so they had to wait.",
            registry=registry,
        )
        self.acquire_timeouts = Counter(
            "profilestream_postgres_pool_acquire_timeouts",
            "Connection requests that got no connection within acquire_timeout_s.",
            registry=registry,
        )


_default: PostgresMetrics | None = None


def default_postgres_metrics() -> PostgresMetrics:
    """Return the process-wide PostgresMetrics in prometheus_client's default registry, creating it once."""
    global _default
    if _default is None:
        _default = PostgresMetrics()
    return _default
