"""The post index: joins likes with the topics of the liked post.

Likes arrive keyed by the user who liked, posts keyed by their author, so neither worker has
the other side. Both are re-keyed by post id into the post-index topic. This stage keeps each
post's topics in a table keyed by post id and sends a `liked_topics` record, keyed by the user
who liked, to the audience topic. A like that arrives before its post waits in the post's
entry (at most `MAX_PENDING_LIKES`) until the post arrives.

Retention bounds the table. An entry is stamped with its post's event time, or, while it only
holds likes waiting for their post, with the newest of those likes. Per partition the stage
tracks the newest event time of the post records and of the like records it has seen. The
partition's horizon is the older of the two minus the retention, so a partition whose likes
are read behind its posts (or the other way round) keeps its entries longer, never shorter.
An entry stamped before its partition's horizon counts as absent: a like of that post gets no
topics, waiting likes are dropped, and a sweep deletes the entry from the table. Drops are
counted in `profilestream_post_index_records_total` with outcome `expired`.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
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


class AudienceEmitter(Protocol):
    async def audience(self, user_id: str, message: dict) -> None: ...


class PostIndexStage:
    def __init__(self, table: MutableMapping[str, dict], emitter: AudienceEmitter,
                 retention_s: float = DEFAULT_RETENTION_S) -> None:
        self._table = table
        self._emitter = emitter
        self._retention_s = retention_s
        # Newest event time per partition and record kind ("post", "like"). It lives in memory
        # only, so after a restart nothing expires in a partition until its records arrive.
        self._newest: dict[int, dict[str, float]] = {}
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
            self._advance(record.partition, kind, at)
            entry = entries.get(post_id) or self._load(post_id, record.partition)
            if entry is None or self._expire(entry):
                entry = {"topics": None, "pending": [], "at": None, "partition": record.partition}
            entries[post_id] = entry
            if kind == "post":
                await self._index_post(entry, message, at)
            else:
                await self._join_like(entry, message, at)
            if self._expire(entry):
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
        if self._expire(entry):
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

    def _advance(self, partition: int, kind: str, at: float | None) -> None:
        if at is None:
            return
        newest = self._newest.setdefault(partition, {})
        if at > newest.get(kind, float("-inf")):
            newest[kind] = at

    def _horizon(self, partition: int | None) -> float | None:
        """Return the event time before which an entry of `partition` expires, or None while unknown.

        Entries written before entries stored their partition use the lowest horizon of all
        partitions seen.
        """
        if partition is None:
            horizons = [min(newest.values()) for newest in self._newest.values()]
        else:
            newest = self._newest.get(partition)
            horizons = [min(newest.values())] if newest else []
        return min(horizons) - self._retention_s if horizons else None

    def _latest(self, partition: int | None) -> float | None:
        newest = self._newest.get(partition) if partition is not None else None
        times = list(newest.values()) if newest else [at for times in self._newest.values() for at in times.values()]
        return max(times) if times else None

    def _expire(self, entry: dict) -> bool:
        """Return whether `entry` is stamped before its horizon; if so, count what it drops."""
        at = entry.get("at")
        horizon = self._horizon(entry.get("partition"))
        if at is None or horizon is None or at >= horizon:
            return False
        if entry["topics"] is not None:
            metrics.POST_INDEX.labels("post", "expired").inc()
        if entry["pending"]:
            metrics.POST_INDEX.labels("like", "expired").inc(len(entry["pending"]))
        return True

    def _sweep(self, budget: int) -> None:
        """Check up to `budget` table entries and delete the expired ones; stamp entries without a time."""
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
                # An entry from before entries carried a time: it expires a retention after now.
                self._table[post_id] = {**entry, "at": self._latest(entry.get("partition")), "partition": entry.get("partition")}
            elif self._expire(entry):
                del self._table[post_id]


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
