"""The deterministic generator: a profile.v1 document from the features alone.

It is the default when no model endpoint is configured and the fallback whenever the model
fails, so its output has exactly the shape the LLM's output has.
"""

from __future__ import annotations

from datetime import datetime

GENERATOR_NAME = "rules"
SUPPORTED_LANGUAGES = ("en", "zh")
FULL_CONFIDENCE_EVENTS = 50
REPLIER_MIN_REPLIES = 5
REPLIER_MIN_SHARE = 0.6
PROLIFIC_MIN_POSTS = 50


def build_profile(request: dict, *, language: str, generated_at: datetime, fallback_reason: str | None = None) -> dict:
    """Build the profile for `request` (see handlers.features.build_request)."""
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"profile language {language!r} is not supported by the rules generator; use one of {SUPPORTED_LANGUAGES}")
    activity = request["activity"]
    events = request["watermark"]["events_applied"]
    return {
        "schema": "profile.v1",
        "user_id": request["user_id"],
        "version": request["version"],
        "generated_at": generated_at.isoformat().replace("+00:00", "Z"),
        "generator": GENERATOR_NAME,
        "fallback_reason": fallback_reason,
        "trigger_reasons": list(request["reasons"]),
        "interests": [dict(interest, evidence=interest["evidence"][:10]) for interest in request["interests"]],
        "activity": dict(activity),
        "social": dict(request["social"]),
        "traits": infer_traits(request),
        "summary": summarize(request, language),
        "language": language,
        "confidence": round(min(1.0, events / FULL_CONFIDENCE_EVENTS), 3),
        "watermark": dict(request["watermark"]),
    }


def infer_traits(request: dict) -> list[dict]:
    """Return behavioural traits that the counts and the recent posts both support."""
    activity = request["activity"]
    posts = activity["posts_total"]
    replies = activity["replies_total"]
    recent = request["recent_posts"]
    traits = []
    reply_ids = [post["event_id"] for post in recent if post["reply"]]
    if replies >= REPLIER_MIN_REPLIES and replies / max(posts, 1) >= REPLIER_MIN_SHARE and reply_ids:
        traits.append({"trait": "mostly replies to others", "confidence": round(replies / posts, 3), "evidence": reply_ids[-5:]})
    if posts >= PROLIFIC_MIN_POSTS and recent:
        traits.append({"trait": "prolific poster", "confidence": round(min(1.0, posts / (2 * PROLIFIC_MIN_POSTS)), 3),
                       "evidence": [post["event_id"] for post in recent[-5:]]})
    return traits


def summarize(request: dict, language: str) -> str:
    topics = [interest["topic"] for interest in request["interests"][:3]]
    activity = request["activity"]
    social = request["social"]
    hours = activity["active_hours_utc"]
    if language == "zh":
        return _summary_zh(topics, activity, social, hours)
    return _summary_en(topics, activity, social, hours)


def _summary_en(topics: list[str], activity: dict, social: dict, hours: list[int]) -> str:
    parts = []
    if topics:
        parts.append(f"Interested mainly in {_join_en(topics)}.")
    parts.append(
        f"{activity['posts_total']} posts ({activity['replies_total']} replies), "
        f"{activity['likes_given_total']} likes given and {activity['likes_received_total']} received; "
        f"{social['followers']} followers, following {social['following']}."
    )
    if hours:
        parts.append(f"Most active around {hours[0]:02d}:00 UTC.")
    return " ".join(parts)


def _summary_zh(topics: list[str], activity: dict, social: dict, hours: list[int]) -> str:
    parts = []
    if topics:
        parts.append(f"主要关注{'、'.join(topics)}。")
    parts.append(
        f"共发帖{activity['posts_total']}条（其中回复{activity['replies_total']}条），"
        f"点赞{activity['likes_given_total']}次，获赞{activity['likes_received_total']}次；"
        f"粉丝{social['followers']}人，关注{social['following']}人。"
    )
    if hours:
        parts.append(f"最活跃时段约为UTC {hours[0]}点。")
    return "".join(parts)


def _join_en(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]
