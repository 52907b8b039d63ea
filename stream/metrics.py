"""Prometheus metrics of the worker. No label ever takes a user id, post id or free text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "profilestream_events", "Input records by event type and outcome.", ["type", "outcome"]
)
DEAD_LETTERS = Counter(
    "profilestream_dead_letters", "Records sent to the dead-letter topic, by reason.", ["reason"]
)
TRIGGERS = Counter(
    "profilestream_triggers", "Profile regenerations requested, by trigger reason.", ["reason"]
)
GENERATIONS = Counter(
    "profilestream_generations", "Profiles generated, by generator and outcome.", ["generator", "outcome"]
)
GENERATION_SECONDS = Histogram(
    "profilestream_generation_seconds", "Time to generate one profile, fallback included.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
SINK_WRITES = Counter(
    "profilestream_sink_writes", "Profile writes by sink and outcome.", ["sink", "outcome"]
)
SINK_SECONDS = Histogram(
    "profilestream_sink_write_seconds", "Time of one profile write, by sink.", ["sink"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
STATE_USERS = Gauge(
    "profilestream_state_users", "Users whose state this worker holds in memory."
)
POST_INDEX = Counter(
    "profilestream_post_index_records", "Post-index records by kind (post, like) and outcome.", ["kind", "outcome"]
)
COALESCED = Counter(
    "profilestream_coalesced_requests", "Regeneration requests skipped because a newer one for the user was in the same batch."
)
BUDGET_WAITS = Counter(
    "profilestream_budget_waits", "Times the generation stage waited for the global generations-per-minute budget."
)
CONSUMER_LAG = Gauge(
    "profilestream_kafka_consumer_lag",
    "Records of an assigned input partition not yet committed by the group (end offset minus committed offset).",
    ["topic", "partition"],
)
COMMITTED_OFFSET_AGE = Gauge(
    "profilestream_kafka_committed_offset_age_seconds",
    "Seconds since this worker last saw the committed offset of an assigned input partition advance, or since the assignment.",
    ["topic", "partition"],
)
ASSIGNED_PARTITIONS = Gauge(
    "profilestream_kafka_assigned_partitions", "Input partitions assigned to this worker."
)
STALLED_PARTITIONS = Gauge(
    "profilestream_kafka_stalled_partitions",
    "Assigned input partitions with lag whose committed offset has not advanced for PROFILESTREAM_WATCHDOG_STALL_S.",
)
REBALANCES = Counter(
    "profilestream_kafka_rebalances", "Consumer group rebalances this worker took part in (counted when they start)."
)
REBALANCE_SECONDS = Histogram(
    "profilestream_kafka_rebalance_seconds",
    "Time from the start of a rebalance to the end of table recovery.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
