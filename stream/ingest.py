"""The ingest stage: one input record in, state updated, follow-up records out.

The stage is written against small interfaces (a mutable mapping for the state table and an
`Emitter` for outgoing records) so the Faust agent stays a thin adapter.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Callable, Protocol

import orjson

from handlers import erasure, features, significance, state as user_state
from handlers.errors import InvalidRecord
from handlers.events import Event, FollowEvent, LikeEvent, PostEvent, UserDeletedEvent, decode_event
from handlers.topics import TopicSignal, extract_topics

from . import metrics
from .dead_letters import bounded_copy
from .records import Record
from .settings import Settings

logger = logging.getLogger(__name__)


class Emitter(Protocol):
    async def dead_letter(self, record: Record, error: InvalidRecord) -> None: ...

    async def audience(self, user_id: str, message: dict) -> None: ...

    async def regenerate(self, user_id: str, request: dict) -> None: ...

    async def post_index(self, post_id: str, message: dict) -> None: ...


@dataclass
class _Batch:
    """Users' state-table values loaded during one batch, and the users whose value changed."""

    # A value is a user's state, an erasure marker (handlers.erasure), or None for a new user.
    states: dict[str, dict | None] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    # Users whose latest regeneration request this batch has sent again (see IngestStage._resend).
    resent: set[str] = field(default_factory=set)


class IngestStage:
    """Apply records to per-user state and request regenerations when a user changed enough."""

    def __init__(
        self,
        settings: Settings,
        table: MutableMapping[str, dict],
        emitter: Emitter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._table = table
        self._emitter = emitter
        self._clock = clock
        self._kinds = settings.input_topics
        self._thresholds = settings.thresholds
        # The late-event series exist at zero from the start, so queries see them before the first one.
        for kind in ("post", "like", "follow", "audience"):
            metrics.LATE_EVENTS.labels(kind)

    async def handle(self, record: Record) -> str:
        """Process one record and return its outcome; bad records go to the dead-letter topic."""
        [outcome] = await self.handle_batch([record])
        return outcome

    async def handle_batch(self, records: list[Record]) -> list[str]:
        """Process records in order and return their outcomes.

        Each user's state is read from the table once and written back once per batch, which
        turns one changelog record per event into one per user and batch. Decisions are still
        taken after every event, so versions do not depend on where a batch starts.
        """
        batch = _Batch()
        outcomes = [await self._handle_one(record, batch) for record in records]
        for user_id in batch.changed:
            self._table[user_id] = batch.states[user_id]
        return outcomes

    async def _handle_one(self, record: Record, batch: _Batch) -> str:
        kind = "audience" if record.topic == self._settings.topic_audience else self._kinds.get(record.topic, "unknown")
        try:
            outcome = await self._apply(kind, record, batch)
        except InvalidRecord as error:
            logger.warning(
                "record.dead_lettered reason=%s topic=%s partition=%s offset=%s error=%s",
                error.reason, record.topic, record.partition, record.offset, error.detail,
            )
            await self._emitter.dead_letter(bounded_copy(record), error)
            metrics.DEAD_LETTERS.labels(error.reason).inc()
            outcome = "dead_letter"
        metrics.EVENTS.labels(kind, outcome).inc()
        return outcome

    async def _apply(self, kind: str, record: Record, batch: _Batch) -> str:
        if record.value is None:
            raise InvalidRecord("missing_value", f"record at {record.position()} has no value")
        if kind == "audience":
            return await self._apply_audience(record, batch)
        if kind == "unknown":
            raise InvalidRecord("unknown_topic", f"topic {record.topic!r} is not an input topic")
        with metrics.DECODE_SECONDS.labels(kind).time():
            event = decode_event(kind, record.value, now=self._clock(), max_future_s=self._settings.max_future_s,
                                 max_bytes=self._settings.max_event_bytes)
        _check_key(record, event.user_id)
        if isinstance(event, UserDeletedEvent):
            return await self._apply_deletion(event, batch)
        at = event.created_at.timestamp()
        state = self._state_for(event.user_id, at, batch, own_event=True)
        if state is None:
            return erasure.DROPPED.outcome
        signals = extract_topics(event.text, event.hashtags, event.tags) if isinstance(event, PostEvent) else None
        late = user_state.outside_window(state, at)
        result = self._update(state, event, signals)
        if not result.applied:
            await self._resend(state, result, batch)
            return result.outcome
        if late:
            metrics.LATE_EVENTS.labels(kind).inc()
        erasure.note_own_event(state, at)
        batch.changed.add(event.user_id)
        await self._emit_audience(event)
        await self._emit_post_index(event, signals, record.partition)
        await self._decide(state)
        return result.outcome

    def _value(self, user_id: str, batch: _Batch) -> dict | None:
        if user_id not in batch.states:
            batch.states[user_id] = self._table.get(user_id)
        return batch.states[user_id]

    def _state_for(self, user_id: str, at: float, batch: _Batch, *, own_event: bool) -> dict | None:
        """Return the state a record stamped `at` applies to, or None when an erasure drops it."""
        state = erasure.state_for_record(self._value(user_id, batch), user_id, at, own_event=own_event)
        if state is not None:
            batch.states[user_id] = state
        return state

    async def _apply_deletion(self, event: UserDeletedEvent, batch: _Batch) -> str:
        deleted_at = event.deleted_at.timestamp()
        value, result = erasure.erase(self._value(event.user_id, batch), event.user_id, event.event_id, deleted_at)
        if not result.applied:
            return result.outcome
        batch.states[event.user_id] = value
        batch.changed.add(event.user_id)
        # The erasure goes to the regenerate topic, keyed like the user's regeneration requests,
        # so the generate stage handles it after every request sent before it.
        await self._emitter.regenerate(event.user_id, erasure.erase_request(event.user_id, value[erasure.MARKER_FIELD]))
        logger.info("user.erased user_id=%s event_id=%s deleted_at=%s recreated=%s",
                    event.user_id, event.event_id, event.deleted_at.isoformat(), erasure.is_live(value))
        return result.outcome

    def _update(self, state: dict, event: Event, signals: list[TopicSignal] | None) -> user_state.ApplyResult:
        if isinstance(event, PostEvent):
            return user_state.apply_post(state, event, half_life_s=self._settings.interest_half_life_s,
                                         short_half_life_s=self._settings.interest_short_half_life_s, signals=signals)
        if isinstance(event, LikeEvent):
            return user_state.apply_like(state, event)
        return user_state.apply_follow(state, event)

    async def _emit_audience(self, event: Event) -> None:
        at = event.created_at.timestamp()
        if isinstance(event, LikeEvent) and event.post_author_id != event.user_id:
            step = -1 if event.action == "unlike" else 1
            await self._emitter.audience(event.post_author_id, _audience("like_received", event, at, step))
        elif isinstance(event, FollowEvent) and event.followee_id != event.follower_id:
            step = -1 if event.action == "unfollow" else 1
            await self._emitter.audience(event.followee_id, _audience("followed", event, at, step))

    async def _emit_post_index(self, event: Event, signals: list[TopicSignal] | None, source_partition: int) -> None:
        # `source` is the input partition, which the post index needs to expire entries (stream/post_index.py).
        at = event.created_at.timestamp()
        if isinstance(event, PostEvent):
            topics = [[signal.topic, signal.weight] for signal in signals or ()]
            message = {"kind": "post", "post_id": event.post_id, "topics": topics, "at": at, "source": source_partition}
            await self._emitter.post_index(event.post_id, message)
        elif isinstance(event, LikeEvent) and event.action == "like":
            message = {"kind": "like", "post_id": event.post_id, "user_id": event.user_id, "event_id": event.event_id, "at": at,
                       "source": source_partition}
            await self._emitter.post_index(event.post_id, message)

    async def _apply_audience(self, record: Record, batch: _Batch) -> str:
        try:
            message = orjson.loads(record.value)
            user_id, kind, event_id = message["user_id"], message["kind"], message["event_id"]
            at, step = float(message["at"]), int(message["step"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord("invalid_internal", f"audience record at {record.position()} is malformed: {exc!r}") from None
        _check_key(record, user_id)
        state = self._state_for(user_id, at, batch, own_event=False)
        if state is None:
            return erasure.DROPPED.outcome
        late = kind != "liked_topics" and user_state.outside_window(state, at)
        try:
            if kind == "liked_topics":
                topics = [(str(topic), float(weight)) for topic, weight in message["topics"]]
                result = user_state.apply_liked_topics(state, event_id, at, topics, half_life_s=self._settings.interest_half_life_s,
                                                       short_half_life_s=self._settings.interest_short_half_life_s)
            else:
                result = user_state.apply_audience(state, kind, event_id, at, step)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRecord("invalid_internal", str(exc)) from None
        if result.applied:
            if late:
                metrics.LATE_EVENTS.labels("audience").inc()
            batch.changed.add(user_id)
            await self._decide(state)
        else:
            await self._resend(state, result, batch)
        return result.outcome

    async def _decide(self, state: dict) -> None:
        decision = significance.decide(state, self._thresholds)
        significance.record_decision(state, decision)
        if not decision.regenerate:
            return
        previous_topics = features.profiled_topics(state)
        version = significance.take_snapshot(state)
        state["profile"]["reasons"] = list(decision.reasons)
        for reason in decision.reasons:
            metrics.TRIGGERS.labels(reason).inc()
        request = features.build_request(state, version, decision.reasons, previous_topics)
        features.remember_topics(state, request)
        erasure.tag_request(request, state)
        await self._emitter.regenerate(state["user_id"], request)

    async def _resend(self, state: dict, result: user_state.ApplyResult, batch: _Batch) -> None:
        """Send the user's latest regeneration request again when a duplicate shows a replay.

        A crash after the state's changelog record landed but before the regeneration request
        did would lose that request: reprocessing finds only duplicates and decides nothing.
        So the first duplicate of a user in a batch sends the request of the state's current
        version again, rebuilt from the state. The generation stage skips versions a sink
        already stored, so a request that did arrive costs no second generation.
        """
        version = state["profile"]["version"]
        if result.outcome != user_state.DUPLICATE.outcome or version == 0 or state["user_id"] in batch.resent:
            return
        batch.resent.add(state["user_id"])
        reasons = tuple(state["profile"].get("reasons") or ("replayed",))
        # The stored topics of this version make build_request choose them again.
        request = features.build_request(state, version, reasons, features.profiled_topics(state))
        request["replayed"] = True
        erasure.tag_request(request, state)
        metrics.REQUESTS_RESENT.inc()
        await self._emitter.regenerate(state["user_id"], request)


def _audience(kind: str, event: Event, at: float, step: int) -> dict:
    target = event.post_author_id if isinstance(event, LikeEvent) else event.followee_id
    return {"kind": kind, "user_id": target, "event_id": event.event_id, "at": at, "step": step}


def _check_key(record: Record, user_id: str) -> None:
    # State lives in the partition of the record's key, so a key that is not the acting
    # user would put the user's state in two partitions.
    if record.key != user_id.encode():
        raise InvalidRecord(
            "key_mismatch",
            f"record key {record.key!r} at {record.position()} is not the acting user id {user_id!r};"
            " produce events keyed by the acting user id",
        )
