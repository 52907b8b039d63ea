"""The deterministic generator: valid profile.v1 documents in English and Chinese."""

from datetime import UTC, datetime, timedelta

import pytest

import schemas
from handlers import features, significance, state as user_state
from handlers.events import PostEvent
from handlers.generation import rules

T0 = datetime(2024, 6, 1, tzinfo=UTC)
NOW = datetime(2024, 7, 1, tzinfo=UTC)


def request_for(posts: int, replies: int = 0, tags=("qiskit", "grovers-algorithm")) -> dict:
    state = user_state.new_state("u1")
    for n in range(posts):
        event = PostEvent(f"e{n}", "u1", f"p{n}", T0 + timedelta(hours=n), "Grover on qiskit",
                          tags=tags, reply_to_post_id="p0" if n < replies else None)
        user_state.apply_post(state, event)
    version = significance.take_snapshot(state)
    return features.build_request(state, version, ("new_user",))


@pytest.mark.parametrize("language", ["en", "zh"])
def test_profile_matches_schema(language):
    profile = rules.build_profile(request_for(8), language=language, generated_at=NOW)
    errors = [error.message for error in schemas.validator("profile.v1").iter_errors(profile)]
    assert errors == []
    assert profile["language"] == language


def test_interests_carry_evidence_of_user():
    request = request_for(8)
    profile = rules.build_profile(request, language="en", generated_at=NOW)
    produced = {f"e{n}" for n in range(8)}
    assert [item["topic"] for item in profile["interests"][:2]] == ["grovers-algorithm", "qiskit"]
    for interest in profile["interests"]:
        assert interest["evidence"]
        assert set(interest["evidence"]) <= produced


def test_summary_english_names_top_interest():
    profile = rules.build_profile(request_for(8), language="en", generated_at=NOW)
    assert "grovers-algorithm" in profile["summary"]
    assert "8 posts" in profile["summary"]


def test_summary_chinese():
    profile = rules.build_profile(request_for(8), language="zh", generated_at=NOW)
    assert "共发帖8条" in profile["summary"]


def test_replier_trait_needs_evidence():
    profile = rules.build_profile(request_for(10, replies=10), language="en", generated_at=NOW)
    traits = {trait["trait"]: trait for trait in profile["traits"]}
    assert "mostly replies to others" in traits
    assert traits["mostly replies to others"]["evidence"]


def test_no_traits_for_light_user():
    profile = rules.build_profile(request_for(3), language="en", generated_at=NOW)
    assert profile["traits"] == []


def test_unsupported_language_rejected():
    with pytest.raises(ValueError, match="not supported"):
        rules.build_profile(request_for(3), language="fr", generated_at=NOW)


def test_single_event_topic_left_out():
    state = user_state.new_state("u1")
    for n in range(3):
        event = PostEvent(f"e{n}", "u1", f"p{n}", T0 + timedelta(hours=n), "", tags=("qiskit",) if n else ("once",))
        user_state.apply_post(state, event)
    request = features.build_request(state, significance.take_snapshot(state), ("new_user",))
    assert [interest["topic"] for interest in request["interests"]] == ["qiskit"]


def test_previous_topic_keeps_place_near_cutoff():
    state = user_state.new_state("u1")
    n = 0
    for rank in range(11):
        # Topic t0 is the heaviest; t10 is just below the cut-off of ten topics.
        repeats = 30 - rank if rank < 10 else 19
        for _ in range(repeats):
            user_state.apply_post(state, PostEvent(f"e{n}", "u1", f"p{n}", T0, "", tags=(f"t{rank}",)))
            n += 1
    version = significance.take_snapshot(state)
    without = [item["topic"] for item in features.build_request(state, version, ())["interests"]]
    kept = [item["topic"] for item in features.build_request(state, version, (), frozenset({"t10"}))["interests"]]
    assert "t10" not in without
    assert "t10" in kept
    assert "t9" not in kept
    assert len(kept) == features.PROFILE_TOPICS
