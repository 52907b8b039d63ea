"""Benchmark: the worker's ingest, losses and recovery while its LLM endpoint fails in scripted ways.

Starts a local Kafka broker, a Postgres cluster and the OpenAI-compatible stub of
`tests.llm_stub`, which this script serves from its own event loop. For each scenario it creates
topics and a database of its own and produces `--copies` copies of the bundled Stack Exchange
events. Each copy has fresh event ids and is moved one data span plus a day later than the copy
before, so no event is deduplicated or dropped. Then `python -m stream worker` runs against the stub.

The stub sends the scenario's faulty reply from the worker's start until `--fault-seconds` after
the worker has processed its first input event, then grounded `ok` replies again. Per scenario:

- ingest rate: input records committed per second on the posts, likes and follows topics, and
  its ratio to the baseline scenario of the same run. The window runs from the first committed
  offset to the last poll before all input is committed or the fault ends. Faust commits every
  2.8 s (its default broker_commit_interval), so this rate rests on a few commits. The rate of
  processed records from the worker's /metrics is printed next to it;
- events lost: valid input events minus profilestream_events_total{outcome="applied"} of the
  three input types;
- profiles by generator and fallback_reason, from profiles_history in Postgres;
- recovery: seconds from the fault's end until the group's committed offsets on the
  regeneration topic reach its end offsets (with the whole group drained), and until the
  generated_at of the last profile.

    python -m bench.llm_faults [--scenarios baseline,hang] [--copies N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.error
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from handlers.errors import InvalidRecord, ProfilestreamError
from handlers.events import decode_event
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl, write_jsonl
from stream.progress import consumed_topics
from stream.replay import replay
from stream.services.kafka import KAFKA_VERSION, KafkaBroker
from stream.services.postgres import PostgresCluster
from stream.settings import Settings
from stream.worker import prepare
from tests.llm_stub import (
    LLMStub, Reply, hang, quota_exhausted, rate_limited, refusal, schema_breaking, server_error, slow, truncated,
)
from tests.worker_harness import WorkerProcess, isolated_settings

logger = logging.getLogger("bench.llm_faults")

MODEL = "stub-model"
API_KEY = "sk-bench-stub"
DEFAULT_COPIES = 2
DEFAULT_FAULT_S = 30.0
GENERATION_CONCURRENCY = 4
HANG_TIMEOUT_S = 3.0
POLL_S = 0.5
QUIET_POLLS = 3
# Limits that only stop a stuck run. A healthy run needs a small part of them.
INGEST_TIMEOUT_S = 240.0
DRAIN_TIMEOUT_S = 180.0
# The fault is switched on before the worker starts and narrowed to `fault_s` once input flows.
UNTIL_NARROWED_S = 3600.0
INPUT_TYPES = ("post", "like", "follow")
BASELINE = "baseline"


class BenchmarkError(ProfilestreamError):
    """The benchmark could not run a scenario; the message names the scenario and the log."""


@dataclass(frozen=True)
class Scenario:
    """One endpoint behaviour.

    `fault` builds the stub reply sent during the fault (None for no fault), and `settings`
    overrides worker settings for this scenario only.
    """

    name: str
    description: str
    fault: Callable[[], Reply] | None
    settings: dict = field(default_factory=dict)


SCENARIOS = (
    Scenario(BASELINE, "no fault, grounded replies", None),
    Scenario("slow", "every reply takes 2 s", lambda: slow(2.0)),
    Scenario("hang", f"no reply ever, LLM timeout {HANG_TIMEOUT_S:g} s", hang, {"llm_timeout_s": HANG_TIMEOUT_S}),
    Scenario("rate_limited", "HTTP 429 rate_limit_exceeded, Retry-After: 2", lambda: rate_limited(retry_after="2")),
    Scenario("quota", "HTTP 429 insufficient_quota", quota_exhausted),
    Scenario("server_error", "HTTP 500", server_error),
    Scenario("truncated", "JSON cut in half, finish_reason length", truncated),
    Scenario("schema_breaking", "valid JSON without the summary field", lambda: schema_breaking("missing")),
    Scenario("refusal", "a refusal instead of content", refusal),
)


@dataclass
class Sample:
    """One poll, `at` in seconds since the worker started. `processed` is None until /metrics responds."""

    at: float
    input_committed: int
    input_end: int
    regenerate_committed: int
    regenerate_end: int
    group_lag: int
    processed: int | None

    @property
    def regenerate_lag(self) -> int:
        return self.regenerate_end - self.regenerate_committed


@dataclass
class Services:
    kafka_bootstrap: str
    postgres_dsn: str
    stub: LLMStub
    events_path: Path
    valid_events: int
    workdir: Path


# Input data


def copied_events(lines: list[bytes], copies: int) -> list[dict]:
    """Return `copies` copies of the events in `lines`, in order, the first copy unchanged.

    Copy k gets event ids ending in ":k" and times moved k times (data span + 1 day) later, so
    every copy is newer than the one before and the dedup horizon of a user's state never
    drops an event.
    """
    documents = [orjson.loads(line) for line in lines]
    times = [datetime.fromisoformat(document["created_at"].replace("Z", "+00:00")) for document in documents]
    shift = max(times) - min(times) + timedelta(days=1)
    copied = []
    for copy in range(copies):
        for document, at in zip(documents, times):
            moved = at + copy * shift
            copied.append({
                **document,
                "event_id": document["event_id"] if copy == 0 else f"{document['event_id']}:{copy}",
                "created_at": moved.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            })
    return copied


def count_valid(path: Path) -> int:
    """Count the lines of `path` that the worker's decoder accepts."""
    now = datetime.now(UTC)
    valid = 0
    for _, line in read_jsonl(path):
        try:
            kind = orjson.loads(line)["schema"].split(".")[0]
            decode_event(kind, line, now=now)
        except (InvalidRecord, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        valid += 1
    return valid


# Kafka progress


class GroupProbe:
    """Committed and end offsets of the worker's consumer group, read with the aiokafka admin client."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id="bench-llm-faults")
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, client_id="bench-llm-faults")
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()
        self._partitions = [
            TopicPartition(entry["topic"], partition["partition"])
            for entry in await self._admin.describe_topics(consumed_topics(self._settings))
            for partition in entry["partitions"]
        ]

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def read(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Return (committed, end) offsets summed per topic, or None while the group coordinator is not ready."""
        try:
            ends = await self._consumer.end_offsets(self._partitions)
            committed = await self._admin.list_consumer_group_offsets(self._settings.app_id, partitions=self._partitions)
        except KafkaError as error:
            if not error.retriable:
                raise
            return None
        committed_by_topic: dict[str, int] = {}
        end_by_topic: dict[str, int] = {}
        for partition in self._partitions:
            position = committed.get(partition)
            offset = position.offset if position is not None and position.offset >= 0 else 0
            committed_by_topic[partition.topic] = committed_by_topic.get(partition.topic, 0) + offset
            end_by_topic[partition.topic] = end_by_topic.get(partition.topic, 0) + ends[partition]
        return committed_by_topic, end_by_topic

    async def sample(self, at: float, processed: int | None) -> Sample | None:
        offsets = await self.read()
        if offsets is None:
            return None
        committed, ends = offsets
        inputs = list(self._settings.input_topics)
        regenerate = self._settings.topic_regenerate
        return Sample(
            at=at,
            input_committed=sum(committed.get(topic, 0) for topic in inputs),
            input_end=sum(ends.get(topic, 0) for topic in inputs),
            regenerate_committed=committed.get(regenerate, 0),
            regenerate_end=ends.get(regenerate, 0),
            group_lag=sum(max(0, ends[topic] - committed.get(topic, 0)) for topic in ends),
            processed=processed,
        )


# Worker metrics


async def scrape(worker: WorkerProcess) -> dict[tuple[str, tuple], float] | None:
    """Return the worker's /metrics samples, or None while its HTTP server is not up."""
    try:
        return await asyncio.to_thread(worker.metrics)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def sum_samples(samples: dict[tuple[str, tuple], float], name: str, **labels: object) -> float:
    """Sum the samples called `name` whose labels match `labels`; a tuple value matches any of its items."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name != name:
            continue
        found = dict(sample_labels)
        if all(found.get(key) in (wanted if isinstance(wanted, tuple) else (wanted,)) for key, wanted in labels.items()):
            total += value
    return total


def by_label(samples: dict[tuple[str, tuple], float], name: str, label: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (sample_name, sample_labels), value in samples.items():
        if sample_name == name and value:
            key = dict(sample_labels).get(label, "")
            counts[key] = counts.get(key, 0) + int(value)
    return dict(sorted(counts.items()))


def processed_input(samples: dict[tuple[str, tuple], float] | None) -> int | None:
    if samples is None:
        return None
    return int(sum_samples(samples, "profilestream_events_total", type=INPUT_TYPES))


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of process `pid` from /proc, None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # utime and stime are fields 14 and 15 of proc(5). The split starts at field 3, after the command name.
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Postgres


def with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def create_database(server_dsn: str, name: str) -> str:
    """Create database `name` on the server of `server_dsn` and return its DSN."""
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return with_database(server_dsn, name)


async def profile_counts(dsn: str, fault_end_wall: datetime) -> dict:
    """Count the profile versions by generator and fallback reason, and time the last ones against the fault's end."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT generator, profile->>'fallback_reason' AS reason, count(*) AS n,"
            " max(generated_at) AS last_at FROM profiles_history GROUP BY 1, 2 ORDER BY 1, 2"
        )
        first_model_after = await connection.fetchval(
            "SELECT min(generated_at) FROM profiles_history WHERE generator <> 'rules' AND generated_at >= $1",
            fault_end_wall,
        )
        users = await connection.fetchval("SELECT count(*) FROM profiles_current")
    finally:
        await connection.close()
    model = sum(row["n"] for row in rows if row["generator"] != "rules")
    rules = {row["reason"] or "none": row["n"] for row in rows if row["generator"] == "rules"}
    last_at = max((row["last_at"] for row in rows), default=None)
    return {
        "profiles": sum(row["n"] for row in rows),
        "users": users,
        "model": model,
        "rules_by_reason": rules,
        "last_profile_after_fault_end_s": None if last_at is None else (last_at - fault_end_wall).total_seconds(),
        "first_model_profile_after_fault_end_s": (
            None if first_model_after is None else (first_model_after - fault_end_wall).total_seconds()
        ),
    }


# One scenario


@dataclass
class Tracked:
    """Observations of one `track` run, with times in seconds since the worker started."""

    samples: list[Sample]
    input_started_at: float
    fault_end_at: float
    fault_end_wall: datetime
    drained_at: float | None
    final_metrics: dict[tuple[str, tuple], float]


def ingest_rate(samples: list[Sample], fault_end_at: float, *, counter: str) -> float | None:
    """Return input records per second by `counter` ("input_committed" or "processed") during the fault.

    The window starts at the first sample with a non-zero count and ends at the first sample
    with all input counted, or at the last sample before the fault's end if that comes first.
    Returns None when the window does not span two sample times.
    """
    counted = [sample for sample in samples if (getattr(sample, counter) or 0) > 0]
    if not counted:
        return None
    start = end = counted[0]
    for sample in counted:
        if sample.at > fault_end_at:
            break
        end = sample
        if getattr(sample, counter) >= sample.input_end:
            break
    if end.at <= start.at:
        return None
    return (getattr(end, counter) - getattr(start, counter)) / (end.at - start.at)


def drained_since(samples: list[Sample]) -> float | None:
    """Return the time from which every later sample shows all input committed and no lag in the group."""
    since = None
    for sample in samples:
        done = sample.input_committed >= sample.input_end > 0 and sample.regenerate_lag == 0 and sample.group_lag == 0
        if not done:
            since = None
        elif since is None:
            since = sample.at
    return since


async def track(scenario: Scenario, worker: WorkerProcess, probe: GroupProbe, stub: LLMStub, fault_s: float) -> Tracked:
    """Poll the worker until the fault has ended and the group has drained for QUIET_POLLS polls.

    The fault window of `fault_s` seconds starts at the first poll at which the worker has
    processed input, and the stub's outage is narrowed to it then.
    """
    started = time.monotonic()
    samples: list[Sample] = []
    input_started_at = fault_end_at = fault_end_wall = None
    quiet = 0
    while True:
        if worker.process is not None and worker.process.poll() is not None:
            raise BenchmarkError(
                f"scenario {scenario.name}: the worker exited with code {worker.process.returncode}; see {worker.log_path}"
            )
        now = time.monotonic() - started
        processed = processed_input(await scrape(worker))
        if input_started_at is None and processed:
            input_started_at = now
            fault_end_at = now + fault_s
            fault_end_wall = datetime.now(UTC) + timedelta(seconds=fault_s)
            if scenario.fault is not None:
                stub.outage(scenario.fault(), fault_s)
        sample = await probe.sample(now, processed)
        if sample is not None:
            samples.append(sample)
        if input_started_at is None:
            if now > INGEST_TIMEOUT_S:
                raise BenchmarkError(
                    f"scenario {scenario.name}: the worker processed no input in {INGEST_TIMEOUT_S:.0f} s; see {worker.log_path}"
                )
        elif now >= fault_end_at and drained_since(samples) is not None:
            quiet += 1
            if quiet >= QUIET_POLLS:
                break
        elif now > fault_end_at + DRAIN_TIMEOUT_S:
            logger.warning("scenario.not_drained scenario=%s timeout_s=%s log=%s", scenario.name, DRAIN_TIMEOUT_S, worker.log_path)
            break
        await asyncio.sleep(POLL_S)
    return Tracked(samples, input_started_at, fault_end_at, fault_end_wall, drained_since(samples),
                   await scrape(worker) or {})


async def run_scenario(scenario: Scenario, services: Services, fault_s: float) -> dict:
    """Run the worker through one scenario on topics and a database of its own; return its result row."""
    stub = services.stub
    stub.reset()
    workdir = services.workdir / scenario.name
    workdir.mkdir(parents=True, exist_ok=True)

    database = await create_database(services.postgres_dsn, f"bench_{scenario.name}_{uuid.uuid4().hex[:8]}")
    settings = isolated_settings(
        services.kafka_bootstrap, database, workdir,
        llm_base_url=stub.base_url, llm_model=MODEL, llm_api_key=API_KEY,
        generation_concurrency=GENERATION_CONCURRENCY, **scenario.settings,
    )
    await prepare(settings)
    await replay(services.events_path, settings, progress=False)

    if scenario.fault is not None:
        stub.outage(scenario.fault(), UNTIL_NARROWED_S)
    probe = GroupProbe(settings)
    await probe.start()
    load_before = os.getloadavg()[0]
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    logger.info("scenario.started scenario=%s app_id=%s log=%s", scenario.name, settings.app_id, worker.log_path)
    try:
        tracked = await track(scenario, worker, probe, stub, fault_s)
        worker_cpu_s = cpu_seconds(worker.process.pid)
    finally:
        await asyncio.to_thread(worker.stop)
        await probe.stop()

    stub_stats = {"stub_requests": len(stub.requests), "stub_max_in_flight": stub.max_in_flight}
    # Releases the requests that the hang reply still holds open.
    stub.reset()
    profiles = await profile_counts(database, tracked.fault_end_wall)
    row = summarize(scenario, services, tracked, fault_s if scenario.fault is not None else 0.0)
    row.update(stub_stats, **profiles, worker_cpu_s=worker_cpu_s, load_average_1m=[load_before, os.getloadavg()[0]])
    return row


def summarize(scenario: Scenario, services: Services, tracked: Tracked, fault_s: float) -> dict:
    samples = tracked.samples
    metrics = tracked.final_metrics
    outcomes = sorted({dict(labels)["outcome"] for name, labels in metrics if name == "profilestream_events_total"})
    applied = int(sum_samples(metrics, "profilestream_events_total", type=INPUT_TYPES, outcome="applied"))
    committed_at = next((sample.at for sample in samples if sample.input_committed >= sample.input_end > 0), None)
    drained_at = tracked.drained_at
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "fault_s": fault_s,
        "ingest_committed_per_s": ingest_rate(samples, tracked.fault_end_at, counter="input_committed"),
        "ingest_processed_per_s": ingest_rate(samples, tracked.fault_end_at, counter="processed"),
        "input_committed_after_s": None if committed_at is None else committed_at - tracked.input_started_at,
        "valid_events": services.valid_events,
        "applied_events": applied,
        "events_lost": services.valid_events - applied,
        "input_outcomes": {
            outcome: int(sum_samples(metrics, "profilestream_events_total", type=INPUT_TYPES, outcome=outcome))
            for outcome in outcomes
        },
        "regeneration_requests": samples[-1].regenerate_end if samples else 0,
        "generations_by_outcome": by_label(metrics, "profilestream_generations_total", "outcome"),
        "llm_calls_by_outcome": by_label(metrics, "profilestream_llm_requests_total", "outcome"),
        "llm_retries": int(sum_samples(metrics, "profilestream_llm_retries_total")),
        "drained": drained_at is not None,
        "regeneration_drained_after_fault_end_s": None if drained_at is None else max(0.0, drained_at - tracked.fault_end_at),
        "drained_after_input_start_s": None if drained_at is None else drained_at - tracked.input_started_at,
    }


def add_ratios(rows: list[dict]) -> None:
    """Set each row's ingest ratios to the baseline row's rates; None without a baseline."""
    baseline = next((row for row in rows if row["scenario"] == BASELINE and "error" not in row), None)
    for row in rows:
        for rate, ratio in (("ingest_committed_per_s", "ingest_committed_ratio"), ("ingest_processed_per_s", "ingest_processed_ratio")):
            reference = baseline.get(rate) if baseline else None
            value = row.get(rate)
            row[ratio] = value / reference if value is not None and reference else None


# Whole run


async def run_all(scenarios: list[Scenario], copies: int, fault_s: float, kafka_bootstrap: str, postgres_dsn: str,
                  workdir: Path) -> list[dict]:
    lines = [line for _, line in read_jsonl(bundled_data_path())]
    events_path = workdir / "events.jsonl"
    write_jsonl(copied_events(lines, copies), events_path)
    stub = LLMStub()
    await stub.start()
    rows = []
    try:
        services = Services(kafka_bootstrap, postgres_dsn, stub, events_path, count_valid(events_path), workdir)
        for scenario in scenarios:
            print(f"scenario {scenario.name}: {scenario.description}", file=sys.stderr, flush=True)
            try:
                rows.append(await run_scenario(scenario, services, fault_s))
            except BenchmarkError as error:
                logger.error("scenario.failed scenario=%s error=%s", scenario.name, error)
                rows.append({"scenario": scenario.name, "description": scenario.description, "error": str(error)})
    finally:
        await stub.close()
    add_ratios(rows)
    return rows


def machine() -> dict:
    """Describe the machine and versions the numbers come from."""
    cpu = platform.processor() or "unknown"
    memory_gib = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as meminfo:
            total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
            memory_gib = round(total_kb / 2**20, 1)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "kafka": KAFKA_VERSION,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _number(value: float | None, pattern: str = "{:.0f}") -> str:
    return "-" if value is None else pattern.format(value)


def format_table(rows: list[dict], copies: int) -> str:
    """Render one line per scenario, with the fallback reasons of the rules-made profiles."""
    header = (
        f"{'scenario':<16} {'commit/s':>8} {'ratio':>5} {'proc/s':>6} {'ratio':>5} {'lost':>4} {'requests':>8}"
        f" {'profiles':>8} {'model':>5} {'rules':>5} {'drain@s':>7} {'drain+s':>7} {'last+s':>6} {'model+s':>7}"
        f" {'calls':>5} {'inflight':>8}"
        f" {'cpu s':>5}  rules by fallback_reason"
    )
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['scenario']:<16} failed: {row['error']}")
            continue
        rules = sum(row["rules_by_reason"].values())
        reasons = ", ".join(f"{reason}={count}" for reason, count in row["rules_by_reason"].items()) or "-"
        lines.append(
            f"{row['scenario']:<16} {_number(row['ingest_committed_per_s']):>8} {_number(row['ingest_committed_ratio'], '{:.2f}'):>5}"
            f" {_number(row['ingest_processed_per_s']):>6} {_number(row['ingest_processed_ratio'], '{:.2f}'):>5}"
            f" {row['events_lost']:>4} {row['regeneration_requests']:>8} {row['profiles']:>8} {row['model']:>5} {rules:>5}"
            f" {_number(row['drained_after_input_start_s'], '{:.1f}'):>7}"
            f" {_number(row['regeneration_drained_after_fault_end_s'], '{:.1f}'):>7}"
            f" {_number(row['last_profile_after_fault_end_s'], '{:.1f}'):>6}"
            f" {_number(row['first_model_profile_after_fault_end_s'], '{:.1f}'):>7}"
            f" {row['stub_requests']:>5} {row['stub_max_in_flight']:>8} {_number(row['worker_cpu_s']):>5}  {reasons}"
        )
    valid = next((row["valid_events"] for row in rows if "valid_events" in row), None)
    loads = [load for row in rows for load in row.get("load_average_1m", ())]
    lines += [
        "",
        f"input: {copies} {'copy' if copies == 1 else 'copies'} of the bundled Stack Exchange events, {valid} valid events per scenario;"
        f" 1-minute load average {_number(min(loads, default=None), '{:.1f}')} to {_number(max(loads, default=None), '{:.1f}')}"
        f" on {os.cpu_count()} cores",
        "commit/s: input records committed per second during the fault; proc/s: processed per second from /metrics;"
        " ratio: to the baseline",
        "lost: valid events minus applied ones; requests: regeneration requests; profiles: versions in profiles_history",
        "drain@s: seconds from the first processed event until all input is committed and the regeneration"
        " topic's lag is 0; drain+s: the same from the fault's end (0 = drained during the fault)",
        "last+s: seconds from the fault's end to the last profile's generated_at (negative = before the end);"
        " model+s: to the first model-made profile after the end (- = none)",
        "calls: requests the stub received; inflight: most requests the stub had open at once (hang: timed-out"
        " requests stay open at the stub); cpu s: the worker's CPU seconds; the baseline's fault window is"
        " virtual and of the same length",
    ]
    return "\n".join(lines)


def select_scenarios(names: str | None) -> list[Scenario]:
    """Return the scenarios named in the comma-separated `names` (all when None), in the order of SCENARIOS."""
    known = {scenario.name: scenario for scenario in SCENARIOS}
    if names is None:
        return list(SCENARIOS)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown scenario {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return [scenario for scenario in SCENARIOS if scenario.name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", help=f"comma-separated scenarios to run (default: all): {', '.join(s.name for s in SCENARIOS)}")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES,
                        help=f"copies of the bundled events to replay per scenario (default: {DEFAULT_COPIES})")
    parser.add_argument("--fault-seconds", type=float, default=DEFAULT_FAULT_S,
                        help=f"seconds the fault lasts after the worker's first processed event (default: {DEFAULT_FAULT_S:g})")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the folder with the worker logs and the event file (always kept when a scenario fails)")
    args = parser.parse_args(argv)

    try:
        scenarios = select_scenarios(args.scenarios)
    except ValueError as error:
        parser.error(str(error))
    if args.copies < 1:
        parser.error(f"--copies {args.copies} must be at least 1")
    if args.fault_seconds <= 0:
        parser.error(f"--fault-seconds {args.fault_seconds} must be positive")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-llm-faults-"))
    with KafkaBroker() as broker, PostgresCluster() as cluster:
        rows = asyncio.run(run_all(scenarios, args.copies, args.fault_seconds, broker.bootstrap_servers, cluster.dsn, workdir))

    print(format_table(rows, args.copies))
    failed = any("error" in row for row in rows)
    if failed or args.keep_logs:
        print(f"worker logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        result = {"machine": machine(), "copies": args.copies, "fault_s": args.fault_seconds,
                  "generation_concurrency": GENERATION_CONCURRENCY, "scenarios": rows,
                  "seconds": time.monotonic() - started}
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
