"""Benchmark: bytes of per-user state and the cost of applying one event, without Kafka.

Part one applies the bundled Stack Exchange events in time order to `handlers.state`, the way
the worker's stages do: a like also adds `like_received` to the liked post's author, and the
liked post's topics to the liker (the post-index join). It reports the orjson-serialized size
of every user's final state. Part two feeds one synthetic heavy user
100,000 events spread over a year and reports the state size after 1k, 10k and 100k events,
which the module's limits (`MAX_TOPICS`, `MAX_SEEN_EVENTS`, ...) must keep flat.

Apply times are reported next to one orjson loads+dumps of a state dict, because the Faust
table serializes a changed user's whole state with orjson (once per user and batch). All times
are CPU time of this process (`time.process_time`), so other busy processes on the machine
inflate them less than wall-clock time.

    python -m bench.state_size [--heavy-events N] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from handlers import state as user_state
from handlers.events import Event, FollowEvent, LikeEvent, PostEvent, decode_event
from handlers.topics import extract_topics
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl
from stream.post_index import MAX_PENDING_LIKES

HEAVY_EVENTS = 100_000
HEAVY_CHECKPOINTS = (1_000, 10_000, 100_000)
HEAVY_TOPICS = 1_000
HEAVY_SPAN_DAYS = 365
HEAVY_USER = "heavy:1"
BUNDLED_PASSES = 5
SEED = 20180312

# Words for the heavy user's post text, so keyword extraction does real work.
_WORDS = (
    "qubit entanglement circuit gate hamiltonian measurement noise decoherence superposition "
    "algorithm simulator compiler error correction surface code topology photon trapped ion "
    "annealing variational eigensolver amplitude phase estimation oracle fourier transform "
    "tomography fidelity benchmark transpiler pulse calibration readout register ancilla"
).split()


def load_events(path: Path | None = None, limit: int | None = None) -> list[Event]:
    """Decode the first `limit` events (default all) of a JSON-lines file, the bundled data by default.

    Raises InvalidRecord for a line the worker would dead-letter, because the bundled file has none.
    """
    now = datetime.now(UTC)
    events = []
    for _, line in read_jsonl(path or bundled_data_path()):
        if limit is not None and len(events) >= limit:
            break
        kind = orjson.loads(line)["schema"].split(".")[0]
        events.append(decode_event(kind, line, now=now))
    return events


@dataclass
class PostIndex:
    """Topics of the posts seen so far and likes that wait for their post, as `stream.post_index` keeps them."""

    topics: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    pending: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)


def apply_event(states: dict[str, dict], index: PostIndex, event: Event) -> Iterator[str]:
    """Apply one event to every state it changes, in the order the worker's stages do.

    The worker applies the event to the actor, then a like or follow to the audience user,
    then (for a like, after the post-index join) the liked post's topics to the liker. This
    generator yields each changed user id right after that user's update, so a caller can run
    the significance decision exactly where the worker does. States are created on first use.
    """
    actor = _state(states, event.user_id)
    signals = extract_topics(event.text, event.hashtags, event.tags) if isinstance(event, PostEvent) else None
    if isinstance(event, PostEvent):
        result = user_state.apply_post(actor, event, signals=signals)
    elif isinstance(event, LikeEvent):
        result = user_state.apply_like(actor, event)
    else:
        result = user_state.apply_follow(actor, event)
    if not result.applied:
        return
    yield event.user_id
    audience = _audience_of(event)
    if audience is not None:
        target, kind, step = audience
        if user_state.apply_audience(_state(states, target), kind, event.event_id, event.created_at.timestamp(), step).applied:
            yield target
    if isinstance(event, PostEvent):
        topics = [(signal.topic, signal.weight) for signal in signals]
        index.topics[event.post_id] = topics
        for user_id, like_id, at in index.pending.pop(event.post_id, []):
            if topics and user_state.apply_liked_topics(_state(states, user_id), like_id, at, topics).applied:
                yield user_id
    elif isinstance(event, LikeEvent) and event.action == "like":
        at = event.created_at.timestamp()
        topics = index.topics.get(event.post_id)
        if topics is None:
            waiting = index.pending.setdefault(event.post_id, [])
            waiting.append((event.user_id, event.event_id, at))
            del waiting[:-MAX_PENDING_LIKES]
        elif topics and user_state.apply_liked_topics(actor, event.event_id, at, topics).applied:
            yield event.user_id


def _state(states: dict[str, dict], user_id: str) -> dict:
    state = states.get(user_id)
    if state is None:
        state = states[user_id] = user_state.new_state(user_id)
    return state


def _audience_of(event: Event) -> tuple[str, str, int] | None:
    if isinstance(event, LikeEvent) and event.post_author_id != event.user_id:
        return event.post_author_id, "like_received", -1 if event.action == "unlike" else 1
    if isinstance(event, FollowEvent) and event.followee_id != event.follower_id:
        return event.followee_id, "followed", -1 if event.action == "unfollow" else 1
    return None


def state_bytes(state: dict) -> int:
    return len(orjson.dumps(state))


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile (`share` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


def round_trip_us(state: dict, repeats: int = 7, min_seconds: float = 0.03) -> float:
    """Return the time of orjson.loads(orjson.dumps(state)) in µs, the Faust table round trip.

    Each of `repeats` blocks loops for at least `min_seconds`. The result is the median block
    mean, because other processes on the machine disturb it less than one long block.
    """
    block_means = []
    for _ in range(repeats):
        loops = 0
        started = time.process_time()
        elapsed = 0.0
        while elapsed < min_seconds:
            for _ in range(20):
                orjson.loads(orjson.dumps(state))
            loops += 20
            elapsed = time.process_time() - started
        block_means.append(elapsed / loops * 1e6)
    return statistics.median(block_means)


def measure_bundled(events: list[Event], passes: int = BUNDLED_PASSES) -> dict:
    """Apply `events` `passes` times to fresh states; report state sizes and apply time per event.

    The apply time is the median over passes of the mean per input event, including the
    audience update a like causes.
    """
    pass_us = []
    states: dict[str, dict] = {}
    for _ in range(passes):
        states = {}
        index = PostIndex()
        started = time.process_time_ns()
        for event in events:
            for _ in apply_event(states, index, event):
                pass
        pass_us.append((time.process_time_ns() - started) / 1000 / len(events))
    sizes = {user: state_bytes(state) for user, state in states.items()}
    median_user = sorted(sizes, key=lambda user: (sizes[user], user))[len(sizes) // 2]
    largest_user = max(sizes, key=lambda user: (sizes[user], user))
    apply_us = statistics.median(pass_us)
    median_round_trip = round_trip_us(states[median_user])
    largest_round_trip = round_trip_us(states[largest_user])
    return {
        "events": len(events),
        "users": len(states),
        "state_bytes": summarize(list(sizes.values())),
        "apply_us_mean": apply_us,
        "round_trip_us_p50_state": median_round_trip,
        "round_trip_us_max_state": largest_round_trip,
        "apply_to_round_trip_p50": apply_us / median_round_trip,
    }


HeavyStep = Event | tuple[str, str, float, object]


def heavy_user_events(count: int, *, seed: int = SEED, topics: int = HEAVY_TOPICS,
                      span_days: int = HEAVY_SPAN_DAYS) -> Iterator[list[HeavyStep]]:
    """Yield `count` events of one user in time order, spread evenly at random over `span_days`.

    Each event is the list of updates it causes to this user's state. Half are posts with one
    to three tags drawn uniformly from `topics` topics and 8 to 40 words of text. 30 % are likes
    given, each followed by the liked post's one to three topics (the post-index join). 10 % are
    follows or unfollows, and 10 % likes received. The last two kinds of update are tuples
    `(kind, event_id, at, argument)` for `apply_liked_topics` and `apply_audience`.
    """
    rng = random.Random(seed)
    start = datetime(2023, 1, 1, tzinfo=UTC)
    offsets = sorted(rng.uniform(0, span_days * 86400) for _ in range(count))
    pool = [f"topic-{index:04d}" for index in range(topics)]
    for n, offset in enumerate(offsets):
        at = start + timedelta(seconds=offset)
        event_id = f"h:{n}"
        draw = rng.random()
        if draw < 0.5:
            text = " ".join(rng.choices(_WORDS, k=rng.randint(8, 40)))
            tags = tuple(rng.sample(pool, rng.randint(1, 3)))
            reply = f"post:{rng.randrange(count)}" if rng.random() < 0.3 else None
            yield [PostEvent(event_id, HEAVY_USER, f"post:{n}", at, text, lang="en", tags=tags, reply_to_post_id=reply)]
        elif draw < 0.8:
            like = LikeEvent(event_id, HEAVY_USER, f"post:{rng.randrange(count)}", f"u:{rng.randrange(5000)}", at)
            liked = [(topic, 1.0) for topic in rng.sample(pool, rng.randint(1, 3))]
            yield [like, ("liked_topics", event_id, at.timestamp(), liked)]
        elif draw < 0.9:
            action = "unfollow" if rng.random() < 0.2 else "follow"
            yield [FollowEvent(event_id, HEAVY_USER, f"u:{rng.randrange(5000)}", at, action)]
        else:
            yield [("like_received", event_id, at.timestamp(), 1)]


def _apply_heavy(state: dict, steps: list[HeavyStep]) -> None:
    for step in steps:
        if isinstance(step, PostEvent):
            user_state.apply_post(state, step)
        elif isinstance(step, LikeEvent):
            user_state.apply_like(state, step)
        elif isinstance(step, FollowEvent):
            user_state.apply_follow(state, step)
        elif step[0] == "liked_topics":
            user_state.apply_liked_topics(state, step[1], step[2], step[3])
        else:
            user_state.apply_audience(state, *step)


def measure_heavy(count: int = HEAVY_EVENTS, checkpoints: Iterable[int] = HEAVY_CHECKPOINTS) -> dict:
    """Feed one synthetic user `count` events; report size, shape and apply time at each checkpoint.

    Event generation is excluded from the apply time. The apply time at a checkpoint is the
    mean over the events since the previous checkpoint.
    """
    marks = sorted(point for point in checkpoints if point <= count)
    events = list(heavy_user_events(count))
    state = user_state.new_state(HEAVY_USER)
    rows = []
    done = 0
    for mark in marks:
        started = time.process_time_ns()
        for event in events[done:mark]:
            _apply_heavy(state, event)
        apply_us = (time.process_time_ns() - started) / 1000 / (mark - done)
        rows.append({
            "events": mark,
            "state_bytes": state_bytes(state),
            "topics": len(state["interests"]),
            "seen_ids": len(state["seen"]),
            "hour_buckets": len(state["hours"]),
            "recent_posts": len(state["recent_posts"]),
            "apply_us_mean": apply_us,
            "round_trip_us": round_trip_us(state),
        })
        done = mark
    for row in rows:
        row["apply_to_round_trip"] = row["apply_us_mean"] / row["round_trip_us"]
    return {"events": count, "topic_pool": HEAVY_TOPICS, "span_days": HEAVY_SPAN_DAYS, "checkpoints": rows}


def format_report(bundled: dict, heavy: dict) -> str:
    sizes = bundled["state_bytes"]
    lines = [
        f"bundled data: {bundled['events']} events, {bundled['users']} users",
        "  state bytes per user (orjson): mean {mean:.0f}  p50 {p50:.0f}  p95 {p95:.0f}  max {max:.0f}".format(**sizes),
        f"  apply per event: {bundled['apply_us_mean']:.1f} µs;"
        f" orjson round trip of the p50 state {bundled['round_trip_us_p50_state']:.1f} µs,"
        f" of the max state {bundled['round_trip_us_max_state']:.1f} µs;"
        f" apply / round trip (p50 state) = {bundled['apply_to_round_trip_p50']:.2f}",
        f"heavy user: {heavy['events']} events over {heavy['span_days']} days, tags from {heavy['topic_pool']} topics",
        f"  {'events':>8} {'bytes':>8} {'topics':>6} {'seen':>5} {'hours':>5} {'apply µs':>9} {'trip µs':>8} {'ratio':>6}",
    ]
    for row in heavy["checkpoints"]:
        lines.append(
            f"  {row['events']:>8} {row['state_bytes']:>8} {row['topics']:>6} {row['seen_ids']:>5}"
            f" {row['hour_buckets']:>5} {row['apply_us_mean']:>9.1f} {row['round_trip_us']:>8.1f}"
            f" {row['apply_to_round_trip']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy-events", type=int, default=HEAVY_EVENTS,
                        help=f"events of the synthetic heavy user (default: {HEAVY_EVENTS})")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.heavy_events < 1:
        parser.error(f"--heavy-events {args.heavy_events} must be at least 1")
    bundled = measure_bundled(load_events())
    heavy = measure_heavy(args.heavy_events)
    print(format_report(bundled, heavy))
    if args.json:
        result = {"python": sys.version.split()[0], "bundled": bundled, "heavy": heavy}
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
