"""Decoding and validation of input records."""

from datetime import UTC, datetime

import orjson
import pytest

from handlers.errors import InvalidRecord
from handlers.events import FollowEvent, LikeEvent, PostEvent, decode_event

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def post(**fields) -> dict:
    document = {"schema": "post.v1", "event_id": "e1", "user_id": "u1", "post_id": "p1",
                "created_at": "2024-06-01T12:00:00Z", "text": "hello"}
    document.update(fields)
    return document


def decode_post(document: dict | bytes):
    raw = document if isinstance(document, bytes) else orjson.dumps(document)
    return decode_event("post", raw, now=NOW)


def reason_of(document: dict | bytes, kind: str = "post") -> str:
    raw = document if isinstance(document, bytes) else orjson.dumps(document)
    with pytest.raises(InvalidRecord) as caught:
        decode_event(kind, raw, now=NOW)
    return caught.value.reason


def test_post_valid_minimal():
    event = decode_post(post())
    assert isinstance(event, PostEvent)
    assert event.created_at == datetime(2024, 6, 1, 12, tzinfo=UTC)


def test_timestamp_with_z_offset_and_naive():
    zulu = decode_post(post(created_at="2024-06-01T12:00:00Z")).created_at
    offset = decode_post(post(created_at="2024-06-01T20:00:00+08:00")).created_at
    naive = decode_post(post(created_at="2024-06-01T12:00:00")).created_at
    lower = decode_post(post(created_at="2024-06-01t12:00:00z")).created_at
    assert zulu == offset
    assert lower == zulu
    assert naive == zulu
    assert naive.tzinfo == UTC


def test_timestamp_impossible_rejected():
    assert reason_of(post(created_at="2024-02-30T25:00:00Z")) == "invalid_timestamp"


def test_timestamp_far_future_rejected():
    assert reason_of(post(created_at="2025-01-02T00:00:00Z")) == "future_timestamp"


def test_timestamp_not_rfc3339_rejected():
    assert reason_of(post(created_at="yesterday")) == "invalid_schema"


def test_truncated_json_rejected():
    raw = orjson.dumps(post())[:-7]
    assert reason_of(raw) == "invalid_json"


def test_invalid_utf8_rejected():
    raw = orjson.dumps(post(text="PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xff\xfe")
    assert reason_of(raw) == "invalid_utf8"


def test_lone_surrogate_rejected():
    raw = orjson.dumps(post(text="PLACEHOLDER")).replace(b"PLACEHOLDER", b"bad \\ud800 here")
    assert reason_of(raw) == "lone_surrogate"


def test_emoji_surrogate_pair_kept():
    raw = orjson.dumps(post(text="PLACEHOLDER")).replace(b"PLACEHOLDER", b"smile \\ud83d\\ude00")
    assert decode_post(raw).text == "smile \U0001F600"


def test_nul_character_removed():
    event = decode_post(post(text="a\u0000b\tc\n"))
    assert event.text == "ab\tc\n"


def test_missing_field_rejected():
    document = post()
    del document["user_id"]
    assert reason_of(document) == "invalid_schema"


def test_mistyped_field_rejected():
    assert reason_of(post(hashtags="qiskit")) == "invalid_schema"


def test_extra_field_rejected():
    assert reason_of(post(mood="happy")) == "invalid_schema"


def test_oversized_text_rejected():
    assert reason_of(post(text="x" * 20001)) == "invalid_schema"


def test_oversized_record_rejected():
    assert reason_of(post(text="x" * 300_000)) == "oversized"


def test_unknown_version_rejected():
    assert reason_of(post(schema="post.v2")) == "unknown_version"


def test_wrong_schema_for_topic_rejected():
    assert reason_of(post(), kind="like") == "wrong_schema"


def test_non_object_rejected():
    assert reason_of(b"[1, 2]") == "invalid_schema"


def test_like_and_unlike():
    like = {"schema": "like.v1", "event_id": "l1", "user_id": "u1", "post_id": "p9",
            "post_author_id": "u2", "created_at": "2024-06-01T12:00:00Z"}
    event = decode_event("like", orjson.dumps(like), now=NOW)
    assert isinstance(event, LikeEvent)
    assert event.action == "like"
    unlike = decode_event("like", orjson.dumps({**like, "action": "unlike"}), now=NOW)
    assert unlike.action == "unlike"


def test_follow_actor_is_follower():
    follow = {"schema": "follow.v1", "event_id": "f1", "follower_id": "u1", "followee_id": "u2",
              "created_at": "2024-06-01T12:00:00Z", "action": "unfollow"}
    event = decode_event("follow", orjson.dumps(follow), now=NOW)
    assert isinstance(event, FollowEvent)
    assert event.user_id == "u1"
    assert event.action == "unfollow"
