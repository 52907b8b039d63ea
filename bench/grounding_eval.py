"""Benchmark: the share of profile interests grounded in the user's own events, for both generators.

Applies the bundled Stack Exchange events in time order in this process, the way the worker
does: `handlers.state` for the acting user, like_received and followed for the other user, and
the post-index join, which adds a liked post's topics to the liker's interests with the like as
the evidence once the post is known. After every change `handlers.significance` decides whether
the user gets a new profile version, and `handlers.features.build_request` builds its request.
Every request becomes one profile from `handlers.generation.rules.build_profile` and one from
`LLMGenerator` against the stub of `tests.llm_stub` in `ok` mode.

An interest is grounded when it cites at least two distinct events and every id it cites is an
event the user produced (a post, like or follow with the user as actor), read from the input
file itself. The goal is a grounded share of at least 90 %.

The stub does not write like a model: it copies the first five request interests with their
first three evidence ids. The LLM number therefore measures what the grounding validator lets
through and what evidence the requests carry, not what a real model would cite.

The admission variants filter each request's interests before both generators, to show what
a rule that admits a topic into a profile only after enough signals would change. A signal is
one event of the user, before the request, that carried the topic. It is explicit when the
topic was a tag or hashtag of the user's post, and implicit when it was a keyword of the post's
text or a topic of a post the user liked. "2 events" admits a topic once its entry in the
user's state cites two events, "2 explicit or 3 implicit" after two explicit or three
implicit signals.

    python -m bench.grounding_eval [--limit N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from handlers import features, significance, state as user_state
from handlers.errors import GenerationError
from handlers.events import Event, FollowEvent, LikeEvent, PostEvent, decode_event
from handlers.generation import rules
from handlers.generation.llm import LLMGenerator
from handlers.generation.telemetry import LLMTelemetry
from handlers.significance import Thresholds
from handlers.topics import EXPLICIT_WEIGHT, extract_topics
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl

GOAL_SHARE = 0.9
MIN_EVIDENCE_EVENTS = 2
ACTOR_FIELD = {"post.v1": "user_id", "like.v1": "user_id", "follow.v1": "follower_id"}
LANGUAGE = "en"
MODEL = "stub-model"
API_KEY = "sk-bench-stub"
LLM_CONCURRENCY = 8
# A fixed generation time, so that rules profiles do not depend on the clock.
GENERATED_AT = datetime(2024, 1, 1, tzinfo=UTC)


# Input


def load(path: Path | None = None, limit: int | None = None) -> tuple[list[Event], dict[str, set[str]]]:
    """Decode the first `limit` lines (default all) of an event file, the bundled data by default.

    Returns the events and, per user, the ids of the events the user produced, read from each
    line's actor field rather than from the decoded event. Raises InvalidRecord for a line the
    worker would dead-letter, because the bundled file has none.
    """
    now = datetime.now(UTC)
    events: list[Event] = []
    produced: dict[str, set[str]] = defaultdict(set)
    for _, line in read_jsonl(path or bundled_data_path()):
        if limit is not None and len(events) >= limit:
            break
        document = orjson.loads(line)
        produced[document[ACTOR_FIELD[document["schema"]]]].add(document["event_id"])
        events.append(decode_event(document["schema"].split(".")[0], line, now=now))
    return events, dict(produced)


# Admission rules


# Called with the topic's signal counts and its evidence ids in the user's state.
AdmissionRule = Callable[[Counter, list[str]], bool]


def admit_two_events(counts: Counter, evidence: list[str]) -> bool:
    # The state keeps up to MAX_EVIDENCE distinct event ids per topic, so two ids mean two events.
    return len(evidence) >= 2


def admit_two_explicit_or_three_implicit(counts: Counter, evidence: list[str]) -> bool:
    return counts["explicit"] >= 2 or counts["implicit"] >= 3


CURRENT = "current (build_request: 2 explicit or 3 implicit signals)"
ADMISSION_RULES: dict[str, AdmissionRule] = {
    "admit after 2 events": admit_two_events,
    "admit after 2 explicit or 3 implicit": admit_two_explicit_or_three_implicit,
}


def admitted_interests(state: dict, counts: dict[str, Counter], rule: AdmissionRule) -> list[dict]:
    """Return the request interests `features.build_request` would give if it skipped topics `rule` rejects.

    The heaviest admitted topics fill the PROFILE_TOPICS places, and weights are scaled to
    the heaviest admitted one, as build_request scales them to the heaviest topic.
    """
    ranked = user_state.top_interests(state, len(state["interests"]))
    top = [item for item in ranked if rule(counts[item[0]], item[2])][:features.PROFILE_TOPICS]
    heaviest = top[0][1] if top else 1.0
    return [{"topic": topic, "weight": round(weight / heaviest, 4), "evidence": evidence} for topic, weight, evidence in top]


# Replay


@dataclass
class Replay:
    """Per-user states, the post-index join and the generation requests, in the order the worker would make them.

    `signals` counts, per user and topic, the events that carried the topic ("explicit" and
    "implicit", see the module docstring). `admitted[i]` maps each admission rule's name to
    the interests that `requests[i]` would have under that rule.
    """

    thresholds: Thresholds = field(default_factory=Thresholds)
    states: dict[str, dict] = field(default_factory=dict)
    post_topics: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    pending_likes: dict[str, list[tuple[str, str, float]]] = field(default_factory=lambda: defaultdict(list))
    signals: dict[str, dict[str, Counter]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Counter)))
    requests: list[dict] = field(default_factory=list)
    admitted: list[dict[str, list[dict]]] = field(default_factory=list)

    def apply(self, event: Event) -> None:
        state = self._state(event.user_id)
        if isinstance(event, PostEvent):
            self._apply_post(state, event)
        elif isinstance(event, LikeEvent):
            self._apply_like(state, event)
        else:
            self._apply_follow(state, event)

    def requests_under(self, variant: str) -> list[dict]:
        """Return the requests with the interests of admission rule `variant`, or as made for CURRENT."""
        if variant == CURRENT:
            return self.requests
        return [dict(request, interests=interests[variant]) for request, interests in zip(self.requests, self.admitted)]

    def _state(self, user_id: str) -> dict:
        state = self.states.get(user_id)
        if state is None:
            state = self.states[user_id] = user_state.new_state(user_id)
        return state

    def _decide(self, state: dict) -> None:
        decision = significance.decide(state, self.thresholds)
        significance.record_decision(state, decision)
        if not decision.regenerate:
            return
        version = significance.take_snapshot(state)
        counts = self.signals[state["user_id"]]
        self.requests.append(features.build_request(state, version, decision.reasons))
        self.admitted.append({name: admitted_interests(state, counts, rule) for name, rule in ADMISSION_RULES.items()})

    def _apply_post(self, state: dict, event: PostEvent) -> None:
        found = extract_topics(event.text, event.hashtags, event.tags)
        if not user_state.apply_post(state, event, signals=found).applied:
            return
        for signal in found:
            self.signals[event.user_id][signal.topic]["explicit" if signal.weight == EXPLICIT_WEIGHT else "implicit"] += 1
        self._decide(state)
        self.post_topics[event.post_id] = [(signal.topic, signal.weight) for signal in found]
        for liker, like_event_id, at in self.pending_likes.pop(event.post_id, []):
            self._join(liker, like_event_id, at, self.post_topics[event.post_id])

    def _apply_like(self, state: dict, event: LikeEvent) -> None:
        if not user_state.apply_like(state, event).applied:
            return
        self._decide(state)
        at = event.created_at.timestamp()
        if event.post_author_id != event.user_id:
            self._audience(event.post_author_id, "like_received", event.event_id, at, -1 if event.action == "unlike" else 1)
        if event.action != "like":
            return
        topics = self.post_topics.get(event.post_id)
        if topics is None:
            self.pending_likes[event.post_id].append((event.user_id, event.event_id, at))
        else:
            self._join(event.user_id, event.event_id, at, topics)

    def _apply_follow(self, state: dict, event: FollowEvent) -> None:
        if not user_state.apply_follow(state, event).applied:
            return
        self._decide(state)
        if event.followee_id != event.follower_id:
            step = -1 if event.action == "unfollow" else 1
            self._audience(event.followee_id, "followed", event.event_id, event.created_at.timestamp(), step)

    def _audience(self, user_id: str, kind: str, event_id: str, at: float, step: int) -> None:
        state = self._state(user_id)
        if user_state.apply_audience(state, kind, event_id, at, step).applied:
            self._decide(state)

    def _join(self, user_id: str, like_event_id: str, at: float, topics: list[tuple[str, float]]) -> None:
        # The post index sends nothing for a post without topics.
        if not topics:
            return
        state = self._state(user_id)
        if not user_state.apply_liked_topics(state, like_event_id, at, topics).applied:
            return
        for topic, _ in topics:
            self.signals[user_id][topic]["implicit"] += 1
        self._decide(state)


def replay(events: Iterable[Event], thresholds: Thresholds | None = None) -> Replay:
    """Apply `events` in order and return the replay with its generation requests."""
    result = Replay(thresholds or Thresholds())
    for event in events:
        result.apply(event)
    return result


# Grounding


@dataclass
class Grounding:
    """Interest counts of a set of profiles. `evidence_sizes` counts interests by distinct cited ids."""

    profiles: int = 0
    profiles_without_interests: int = 0
    interests: int = 0
    grounded: int = 0
    valid_citations: int = 0
    two_or_more_events: int = 0
    evidence_sizes: Counter = field(default_factory=Counter)

    def add(self, profile: dict, produced: set[str]) -> None:
        self.profiles += 1
        self.profiles_without_interests += not profile["interests"]
        for interest in profile["interests"]:
            cited = set(interest["evidence"])
            valid = cited <= produced
            backed = len(cited) >= MIN_EVIDENCE_EVENTS
            self.interests += 1
            self.valid_citations += valid
            self.two_or_more_events += backed
            self.grounded += valid and backed
            self.evidence_sizes[min(len(cited), 5)] += 1

    def share(self, count: int) -> float:
        """Return `count` as a share of the interests; NaN when there are none."""
        return count / self.interests if self.interests else math.nan

    def as_dict(self) -> dict:
        return {
            "profiles": self.profiles,
            "profiles_without_interests": self.profiles_without_interests,
            "interests": self.interests,
            "grounded_share": self.share(self.grounded),
            "valid_citation_share": self.share(self.valid_citations),
            "two_or_more_events_share": self.share(self.two_or_more_events),
            "interests_per_profile": self.interests / self.profiles if self.profiles else math.nan,
            "interests_by_cited_events": {str(size) if size < 5 else "5+": count
                                          for size, count in sorted(self.evidence_sizes.items())},
        }


def grounding(profiles: Iterable[dict], produced: dict[str, set[str]]) -> Grounding:
    """Count the grounded interests of `profiles` against the event ids each user produced."""
    counts = Grounding()
    for profile in profiles:
        counts.add(profile, produced.get(profile["user_id"], set()))
    return counts


def latest_per_user(profiles: list[dict]) -> list[dict]:
    """Return the highest version of each user's profiles."""
    latest: dict[str, dict] = {}
    for profile in profiles:
        if profile["user_id"] not in latest or profile["version"] > latest[profile["user_id"]]["version"]:
            latest[profile["user_id"]] = profile
    return list(latest.values())


def rules_profiles(requests: list[dict]) -> list[dict]:
    return [rules.build_profile(request, language=LANGUAGE, generated_at=GENERATED_AT) for request in requests]


def evaluate_rules(requests: list[dict], produced: dict[str, set[str]]) -> dict:
    """Return the grounding of the rules generator over all versions and over each user's latest one."""
    profiles = rules_profiles(requests)
    return {
        "all_versions": grounding(profiles, produced).as_dict(),
        "latest_per_user": grounding(latest_per_user(profiles), produced).as_dict(),
    }


# LLM path


async def llm_profiles(requests: list[dict], base_url: str) -> tuple[list[dict], Counter]:
    """Generate a profile per request with LLMGenerator at `base_url`; return the profiles and outcomes.

    A request whose reply fails validation yields no profile and counts under its
    GenerationError outcome.
    """
    generator = LLMGenerator(base_url=base_url, api_key=API_KEY, model=MODEL, language=LANGUAGE,
                             telemetry=LLMTelemetry(CollectorRegistry()))
    slots = asyncio.Semaphore(LLM_CONCURRENCY)
    outcomes: Counter = Counter()

    async def generate(request: dict) -> dict | None:
        async with slots:
            try:
                profile = await generator.generate(request, generated_at=GENERATED_AT)
            except GenerationError as error:
                outcomes[error.outcome] += 1
                return None
        outcomes["ok"] += 1
        return profile

    try:
        results = await asyncio.gather(*(generate(request) for request in requests))
    finally:
        await generator.close()
    return [profile for profile in results if profile is not None], outcomes


async def evaluate_llm(requests: list[dict], produced: dict[str, set[str]]) -> dict:
    """Serve the stub in `ok` mode and return the grounding of the LLM generator's profiles."""
    # Imported here because tests.llm_stub needs pytest and aiohttp, which only this path uses.
    from tests.llm_stub import LLMStub

    stub = LLMStub()
    await stub.start()
    try:
        profiles, outcomes = await llm_profiles(requests, stub.base_url)
    finally:
        await stub.close()
    return {
        "outcomes": dict(sorted(outcomes.items())),
        "all_versions": grounding(profiles, produced).as_dict(),
        "latest_per_user": grounding(latest_per_user(profiles), produced).as_dict(),
    }


# Report


def evaluate(events: list[Event], produced: dict[str, set[str]], *, with_llm: bool = True) -> dict:
    """Replay `events` and return the grounding of each generator under each admission variant."""
    replayed = replay(events)
    variants = {}
    for name in (CURRENT, *ADMISSION_RULES):
        requests = replayed.requests_under(name)
        variants[name] = {"rules": evaluate_rules(requests, produced)}
        if with_llm:
            variants[name]["llm"] = asyncio.run(evaluate_llm(requests, produced))
    return {
        "events": len(events),
        "users": len(replayed.states),
        "requests": len(replayed.requests),
        "goal_share": GOAL_SHARE,
        "variants": variants,
    }


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:5.1f} %"


def format_report(result: dict) -> str:
    lines = [
        f"{result['events']} events, {result['users']} users, {result['requests']} profile requests"
        f" (default thresholds); goal: >= {100 * result['goal_share']:.0f} % of interests grounded",
        "grounded: cites >= 2 distinct events and every cited id is an event the user produced",
    ]
    if any("llm" in variant for variant in result["variants"].values()):
        lines.append(
            "NOTE: the LLM rows use the stub, which copies the request's first 5 interests and their first 3"
            " evidence ids, so they measure the validator and the requests' evidence, not a real model"
        )
    lines += [
        "",
        f"{'variant':<36} {'generator':<9} {'profiles':>8} {'interests':>9} {'per prof':>8} {'grounded':>8}"
        f" {'latest':>8} {'valid ids':>9} {'>=2 ev':>8} {'empty':>5} {'goal':>4}  interests by cited events",
    ]
    for name, variant in result["variants"].items():
        for generator in ("rules", "llm"):
            if generator not in variant:
                continue
            counts = variant[generator]["all_versions"]
            latest = variant[generator]["latest_per_user"]
            met = counts["grounded_share"] >= result["goal_share"]
            sizes = ", ".join(f"{size}:{count}" for size, count in counts["interests_by_cited_events"].items())
            lines.append(
                f"{name:<36} {generator:<9} {counts['profiles']:>8} {counts['interests']:>9}"
                f" {counts['interests_per_profile']:>8.2f} {_percent(counts['grounded_share']):>8}"
                f" {_percent(latest['grounded_share']):>8} {_percent(counts['valid_citation_share']):>9}"
                f" {_percent(counts['two_or_more_events_share']):>8} {counts['profiles_without_interests']:>5}"
                f" {'yes' if met else 'no':>4}  {sizes}"
            )
        if "llm" in variant:
            outcomes = ", ".join(f"{outcome}={count}" for outcome, count in variant["llm"]["outcomes"].items())
            lines.append(f"{'':<36} llm call outcomes: {outcomes}")
    lines.append("latest: grounded share over each user's latest profile; empty: profiles without any interest")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grounding_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use only the first N events of the bundled data (default: all)")
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM generator and the stub")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit} must be at least 1")
    events, produced = load(limit=args.limit)
    result = evaluate(events, produced, with_llm=not args.no_llm)
    print(format_report(result))
    if args.json:
        result["python"] = sys.version.split()[0]
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
