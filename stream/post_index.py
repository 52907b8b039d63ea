"""The post index: joins likes with the topics of the liked post.

Likes arrive keyed by the user who liked, posts keyed by their author, so neither worker has
the other side. Both are re-keyed by post id into the post-index topic. This stage keeps each
post's topics in a table keyed by post id and sends a `liked_topics` record, keyed by the user
who liked, to the audience topic. A like that arrives before its post waits in the post's
entry (at most `MAX_PENDING_LIKES`) until the post arrives.
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


class AudienceEmitter(Protocol):
    async def audience(self, user_id: str, message: dict) -> None: ...


class PostIndexStage:
    def __init__(self, table: MutableMapping[str, dict], emitter: AudienceEmitter) -> None:
        self._table = table
        self._emitter = emitter

    async def handle_batch(self, records: list[Record]) -> None:
        entries: dict[str, dict] = {}
        for record in records:
            try:
                message = orjson.loads(record.value or b"")
                post_id, kind = message["post_id"], message["kind"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                logger.error("post_index.invalid_record position=%s error=%r", record.position(), exc)
                metrics.POST_INDEX.labels("invalid", "dropped").inc()
                continue
            entry = entries.get(post_id)
            if entry is None:
                entry = entries[post_id] = self._table.get(post_id) or {"topics": None, "pending": []}
            if kind == "post":
                await self._index_post(entry, message)
            else:
                await self._join_like(entry, message)
        for post_id, entry in entries.items():
            self._table[post_id] = entry

    async def _index_post(self, entry: dict, message: dict) -> None:
        entry["topics"] = message["topics"]
        for user_id, event_id, at in entry["pending"]:
            await self._send(user_id, event_id, at, entry["topics"])
        entry["pending"] = []
        metrics.POST_INDEX.labels("post", "indexed").inc()

    async def _join_like(self, entry: dict, message: dict) -> None:
        user_id, event_id, at = message["user_id"], message["event_id"], message["at"]
        if entry["topics"] is not None:
            await self._send(user_id, event_id, at, entry["topics"])
            metrics.POST_INDEX.labels("like", "joined").inc()
            return
        pending = entry["pending"]
        if any(item[1] == event_id for item in pending):
            return
        pending.append([user_id, event_id, at])
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
