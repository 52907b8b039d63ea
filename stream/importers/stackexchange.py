"""Conversion of a Stack Exchange data dump (Posts.xml, Comments.xml, Votes.xml) to events.

Mapping:
- A question (PostTypeId 1) is a post. Its text is the title, a blank line, then the body
  converted from HTML by `html_text.html_to_text`. Its tags come from the Tags attribute
  ("<a><b>" becomes ["a", "b"]).
- An answer (PostTypeId 2) is a post replying to its question and the question's owner.
  It carries the question's tags, because answering is evidence of interest in them.
- A comment is a post replying to the commented post and that post's owner. It carries the
  tags of the commented question, or of the answered question for a comment on an answer.
- A favourite (a vote with VoteTypeId 5 and a UserId) is a like of the post by UserId, with
  the post's owner as post_author_id. Vote times in the dump are whole days, so the like's
  created_at is the later of the vote's day (00:00 UTC) and one millisecond after the post's
  creation, which keeps every like after the post it likes in time order.
- Other post types (tag wikis) and other vote types carry no user activity and are ignored.
  Skipped tag-wiki posts are counted as "not_question_or_answer".

Ids: users are `se:<OwnerUserId>`, questions and answers `se:post:<Id>`, comments
`se:comment:<Id>`. Event ids are `se:post:<Id>`, `se:comment:<Id>` and `se:fav:<VoteId>`.
Every post has lang "en". Dump times carry no offset and are UTC.

Rows are skipped and counted by reason when their author is a deleted account (no owner or
user id) or when their target is not a question or answer in the dump. A reply whose target
exists but whose owner was deleted is kept, with reply_to_user_id null, and its
reply_to_post_id then names a post that has no event of its own.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import ImportStats, SourceDataError, fit_text, format_timestamp, sort_events
from .html_text import html_to_text

QUESTION = "1"
ANSWER = "2"
FAVOURITE = "5"
_LIKE_DELAY = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class _Post:
    """A question or answer row, with the fields the mapping uses."""

    id: str
    type_id: str
    created_at: datetime
    owner_id: str | None
    parent_id: str | None
    title: str
    body_html: str
    tags: tuple[str, ...]


def convert(src_dir: Path) -> tuple[list[dict], ImportStats]:
    """Convert the dump in `src_dir` to events sorted by `sort_events`, with their tally.

    Raises SourceDataError when a file is missing, is not well-formed XML, or has a row
    without an attribute the mapping needs.
    """
    stats = ImportStats()
    posts = _read_posts(src_dir / "Posts.xml", stats)
    events = _post_events(posts, stats)
    events += _comment_events(src_dir / "Comments.xml", posts, stats)
    events += _favourite_events(src_dir / "Votes.xml", posts, stats)
    return sort_events(events), stats


def parse_tags(value: str) -> tuple[str, ...]:
    """Split a Tags attribute such as "<qiskit><grovers-algorithm>" into tag names."""
    return tuple(tag for tag in value.strip("<>").split("><") if tag)


def _iter_rows(path: Path) -> Iterator[dict[str, str]]:
    """Yield the attributes of each <row> element of a dump file, streaming."""
    if not path.is_file():
        raise SourceDataError(f"{path} not found. Pass the folder of an unpacked Stack Exchange data dump")
    try:
        for _, element in ElementTree.iterparse(path, events=("end",)):
            if element.tag == "row":
                yield dict(element.attrib)
            element.clear()
    except ElementTree.ParseError as exc:
        raise SourceDataError(f"{path} is not well-formed XML: {exc}") from None


def _required(row: dict[str, str], name: str, path: Path) -> str:
    value = row.get(name)
    if not value:
        raise SourceDataError(f"{path}: row Id={row.get('Id')!r} is missing the {name} attribute")
    return value


def _parse_time(row: dict[str, str], path: Path) -> datetime:
    value = _required(row, "CreationDate", path)
    try:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    except ValueError:
        raise SourceDataError(f"{path}: row Id={row.get('Id')!r} has invalid CreationDate {value!r}") from None


def _read_posts(path: Path, stats: ImportStats) -> dict[str, _Post]:
    """Read questions and answers by Id, counting other post types as skipped."""
    posts: dict[str, _Post] = {}
    for row in _iter_rows(path):
        post_id = _required(row, "Id", path)
        type_id = _required(row, "PostTypeId", path)
        if type_id not in (QUESTION, ANSWER):
            stats.skipped["not_question_or_answer"] += 1
            continue
        posts[post_id] = _Post(
            id=post_id,
            type_id=type_id,
            created_at=_parse_time(row, path),
            owner_id=row.get("OwnerUserId"),
            parent_id=_required(row, "ParentId", path) if type_id == ANSWER else None,
            title=row.get("Title", ""),
            body_html=row.get("Body", ""),
            tags=parse_tags(row.get("Tags", "")),
        )
    return posts


def _topic_tags(post: _Post, posts: dict[str, _Post]) -> tuple[str, ...]:
    """Return a question's own tags, or an answer's question's tags."""
    if post.type_id == QUESTION:
        return post.tags
    question = posts.get(post.parent_id or "")
    return question.tags if question else ()


def _user_id(raw_id: str | None) -> str | None:
    return f"se:{raw_id}" if raw_id else None


def _post_events(posts: dict[str, _Post], stats: ImportStats) -> list[dict]:
    events = []
    for post in posts.values():
        if not post.owner_id:
            stats.skipped["question_without_owner" if post.type_id == QUESTION else "answer_without_owner"] += 1
            continue
        if post.type_id == ANSWER and post.parent_id not in posts:
            stats.skipped["answer_to_unknown_question"] += 1
            continue
        events.append(stats.count(_post_event(post, posts, stats)))
    return events


def _post_event(post: _Post, posts: dict[str, _Post], stats: ImportStats) -> dict:
    body = html_to_text(post.body_html)
    parts = (post.title.strip(), body) if post.type_id == QUESTION else (body,)
    event = {
        "schema": "post.v1",
        "event_id": f"se:post:{post.id}",
        "user_id": _user_id(post.owner_id),
        "post_id": f"se:post:{post.id}",
        "created_at": format_timestamp(post.created_at),
        "text": fit_text("\n\n".join(part for part in parts if part), stats),
        "lang": "en",
        "tags": list(_topic_tags(post, posts)),
    }
    if post.type_id == ANSWER:
        question = posts[post.parent_id or ""]
        event["reply_to_post_id"] = f"se:post:{question.id}"
        event["reply_to_user_id"] = _user_id(question.owner_id)
    return event


def _comment_events(path: Path, posts: dict[str, _Post], stats: ImportStats) -> list[dict]:
    events = []
    for row in _iter_rows(path):
        target = posts.get(_required(row, "PostId", path))
        if not row.get("UserId"):
            stats.skipped["comment_without_user"] += 1
        elif target is None:
            stats.skipped["comment_on_unknown_post"] += 1
        else:
            events.append(stats.count(_comment_event(row, target, posts, path, stats)))
    return events


def _comment_event(row: dict[str, str], target: _Post, posts: dict[str, _Post], path: Path, stats: ImportStats) -> dict:
    comment_id = _required(row, "Id", path)
    return {
        "schema": "post.v1",
        "event_id": f"se:comment:{comment_id}",
        "user_id": _user_id(row["UserId"]),
        "post_id": f"se:comment:{comment_id}",
        "created_at": format_timestamp(_parse_time(row, path)),
        "text": fit_text(row.get("Text", "").strip(), stats),
        "lang": "en",
        "tags": list(_topic_tags(target, posts)),
        "reply_to_post_id": f"se:post:{target.id}",
        "reply_to_user_id": _user_id(target.owner_id),
    }


def _favourite_events(path: Path, posts: dict[str, _Post], stats: ImportStats) -> list[dict]:
    events = []
    for row in _iter_rows(path):
        if row.get("VoteTypeId") != FAVOURITE:
            continue
        target = posts.get(_required(row, "PostId", path))
        if not row.get("UserId"):
            stats.skipped["favourite_without_user"] += 1
        elif target is None:
            stats.skipped["favourite_of_unknown_post"] += 1
        elif not target.owner_id:
            stats.skipped["favourite_of_post_without_owner"] += 1
        else:
            events.append(stats.count(_like_event(row, target, path)))
    return events


def _like_event(row: dict[str, str], target: _Post, path: Path) -> dict:
    vote_id = _required(row, "Id", path)
    liked_at = max(_parse_time(row, path), target.created_at + _LIKE_DELAY)
    return {
        "schema": "like.v1",
        "event_id": f"se:fav:{vote_id}",
        "user_id": _user_id(row["UserId"]),
        "post_id": f"se:post:{target.id}",
        "post_author_id": _user_id(target.owner_id),
        "created_at": format_timestamp(liked_at),
        "action": "like",
    }
