"""Rolling per-user state, updated once per event and stored as a JSON-ready dict.

Every update is a pure function of (state, event): no clock, no I/O. The state is bounded:
windows keep `WINDOW_HOURS` hourly buckets, interests keep the top `MAX_TOPICS`, the
dedup set keeps `MAX_SEEN_EVENTS` ids, and recent posts keep `MAX_RECENT_POSTS`.

An interest entry is the list [weight, signals, evidence, short-scale weight, explicit
signals, implicit signals]. A signal is one event that carried the topic: explicit for a tag
or hashtag of the user's own post, implicit for a keyword of the post's text or a topic of a
post the user liked. States written before the last two counters existed have 4-item entries,
and `signal_counts` derives their counts from the evidence.

Ordering rules:
- interest weights decay exponentially in event time against a reference time that only
  moves forward, so applying the same events in any order gives the same weights (up to
  float rounding and top-K pruning);
- an event older than the window span (7 days before the user's latest event) still counts
  in totals and interests but no longer in the hourly windows;
- duplicate event ids change nothing. Once the dedup set is full, its oldest ids are evicted
  and an event older than the newest evicted id of the same source (own posts, likes or
  follows, engagement received, liked topics) cannot be checked, so it is dropped as
  `beyond_dedup_horizon`. Each source comes from one topic, so a catch-up that reads one topic
  far ahead of another drops events of the slower one only where that topic is out of time order;
- counts are signed sums (an unfollow subtracts one even when its follow has not arrived yet),
  so they commute; readers clamp them at zero.
A user_deleted event replaces the state with an erasure marker; handlers.erasure has the rules.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from .events import FollowEvent, LikeEvent, PostEvent
from .topics import TopicSignal, extract_topics

WINDOW_HOURS = 7 * 24
MAX_TOPICS = 64
MAX_EVIDENCE = 5
MAX_SEEN_EVENTS = 1024
SEEN_EVICTION_BATCH = 64
MAX_RECENT_POSTS = 10
MAX_LANGUAGES = 8
RECENT_TEXT_CHARS = 500
DEFAULT_HALF_LIFE_S = 30 * 24 * 3600.0
# Interests are kept at two time scales, each with a half-life setting. The long one
# (half_life_s) describes the user, the short one (short_half_life_s) what the user is into lately.
SHORT_HALF_LIFE_S = 7 * 24 * 3600.0
# A like is weaker evidence of interest than writing about the topic.
LIKED_TOPIC_FACTOR = 0.5

# Sources of dedup keys, each from one topic. Each source keeps its own eviction floor, so a topic
# read far ahead of another does not move the other's floor.
DEDUP_SOURCES = frozenset({"post", "like", "follow", "like_received", "followed", "liked_topics"})

# Column order of each hourly bucket.
COUNTERS = ("posts", "replies", "likes_given", "likes_received", "follows_gained", "follows_lost")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """Outcome of applying one event: `applied`, or the reason it changed nothing."""

    outcome: str

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"


APPLIED = ApplyResult("applied")
DUPLICATE = ApplyResult("duplicate")
TOO_OLD = ApplyResult("beyond_dedup_horizon")


def new_state(user_id: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "first_seen": None,
        "last_seen": None,
        "events_applied": 0,
        "totals": dict.fromkeys(COUNTERS, 0),
        "followers": 0,
        "following": 0,
        "hours": {},
        "active_hours": [0] * 24,
        "languages": {},
        "interest_ref": None,
        "interests": {},
        "recent_posts": [],
        "seen": {},
        "seen_floors": {},
        "profile": {"version": 0, "at": None, "events_applied": 0, "interests": {}, "topics": [], "totals": {}, "followers": 0},
    }


def apply_post(state: dict, event: PostEvent, *, half_life_s: float = DEFAULT_HALF_LIFE_S,
               short_half_life_s: float = SHORT_HALF_LIFE_S, signals: list[TopicSignal] | None = None) -> ApplyResult:
    """Apply a post; `signals` are its topics when the caller has extracted them already."""
    at = event.created_at.timestamp()
    result = _admit(state, f"post:{event.event_id}", at, legacy_id=event.event_id)
    if not result.applied:
        return result
    is_reply = event.reply_to_post_id is not None
    _count(state, at, "posts")
    if is_reply:
        _count(state, at, "replies")
    if signals is None:
        signals = extract_topics(event.text, event.hashtags, event.tags)
    for signal in signals:
        _add_interest(state, signal.topic, signal.weight, at, event.event_id, half_life_s,
                      short_half_life_s, explicit=signal.explicit)
    if event.lang:
        _add_language(state, event.lang.split("-")[0].lower())
    _remember_post(state, event, at)
    return result


def apply_like(state: dict, event: LikeEvent) -> ApplyResult:
    at = event.created_at.timestamp()
    result = _admit(state, f"like:{event.event_id}", at, legacy_id=event.event_id)
    if not result.applied:
        return result
    # The liked post's topics arrive later through the post index (apply_liked_topics).
    # An unlike counts as -1 like given.
    _count(state, at, "likes_given", -1 if event.action == "unlike" else 1)
    return result


def apply_follow(state: dict, event: FollowEvent) -> ApplyResult:
    at = event.created_at.timestamp()
    result = _admit(state, f"follow:{event.event_id}", at, legacy_id=event.event_id)
    if not result.applied:
        return result
    step = 1 if event.action == "follow" else -1
    state["following"] += step
    _touch(state, at)
    return result


def apply_audience(state: dict, kind: str, event_id: str, at: float, step: int = 1) -> ApplyResult:
    """Apply engagement another user caused: `like_received` or `followed` (step -1 undoes)."""
    result = _admit(state, f"{kind}:{event_id}", at)
    if not result.applied:
        return result
    if kind == "like_received":
        _count(state, at, "likes_received", step)
    elif kind == "followed":
        state["followers"] += step
        _count(state, at, "follows_gained" if step > 0 else "follows_lost")
    else:
        raise ValueError(f"unknown audience kind {kind!r}; expected 'like_received' or 'followed'")
    return result


def apply_liked_topics(state: dict, like_event_id: str, at: float, topics: list[tuple[str, float]],
                       *, half_life_s: float = DEFAULT_HALF_LIFE_S,
                       short_half_life_s: float = SHORT_HALF_LIFE_S) -> ApplyResult:
    """Feed the topics of a post the user liked into the user's interests.

    Each topic counts `LIKED_TOPIC_FACTOR` times its weight in the post, with the like as the
    evidence and as one implicit signal. An unlike removes no interest: the earlier like still
    showed the interest.
    """
    result = _admit(state, f"liked_topics:{like_event_id}", at)
    if not result.applied:
        return result
    for topic, weight in topics:
        _add_interest(state, topic, weight * LIKED_TOPIC_FACTOR, at, like_event_id, half_life_s,
                      short_half_life_s, explicit=False)
    return result


def window_counts(state: dict, hours: int) -> dict[str, int]:
    """Sum the hourly buckets of the last `hours` hours before the user's latest event."""
    if state["last_seen"] is None:
        return dict.fromkeys(COUNTERS, 0)
    newest = int(state["last_seen"] // 3600)
    sums = [0] * len(COUNTERS)
    for hour, bucket in state["hours"].items():
        if newest - int(hour) < hours:
            for index, value in enumerate(bucket):
                sums[index] += value
    return dict(zip(COUNTERS, sums))


def outside_window(state: dict, at: float) -> bool:
    """Return whether an event stamped `at` falls before the hourly windows of the user's latest event."""
    last_seen = state["last_seen"]
    return last_seen is not None and int(last_seen // 3600) - int(at // 3600) >= WINDOW_HOURS


def signal_counts(entry: list) -> tuple[int, int]:
    """Return the (explicit, implicit) signal counts of an interest entry.

    A 4-item entry from an older state has no counters, so each distinct evidence event
    counts as one implicit signal: a conservative reading, because an implicit signal admits
    a topic more slowly than an explicit one.
    """
    if len(entry) >= 6:
        return entry[4], entry[5]
    return 0, len({event_id for _, event_id in entry[2]})


def interest_weights(state: dict, at: float | None = None) -> dict[str, float]:
    """Return decayed interest weights as of `at` (default: the reference time)."""
    ref = state["interest_ref"]
    if ref is None:
        return {}
    factor = 1.0 if at is None else math.pow(2.0, -(at - ref) / state.get("half_life_s", DEFAULT_HALF_LIFE_S))
    return {topic: entry[0] * factor for topic, entry in state["interests"].items()}


def recent_interests(state: dict, limit: int) -> list[tuple[str, float]]:
    """Return up to `limit` (topic, short-scale weight), heaviest first."""
    entries = heapq.nsmallest(limit, state["interests"].items(), key=lambda item: (-item[1][3], item[0]))
    return [(topic, entry[3]) for topic, entry in entries]


def top_interests(state: dict, limit: int) -> list[tuple[str, float, list[str]]]:
    """Return up to `limit` (topic, weight, evidence ids newest first), heaviest first, ties by name."""
    entries = heapq.nsmallest(limit, state["interests"].items(), key=lambda item: (-item[1][0], item[0]))
    return [(topic, entry[0], [event_id for _, event_id in reversed(entry[2])]) for topic, entry in entries]


def _admit(state: dict, key: str, at: float, *, legacy_id: str | None = None) -> ApplyResult:
    """Record `key` (its source, a colon, the event id) in the dedup set, or return why it was not.

    `legacy_id` is the key of the same event in states written before keys named a source.
    """
    seen = state["seen"]
    if key in seen or (legacy_id is not None and legacy_id in seen):
        return DUPLICATE
    if at < _dedup_floor(state, key):
        return TOO_OLD
    seen[key] = at
    if len(seen) > MAX_SEEN_EVENTS + SEEN_EVICTION_BATCH:
        # Evicting in batches keeps the cost per event constant instead of a scan per event.
        ordered = sorted(seen.items(), key=lambda item: (item[1], item[0]))
        floors = state.setdefault("seen_floors", {})
        for evicted, evicted_at in ordered[: len(seen) - MAX_SEEN_EVENTS]:
            del seen[evicted]
            source = _source(evicted)
            floors[source] = max(evicted_at, floors.get(source, evicted_at))
    state["events_applied"] += 1
    return APPLIED


def _source(key: str) -> str:
    """Return the source part of a dedup key, or "" for a key from an older state."""
    source, _, _ = key.partition(":")
    return source if source in DEDUP_SOURCES else ""


def _dedup_floor(state: dict, key: str) -> float:
    """Return the event time below which `key` may have been evicted from the dedup set."""
    floors = state.get("seen_floors", {})
    candidates = [floors.get(_source(key)), floors.get(""), state.get("seen_floor")]
    return max((floor for floor in candidates if floor is not None), default=-math.inf)


def _touch(state: dict, at: float) -> None:
    if state["first_seen"] is None or at < state["first_seen"]:
        state["first_seen"] = at
    if state["last_seen"] is None or at > state["last_seen"]:
        state["last_seen"] = at
        _expire_hours(state)


def _count(state: dict, at: float, counter: str, step: int = 1) -> None:
    _touch(state, at)
    index = COUNTERS.index(counter)
    state["totals"][counter] += step
    hour = int(at // 3600)
    if not outside_window(state, at):
        bucket = state["hours"].setdefault(str(hour), [0] * len(COUNTERS))
        bucket[index] += step
    if counter in ("posts", "likes_given") and step > 0:
        state["active_hours"][hour % 24] += 1


def _expire_hours(state: dict) -> None:
    newest = int(state["last_seen"] // 3600)
    for hour in [hour for hour in state["hours"] if newest - int(hour) >= WINDOW_HOURS]:
        del state["hours"][hour]


def _add_interest(state: dict, topic: str, weight: float, at: float, event_id: str, half_life_s: float,
                  short_half_life_s: float, *, explicit: bool) -> None:
    interests = state["interests"]
    ref = state["interest_ref"]
    if ref is None:
        ref = state["interest_ref"] = at
    elif at > ref:
        decay = math.pow(2.0, -(at - ref) / half_life_s)
        short_decay = math.pow(2.0, -(at - ref) / short_half_life_s)
        for entry in interests.values():
            entry[0] *= decay
            entry[3] *= short_decay
        ref = state["interest_ref"] = at
    state["half_life_s"] = half_life_s
    entry = interests.setdefault(topic, [0.0, 0, [], 0.0, 0, 0])
    if len(entry) < 6:
        entry[4:] = signal_counts(entry)
    entry[0] += weight * math.pow(2.0, (at - ref) / half_life_s)
    entry[3] += weight * math.pow(2.0, (at - ref) / short_half_life_s)
    entry[1] += 1
    entry[4 if explicit else 5] += 1
    # Evidence keeps the latest events by event time, so arrival order does not matter.
    evidence = entry[2]
    evidence.append([at, event_id])
    evidence.sort()
    del evidence[:-MAX_EVIDENCE]
    if len(interests) > MAX_TOPICS + MAX_TOPICS // 4:
        keep = sorted(interests, key=lambda name: (-interests[name][0], name))[:MAX_TOPICS]
        state["interests"] = {name: interests[name] for name in keep}


def _add_language(state: dict, lang: str) -> None:
    languages = state["languages"]
    languages[lang] = languages.get(lang, 0) + 1
    if len(languages) > MAX_LANGUAGES:
        rarest = min(languages, key=lambda name: (languages[name], name))
        del languages[rarest]


def _remember_post(state: dict, event: PostEvent, at: float) -> None:
    recent = state["recent_posts"]
    recent.append({
        "event_id": event.event_id,
        "post_id": event.post_id,
        "at": at,
        "text": event.text[:RECENT_TEXT_CHARS],
        "reply": event.reply_to_post_id is not None,
    })
    recent.sort(key=lambda post: (post["at"], post["event_id"]))
    del recent[:-MAX_RECENT_POSTS]
