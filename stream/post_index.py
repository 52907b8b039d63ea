"""The post index: joins likes with the topics of the liked post.

Likes arrive keyed by the user who liked, posts keyed by their author, so neither worker has
the other side. Both are re-keyed by post id into the post-index topic. This stage keeps each
post's topics in a table keyed by post id and sends a `liked_topics` record, keyed by the user
who liked, to the audience topic. A like that arrives before its post waits in the post's
entry (at most `MAX_PENDING_LIKES`) until the post arrives.

Retention bounds the table. An entry is stamped with its post's event time, or, while it only
contains likes waiting for their post, with the newest of those likes. A source is one input
partition of the posts or the likes topic, named in each record. Per post-index partition the
stage tracks the newest event time each source has sent, and the partition's horizon is the
oldest of these minus the retention. So when the worker reads one input partition or topic
behind the others, as during a catch-up, entries are kept longer, never shorter. A source that
has sent nothing to the partition for `SOURCE_IDLE_S` seconds of wall-clock time no longer
holds the horizon back. An entry stamped before its partition's horizon counts as absent: a
like of that post gets no topics, waiting likes are dropped, and a sweep deletes the entry
from the table. Drops are counted in `profilestream_post_index_records_total` with outcome
`expired`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Protocol

import orjson

from . import metrics
from .records import Record

logger = logging.getLogger(__name__)

MAX_PENDING_LIKES = 100
DEFAULT_RETENTION_S = 90 * 24 * 3600.0
# Each batch checks at least this many table entries, and at least two per record, so the
# sweep passes over the whole table faster than records add entries.
SWEEP_MIN_ENTRIES = 256
SWEEP_ENTRIES_PER_RECORD = 2
# A source being read sends records continuously, so one that has sent nothing for this long
# is idle rather than behind, and an idle source must not stop expiry.
SOURCE_IDLE_S = 600.0


class AudienceEmitter(Protocol):
    async def audience(self, user_id: str, message: dict) -> None: ...


class PostIndexStage:
    def __init__(self, table: MutableMapping[str, dict], emitter: AudienceEmitter,
                 retention_s: float = DEFAULT_RETENTION_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._table = table
        self._emitter = emitter
        self._retention_s = retention_s
        self._clock = clock
        # Per post-index partition and source (record kind, input partition): the newest event
        # time and the clock reading of the source's last record.
        # NOTE: this lives in memory only. After a restart nothing expires in a partition until
        # its records arrive, and a source first seen later may find entries it needed expired.
        self._newest: dict[int, dict[tuple[str, int | None], tuple[float, float]]] = {}
        # Keys the sweep has still to check in its current pass over the table.
        self._sweep_keys: list[str] = []

    async def handle_batch(self, records: list[Record]) -> None:
        entries: dict[str, dict] = {}
        for record in records:
            parsed = _parse(record)
            if parsed is None:
                metrics.POST_INDEX.labels("invalid", "dropped").inc()
                continue
            message, post_id, kind, at = parsed
            self._advance(record.partition, (kind, message.get("source")), at)
            entry = entries.get(post_id) or self._load(post_id, record.partition)
            if entry is not None and self._expired(entry):
                _count_dropped(entry)
                entry = None
            if entry is None:
                entry = {"topics": None, "pending": [], "at": None, "partition": record.partition}
            entries[post_id] = entry
            if kind == "post":
                await self._index_post(entry, message, at)
            else:
                await self._join_like(entry, message, at)
            if self._expired(entry):
                _count_dropped(entry)
                entry["topics"], entry["pending"] = None, []
        for post_id, entry in entries.items():
            if entry["topics"] is None and not entry["pending"]:
                self._table.pop(post_id, None)
            else:
                self._table[post_id] = entry
        self._sweep(max(SWEEP_MIN_ENTRIES, SWEEP_ENTRIES_PER_RECORD * len(records)))

    def _load(self, post_id: str, partition: int) -> dict | None:
        entry = self._table.get(post_id)
        if entry is None or "partition" in entry:
            return entry
        # An entry written before entries carried a time and a partition.
        return {**entry, "at": None, "partition": partition}

    async def _index_post(self, entry: dict, message: dict, at: float | None) -> None:
        entry["topics"] = message["topics"]
        # A post record written before records carried a time is stamped when it arrives.
        entry["at"] = at if at is not None else self._latest(entry["partition"])
        if self._expired(entry):
            return
        metrics.POST_INDEX.labels("post", "indexed").inc()
        for user_id, event_id, like_at in entry["pending"]:
            await self._send(user_id, event_id, like_at, entry["topics"])
        entry["pending"] = []

    async def _join_like(self, entry: dict, message: dict, at: float) -> None:
        user_id, event_id = str(message["user_id"]), str(message["event_id"])
        if entry["topics"] is not None:
            await self._send(user_id, event_id, at, entry["topics"])
            metrics.POST_INDEX.labels("like", "joined").inc()
            return
        pending = entry["pending"]
        if any(item[1] == event_id for item in pending):
            return
        pending.append([user_id, event_id, at])
        entry["at"] = at if entry["at"] is None else max(entry["at"], at)
        if len(pending) > MAX_PENDING_LIKES:
            pending.pop(0)
            metrics.POST_INDEX.labels("like", "pending_dropped").inc()
            logger.warning("post_index.pending_full post_id=%s dropped_oldest=true limit=%s", message["post_id"], MAX_PENDING_LIKES)
        else:
            metrics.POST_INDEX.labels("like", "pending").inc()

    async def _send(self, user_id: str, event_id: str, at: float, topics: list) -> None:
        if not topics:
            return
        message = {"kind": "liked_topics", "user_id": user_id, "event_id": event_id, "at": at, "step": 1, "topics": topics}
        await self._emitter.audience(user_id, message)

    def _advance(self, partition: int, source: tuple[str, int | None], at: float | None) -> None:
        if at is None:
            return
        sources = self._newest.setdefault(partition, {})
        newest = sources.get(source, (at, 0.0))[0]
        sources[source] = (max(newest, at), self._clock())

    def _horizon(self, partition: int | None) -> float | None:
        """Return the event time before which an entry of `partition` expires, or None while unknown.

        Entries written before entries stored their partition use the lowest horizon of all
        partitions seen.
        """
        if partition is None:
            horizons = [self._low_watermark(sources) for sources in self._newest.values()]
        else:
            sources = self._newest.get(partition)
            horizons = [self._low_watermark(sources)] if sources else []
        return min(horizons) - self._retention_s if horizons else None

    def _low_watermark(self, sources: dict[tuple[str, int | None], tuple[float, float]]) -> float:
        """Return the lowest newest event time of the sources that are not idle, or of all sources when every one is idle."""
        now = self._clock()
        active = [newest for newest, seen in sources.values() if now - seen < SOURCE_IDLE_S]
        return min(active or [newest for newest, _ in sources.values()])

    def _latest(self, partition: int | None) -> float | None:
        sources = self._newest.get(partition) if partition is not None else None
        if sources:
            times = [newest for newest, _ in sources.values()]
        else:
            times = [newest for sources in self._newest.values() for newest, _ in sources.values()]
        return max(times) if times else None

    def _expired(self, entry: dict) -> bool:
        """Return whether `entry` is stamped before the horizon of its partition."""
        at = entry.get("at")
        horizon = self._horizon(entry.get("partition"))
        return at is not None and horizon is not None and at < horizon

    def _sweep(self, budget: int) -> None:
        """Check up to `budget` table entries, delete the expired ones and stamp the ones without a time."""
        if not self._newest:
            return
        refilled = False
        for _ in range(budget):
            if not self._sweep_keys:
                if refilled:
                    return
                self._sweep_keys = list(self._table)
                refilled = True
                if not self._sweep_keys:
                    return
            post_id = self._sweep_keys.pop()
            entry = self._table.get(post_id)
            if entry is None:
                continue
            if entry.get("at") is None:
                # An entry from before entries carried a time expires one retention after the newest time seen.
                self._table[post_id] = {**entry, "at": self._latest(entry.get("partition")), "partition": entry.get("partition")}
            elif self._expired(entry):
                _count_dropped(entry)
                del self._table[post_id]


def _count_dropped(entry: dict) -> None:
    """Count the post and the waiting likes an expired entry drops."""
    if entry["topics"] is not None:
        metrics.POST_INDEX.labels("post", "expired").inc()
    if entry["pending"]:
        metrics.POST_INDEX.labels("like", "expired").inc(len(entry["pending"]))


def _parse(record: Record) -> tuple[dict, str, str, float | None] | None:
    """Return (message, post id, kind, event time) of a post-index record, or None when it is malformed.

    A like needs its time. A post record may lack one, because records written before posts
    carried a time are still in the topic.
    """
    try:
        message = orjson.loads(record.value or b"")
        post_id, kind = str(message["post_id"]), message["kind"]
        if kind == "post":
            at = message.get("at")
            topics = message["topics"]
            if not isinstance(topics, list):
                raise TypeError(f"topics is {type(topics).__name__}, expected a list")
        elif kind == "like":
            at = message["at"]
            missing = [name for name in ("user_id", "event_id") if name not in message]
            if missing:
                raise KeyError(f"like record has no {' or '.join(missing)}")
        else:
            raise ValueError(f"kind {kind!r} is neither 'post' nor 'like'")
        return message, post_id, kind, None if at is None else float(at)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        logger.error("post_index.invalid_record position=%s error=%r", record.position(), exc)
        return None
