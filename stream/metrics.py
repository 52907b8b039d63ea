"""Prometheus metrics of the worker. No label ever takes a user id, post id or free text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "profilestream_events", "Input records by event type and outcome.", ["type", "outcome"]
)
LATE_EVENTS = Counter(
    "profilestream_late_events",
    "Applied events whose hour is 7 days (168 hourly buckets) or more before the hour of their user's latest event: counted in totals and interests, not in the hourly windows.",
    ["type"],
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
BATCH_RETRIES = Counter(
    "profilestream_batch_retries",
    "Batches an agent ran again after an unexpected error, by agent (ingest, post-index, generate).",
    ["agent"],
)
for _agent in ("ingest", "post-index", "generate"):
    BATCH_RETRIES.labels(_agent)
REQUESTS_RESENT = Counter(
    "profilestream_regenerations_resent",
    "Regeneration requests sent again because a duplicate record showed that a batch was being reprocessed.",
)
SKIPPED_GAP_SEEKS = Counter(
    "profilestream_consumer_gap_seeks",
    "Seeks of an input partition back to its committed offset because Faust skipped records below its read offset (stream/faust_acks.py).",
)
FETCH_GAPS = Counter(
    "profilestream_consumer_fetch_gaps",
    "Jumps in the offsets Faust fetched for an input partition: records it dropped, delivered again by a seek (stream/faust_acks.py).",
)
STALE_RECORDS_SKIPPED = Counter(
    "profilestream_consumer_stale_records_skipped",
    "Input records Faust fetched before a seek of their partition, skipped because the seek delivers them again in order (stream/faust_acks.py).",
)
SEEKS_REISSUED = Counter(
    "profilestream_consumer_seeks_reissued",
    "Seeks of an input partition issued again because the seek's target record had not arrived within 30 s (stream/faust_acks.py).",
)
ACKS_RESTORED = Counter(
    "profilestream_consumer_acks_restored",
    "Input offsets whose lost Faust acknowledgement was restored so the partition's commits could advance (stream/faust_acks.py).",
)
ERASURES = Counter(
    "profilestream_erasures", "User erasures carried out in a sink (rows deleted, tombstone sent), by sink and outcome.", ["sink", "outcome"]
)
SINK_SECONDS = Histogram(
    "profilestream_sink_write_seconds", "Time of one profile write, by sink.", ["sink"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
STATE_USERS = Gauge(
    "profilestream_state_users", "Users whose state this worker holds in memory.",
    multiprocess_mode="livesum",
)
STATE_BYTES = Gauge(
    "profilestream_state_bytes",
    "Estimated JSON-encoded size of the user-state table this worker holds: the mean size of a random sample of entries times their count.",
    multiprocess_mode="livesum",
)
DECODE_SECONDS = Histogram(
    "profilestream_decode_seconds", "Time to decode and validate one input record, by event type; invalid records included.",
    ["type"], buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05),
)
REGENERATIONS_PENDING = Gauge(
    "profilestream_regenerations_pending",
    "Regeneration requests in this worker's partitions of the regenerate topic that the group has not committed yet.",
    multiprocess_mode="livesum",
)
PRODUCER_ERRORS = Counter(
    "profilestream_kafka_producer_errors",
    "Records the Kafka producer failed to deliver after its own retries, to any topic (dead letters, changelogs and profiles included).",
)
POST_INDEX = Counter(
    "profilestream_post_index_records",
    "Post-index records by kind (post, like, invalid) and outcome (indexed, joined, pending, pending_dropped, dropped, and expired for posts and waiting likes older than PROFILESTREAM_POST_INDEX_RETENTION_S).",
    ["kind", "outcome"],
)
COALESCED = Counter(
    "profilestream_coalesced_requests", "Regeneration requests skipped because a newer one for the user was in the same batch."
)
BUDGET_REMAINING = Gauge(
    "profilestream_generation_budget_remaining",
    "Generations this worker may start now under PROFILESTREAM_GENERATION_BUDGET_PER_MINUTE (the token bucket's whole tokens), set at each generation and every 5 s; -1 when no budget is set.",
    multiprocess_mode="livesum",
)
BUDGET_WAITS = Counter(
    "profilestream_budget_waits", "Times the generation stage waited for the global generations-per-minute budget."
)
CONSUMER_LAG = Gauge(
    "profilestream_kafka_consumer_lag",
    "Records of an assigned input partition not yet committed by the group (end offset minus committed offset).",
    ["topic", "partition"],
    multiprocess_mode="livesum",
)
COMMITTED_OFFSET_AGE = Gauge(
    "profilestream_kafka_committed_offset_age_seconds",
    "Seconds since this worker last saw the committed offset of an assigned input partition advance, or since the assignment.",
    ["topic", "partition"],
    multiprocess_mode="livemax",
)
ASSIGNED_PARTITIONS = Gauge(
    "profilestream_kafka_assigned_partitions", "Input partitions assigned to this worker.",
    multiprocess_mode="livesum",
)
STALLED_PARTITIONS = Gauge(
    "profilestream_kafka_stalled_partitions",
    "Assigned input partitions with lag whose committed offset has not advanced for PROFILESTREAM_WATCHDOG_STALL_S.",
    multiprocess_mode="livesum",
)
REBALANCES = Counter(
    "profilestream_kafka_rebalances", "Consumer group rebalances this worker took part in (counted when they start)."
)
REBALANCE_SECONDS = Histogram(
    "profilestream_kafka_rebalance_seconds",
    "Time from the start of a rebalance to the end of table recovery.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
READ_REQUESTS = Counter(
    "profilestream_read_api_requests",
    "Read API requests by route template (never the user id) and HTTP status code.",
    ["route", "status"],
)
READ_SECONDS = Histogram(
    "profilestream_read_api_seconds", "Time to serve one read API request, by route template.", ["route"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
