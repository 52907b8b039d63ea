"""Benchmark: the worker's ingest rate on a real broker, next to the raw consumer rate of the same topics.

Starts a local Kafka broker and Postgres cluster (the worker writes profiles there), creates
topics of its own and produces the bundled Stack Exchange events `--copies` times. Every copy
gets fresh event ids, so nothing is deduplicated, and keeps the user ids, so the copies add to
the same users' state. Copies are also moved back in time by the span of the data, oldest copy
first, because an event older than a full dedup set is dropped as `beyond_dedup_horizon`.

Then, in the same run:
(a) a plain AIOKafkaConsumer reads every record of the three input topics from the beginning
    with no processing (median of `--raw-repeats` reads, records/s and records per CPU second);
(b) `python -m stream worker` runs as a subprocess. The clock starts at its first committed
    offset on the input topics and stops when their committed offsets reach the end (events/s,
    events per CPU second of the worker, and both as ratios to (a)). The pipeline counts as
    drained when `stream.progress.group_lag` is zero, which also covers the worker's internal
    topics. The worker's VmRSS and CPU time are read from /proc every second.

    python -m bench.ingest_throughput [--copies N] [--partitions N] [--timeout S] [--raw-repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl, write_jsonl
from stream.progress import group_lag
from stream.replay import replay
from stream.services.kafka import KAFKA_VERSION, KafkaBroker
from stream.services.postgres import PostgresCluster
from stream.settings import Settings
from stream.worker import prepare
from tests.worker_harness import WorkerProcess, isolated_settings

logger = logging.getLogger("bench.ingest_throughput")

BUNDLED_EVENTS = 5788
DEFAULT_COPIES = 9  # 52,092 events
DEFAULT_PARTITIONS = 2
DEFAULT_TIMEOUT_S = 600.0
RAW_REPEATS = 3
POLL_S = 0.5
SAMPLE_INTERVAL_S = 1.0
EARLIEST_EVENT = datetime(1990, 1, 2, tzinfo=UTC)  # a day after the earliest instant decode_event accepts
INPUT_TYPES = ("post", "like", "follow")


def copy_events(lines: list[bytes], copies: int) -> Iterator[dict]:
    """Yield `copies` copies of the events in `lines`, oldest copy first, each in the lines' order.

    Copy k gets event ids ending in ":copyK" and timestamps moved back by (copies - 1 - k) times
    the data's span plus one day, so the last copy keeps the original times. Raises ValueError
    when the oldest copy would start before 1990, which decode_event rejects.
    """
    documents = [orjson.loads(line) for line in lines]
    times = [datetime.fromisoformat(document["created_at"]) for document in documents]
    shift = max(times) - min(times) + timedelta(days=1)
    if min(times) - (copies - 1) * shift < EARLIEST_EVENT:
        limit = int((min(times) - EARLIEST_EVENT) / shift) + 1
        raise ValueError(f"--copies {copies} would move events before 1990; use at most {limit} copies of this file")
    for copy in range(copies):
        offset = (copies - 1 - copy) * shift
        for document, at in zip(documents, times):
            yield {
                **document,
                "event_id": f"{document['event_id']}:copy{copy}",
                "created_at": (at - offset).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }


async def topic_partitions(bootstrap: str, topics: list[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-describe")
    await admin.start()
    try:
        return [
            TopicPartition(entry["topic"], partition["partition"])
            for entry in await admin.describe_topics(topics)
            for partition in entry["partitions"]
        ]
    finally:
        await admin.close()


async def raw_consume(bootstrap: str, topics: list[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Read every record of `topics` from the beginning with a plain consumer; return count, seconds and rate."""
    partitions = await topic_partitions(bootstrap, topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign(partitions)
        # With aiokafka 0.14 and auto_offset_reset="latest", a seek issued after another await
        # lost to the fetcher's reset of the new assignment, and the consumer read nothing.
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        total = sum(ends.values())
        records = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        while records < total:
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"raw consume timed out: read {records} of {total} records in {timeout_s:.0f} s")
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            records += sum(len(messages) for messages in batch.values())
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    finally:
        await consumer.stop()
    return {"records": records, "seconds": seconds, "per_s": records / seconds, "cpu_s": cpu_s,
            "per_cpu_s": records / cpu_s if cpu_s > 0 else float("nan")}


class ProcessSampler(threading.Thread):
    """Read VmRSS and CPU time of process `pid` every `interval_s` seconds until stopped or the process exits.

    CPU time (user plus system) shows how much work the worker did even when other processes
    on the machine slow down its wall-clock rate.
    """

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name="process-sampler", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.started_at = time.monotonic()
        self.samples: list[tuple[float, int, float]] = []  # (seconds since start, RSS in kB, CPU seconds)
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            rss_kb, cpu_s = read_rss_kb(self.pid), read_cpu_s(self.pid)
            if rss_kb is None or cpu_s is None:
                return
            self.samples.append((time.monotonic() - self.started_at, rss_kb, cpu_s))
            self._stopping.wait(self.interval_s)

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def at(self, seconds: float) -> tuple[float, int, float] | None:
        """Return the last sample taken at or before `seconds`."""
        earlier = [sample for sample in self.samples if sample[0] <= seconds]
        return earlier[-1] if earlier else None


def read_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def read_cpu_s(pid: int) -> float | None:
    """Return user plus system CPU seconds of `pid` from /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name in field 2 may contain spaces, so count fields after its ")".
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def committed_input(admin: AIOKafkaAdminClient, group: str, partitions: list[TopicPartition]) -> int:
    """Return the sum of the group's committed offsets on `partitions` (0 where none is committed)."""
    offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
    return sum(max(0, position.offset) for position in offsets.values() if position is not None)


def processed_input(worker: WorkerProcess) -> int | None:
    """Return the input records the worker has handled, from its /metrics, or None before it serves them."""
    try:
        samples = worker.metrics()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return int(sum(
        value for (name, labels), value in samples.items()
        if name == "profilestream_events_total" and dict(labels).get("type") in INPUT_TYPES
    ))


@dataclass(frozen=True, slots=True)
class Mark:
    """A moment of the worker run: seconds since its start, its CPU seconds then, and input records done then."""

    seconds: float
    cpu_s: float
    records: int


def rate_between(start: Mark, end: Mark) -> dict:
    """Return wall-clock and CPU rates of the records done between two marks."""
    records = end.records - start.records
    seconds = end.seconds - start.seconds
    cpu_s = end.cpu_s - start.cpu_s
    return {
        "records": records,
        "seconds": seconds,
        "events_per_s": records / seconds if seconds > 0 else float("nan"),
        "cpu_s": cpu_s,
        "events_per_cpu_s": records / cpu_s if cpu_s > 0 else float("nan"),
    }


async def input_end_offsets(settings: Settings) -> tuple[list[TopicPartition], int]:
    """Return the input topics' partitions and the sum of their end offsets."""
    partitions = await topic_partitions(settings.kafka_bootstrap_servers, list(settings.input_topics))
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await probe.start()
    try:
        return partitions, sum((await probe.end_offsets(partitions)).values())
    finally:
        await probe.stop()


async def track_worker(settings: Settings, worker: WorkerProcess, sampler: ProcessSampler, timeout_s: float) -> dict:
    """Poll the worker's committed input offsets and /metrics until its group has no lag at all.

    Returns marks (see `Mark`) at the first commit, at input catch-up, at the first and last
    input record its /metrics counted, and when `group_lag` is zero, plus every poll.
    """
    partitions, total = await input_end_offsets(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, client_id="bench-progress")
    await admin.start()
    marks: dict[str, Mark] = {}
    timeline = []
    try:
        while "drained" not in marks:
            worker.check_alive()
            if time.monotonic() > sampler.started_at + timeout_s:
                raise TimeoutError(f"the worker had not drained {total} input records after {timeout_s:.0f} s; log: {worker.log_path}")
            try:
                committed = await committed_input(admin, settings.app_id, partitions)
            except KafkaError as error:
                # The group coordinator is not ready in the first seconds of a new group.
                if not error.retriable:
                    raise
                await asyncio.sleep(POLL_S)
                continue
            processed = processed_input(worker)
            now = Mark(time.monotonic() - sampler.started_at, read_cpu_s(worker.process.pid) or 0.0, committed)
            timeline.append({"seconds": round(now.seconds, 2), "cpu_s": now.cpu_s, "committed": committed, "processed": processed})
            if committed > 0:
                marks.setdefault("first_commit", now)
            if processed:
                marks.setdefault("first_handled", replace(now, records=processed))
            if processed is not None and processed >= total:
                marks.setdefault("all_handled", replace(now, records=processed))
            if committed >= total:
                marks.setdefault("caught_up", now)
                lag, _ = await group_lag(settings)
                if lag == 0:
                    marks["drained"] = now
            await asyncio.sleep(POLL_S)
    finally:
        await admin.close()
    handled = None
    if "first_handled" in marks and "all_handled" in marks:
        handled = rate_between(marks["first_handled"], marks["all_handled"])
    return {
        "input_records": total,
        "marks": {name: asdict(mark) for name, mark in marks.items()},
        "committed": rate_between(marks["first_commit"], marks["caught_up"]),
        "handled": handled,
        "timeline": timeline,
    }


def rss_summary(sampler: ProcessSampler, first_commit_s: float, caught_up_s: float, drained_s: float) -> dict:
    """Return the worker's RSS in MiB at its first commit, at 25/50/75 % of the catch-up, the peak until drained and at the end."""
    window = [rss_kb for at, rss_kb, _ in sampler.samples if first_commit_s <= at <= drained_s]
    moments = [first_commit_s + share * (caught_up_s - first_commit_s) for share in (0.25, 0.5, 0.75)]
    return {
        "start_mib": _mib_at(sampler, first_commit_s),
        "quarters_mib": [_mib_at(sampler, moment) for moment in moments],
        "peak_mib": round(max(window) / 1024, 1) if window else None,
        "end_mib": _mib_at(sampler, drained_s),
        "samples": [(round(at, 1), rss_kb) for at, rss_kb, _ in sampler.samples],
    }


def _mib_at(sampler: ProcessSampler, seconds: float) -> float | None:
    sample = sampler.at(seconds)
    return None if sample is None else round(sample[1] / 1024, 1)


def run(copies: int, partitions: int, timeout_s: float, raw_repeats: int) -> dict:
    """Start the services, produce the copies, measure (a) and (b), stop everything; return the numbers."""
    lines = [line for _, line in read_jsonl(bundled_data_path())]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder, KafkaBroker() as broker, PostgresCluster() as cluster:
        workdir = Path(folder)
        settings = isolated_settings(broker.bootstrap_servers, cluster.dsn, workdir, partitions=partitions)
        asyncio.run(prepare(settings))
        events_path = workdir / "events.jsonl.gz"
        produced = write_jsonl(copy_events(lines, copies), events_path)
        logger.info("bench.produce events=%s copies=%s", produced, copies)
        stats = asyncio.run(replay(events_path, settings, progress=False))
        topics = list(settings.input_topics)
        raw_runs = [asyncio.run(raw_consume(broker.bootstrap_servers, topics)) for _ in range(raw_repeats)]
        raw_rate = statistics.median(entry["per_s"] for entry in raw_runs)
        logger.info("bench.raw_consume runs=%s median_records_per_s=%.0f", len(raw_runs), raw_rate)
        worker = WorkerProcess(settings, workdir / "worker.log").start()
        sampler = ProcessSampler(worker.process.pid)
        sampler.start()
        try:
            tracked = asyncio.run(track_worker(settings, worker, sampler, timeout_s))
        finally:
            code = worker.stop()
            sampler.stop()
        logger.info("bench.worker_stopped exit_code=%s", code)
    marks = tracked["marks"]
    raw_cpu_rate = statistics.median(entry["per_cpu_s"] for entry in raw_runs)
    committed = tracked["committed"]
    return {
        "machine": {**machine_facts(), "load_average_before": load_before},
        "copies": copies,
        "partitions": partitions,
        "events_produced": stats.sent,
        "produce_seconds": stats.seconds,
        "raw": {"runs": raw_runs, "median_per_s": raw_rate, "median_per_cpu_s": raw_cpu_rate},
        "worker": {
            "input_records": tracked["input_records"],
            "marks": marks,
            "committed": committed,
            "handled": tracked["handled"],
            "ratio_to_raw": committed["events_per_s"] / raw_rate,
            "cpu_ratio_to_raw": committed["events_per_cpu_s"] / raw_cpu_rate,
            "exit_code": code,
        },
        "rss": rss_summary(sampler, marks["first_commit"]["seconds"], marks["caught_up"]["seconds"], marks["drained"]["seconds"]),
        "timeline": tracked["timeline"],
    }


def machine_facts() -> dict:
    """Return the facts BENCHMARKS.md reports next to each number, and the load at the end of the run."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "kafka": KAFKA_VERSION,
        "load_average": os.getloadavg(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(_git("status", "--porcelain").splitlines()),
    }


def _git(*arguments: str) -> str:
    try:
        return subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent.parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def format_report(result: dict) -> str:
    raw, worker, rss = result["raw"], result["worker"], result["rss"]
    committed, handled, marks = worker["committed"], worker["handled"], worker["marks"]
    rows = [
        ("input events", f"{result['events_produced']} ({result['copies']} copies, {result['partitions']} partitions)"),
        ("produce (replay)", f"{result['produce_seconds']:.1f} s"),
        ("(a) raw consume", f"{raw['median_per_s']:,.0f} records/s, {raw['median_per_cpu_s']:,.0f} records/CPU-s"
                            f" (median of {len(raw['runs'])})"),
        ("(b) worker", f"{committed['events_per_s']:,.0f} events/s ({worker['ratio_to_raw']:.4f} of raw),"
                       f" {committed['events_per_cpu_s']:,.0f} events/CPU-s ({worker['cpu_ratio_to_raw']:.4f} of raw)"),
        ("    measured", f"{committed['records']} events from first commit ({marks['first_commit']['seconds']:.1f} s)"
                         f" to input catch-up ({marks['caught_up']['seconds']:.1f} s)"),
        ("    from /metrics", "n/a" if handled is None else
                              f"{handled['events_per_s']:,.0f} events/s, first to last handled input record"),
        ("    drained", f"group_lag 0 at {marks['drained']['seconds']:.1f} s after worker start"),
        ("worker RSS", f"start {rss['start_mib']} MiB, peak {rss['peak_mib']} MiB, end {rss['end_mib']} MiB"),
        ("    at 25/50/75 %", " / ".join(f"{value} MiB" for value in rss["quarters_mib"])),
        ("load average", "before " + " ".join(f"{value:.2f}" for value in result["machine"]["load_average_before"])
                         + ", after " + " ".join(f"{value:.2f}" for value in result["machine"]["load_average"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES,
                        help=f"copies of the bundled {BUNDLED_EVENTS} events to produce (default: {DEFAULT_COPIES})")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help=f"partitions of every topic (default: {DEFAULT_PARTITIONS})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the worker to drain the topics (default: {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--raw-repeats", type=int, default=RAW_REPEATS,
                        help=f"raw consumer reads, the median is reported (default: {RAW_REPEATS})")
    parser.add_argument("--json", type=Path, help="also write the numbers, RSS samples and progress timeline to this JSON file")
    args = parser.parse_args(argv)
    for name in ("copies", "partitions", "raw_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    result = run(args.copies, args.partitions, args.timeout, args.raw_repeats)
    print(format_report(result))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
