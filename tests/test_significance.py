"""Trigger decisions: new users, drift, new content, staleness and cooldown."""

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings, strategies as st

from handlers import significance, state as user_state
from handlers.events import PostEvent

T0 = datetime(2024, 6, 1, tzinfo=UTC)
RULES = significance.Thresholds(min_events_new_user=3, interest_drift=0.3, min_new_events=2,
                                new_content_events=20, cooldown_s=3600, stale_after_s=10 * 24 * 3600)


def post(state: dict, n: int, hours: float, tag: str) -> None:
    event = PostEvent(f"e{n}", "u1", f"p{n}", T0 + timedelta(hours=hours), "", tags=(tag,))
    user_state.apply_post(state, event)


def profiled_state() -> dict:
    state = user_state.new_state("u1")
    for n in range(3):
        post(state, n, n, "qiskit")
    significance.take_snapshot(state)
    return state


def test_new_user_needs_min_events():
    state = user_state.new_state("u1")
    post(state, 1, 0, "qiskit")
    post(state, 2, 1, "qiskit")
    assert not significance.decide(state, RULES).regenerate
    post(state, 3, 2, "qiskit")
    decision = significance.decide(state, RULES)
    assert decision.regenerate
    assert decision.reasons == ("new_user",)


def test_no_new_events_never_regenerates():
    state = profiled_state()
    state["last_seen"] += 365 * 24 * 3600
    assert not significance.decide(state, RULES).regenerate


def test_interest_drift_triggers():
    state = profiled_state()
    for n in range(10, 16):
        post(state, n, 10 + n, "error-correction")
    decision = significance.decide(state, RULES)
    assert decision.regenerate
    assert "interest_drift" in decision.reasons
    assert decision.score >= RULES.interest_drift


def test_same_interests_do_not_trigger():
    state = profiled_state()
    for n in range(10, 14):
        post(state, n, 10 + n, "qiskit")
    assert not significance.decide(state, RULES).regenerate


def test_cooldown_blocks_drift():
    state = profiled_state()
    for n in range(10, 16):
        post(state, n, 2.1 + n / 100, "error-correction")
    assert not significance.decide(state, RULES).regenerate


def test_new_content_triggers_without_drift():
    state = profiled_state()
    for n in range(10, 10 + RULES.new_content_events):
        post(state, n, 10 + n, "qiskit")
    decision = significance.decide(state, RULES)
    assert "new_content" in decision.reasons
    assert "interest_drift" not in decision.reasons


def test_stale_with_any_change_triggers():
    state = profiled_state()
    post(state, 10, 24 * 11, "qiskit")
    decision = significance.decide(state, RULES)
    assert decision.reasons == ("stale",)


def test_snapshot_versions_increase():
    state = profiled_state()
    assert state["profile"]["version"] == 1
    post(state, 10, 24 * 11, "qiskit")
    assert significance.take_snapshot(state) == 2
    assert state["profile"]["events_applied"] == state["events_applied"]


def test_drift_of_disjoint_vectors_is_one():
    assert significance.interest_drift({"a": 1.0}, {"b": 1.0}) == 1.0
    assert significance.interest_drift({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) < 1e-9
    assert significance.interest_drift({}, {}) == 0.0


def test_new_content_passes_cooldown():
    state = profiled_state()
    for n in range(10, 10 + RULES.new_content_events):
        post(state, n, 2.1 + n / 1000, "qiskit")
    assert significance.decide(state, RULES).reasons == ("new_content",)


def test_first_interests_pass_cooldown():
    state = user_state.new_state("u1")
    state["events_applied"] = RULES.min_events_new_user
    state["last_seen"] = (T0 + timedelta(days=90)).timestamp()
    significance.take_snapshot(state)
    for n in range(RULES.min_new_events):
        post(state, n, n, "qiskit")
    decision = significance.decide(state, RULES)
    assert decision.reasons == ("interest_drift",)


def test_hysteresis_keeps_armed_trigger():
    rules = significance.Thresholds(min_events_new_user=3, interest_drift=0.3, drift_hysteresis=0.1,
                                    min_new_events=2, new_content_events=1000, cooldown_s=3600)
    state = profiled_state()
    armed = significance.Decision(False, 0.32, (), drift_armed=True)
    significance.record_decision(state, armed)
    state["profile"]["interests"] = {"qiskit": 0.5, "other": 0.441}
    post(state, 10, 10, "qiskit")
    post(state, 11, 11, "qiskit")
    drift = significance.interest_drift(significance.interest_vector(state), state["profile"]["interests"])
    assert rules.interest_drift - rules.drift_hysteresis <= drift < rules.interest_drift
    assert significance.decide(state, rules).reasons == ("interest_drift",)
    significance.record_decision(state, significance.Decision(False, 0.0, (), drift_armed=False))
    assert not significance.decide(state, rules).regenerate


def test_activity_change_triggers():
    rules = significance.Thresholds(min_events_new_user=3, new_content_events=1000, cooldown_s=3600,
                                    activity_change_ratio=2.0, activity_min_posts=5)
    state = profiled_state()
    for n in range(10, 16):
        post(state, n, 3 + n / 10, "qiskit")
    assert significance.decide(state, rules).reasons == ("activity_change",)


def test_small_activity_change_ignored():
    rules = significance.Thresholds(min_events_new_user=3, new_content_events=1000, cooldown_s=3600,
                                    activity_min_posts=5)
    state = profiled_state()
    for n in range(10, 13):
        post(state, n, 3 + n / 10, "qiskit")
    assert not significance.decide(state, rules).regenerate


def test_audience_change_triggers():
    rules = significance.Thresholds(min_events_new_user=3, new_content_events=1000, cooldown_s=3600,
                                    audience_min_followers=10, audience_change_share=0.2)
    state = profiled_state()
    at = (T0 + timedelta(hours=5)).timestamp()
    for n in range(12):
        user_state.apply_audience(state, "followed", f"f{n}", at)
    assert significance.decide(state, rules).reasons == ("audience_change",)


lifetimes = st.lists(st.tuples(st.floats(0, 24 * 365), st.sampled_from(["qiskit", "grover", "qec", "tea"])),
                     min_size=1, max_size=40)
any_thresholds = st.builds(
    significance.Thresholds,
    min_events_new_user=st.integers(1, 5), interest_drift=st.floats(0.01, 1.0), min_new_events=st.integers(1, 5),
    new_content_events=st.integers(1, 20), cooldown_s=st.floats(0, 30 * 24 * 3600),
    stale_after_s=st.floats(1, 30 * 24 * 3600), activity_change_ratio=st.floats(1.0, 5.0),
    activity_min_posts=st.integers(0, 5), audience_change_share=st.floats(0, 1), audience_min_followers=st.integers(0, 5),
)


@settings(max_examples=200, deadline=None)
@given(lifetimes, any_thresholds, st.floats(0, 10 * 365 * 24 * 3600))
def test_idle_user_never_regenerates(events, rules, later_s):
    state = user_state.new_state("u1")
    # The worker's loop: decide after every applied event, snapshot when it regenerates.
    for n, (hours, tag) in enumerate(events):
        post(state, n, hours, tag)
        decision = significance.decide(state, rules)
        significance.record_decision(state, decision)
        if decision.regenerate:
            significance.take_snapshot(state)
    # Events after the last profile are new events. The ingest stage decides only after an
    # applied event, so it never decides again on them without one (tests/test_event_time.py).
    if state["profile"]["events_applied"] != state["events_applied"]:
        significance.take_snapshot(state)
    # Nothing new arrives, so no decision triggers, even with the user's clock moved years later.
    state["last_seen"] += later_s
    for _ in range(3):
        decision = significance.decide(state, rules)
        significance.record_decision(state, decision)
        assert not decision.regenerate
        assert decision.reasons == ()
