"""Importers, event files and the bundled demo data, tested on files only (no Kafka)."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

import stream
from handlers.events import decode_event
from stream.importers import (
    MAX_TEXT_CHARS,
    ImportStats,
    SourceDataError,
    convert_to_file,
    fit_text,
    format_timestamp,
    sort_events,
)
from stream.importers import bluesky, stackexchange
from stream.importers.html_text import html_to_text
from stream.importers.jsonl import read_jsonl, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
BUNDLED = Path(stream.__file__).parent / "data" / "stackexchange-quantumcomputing.jsonl.gz"


def _kind(event: dict) -> str:
    return event["schema"].split(".", 1)[0]


def _decode(event: dict):
    return decode_event(_kind(event), orjson.dumps(event), now=datetime.now(UTC))


def _instant(event: dict) -> datetime:
    return datetime.fromisoformat(event["created_at"])


@pytest.fixture(scope="module")
def se_result() -> tuple[list[dict], ImportStats]:
    return stackexchange.convert(FIXTURES / "stackexchange")


@pytest.fixture(scope="module")
def se_events(se_result) -> list[dict]:
    return se_result[0]


@pytest.fixture(scope="module")
def se_by_id(se_events) -> dict[str, dict]:
    return {event["event_id"]: event for event in se_events}


@pytest.fixture(scope="module")
def bsky_result() -> tuple[list[dict], ImportStats]:
    return bluesky.convert(FIXTURES / "bluesky")


@pytest.fixture(scope="module")
def bsky_events(bsky_result) -> list[dict]:
    return bsky_result[0]


@pytest.fixture(scope="module")
def bsky_source_posts() -> list[dict]:
    lines = (FIXTURES / "bluesky" / "posts.jsonl").read_bytes().split(b"\n")
    return [orjson.loads(line) for line in lines if line]


# Shared helpers


def test_format_timestamp_milliseconds():
    moment = datetime(2018, 3, 12, 17, 0, 45, 567000, tzinfo=UTC)
    assert format_timestamp(moment) == "2018-03-12T17:00:45.567Z"


def test_format_timestamp_keeps_microseconds():
    moment = datetime(2026, 5, 24, 14, 8, 26, 857564, tzinfo=UTC)
    assert format_timestamp(moment) == "2026-05-24T14:08:26.857564Z"


def test_fit_text_short_unchanged():
    stats = ImportStats()
    assert fit_text("short", stats) == "short"
    assert stats.adjusted == Counter()


def test_fit_text_truncates_to_limit():
    stats = ImportStats()
    text = fit_text("x" * (MAX_TEXT_CHARS + 5), stats)
    assert len(text) == MAX_TEXT_CHARS
    assert text.endswith("\u2026")
    assert text[:-1] == "x" * (MAX_TEXT_CHARS - 1)
    assert stats.adjusted["text_truncated"] == 1


def test_sort_events_by_instant_then_id():
    events = [
        {"event_id": "b", "created_at": "2024-01-01T00:00:00.5Z"},
        {"event_id": "a", "created_at": "2024-01-01T00:00:00.500001Z"},
        {"event_id": "a", "created_at": "2024-01-01T00:00:00.500Z"},
    ]
    ordered = sort_events(events)
    assert [event["created_at"] for event in ordered] == [
        "2024-01-01T00:00:00.500Z",
        "2024-01-01T00:00:00.5Z",
        "2024-01-01T00:00:00.500001Z",
    ]


def test_import_stats_str():
    stats = ImportStats()
    stats.events.update({"post": 2, "like": 1})
    stats.skipped["comment_without_user"] = 1
    assert str(stats) == "3 events (like=1, post=2); skipped 1 rows (comment_without_user=1)"


def test_convert_to_file_writes_events(tmp_path, bsky_events):
    output = tmp_path / "bluesky.jsonl.gz"
    stats = convert_to_file("bluesky", FIXTURES / "bluesky", output)
    assert stats.events == Counter({"post": 40, "follow": 40})
    assert [orjson.loads(raw) for _, raw in read_jsonl(output)] == bsky_events


def test_convert_to_file_unknown_source(tmp_path):
    with pytest.raises(SourceDataError, match="unknown source 'mastodon'"):
        convert_to_file("mastodon", tmp_path, tmp_path / "out.jsonl")


# HTML to text


def test_html_unescapes_entities():
    assert html_to_text("<p>a &amp; b &lt;c&gt; &quot;d&quot; &#233;</p>") == 'a & b <c> "d" é'


def test_html_drops_tags_keeps_link_text():
    assert html_to_text('<p>see <a href="https://example.org">the <em>docs</em></a></p>') == "see the docs"


def test_html_separates_paragraphs():
    assert html_to_text("<p>one\n two</p>\n\n<p>three</p>") == "one two\n\nthree"


def test_html_code_block_keeps_lines():
    markup = "<p>run:</p><pre><code>if a &lt; b:\n    go()\n</code></pre><p>done</p>"
    assert html_to_text(markup) == "run:\n\nif a < b:\n    go()\n\ndone"


def test_html_lists_marked():
    markup = "<ul><li>x</li><li><p>y</p></li></ul><ol><li>first</li><li>second</li></ol>"
    assert html_to_text(markup) == "- x\n- y\n\n1. first\n2. second"


def test_html_line_break():
    assert html_to_text("<p>a<br>b<br/>c</p>") == "a\nb\nc"


def test_html_empty_body():
    assert html_to_text('<p> <img src="x.png" alt="diagram"> </p>') == ""


# Stack Exchange


def test_se_parse_tags():
    assert stackexchange.parse_tags("<qiskit><grovers-algorithm>") == ("qiskit", "grovers-algorithm")
    assert stackexchange.parse_tags("") == ()


def test_se_every_event_decodes(se_events):
    for event in se_events:
        decoded = _decode(event)
        assert decoded.event_id == event["event_id"]


def test_se_event_ids_unique(se_events):
    ids = [event["event_id"] for event in se_events]
    assert len(ids) == len(set(ids))


def test_se_events_sorted(se_events):
    keys = [(_instant(event), event["event_id"]) for event in se_events]
    assert keys == sorted(keys)


def test_se_counts(se_result):
    _, stats = se_result
    assert stats.events == Counter({"post": 68, "like": 10})


def test_se_skips_counted_by_reason(se_result):
    _, stats = se_result
    assert stats.skipped == Counter(
        {
            "not_question_or_answer": 2,
            "question_without_owner": 1,
            "answer_without_owner": 1,
            "comment_without_user": 1,
            "favourite_of_unknown_post": 1,
        }
    )


def test_se_skipped_rows_emit_nothing(se_by_id):
    assert "se:post:1808" not in se_by_id
    assert "se:post:1200" not in se_by_id
    assert "se:post:31" not in se_by_id
    assert "se:comment:1202" not in se_by_id
    assert "se:fav:4141" not in se_by_id


def test_se_question_fields(se_by_id):
    question = se_by_id["se:post:1"]
    assert question["user_id"] == "se:7"
    assert question["post_id"] == "se:post:1"
    assert question["created_at"] == "2018-03-12T17:00:45.567Z"
    assert question["lang"] == "en"
    assert question["tags"] == ["simulation", "quantum-turing-machine"]
    assert "reply_to_post_id" not in question


def test_se_question_text_title_then_body(se_by_id):
    text = se_by_id["se:post:1"]["text"]
    assert text.startswith("Can a Turing machine simulate a quantum computer?\n\nI know that a Turing machine")


def test_se_question_html_stripped(se_by_id):
    text = se_by_id["se:post:1"]["text"]
    assert "<" not in text
    assert "&quot;" not in text
    assert 'simulate "anything"' in text
    assert "W. Fouché et al." in text


def test_se_code_block_text_kept(se_by_id):
    text = se_by_id["se:post:2553"]["text"]
    assert "Qubit[] qubits = new Qubit[2];\nmyOp.Run(sim, qubits);" in text
    assert "QArray<Microsoft.Quantum.Simulation.Core.Qubit>" in text
    assert "&lt;" not in text


def test_se_tag_with_hash(se_by_id):
    assert se_by_id["se:post:2553"]["tags"] == ["q#"]


def test_se_answer_replies_to_question(se_by_id):
    answer = se_by_id["se:post:5"]
    assert answer["user_id"] == "se:29"
    assert answer["reply_to_post_id"] == "se:post:1"
    assert answer["reply_to_user_id"] == "se:7"


def test_se_answer_carries_question_tags(se_by_id):
    assert se_by_id["se:post:5"]["tags"] == ["simulation", "quantum-turing-machine"]
    assert se_by_id["se:post:2575"]["tags"] == ["q#"]


def test_se_answer_to_ownerless_question(se_by_id):
    answer = se_by_id["se:post:1812"]
    assert answer["reply_to_post_id"] == "se:post:1808"
    assert answer["reply_to_user_id"] is None
    assert answer["tags"] == ["quantum-algorithms", "shors-algorithm"]


def test_se_comment_on_question(se_by_id):
    comment = se_by_id["se:comment:3210"]
    assert comment["post_id"] == "se:comment:3210"
    assert comment["user_id"] == "se:26"
    assert comment["reply_to_post_id"] == "se:post:2553"
    assert comment["reply_to_user_id"] == "se:2832"
    assert comment["tags"] == ["q#"]
    assert comment["text"].startswith("Hi @Tinkidinki! Welcome to Quantum Computing Stack Exchange.")


def test_se_comment_on_answer(se_by_id):
    comment = se_by_id["se:comment:1228"]
    assert comment["reply_to_post_id"] == "se:post:1564"
    assert comment["reply_to_user_id"] == "se:409"
    assert comment["tags"] == ["quantum-algorithms", "quantum-speedup"]


def test_se_comment_on_ownerless_answer(se_by_id):
    comment = se_by_id["se:comment:436"]
    assert comment["reply_to_post_id"] == "se:post:1200"
    assert comment["reply_to_user_id"] is None


def test_se_favourite_becomes_like(se_by_id):
    like = se_by_id["se:fav:495"]
    assert like["schema"] == "like.v1"
    assert like["user_id"] == "se:141"
    assert like["post_id"] == "se:post:1"
    assert like["post_author_id"] == "se:7"


def test_se_like_time_same_day_follows_post(se_by_id):
    # Vote day 2018-03-12 00:00 precedes the question, created 2018-03-12T17:00:45.567.
    assert se_by_id["se:fav:185"]["created_at"] == "2018-03-12T17:00:45.568Z"


def test_se_like_time_later_day(se_by_id):
    assert se_by_id["se:fav:495"]["created_at"] == "2018-03-13T00:00:00.000Z"


def test_se_targets_precede_replies_and_likes(se_events):
    position = {event["post_id"]: index for index, event in enumerate(se_events) if event["schema"] == "post.v1"}
    for index, event in enumerate(se_events):
        target = event.get("reply_to_post_id") if event["schema"] == "post.v1" else event["post_id"]
        if target in position:
            assert position[target] < index, event["event_id"]


def test_se_long_body_truncated(tmp_path):
    body = "&lt;p&gt;" + "word " * 5000 + "&lt;/p&gt;"
    row = (
        '<row Id="9" PostTypeId="1" CreationDate="2018-03-12T17:00:45.567" OwnerUserId="7"'
        f' Title="Long" Tags="&lt;a&gt;" Body="{body}" />'
    )
    posts = f'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  {row}\n</posts>\n'
    (tmp_path / "Posts.xml").write_text(posts, encoding="utf-8")
    (tmp_path / "Comments.xml").write_text("<comments />", encoding="utf-8")
    (tmp_path / "Votes.xml").write_text("<votes />", encoding="utf-8")
    events, stats = stackexchange.convert(tmp_path)
    assert len(events[0]["text"]) == MAX_TEXT_CHARS
    assert stats.adjusted["text_truncated"] == 1
    assert _decode(events[0]).text == events[0]["text"]


def test_se_missing_file(tmp_path):
    with pytest.raises(SourceDataError, match="Posts.xml not found"):
        stackexchange.convert(tmp_path)


def test_se_malformed_xml(tmp_path):
    (tmp_path / "Posts.xml").write_text("<posts><row Id='1'", encoding="utf-8")
    with pytest.raises(SourceDataError, match="not well-formed XML"):
        stackexchange.convert(tmp_path)


# Bluesky


def test_bsky_every_event_decodes(bsky_events):
    for event in bsky_events:
        decoded = _decode(event)
        assert decoded.event_id == event["event_id"]


def test_bsky_event_ids_unique(bsky_events):
    ids = [event["event_id"] for event in bsky_events]
    assert len(ids) == len(set(ids))


def test_bsky_events_sorted(bsky_events):
    keys = [(_instant(event), event["event_id"]) for event in bsky_events]
    assert keys == sorted(keys)


def test_bsky_counts(bsky_result):
    _, stats = bsky_result
    assert stats.events == Counter({"post": 40, "follow": 40})
    assert stats.skipped == Counter()


def test_bsky_follow_time_rule(bsky_events, bsky_source_posts):
    earliest = min(datetime.fromisoformat(post["created_at"]) for post in bsky_source_posts)
    follows = [event for event in bsky_events if event["schema"] == "follow.v1"]
    assert {event["created_at"] for event in follows} == {"2024-11-19T20:44:59.927Z"}
    assert (earliest - _instant(follows[0])).total_seconds() == 1.0


def test_bsky_follows_before_posts(bsky_events):
    kinds = [_kind(event) for event in bsky_events]
    assert kinds == ["follow"] * 40 + ["post"] * 40


def test_bsky_follow_fields(bsky_events):
    first = next(event for event in bsky_events if event["event_id"] == "bsky:follow:1")
    assert first["follower_id"] == "did:plc:184723dc16774197d8baf5ec"
    assert first["followee_id"] == "did:plc:1f70a39e942db46453a6d3c7"
    assert first["action"] == "follow"


def test_bsky_follow_ids_stable(bsky_events):
    again, _ = bluesky.convert(FIXTURES / "bluesky")
    assert [event["event_id"] for event in again] == [event["event_id"] for event in bsky_events]


def test_bsky_post_fields(bsky_events, bsky_source_posts):
    source = bsky_source_posts[0]
    post = next(event for event in bsky_events if event.get("post_id") == source["uri"])
    assert post["event_id"] == f"bsky:post:{source['uri']}"
    assert post["user_id"] == source["author_did"]
    assert post["text"] == source["text"]
    assert _instant(post) == datetime.fromisoformat(source["created_at"])


def test_bsky_lang_first_or_null(bsky_events, bsky_source_posts):
    langs = {post["uri"]: (post["langs"] or [None])[0] for post in bsky_source_posts}
    posts = [event for event in bsky_events if event["schema"] == "post.v1"]
    assert {event["lang"] for event in posts} == {"en", "ca", None}
    for event in posts:
        assert event["lang"] == langs[event["post_id"]], event["post_id"]


def test_bsky_hashtags_kept(bsky_events, bsky_source_posts):
    expected = {post["uri"]: post["hashtags"] for post in bsky_source_posts}
    posts = [event for event in bsky_events if event["schema"] == "post.v1"]
    assert sum(1 for event in posts if event["hashtags"]) == 10
    for event in posts:
        assert event["hashtags"] == expected[event["post_id"]], event["post_id"]


def test_bsky_replies_have_no_target(bsky_events, bsky_source_posts):
    replies = {post["uri"] for post in bsky_source_posts if post["is_reply"]}
    assert replies
    for event in bsky_events:
        if event.get("post_id") in replies:
            assert event.get("reply_to_post_id") is None
            assert event.get("reply_to_user_id") is None


def test_bsky_line_separator_inside_text(bsky_events):
    texts = [event["text"] for event in bsky_events if event["schema"] == "post.v1"]
    assert "KNICKS TAKE GAME 2.\u2028\n\nNew York is two wins away from its first NBA title since 1973." in texts


def test_bsky_follow_skips(tmp_path):
    post = {
        "uri": "at://did:plc:a/app.bsky.feed.post/1",
        "author_did": "did:plc:a",
        "created_at": "2025-01-01T00:00:00Z",
        "text": "hi",
    }
    (tmp_path / "posts.jsonl").write_bytes(orjson.dumps(post) + b"\n")
    rows = [
        "follower_did,followee_did",
        "did:plc:a,did:plc:b",
        "did:plc:a,did:plc:b",
        "did:plc:a,did:plc:a",
        "did:plc:c,",
    ]
    (tmp_path / "follows.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    events, stats = bluesky.convert(tmp_path)
    assert stats.events == Counter({"post": 1, "follow": 1})
    assert stats.skipped == Counter({"duplicate_follow": 1, "self_follow": 1, "follow_without_did": 1})
    assert events[0]["created_at"] == "2024-12-31T23:59:59.000Z"


def test_bsky_invalid_json_line(tmp_path):
    (tmp_path / "posts.jsonl").write_bytes(b'{"uri": \n')
    (tmp_path / "follows.csv").write_text("follower_did,followee_did\n", encoding="utf-8")
    with pytest.raises(SourceDataError, match=r"posts.jsonl:1: invalid JSON"):
        bluesky.convert(tmp_path)


def test_bsky_no_posts(tmp_path):
    (tmp_path / "posts.jsonl").write_bytes(b"")
    (tmp_path / "follows.csv").write_text("follower_did,followee_did\n", encoding="utf-8")
    with pytest.raises(SourceDataError, match="has no posts"):
        bluesky.convert(tmp_path)


# Event files


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz"])
def test_jsonl_round_trip(tmp_path, se_events, name):
    path = tmp_path / name
    assert write_jsonl(se_events, path) == len(se_events)
    lines = list(read_jsonl(path))
    assert [number for number, _ in lines] == list(range(1, len(se_events) + 1))
    assert [orjson.loads(raw) for _, raw in lines] == se_events


def test_jsonl_gz_is_gzip(tmp_path, se_events):
    path = tmp_path / "events.jsonl.gz"
    write_jsonl(se_events, path)
    assert gzip.decompress(path.read_bytes()).count(b"\n") == len(se_events)


def test_jsonl_gz_reproducible(tmp_path, se_events):
    write_jsonl(se_events, tmp_path / "a.jsonl.gz")
    write_jsonl(se_events, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


def test_jsonl_read_passes_invalid_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"a": 1}\r\nnot json\n\n{"b": \xff}\n')
    assert list(read_jsonl(path)) == [(1, b'{"a": 1}'), (2, b"not json"), (4, b'{"b": \xff}')]


# Bundled demo data


@pytest.fixture(scope="module")
def bundled_events() -> list[dict]:
    return [orjson.loads(raw) for _, raw in read_jsonl(BUNDLED)]


def test_bundled_file_present():
    assert BUNDLED.is_file()
    assert BUNDLED.stat().st_size > 0


def test_bundled_every_line_decodes():
    now = datetime.now(UTC)
    count = 0
    for _, raw in read_jsonl(BUNDLED):
        kind = orjson.loads(raw)["schema"].split(".", 1)[0]
        decode_event(kind, raw, now=now)
        count += 1
    assert count == 5788


def test_bundled_counts(bundled_events):
    kinds = Counter(event["schema"] for event in bundled_events)
    assert kinds == Counter({"post.v1": 5082, "like.v1": 706})


def test_bundled_post_breakdown(bundled_events):
    posts = [event for event in bundled_events if event["schema"] == "post.v1"]
    questions_and_answers = [event for event in posts if event["event_id"].startswith("se:post:")]
    questions = [event for event in questions_and_answers if "reply_to_post_id" not in event]
    answers = [event for event in questions_and_answers if "reply_to_post_id" in event]
    comments = [event for event in posts if event["event_id"].startswith("se:comment:")]
    assert len(questions) == 611
    assert len(answers) == 1059
    assert len(comments) == 3412


def test_bundled_sorted_and_unique(bundled_events):
    keys = [(_instant(event), event["event_id"]) for event in bundled_events]
    assert keys == sorted(keys)
    assert len({event["event_id"] for event in bundled_events}) == len(bundled_events)


def test_bundled_time_range(bundled_events):
    assert bundled_events[0]["created_at"] == "2018-03-12T17:00:45.567Z"
    assert bundled_events[-1]["created_at"] == "2018-09-01T21:16:55.083Z"
