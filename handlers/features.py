"""The generation request: a self-contained view of one user's features.

The ingest stage builds it when a regeneration is triggered and hands it to the generation
stage, which needs nothing else: both generators build a profile from this dict alone.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .state import top_interests, window_counts

PROFILE_TOPICS = 10
ACTIVE_HOURS = 3
# A topic enters a profile only with at least this many distinct supporting events, so
# every interest a profile states is backed by more than one event of the user.
MIN_INTEREST_EVIDENCE = 2


def isoformat(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def build_request(state: dict, version: int, reasons: tuple[str, ...]) -> dict:
    """Build the generation request for `version` of the user's profile."""
    ranked = top_interests(state, len(state["interests"]))
    top = [entry for entry in ranked if len(set(entry[2])) >= MIN_INTEREST_EVIDENCE][:PROFILE_TOPICS]
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
        "languages": dict(state["languages"]),
        "recent_posts": [
            {"event_id": post["event_id"], "post_id": post["post_id"], "created_at": isoformat(post["at"]),
             "reply": post["reply"], "text": post["text"]}
            for post in state["recent_posts"]
        ],
        "watermark": {"event_time": isoformat(state["last_seen"]), "events_applied": state["events_applied"]},
    }
