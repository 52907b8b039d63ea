"""Event time through the ingest stage: far-future, late and too-old events, on an in-memory table."""

from datetime import UTC, datetime, timedelta

import orjson
from prometheus_client import REGISTRY

from handlers import state as user_state
from stream.ingest import IngestStage
from stream.records import Record
from stream.settings import load_settings
from tests.test_ingest_erasure import RecordingEmitter

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def like(n: int, at: datetime, user: str = "u1") -> Record:
    document = {"schema": "like.v1", "event_id": f"{user}:l{n}", "user_id": user, "post_id": f"p{n}",
                "post_author_id": "author", "created_at": stamp(at)}
    return Record("likes", 0, n, user.encode(), orjson.dumps(document))


def post(n: int, at: datetime, user: str = "u1") -> Record:
    document = {"schema": "post.v1", "event_id": f"{user}:e{n}", "user_id": user, "post_id": f"{user}:p{n}",
                "created_at": stamp(at), "text": "qubits", "tags": ["qiskit"]}
    return Record("posts", 0, n, user.encode(), orjson.dumps(document))


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_stage(**overrides) -> tuple[IngestStage, dict, RecordingEmitter]:
    table: dict[str, dict] = {}
    emitter = RecordingEmitter()
    stage = IngestStage(load_settings(**overrides), table, emitter, clock=lambda: NOW)
    return stage, table, emitter


async def test_like_a_day_ahead_then_ten_likes():
    stage, table, emitter = make_stage()
    future_before = counter("profilestream_dead_letters_total", reason="future_timestamp")
    outcomes = await stage.handle_batch([like(0, NOW + timedelta(days=1))])
    assert outcomes == ["dead_letter"]
    assert emitter.dead_letters[0][1].reason == "future_timestamp"
    assert counter("profilestream_dead_letters_total", reason="future_timestamp") == future_before + 1

    ten = [like(n, NOW - timedelta(hours=11 - n)) for n in range(1, 11)]
    assert await stage.handle_batch(ten) == ["applied"] * 10
    state = table["u1"]
    assert state["totals"]["likes_given"] == 10
    assert user_state.window_counts(state, 24)["likes_given"] == 10
    assert user_state.window_counts(state, 1)["likes_given"] == 1
    assert state["last_seen"] == (NOW - timedelta(hours=1)).timestamp()
    assert "like:u1:l0" not in state["seen"]


async def test_far_future_like_in_same_batch_moves_nothing():
    stage, table, _ = make_stage()
    records = [like(0, NOW + timedelta(days=1))] + [like(n, NOW - timedelta(hours=11 - n)) for n in range(1, 11)]
    assert await stage.handle_batch(records) == ["dead_letter"] + ["applied"] * 10
    assert user_state.window_counts(table["u1"], 24)["likes_given"] == 10
    assert table["u1"]["last_seen"] == (NOW - timedelta(hours=1)).timestamp()


async def test_late_event_outside_window_counted():
    stage, table, _ = make_stage()
    late_before = counter("profilestream_late_events_total", type="post")
    start = NOW - timedelta(days=30)
    await stage.handle_batch([post(1, start), post(2, start + timedelta(days=8))])
    assert counter("profilestream_late_events_total", type="post") == late_before
    outcomes = await stage.handle_batch([post(3, start + timedelta(hours=12))])
    assert outcomes == ["applied"]
    assert counter("profilestream_late_events_total", type="post") == late_before + 1
    state = table["u1"]
    assert state["totals"]["posts"] == 3
    assert user_state.window_counts(state, 7 * 24)["posts"] == 1
    assert state["interests"]["qiskit"][4] == 3


async def test_event_within_window_not_late():
    stage, table, _ = make_stage()
    late_before = counter("profilestream_late_events_total", type="post")
    start = NOW - timedelta(days=30)
    await stage.handle_batch([post(1, start + timedelta(days=6)), post(2, start)])
    assert counter("profilestream_late_events_total", type="post") == late_before
    assert user_state.window_counts(table["u1"], 7 * 24)["posts"] == 2


async def test_event_beyond_dedup_horizon_counted():
    stage, table, _ = make_stage()
    start = NOW - timedelta(days=30)
    count = user_state.MAX_SEEN_EVENTS + user_state.SEEN_EVICTION_BATCH + 1
    await stage.handle_batch([post(n, start + timedelta(minutes=n)) for n in range(1, count + 1)])
    before = orjson.dumps(table["u1"], option=orjson.OPT_SORT_KEYS)
    dropped_before = counter("profilestream_events_total", type="post", outcome="beyond_dedup_horizon")
    outcomes = await stage.handle_batch([post(0, start - timedelta(hours=1))])
    assert outcomes == ["beyond_dedup_horizon"]
    assert counter("profilestream_events_total", type="post", outcome="beyond_dedup_horizon") == dropped_before + 1
    assert orjson.dumps(table["u1"], option=orjson.OPT_SORT_KEYS) == before


async def test_idle_user_never_regenerated():
    stage, table, emitter = make_stage(min_events_new_user=3, stale_after_s=24 * 3600, cooldown_s=0)
    start = NOW - timedelta(days=400)
    await stage.handle_batch([post(n, start + timedelta(hours=n)) for n in range(1, 6)])
    requests = [request for user, request in emitter.regenerations if user == "u1"]
    assert [request["version"] for request in requests] == [1]
    # A year of other users' events, each far beyond u1's staleness, and u1's own duplicates.
    others = [post(n, start + timedelta(days=n), user="u2") for n in range(1, 365)]
    await stage.handle_batch(others)
    await stage.handle_batch([post(n, start + timedelta(hours=n)) for n in range(1, 6)])
    requests = [request for user, request in emitter.regenerations if user == "u1"]
    assert [request["version"] for request in requests] == [1, 1]
    assert requests[1]["replayed"] is True
    assert table["u1"]["profile"]["version"] == 1
