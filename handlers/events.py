"""Typed input events and their decoding from Kafka record values.

Decoding rules (documented in the README):
- the value may be at most `max_bytes` long (PROFILESTREAM_MAX_EVENT_BYTES, 256 KiB by
  default); a longer one is rejected as `oversized` before it is parsed;
- the value must be UTF-8 JSON; invalid UTF-8 and lone surrogate escapes ("\\ud800") are
  rejected, while valid surrogate pairs (emoji) are kept;
- U+0000 and the other C0 control characters except tab, newline and carriage return are
  removed from text, because Postgres cannot store U+0000 in text or jsonb;
- a timestamp without a UTC offset is read as UTC; one that names no real instant
  (2024-02-30T25:00:00Z) is rejected, and so is one more than `max_future_s` ahead of now.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import orjson

import schemas

from .errors import InvalidRecord

EventKind = Literal["post", "like", "follow", "user_deleted"]
MAX_RECORD_BYTES = 256 * 1024
_EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(frozen=True, slots=True)
class PostEvent:
    event_id: str
    user_id: str
    post_id: str
    created_at: datetime
    text: str
    lang: str | None = None
    hashtags: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    reply_to_post_id: str | None = None
    reply_to_user_id: str | None = None
    repost_of_post_id: str | None = None

    kind = "post"


@dataclass(frozen=True, slots=True)
class LikeEvent:
    event_id: str
    user_id: str
    post_id: str
    post_author_id: str
    created_at: datetime
    action: Literal["like", "unlike"] = "like"

    kind = "like"


@dataclass(frozen=True, slots=True)
class FollowEvent:
    event_id: str
    follower_id: str
    followee_id: str
    created_at: datetime
    action: Literal["follow", "unfollow"] = "follow"

    kind = "follow"

    @property
    def user_id(self) -> str:
        return self.follower_id


@dataclass(frozen=True, slots=True)
class UserDeletedEvent:
    """The user's account was deleted at `deleted_at`; handlers.erasure has the rules."""

    event_id: str
    user_id: str
    deleted_at: datetime

    kind = "user_deleted"


# Events the acting user caused; a UserDeletedEvent is not one of them.
Event = PostEvent | LikeEvent | FollowEvent


def parse_timestamp(value: str, *, now: datetime, max_future_s: float, field: str = "created_at") -> datetime:
    """Parse the RFC 3339 timestamp of `field` into an aware UTC datetime, or raise InvalidRecord."""
    try:
        # Python 3.11's parser rejects the lower-case "z" and "t" that RFC 3339 allows.
        parsed = datetime.fromisoformat(value.upper())
    except ValueError as exc:
        raise InvalidRecord("invalid_timestamp", f"{field} {value!r} is not a real date-time: {exc}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    parsed = parsed.astimezone(UTC)
    if parsed < _EARLIEST:
        raise InvalidRecord("invalid_timestamp", f"{field} {value!r} is before {_EARLIEST.date()}")
    if parsed > now + timedelta(seconds=max_future_s):
        raise InvalidRecord(
            "future_timestamp",
            f"{field} {value!r} is more than {max_future_s:.0f} s ahead of now ({now.isoformat()});"
            " fix the producer's clock or raise PROFILESTREAM_MAX_FUTURE_S",
        )
    return parsed


def load_json(raw: bytes, max_bytes: int = MAX_RECORD_BYTES) -> object:
    """Parse a record value of at most `max_bytes` as UTF-8 JSON, naming the failure precisely."""
    if len(raw) > max_bytes:
        raise InvalidRecord(
            "oversized",
            f"record value is {len(raw)} bytes, more than the limit of {max_bytes} bytes;"
            " shorten the event or raise PROFILESTREAM_MAX_EVENT_BYTES",
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = exc
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("invalid_utf8", f"record value is not valid UTF-8: {exc}") from None
    try:
        json.loads(raw)
    except ValueError:
        raise InvalidRecord("invalid_json", f"record value is not valid JSON: {error}") from None
    # The standard library accepts what orjson rejected: only unpaired surrogates differ.
    raise InvalidRecord("lone_surrogate", "text contains an unpaired UTF-16 surrogate escape such as \\ud800")


def clean_text(text: str) -> str:
    return _CONTROL_CHARS.sub("", text)


def decode_event(kind: EventKind, raw: bytes, *, now: datetime, max_future_s: float = 600.0,
                 max_bytes: int = MAX_RECORD_BYTES) -> Event | UserDeletedEvent:
    """Decode and validate one record value from the topic of `kind`.

    Raises InvalidRecord with a stable `reason` code for every way a record can be bad.
    """
    document = load_json(raw, max_bytes)
    if not isinstance(document, dict):
        raise InvalidRecord("invalid_schema", f"record value is JSON {type(document).__name__}, expected an object")
    expected = f"{kind}.v1"
    declared = document.get("schema")
    if declared != expected:
        reason = "unknown_version" if isinstance(declared, str) and declared.startswith(f"{kind}.") else "wrong_schema"
        raise InvalidRecord(reason, f"schema is {declared!r}; the {kind} topic accepts {expected!r}")
    error = schemas.fast_validator(expected)(document, "")
    if error is not None:
        raise InvalidRecord("invalid_schema", error.lstrip(": ") if error.startswith(":") else error.lstrip("/"))
    time_field = "deleted_at" if kind == "user_deleted" else "created_at"
    created_at = parse_timestamp(document[time_field], now=now, max_future_s=max_future_s, field=time_field)
    return _build(kind, document, created_at)


def _build(kind: EventKind, document: dict, created_at: datetime) -> Event | UserDeletedEvent:
    if kind == "user_deleted":
        return UserDeletedEvent(event_id=document["event_id"], user_id=document["user_id"], deleted_at=created_at)
    if kind == "post":
        return PostEvent(
            event_id=document["event_id"],
            user_id=document["user_id"],
            post_id=document["post_id"],
            created_at=created_at,
            text=clean_text(document["text"]),
            lang=document.get("lang"),
            hashtags=tuple(document.get("hashtags", ())),
            tags=tuple(document.get("tags", ())),
            reply_to_post_id=document.get("reply_to_post_id"),
            reply_to_user_id=document.get("reply_to_user_id"),
            repost_of_post_id=document.get("repost_of_post_id"),
        )
    if kind == "like":
        return LikeEvent(
            event_id=document["event_id"],
            user_id=document["user_id"],
            post_id=document["post_id"],
            post_author_id=document["post_author_id"],
            created_at=created_at,
            action=document.get("action", "like"),
        )
    return FollowEvent(
        event_id=document["event_id"],
        follower_id=document["follower_id"],
        followee_id=document["followee_id"],
        created_at=created_at,
        action=document.get("action", "follow"),
    )
