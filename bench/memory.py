"""Benchmark: process memory over a long replay, and the size of the post index.

The bundled Stack Exchange events are repeated `--copies` times (36 copies: 208,368 events).
Every copy gets new event ids and new post ids, so each copy adds posts the post index has
not seen, as a live stream would, and keeps the user ids, so the user count stays at 555.
Copies are moved back in time by the span of the data plus a day, oldest copy first (see
`bench.ingest_throughput.copy_events`).

Two modes:
- `in-process` (default): the worker's stages in this process, `stream.ingest.IngestStage`
  and `stream.post_index.PostIndexStage` with dict tables. Records go in batches of
  `ingest_batch_max`, and the audience and post-index records the stages emit are fed back
  the way the worker's topics would feed them, keyed into `--partitions` partitions. No Kafka
  client, no Faust, no generation. It prints this process's VmRSS, the post index's entries
  and the JSON bytes of both tables every `--every` events.
- `worker`: a local Kafka broker, a Postgres cluster and `python -m stream worker` as a
  subprocess, as in `bench.ingest_throughput`. It prints the worker's VmRSS each time its
  /metrics count `--every` more handled input events, and the post-index and event-outcome
  counters at the end.

    python -m bench.memory [--mode in-process|worker] [--copies N] [--every N] [--retention-s S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.ingest_throughput import copy_events, machine_facts, processed_input, read_cpu_s, read_rss_kb
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl, write_jsonl
from stream.ingest import IngestStage
from stream.post_index import PostIndexStage
from stream.records import Record
from stream.settings import Settings, load_settings

logger = logging.getLogger("bench.memory")

DEFAULT_COPIES = 36  # 208,368 events
DEFAULT_EVERY = 20_000
DEFAULT_PARTITIONS = 2
DEFAULT_TIMEOUT_S = 3600.0
POST_ID_FIELDS = ("post_id", "reply_to_post_id", "repost_of_post_id")
ACTOR_FIELD = {"post.v1": "user_id", "like.v1": "user_id", "follow.v1": "follower_id", "user_deleted.v1": "user_id"}
# Retention used for "no retention": longer than any span the copies can cover.
UNBOUNDED_RETENTION_S = 1e12


def fresh_post_copies(lines: list[bytes], copies: int) -> Iterator[dict]:
    """Yield `copy_events(lines, copies)` with every post id suffixed by its copy, so each copy adds new posts."""
    for document in copy_events(lines, copies):
        suffix = document["event_id"].rsplit(":", 1)[1]
        for name in POST_ID_FIELDS:
            if document.get(name) is not None:
                document[name] = f"{document[name]}:{suffix}"
        yield document


def read_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def partition_of(key: str, partitions: int) -> int:
    # Any stable hash shows the per-partition behaviour. Kafka's own partitioner uses murmur2.
    return zlib.crc32(key.encode()) % partitions


class LocalPipeline:
    """The worker's ingest and post-index stages in one process, with dict tables and in-memory topics."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.settings = settings
        self.partitions = partitions
        self.states: dict[str, dict] = {}
        self.posts: dict[str, dict] = {}
        self.ingest_stage = IngestStage(settings, self.states, self)
        self.index_stage = PostIndexStage(self.posts, self, retention_s=settings.post_index_retention_s)
        self.audience_records: list[Record] = []
        self.index_records: list[Record] = []
        self.requests = 0
        self.dead_letters = 0

    async def dead_letter(self, record: Record, error: Exception) -> None:
        self.dead_letters += 1

    async def regenerate(self, user_id: str, request: dict) -> None:
        self.requests += 1

    async def audience(self, user_id: str, message: dict) -> None:
        self.audience_records.append(self._record(self.settings.topic_audience, user_id, message))

    async def post_index(self, post_id: str, message: dict) -> None:
        self.index_records.append(self._record(self.settings.topic_post_index, post_id, message))

    async def feed(self, records: list[Record]) -> None:
        """Apply input records, then the internal records they cause, until none is left."""
        await self.ingest_stage.handle_batch(records)
        while self.index_records or self.audience_records:
            index, self.index_records = self.index_records, []
            if index:
                await self.index_stage.handle_batch(index)
            audience, self.audience_records = self.audience_records, []
            if audience:
                await self.ingest_stage.handle_batch(audience)

    def _record(self, topic: str, key: str, message: dict) -> Record:
        return Record(topic, partition_of(key, self.partitions), 0, key.encode(), orjson.dumps(message))


def input_record(settings: Settings, document: dict, partitions: int, offset: int) -> Record:
    kind = document["schema"].split(".")[0]
    topic = {"post": settings.topic_posts, "like": settings.topic_likes, "follow": settings.topic_follows,
             "user_deleted": settings.topic_users}[kind]
    key = document[ACTOR_FIELD[document["schema"]]]
    return Record(topic, partition_of(key, partitions), offset, key.encode(), orjson.dumps(document))


def table_bytes(table: dict[str, dict]) -> int:
    return sum(len(orjson.dumps(value)) for value in table.values())


async def run_in_process(copies: int, every: int, partitions: int, retention_s: float) -> dict:
    """Replay the copies through a LocalPipeline and return a checkpoint every `every` input events."""
    settings = load_settings(post_index_retention_s=retention_s)
    lines = [line for _, line in read_jsonl(bundled_data_path())]
    pipeline = LocalPipeline(settings, partitions)
    gc.collect()
    checkpoints = [_checkpoint(pipeline, 0, 0.0)]

    batch: list[Record] = []
    events = 0
    started = time.process_time()
    for document in fresh_post_copies(lines, copies):
        batch.append(input_record(settings, document, partitions, events))
        events += 1
        if len(batch) >= settings.ingest_batch_max or events % every == 0:
            await pipeline.feed(batch)
            batch = []
        if events % every == 0:
            checkpoints.append(_checkpoint(pipeline, events, time.process_time() - started))
            logger.info("bench.memory.checkpoint %s", checkpoints[-1])
    if batch:
        await pipeline.feed(batch)
    if events % every:
        checkpoints.append(_checkpoint(pipeline, events, time.process_time() - started))
    return {
        "mode": "in-process",
        "events": events,
        "copies": copies,
        "partitions": partitions,
        "retention_s": retention_s,
        "requests": pipeline.requests,
        "dead_letters": pipeline.dead_letters,
        "checkpoints": checkpoints,
        "machine": machine_facts(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _checkpoint(pipeline: LocalPipeline, events: int, cpu_s: float) -> dict:
    return {
        "events": events,
        "cpu_s": round(cpu_s, 1),
        "rss_mib": round(read_rss_mib(), 1),
        "post_index_entries": len(pipeline.posts),
        "post_index_bytes": table_bytes(pipeline.posts),
        "users": len(pipeline.states),
        "state_bytes": table_bytes(pipeline.states),
    }


def run_worker(copies: int, every: int, partitions: int, retention_s: float, timeout_s: float) -> dict:
    """Run the real worker on the copies and return its RSS each time it has handled `every` more input events.

    The count comes from the worker's /metrics (`profilestream_events_total` of the input
    types), polled every second. Each checkpoint is also logged as it is reached, so a run
    that times out still leaves its readings in the log.
    """
    from stream.progress import group_lag
    from stream.replay import replay
    from stream.services.kafka import KafkaBroker
    from stream.services.postgres import PostgresCluster
    from stream.worker import prepare
    from tests.worker_harness import WorkerProcess, isolated_settings

    lines = [line for _, line in read_jsonl(bundled_data_path())]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder, KafkaBroker() as broker, PostgresCluster() as cluster:
        workdir = Path(folder)
        settings = isolated_settings(broker.bootstrap_servers, cluster.dsn, workdir, partitions=partitions,
                                     post_index_retention_s=retention_s)
        asyncio.run(prepare(settings))
        events_path = workdir / "events.jsonl.gz"
        produced = write_jsonl(fresh_post_copies(lines, copies), events_path)
        logger.info("bench.memory.produce events=%s copies=%s", produced, copies)
        stats = asyncio.run(replay(events_path, settings, progress=False))
        worker = WorkerProcess(settings, workdir / "worker.log").start()
        started = time.monotonic()
        checkpoints: list[dict] = []
        complete = False
        drained = None
        handled = 0
        samples: dict = {}
        try:
            while time.monotonic() - started < timeout_s:
                worker.check_alive()
                handled = processed_input(worker) or 0
                while handled >= (len(checkpoints) + 1) * every or (handled >= stats.sent and len(checkpoints) * every < stats.sent):
                    checkpoints.append(_worker_checkpoint(worker, handled, time.monotonic() - started))
                    logger.info("bench.memory.checkpoint %s", checkpoints[-1])
                if handled >= stats.sent:
                    break
                time.sleep(1.0)
            # The post index and the audience loop run behind ingest, so wait for the group to drain.
            while handled >= stats.sent and time.monotonic() - started < timeout_s:
                lag, _ = asyncio.run(group_lag(settings))
                if lag == 0:
                    complete = True
                    drained = _worker_checkpoint(worker, handled, time.monotonic() - started)
                    logger.info("bench.memory.drained %s", drained)
                    break
                time.sleep(1.0)
            samples = worker.metrics()
        finally:
            code = worker.stop()
    post_index = {
        f"{dict(labels)['kind']}/{dict(labels)['outcome']}": value
        for (name, labels), value in samples.items() if name == "profilestream_post_index_records_total"
    }
    events = {
        f"{dict(labels)['type']}/{dict(labels)['outcome']}": value
        for (name, labels), value in samples.items() if name == "profilestream_events_total"
    }
    return {
        "mode": "worker",
        "events": stats.sent,
        "copies": copies,
        "partitions": partitions,
        "retention_s": retention_s,
        "complete": complete,
        "drained": drained,
        "post_index_records": post_index,
        "event_outcomes": events,
        "checkpoints": checkpoints,
        "exit_code": code,
        "machine": machine_facts(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _worker_checkpoint(worker, handled: int, seconds: float) -> dict:
    return {
        "events": handled,
        "seconds": round(seconds, 1),
        "rss_mib": round((read_rss_kb(worker.process.pid) or 0) / 1024, 1),
        "cpu_s": round(read_cpu_s(worker.process.pid) or 0.0, 1),
    }


def format_report(result: dict) -> str:
    lines = [f"mode {result['mode']}, {result['events']} events ({result['copies']} copies),"
             f" {result['partitions']} partitions, post_index_retention_s {result['retention_s']:g}"]
    if result["mode"] == "in-process":
        lines.append(f"{'events':>8}  {'RSS MiB':>8}  {'post index entries':>18}  {'post index bytes':>16}  {'state bytes':>11}  {'CPU s':>6}")
        for point in result["checkpoints"]:
            lines.append(f"{point['events']:>8}  {point['rss_mib']:>8.1f}  {point['post_index_entries']:>18}"
                         f"  {point['post_index_bytes']:>16}  {point['state_bytes']:>11}  {point['cpu_s']:>6}")
    else:
        lines.append(f"drained: {result['drained'] if result['complete'] else 'no, timed out'}")
        lines.append(f"{'handled':>9}  {'RSS MiB':>8}  {'seconds':>8}  {'CPU s':>6}")
        for point in result["checkpoints"]:
            lines.append(f"{point['events']:>9}  {point['rss_mib']:>8.1f}  {point['seconds']:>8.1f}  {point['cpu_s']:>6}")
        lines.append("post-index records: " + ", ".join(f"{name} {value:g}" for name, value in sorted(result["post_index_records"].items())))
        lines.append("events: " + ", ".join(f"{name} {value:g}" for name, value in sorted(result["event_outcomes"].items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("in-process", "worker"), default="in-process",
                        help="in-process: the stages with dict tables; worker: a real broker and worker (default: in-process)")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES,
                        help=f"copies of the bundled events, each with new event and post ids (default: {DEFAULT_COPIES})")
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY, help=f"events between two memory readings (default: {DEFAULT_EVERY})")
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS, help=f"partitions (default: {DEFAULT_PARTITIONS})")
    parser.add_argument("--retention-s", type=float, default=None,
                        help="post index retention in seconds (default: the setting's default); 0 keeps every post")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"worker mode: seconds to wait for the worker to drain the topics (default: {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    for name in ("copies", "every", "partitions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be at least 1")
    retention_s = Settings.model_fields["post_index_retention_s"].default if args.retention_s is None else args.retention_s
    if retention_s <= 0:
        retention_s = UNBOUNDED_RETENTION_S
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if args.mode == "worker":
        result = run_worker(args.copies, args.every, args.partitions, retention_s, args.timeout)
    else:
        result = asyncio.run(run_in_process(args.copies, args.every, args.partitions, retention_s))
    print(format_report(result))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
