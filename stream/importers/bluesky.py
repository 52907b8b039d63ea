"""Conversion of a Bluesky collection (posts.jsonl, follows.csv) to events.

Mapping:
- Each posts.jsonl line is a post by author_did, with the at:// URI as post id and event id
  `bsky:post:<uri>`. lang is the first entry of langs, or null when langs is empty or its
  first entry is not a BCP 47 tag. hashtags come from the hashtags field, without
  duplicates. The collection records is_reply but not the post replied to, so no post has
  a reply target, replies included.
- Each follows.csv row is a follow by follower_did of followee_did, with event id
  `bsky:follow:<n>`, n being the row's 1-based position after the header, so ids are
  stable for the same file.
- The API gives no time for a follow, so every follow gets the time one second before the
  earliest post in posts.jsonl. Follower counts then exist before any post is processed.

The pseudonymous DIDs are the user ids. A follow row is skipped and counted by reason when
it lacks a DID ("follow_without_did"), repeats an earlier edge ("duplicate_follow") or
follows its own author ("self_follow"). Hashtags longer than the schema's 100 characters
or beyond its 64 per post are dropped and counted in `adjusted`. A first langs entry that
is not a BCP 47 tag is counted there too.
"""

from __future__ import annotations

import csv
import re
from datetime import datetime, timedelta
from pathlib import Path

import orjson

from . import ImportStats, SourceDataError, fit_text, format_timestamp, sort_events

FOLLOW_LEAD = timedelta(seconds=1)
MAX_TOPICS = 64
MAX_TOPIC_CHARS = 100
# The pattern of "lang" in post.v1.json.
_LANG_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
_POST_FIELDS = ("uri", "author_did", "created_at")


def convert(src_dir: Path) -> tuple[list[dict], ImportStats]:
    """Convert the collection in `src_dir` to events sorted by `sort_events`, with their tally.

    Raises SourceDataError when a file is missing, posts.jsonl has no posts, or a row is
    malformed (invalid JSON, a missing field, an invalid created_at, a missing CSV column).
    """
    stats = ImportStats()
    posts = _post_events(src_dir / "posts.jsonl", stats)
    if not posts:
        raise SourceDataError(
            f"{src_dir / 'posts.jsonl'} has no posts, so no follow time can be derived from the earliest post"
        )
    earliest = min(datetime.fromisoformat(event["created_at"]) for event in posts)
    follows = _follow_events(src_dir / "follows.csv", earliest - FOLLOW_LEAD, stats)
    return sort_events(posts + follows), stats


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise SourceDataError(f"{path} not found. Pass the folder that contains posts.jsonl and follows.csv")


def _post_events(path: Path, stats: ImportStats) -> list[dict]:
    _require_file(path)
    events = []
    with path.open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                record = _parse_post_line(line, path, line_number)
                events.append(stats.count(_post_event(record, stats)))
    return events


def _parse_post_line(line: bytes, path: Path, line_number: int) -> dict:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise SourceDataError(f"{path}:{line_number}: invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise SourceDataError(f"{path}:{line_number}: expected a JSON object, found {type(record).__name__}")
    missing = [name for name in _POST_FIELDS if not record.get(name)]
    if missing:
        raise SourceDataError(f"{path}:{line_number}: missing field {', '.join(missing)}")
    try:
        record["created_at"] = datetime.fromisoformat(record["created_at"])
    except (TypeError, ValueError):
        raise SourceDataError(f"{path}:{line_number}: invalid created_at {record['created_at']!r}") from None
    if record["created_at"].tzinfo is None:
        raise SourceDataError(f"{path}:{line_number}: created_at {record['created_at']} has no UTC offset")
    return record


def _post_event(record: dict, stats: ImportStats) -> dict:
    return {
        "schema": "post.v1",
        "event_id": f"bsky:post:{record['uri']}",
        "user_id": record["author_did"],
        "post_id": record["uri"],
        "created_at": format_timestamp(record["created_at"]),
        "text": fit_text(record.get("text") or "", stats),
        "lang": _first_lang(record.get("langs") or [], stats),
        "hashtags": _hashtags(record.get("hashtags") or [], stats),
    }


def _first_lang(langs: list[str], stats: ImportStats) -> str | None:
    if not langs:
        return None
    if isinstance(langs[0], str) and _LANG_TAG.match(langs[0]):
        return langs[0]
    stats.adjusted["lang_dropped"] += 1
    return None


def _hashtags(raw: list[str], stats: ImportStats) -> list[str]:
    """Return the distinct hashtags in source order that fit the schema's topic limits."""
    hashtags: list[str] = []
    for tag in raw:
        if not tag or tag in hashtags:
            continue
        if len(tag) > MAX_TOPIC_CHARS or len(hashtags) == MAX_TOPICS:
            stats.adjusted["hashtag_dropped"] += 1
            continue
        hashtags.append(tag)
    return hashtags


def _follow_events(path: Path, followed_at: datetime, stats: ImportStats) -> list[dict]:
    _require_file(path)
    events = []
    seen: set[tuple[str, str]] = set()
    with path.open(newline="", encoding="utf-8") as source:
        reader = csv.DictReader(source)
        missing = {"follower_did", "followee_did"} - set(reader.fieldnames or ())
        if missing:
            raise SourceDataError(
                f"{path}: header is missing column {', '.join(sorted(missing))}; expected follower_did,followee_did"
            )
        for row_number, row in enumerate(reader, start=1):
            edge = ((row["follower_did"] or "").strip(), (row["followee_did"] or "").strip())
            reason = _follow_skip_reason(edge, seen)
            if reason:
                stats.skipped[reason] += 1
                continue
            seen.add(edge)
            events.append(stats.count(_follow_event(row_number, edge, followed_at)))
    return events


def _follow_skip_reason(edge: tuple[str, str], seen: set[tuple[str, str]]) -> str | None:
    follower, followee = edge
    if not follower or not followee:
        return "follow_without_did"
    if follower == followee:
        return "self_follow"
    if edge in seen:
        return "duplicate_follow"
    return None


def _follow_event(row_number: int, edge: tuple[str, str], followed_at: datetime) -> dict:
    return {
        "schema": "follow.v1",
        "event_id": f"bsky:follow:{row_number}",
        "follower_id": edge[0],
        "followee_id": edge[1],
        "created_at": format_timestamp(followed_at),
        "action": "follow",
    }
