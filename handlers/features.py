"""The generation request: a self-contained view of one user's features.

The ingest stage builds it when a regeneration is triggered and hands it to the generation
stage, which needs nothing else: both generators build a profile from this dict alone.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .state import recent_interests, signal_counts, top_interests, window_counts

PROFILE_TOPICS = 10
ACTIVE_HOURS = 3
# A topic enters a profile only with at least this many distinct supporting events, so
# every interest a profile states is backed by more than one event of the user.
MIN_INTEREST_EVIDENCE = 2
# Admission: a topic enters a profile after this many explicit signals (tags and hashtags of
# the user's posts) or this many implicit ones (keywords, topics of liked posts). The counts
# never go down while the topic keeps its entry in the state, so an admitted topic stays
# admitted. Mixed counts (1 explicit and 2 implicit) do not admit a topic.
ADMIT_EXPLICIT_SIGNALS = 2
ADMIT_IMPLICIT_SIGNALS = 3
# Drop threshold: a topic of the previous profile keeps its place while its weight stays
# above this share of the weight at the cut-off.
KEEP_TOPIC_FACTOR = 0.8
RECENT_TOPICS = 5


def isoformat(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def build_request(state: dict, version: int, reasons: tuple[str, ...], previous_topics: frozenset[str] = frozenset()) -> dict:
    """Build the generation request for `version` of the user's profile.

    Only admitted topics are listed (see `is_admitted`). `previous_topics` are the topics of
    the user's last profile (`profiled_topics`). One of them keeps its place while its weight
    stays above KEEP_TOPIC_FACTOR times the weight at the cut-off, so a topic near the cut-off
    does not drop out of one version and back into the next.
    """
    top = _profile_topics(state, previous_topics)
    heaviest = top[0][1] if top else 1.0
    totals = state["totals"]
    hours = state["active_hours"]
    busiest = sorted((hour for hour in range(24) if hours[hour] > 0), key=lambda hour: (-hours[hour], hour))
    return {
        "user_id": state["user_id"],
        "version": version,
        "reasons": list(reasons),
        "interests": [
            {"topic": topic, "weight": round(weight / heaviest, 4), "evidence": evidence}
            for topic, weight, evidence in top
        ],
        "activity": {
            "posts_total": max(0, totals["posts"]),
            "replies_total": max(0, totals["replies"]),
            "likes_given_total": max(0, totals["likes_given"]),
            "likes_received_total": max(0, totals["likes_received"]),
            "posts_7d": max(0, window_counts(state, 7 * 24)["posts"]),
            "first_seen": isoformat(state["first_seen"]),
            "last_seen": isoformat(state["last_seen"]),
            "active_hours_utc": busiest[:ACTIVE_HOURS],
        },
        "social": {"followers": max(0, state["followers"]), "following": max(0, state["following"])},
        "recent_interests": [{"topic": topic, "weight": round(weight, 4)} for topic, weight in recent_interests(state, RECENT_TOPICS)],
        "languages": dict(state["languages"]),
        "recent_posts": [
            {"event_id": post["event_id"], "post_id": post["post_id"], "created_at": isoformat(post["at"]),
             "reply": post["reply"], "text": post["text"]}
            for post in state["recent_posts"]
        ],
        "watermark": {"event_time": isoformat(state["last_seen"]), "events_applied": state["events_applied"]},
    }


def is_admitted(entry: list) -> bool:
    """Return whether an interest entry of the state has enough signals to enter a profile."""
    explicit, implicit = signal_counts(entry)
    return explicit >= ADMIT_EXPLICIT_SIGNALS or implicit >= ADMIT_IMPLICIT_SIGNALS


def profiled_topics(state: dict) -> frozenset[str]:
    """Return the topics of the user's last profile request.

    States written before the profile snapshot stored its topics fall back to the snapshot's
    interest vector (the ten heaviest topics then, admitted or not).
    """
    profile = state["profile"]
    topics = profile.get("topics")
    return frozenset(profile["interests"] if topics is None else topics)


def remember_topics(state: dict, request: dict) -> None:
    """Store the topics of `request` in the profile snapshot, for the next request's drop threshold."""
    state["profile"]["topics"] = [interest["topic"] for interest in request["interests"]]


def _profile_topics(state: dict, previous_topics: frozenset[str]) -> list[tuple[str, float, list[str]]]:
    ranked = top_interests(state, len(state["interests"]))
    interests = state["interests"]
    candidates = [entry for entry in ranked
                  if is_admitted(interests[entry[0]]) and len(set(entry[2])) >= MIN_INTEREST_EVIDENCE]
    if len(candidates) <= PROFILE_TOPICS or not previous_topics:
        return candidates[:PROFILE_TOPICS]
    cutoff = candidates[PROFILE_TOPICS - 1][1]
    kept = [entry for entry in candidates[PROFILE_TOPICS:] if entry[0] in previous_topics and entry[1] >= KEEP_TOPIC_FACTOR * cutoff]
    chosen = candidates[:PROFILE_TOPICS]
    # A kept topic replaces the lightest newcomer, never another kept or previous topic.
    for entry in kept:
        newcomers = [index for index, item in enumerate(chosen) if item[0] not in previous_topics]
        if not newcomers:
            break
        chosen[newcomers[-1]] = entry
    return sorted(chosen, key=lambda entry: (-entry[1], entry[0]))
