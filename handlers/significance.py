"""Significant change: decide whether a user's profile is worth regenerating.

`decide` is a pure function of the state (which contains the snapshot taken at the last
profile) and the thresholds. Time is the user's own event time, so replaying history gives
the same decisions as living through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .state import top_interests, window_counts

SNAPSHOT_TOPICS = 10


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Trigger settings; see the README's configuration table for the defaults' rationale."""

    # Defaults from the trigger-economy sweep in BENCHMARKS.md: about 41% fewer generations
    # than the earlier defaults at higher recall@5 on the Stack Exchange data.
    min_events_new_user: int = 10
    interest_drift: float = 0.2
    min_new_events: int = 3
    new_content_events: int = 50
    cooldown_s: float = 7 * 24 * 3600.0
    stale_after_s: float = 90 * 24 * 3600.0
    # Hysteresis: drift must reach interest_drift to arm the trigger, but once armed (held back
    # by the cooldown or too few events) it stays armed while drift stays above
    # interest_drift - drift_hysteresis, so noise around the threshold does not disarm it.
    drift_hysteresis: float = 0.05
    # Activity change: posts in the last 7 days grew or shrank by this ratio against the count
    # at the last profile, and by at least activity_min_posts posts.
    activity_change_ratio: float = 4.0
    activity_min_posts: int = 20
    # Audience change: followers moved by this share of the count at the last profile, and by
    # at least audience_min_followers.
    audience_change_share: float = 0.2
    audience_min_followers: int = 10


@dataclass(frozen=True, slots=True)
class Decision:
    regenerate: bool
    score: float
    reasons: tuple[str, ...]
    drift_armed: bool = False


NO_CHANGE = Decision(False, 0.0, ())


def interest_vector(state: dict) -> dict[str, float]:
    """Return the top interests as weights that sum to 1."""
    top = top_interests(state, SNAPSHOT_TOPICS)
    total = sum(weight for _, weight, _ in top)
    if total <= 0:
        return {}
    return {topic: weight / total for topic, weight, _ in top}


def interest_drift(current: dict[str, float], previous: dict[str, float]) -> float:
    """Return 1 - cosine similarity of two interest vectors (1.0 when one is empty)."""
    if not current or not previous:
        return 1.0 if current or previous else 0.0
    dot = sum(weight * previous.get(topic, 0.0) for topic, weight in current.items())
    norm = math.sqrt(sum(w * w for w in current.values())) * math.sqrt(sum(w * w for w in previous.values()))
    return max(0.0, 1.0 - dot / norm)


def decide(state: dict, thresholds: Thresholds) -> Decision:
    """Decide whether to regenerate the profile of the user whose state this is."""
    profile = state["profile"]
    new_events = state["events_applied"] - profile["events_applied"]
    if new_events <= 0:
        return NO_CHANGE
    if profile["version"] == 0:
        if state["events_applied"] >= thresholds.min_events_new_user:
            return Decision(True, 1.0, ("new_user",))
        return NO_CHANGE

    elapsed_s = (state["last_seen"] or 0.0) - (profile["at"] or 0.0)
    reasons = []
    # The cooldown bounds regenerations per user in event time. Two cases pass it: a volume
    # of new events that alone justifies a profile, and a first profile made before any
    # interest was known. The second matters when a user's likes are consumed before their
    # posts (topics are read at different speeds during catch-up), which leaves the user's
    # latest event time ahead of the posts still to come.
    if new_events >= thresholds.new_content_events:
        reasons.append("new_content")

    cooled = elapsed_s >= thresholds.cooldown_s or not profile["interests"]
    drift = 0.0
    armed = bool(profile.get("drift_armed"))
    # Drift is computed only once enough new events exist, since it can trigger nothing before.
    if new_events >= thresholds.min_new_events:
        drift = interest_drift(interest_vector(state), profile["interests"])
        entry = thresholds.interest_drift
        if armed:
            entry -= thresholds.drift_hysteresis
        armed = drift >= entry
        if cooled and armed:
            reasons.append("interest_drift")

    if cooled and _activity_changed(state, profile, thresholds):
        reasons.append("activity_change")
    if cooled and _audience_changed(state, profile, thresholds):
        reasons.append("audience_change")
    if elapsed_s >= thresholds.stale_after_s:
        reasons.append("stale")
    if not reasons:
        return Decision(False, drift, (), drift_armed=armed)
    return Decision(True, drift, tuple(reasons))


def _activity_changed(state: dict, profile: dict, thresholds: Thresholds) -> bool:
    then = profile.get("posts_7d", 0)
    now = window_counts(state, 7 * 24)["posts"]
    ratio = max(now, then) / max(min(now, then), 1)
    return abs(now - then) >= thresholds.activity_min_posts and ratio >= thresholds.activity_change_ratio


def _audience_changed(state: dict, profile: dict, thresholds: Thresholds) -> bool:
    then = profile.get("followers", 0)
    change = abs(state["followers"] - then)
    return change >= thresholds.audience_min_followers and change >= thresholds.audience_change_share * then


def record_decision(state: dict, decision: Decision) -> None:
    """Keep the hysteresis flag for the next decision."""
    state["profile"]["drift_armed"] = decision.drift_armed


def take_snapshot(state: dict) -> int:
    """Record the features the next profile reflects and return its version number.

    The version comes from the state alone, so a replay after a crash assigns the same
    version to the same change.
    """
    profile = state["profile"]
    profile["version"] += 1
    profile["at"] = state["last_seen"]
    profile["events_applied"] = state["events_applied"]
    profile["interests"] = interest_vector(state)
    profile["totals"] = dict(state["totals"])
    profile["followers"] = state["followers"]
    profile["posts_7d"] = window_counts(state, 7 * 24)["posts"]
    profile["drift_armed"] = False
    return profile["version"]
