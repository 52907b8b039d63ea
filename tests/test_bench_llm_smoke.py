"""The in-process parts of bench.grounding_eval on the first 300 bundled events, without the stub."""

from __future__ import annotations

import math

import pytest

from bench import grounding_eval

EVENTS = 300
SHARES = ("grounded_share", "valid_citation_share", "two_or_more_events_share")


@pytest.fixture(scope="module")
def result() -> dict:
    events, produced = grounding_eval.load(limit=EVENTS)
    return grounding_eval.evaluate(events, produced, with_llm=False)


def _counts(result: dict) -> list[dict]:
    return [
        variant["rules"][scope]
        for variant in result["variants"].values()
        for scope in ("all_versions", "latest_per_user")
    ]


def test_replay_makes_requests(result):
    assert result["events"] == EVENTS
    assert result["requests"] > 0


def test_every_variant_evaluated(result):
    assert set(result["variants"]) == {grounding_eval.CURRENT, *grounding_eval.ADMISSION_RULES}


def test_shares_within_unit_interval(result):
    for counts in _counts(result):
        for share in SHARES:
            assert 0.0 <= counts[share] <= 1.0, (share, counts[share])


def test_counts_finite(result):
    for counts in _counts(result):
        assert counts["interests"] > 0
        assert math.isfinite(counts["interests_per_profile"])
        assert sum(counts["interests_by_cited_events"].values()) == counts["interests"]


def test_rules_cite_own_events(result):
    current = result["variants"][grounding_eval.CURRENT]["rules"]["all_versions"]
    assert current["valid_citation_share"] == 1.0


def test_admission_keeps_backed_interests(result):
    current = result["variants"][grounding_eval.CURRENT]["rules"]["all_versions"]
    two_events = result["variants"]["admit after 2 events"]["rules"]["all_versions"]
    # build_request admits a topic after 2 explicit or 3 implicit signals, each from its own
    # event, so every admitted topic also passes the looser two-event rule.
    assert current["interests"] <= two_events["interests"]
    assert current["two_or_more_events_share"] == 1.0


def test_grounding_needs_two_events():
    counts = grounding_eval.grounding(
        [{"user_id": "u1", "interests": [
            {"topic": "qubits", "evidence": ["e1", "e2"]},
            {"topic": "noise", "evidence": ["e1"]},
            {"topic": "gates", "evidence": ["e1", "someone-else"]},
        ]}],
        {"u1": {"e1", "e2"}},
    )
    assert counts.interests == 3
    assert counts.grounded == 1
    assert counts.valid_citations == 2
    assert counts.two_or_more_events == 2
