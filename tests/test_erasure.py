"""User erasure: the marker, re-creation after deleted_at, and order independence."""

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from handlers import erasure, state as user_state
from handlers.errors import InvalidRecord
from handlers.events import PostEvent, UserDeletedEvent, decode_event

T0 = datetime(2024, 6, 1, tzinfo=UTC)
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def post(n: int, hours: float) -> PostEvent:
    return PostEvent(f"e{n}", "u1", f"p{n}", T0 + timedelta(hours=hours), "qubits and gates", tags=("qiskit",))


def deletion(hours: float, event_id: str = "d1") -> UserDeletedEvent:
    return UserDeletedEvent(event_id, "u1", T0 + timedelta(hours=hours))


def apply(value: dict | None, item: PostEvent | UserDeletedEvent) -> dict | None:
    """Apply one event to a state-table value the way the ingest stage does."""
    if isinstance(item, UserDeletedEvent):
        value, _ = erasure.erase(value, "u1", item.event_id, item.deleted_at.timestamp())
        return value
    at = item.created_at.timestamp()
    state = erasure.state_for_record(value, "u1", at, own_event=True)
    if state is None:
        return value
    if user_state.apply_post(state, item).applied:
        erasure.note_own_event(state, at)
    return state


def apply_all(items, value: dict | None = None) -> dict | None:
    for item in items:
        value = apply(value, item)
    return value


def stamp(hours: float) -> float:
    return (T0 + timedelta(hours=hours)).timestamp()


def test_deletion_leaves_only_marker():
    value = apply_all([post(1, 1), post(2, 2), deletion(5)])
    assert value == {"user_id": "u1", "erased": {"deleted_at": stamp(5), "event_id": "d1"}}
    assert not erasure.is_live(value)


def test_deletion_of_unknown_user_stores_marker():
    value, result = erasure.erase(None, "u1", "d1", stamp(5))
    assert result.outcome == "applied"
    assert erasure.marker_of(value) == {"deleted_at": stamp(5), "event_id": "d1"}


def test_older_events_after_deletion_dropped():
    marker_only = apply_all([post(1, 1), deletion(5)])
    assert erasure.state_for_record(marker_only, "u1", stamp(1), own_event=True) is None
    assert erasure.state_for_record(marker_only, "u1", stamp(5), own_event=True) is None
    assert apply_all([post(1, 1), post(2, 4)], marker_only) == marker_only


def test_newer_event_recreates_user():
    value = apply_all([post(1, 1), deletion(5), post(2, 6)])
    assert erasure.is_live(value)
    assert value["events_applied"] == 1
    assert list(value["seen"]) == ["post:e2"]
    assert value["profile"]["version"] == 0
    assert erasure.marker_of(value)["deleted_at"] == stamp(5)


def test_recreated_user_still_drops_old_events():
    value = apply_all([post(1, 1), deletion(5), post(2, 6), post(3, 2)])
    assert value["events_applied"] == 1
    assert "post:e3" not in value["seen"]


def test_audience_record_never_recreates():
    marker_only = apply_all([deletion(5)])
    assert erasure.state_for_record(marker_only, "u1", stamp(9), own_event=False) is None


def test_audience_record_applies_to_recreated_user():
    value = apply_all([deletion(5), post(2, 6)])
    assert erasure.state_for_record(value, "u1", stamp(9), own_event=False) is value
    assert erasure.state_for_record(value, "u1", stamp(4), own_event=False) is None


def test_same_deletion_twice_is_duplicate():
    value = apply_all([post(1, 1), deletion(5)])
    again, result = erasure.erase(value, "u1", "d1", stamp(5))
    assert result.outcome == "duplicate"
    assert again is value


def test_older_deletion_is_duplicate():
    value = apply_all([deletion(5), post(2, 6)])
    again, result = erasure.erase(value, "u1", "d0", stamp(3))
    assert result.outcome == "duplicate"
    assert again is value


def test_later_deletion_erases_recreated_user():
    value = apply_all([deletion(5), post(2, 6), deletion(8, "d2")])
    assert not erasure.is_live(value)
    assert erasure.marker_of(value) == {"deleted_at": stamp(8), "event_id": "d2"}


def test_late_deletion_keeps_user_present_but_empty():
    value = apply_all([post(1, 1), post(2, 9), deletion(5)])
    assert erasure.is_live(value)
    assert value["events_applied"] == 0
    assert value["seen"] == {}
    assert value["recent_posts"] == []
    replayed = apply_all([post(1, 1), post(2, 9)], value)
    assert replayed["events_applied"] == 1
    assert list(replayed["seen"]) == ["post:e2"]


def test_marker_survives_json_round_trip():
    value = apply_all([post(1, 1), deletion(5)])
    restored = orjson.loads(orjson.dumps(value))
    assert erasure.state_for_record(restored, "u1", stamp(2), own_event=True) is None


def test_erase_request_and_tags():
    value = apply_all([deletion(5), post(2, 6)])
    request = erasure.erase_request("u1", erasure.marker_of(value))
    assert request == {"action": "erase", "user_id": "u1", "event_id": "d1", "deleted_at": stamp(5)}
    assert erasure.is_erase_request(request)
    tagged = {"user_id": "u1", "version": 1}
    erasure.tag_request(tagged, value)
    assert tagged["erased_at"] == stamp(5)
    assert not erasure.predates_erasure(tagged, request)
    assert erasure.predates_erasure({"user_id": "u1", "version": 7}, request)
    later = erasure.erase_request("u1", {"event_id": "d2", "deleted_at": stamp(8)})
    assert erasure.predates_erasure(tagged, later)


def test_untagged_request_for_user_never_erased():
    request = {"user_id": "u1", "version": 1}
    erasure.tag_request(request, user_state.new_state("u1"))
    assert "erased_at" not in request


def test_user_deleted_decoded():
    raw = orjson.dumps({"schema": "user_deleted.v1", "event_id": "d1", "user_id": "u1", "deleted_at": "2024-06-01T05:00:00Z"})
    event = decode_event("user_deleted", raw, now=NOW)
    assert event == UserDeletedEvent("d1", "u1", T0 + timedelta(hours=5))


def test_user_deleted_timestamp_error_names_field():
    raw = orjson.dumps({"schema": "user_deleted.v1", "event_id": "d1", "user_id": "u1", "deleted_at": "2024-02-30T00:00:00Z"})
    with pytest.raises(InvalidRecord) as caught:
        decode_event("user_deleted", raw, now=NOW)
    assert caught.value.reason == "invalid_timestamp"
    assert caught.value.detail.startswith("deleted_at ")


def test_user_deleted_without_time_rejected():
    raw = orjson.dumps({"schema": "user_deleted.v1", "event_id": "d1", "user_id": "u1"})
    with pytest.raises(InvalidRecord) as caught:
        decode_event("user_deleted", raw, now=NOW)
    assert caught.value.reason == "invalid_schema"


def test_size_limit_is_a_parameter():
    raw = orjson.dumps({"schema": "user_deleted.v1", "event_id": "d1", "user_id": "u1", "deleted_at": "2024-06-01T05:00:00Z"})
    assert decode_event("user_deleted", raw, now=NOW, max_bytes=len(raw)).event_id == "d1"
    with pytest.raises(InvalidRecord) as caught:
        decode_event("user_deleted", raw, now=NOW, max_bytes=len(raw) - 1)
    assert caught.value.reason == "oversized"
    assert "PROFILESTREAM_MAX_EVENT_BYTES" in caught.value.detail
    assert f"{len(raw)} bytes" in caught.value.detail


@st.composite
def histories(draw):
    """Posts at whole hours (so ties with deleted_at occur), one deletion, any arrival order."""
    hours = draw(st.lists(st.integers(0, 20), min_size=0, max_size=12))
    posts = [post(n, hour) for n, hour in enumerate(hours)]
    deleted_hour = draw(st.integers(0, 20))
    order = draw(st.permutations(posts))
    position = draw(st.integers(0, len(order)))
    return posts, deleted_hour, [*order[:position], deletion(deleted_hour), *order[position:]]


@settings(max_examples=400, deadline=None)
@given(history=histories())
def test_absent_iff_no_event_after_deletion(history):
    posts, deleted_hour, arrivals = history
    value = apply_all(arrivals)
    acted_after = any(event.created_at > T0 + timedelta(hours=deleted_hour) for event in posts)
    assert erasure.is_live(value) == acted_after
    assert erasure.marker_of(value)["deleted_at"] == stamp(deleted_hour)


@settings(max_examples=400, deadline=None)
@given(history=histories())
def test_state_holds_only_events_after_deletion(history):
    posts, deleted_hour, arrivals = history
    value = apply_all(arrivals)
    if not erasure.is_live(value):
        return
    deleted_at = stamp(deleted_hour)
    assert all(at > deleted_at for at in value["seen"].values())
    assert all(item["at"] > deleted_at for item in value["recent_posts"])


@settings(max_examples=400, deadline=None)
@given(history=histories(), replay_order=st.randoms(use_true_random=False))
def test_full_replay_converges(history, replay_order):
    posts, deleted_hour, arrivals = history
    replay = list(posts)
    replay_order.shuffle(replay)
    value = apply_all(replay, apply_all(arrivals))
    after = [event for event in posts if event.created_at > T0 + timedelta(hours=deleted_hour)]
    assert erasure.is_live(value) == bool(after)
    if after:
        assert value["totals"]["posts"] == len(after)
        assert set(value["seen"]) == {f"post:{event.event_id}" for event in after}
