"""Replay a JSON-lines file of events into the input topics, keyed by the acting user id.

Each line goes to the topic of its `schema` (post.v1 to the posts topic, and so on). A line
that is not a JSON object with a known schema is still sent, unchanged and without a key, to
the posts topic, so the worker dead-letters it with the reason. The summary counts such lines.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from stream.importers.jsonl import read_jsonl

from .kafka_security import aiokafka_security_kwargs
from .settings import Settings

ACTOR_FIELD = {"post": "user_id", "like": "user_id", "follow": "follower_id", "user_deleted": "user_id"}
IN_FLIGHT_MAX = 2000


@dataclass
class ReplayStats:
    sent: int = 0
    unroutable: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def route(line: bytes, settings: Settings) -> tuple[str, bytes | None]:
    """Return the (topic, key) of one line; unroutable lines go to the posts topic unkeyed."""
    topics = {kind: name for name, kind in settings.input_topics.items()}
    try:
        document = orjson.loads(line)
        kind = document["schema"].split(".")[0]
        key = document[ACTOR_FIELD[kind]]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return settings.topic_posts, None
    if not isinstance(key, str):
        return settings.topic_posts, None
    return topics[kind], key.encode()


async def replay(path: Path, settings: Settings, *, rate_per_s: float | None = None, progress: bool = True) -> ReplayStats:
    """Produce every line of `path` and wait until the broker has acknowledged all of them."""
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError(f"rate {rate_per_s} must be positive events per second; omit it for no limit")
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.app_id}-replay",
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        **aiokafka_security_kwargs(settings),
    )
    stats = ReplayStats()
    started = time.monotonic()
    await producer.start()
    try:
        pending: list[asyncio.Future] = []
        with tqdm(desc=f"replay {path.name}", unit="event", disable=not progress) as bar:
            for _, line in read_jsonl(path):
                topic, key = route(line, settings)
                stats.unroutable += key is None
                stats.by_topic[topic] = stats.by_topic.get(topic, 0) + 1
                pending.append(await producer.send(topic, value=line, key=key))
                stats.sent += 1
                bar.update()
                if len(pending) >= IN_FLIGHT_MAX:
                    await asyncio.gather(*pending)
                    pending.clear()
                if rate_per_s:
                    delay_s = stats.sent / rate_per_s - (time.monotonic() - started)
                    if delay_s > 0:
                        await asyncio.sleep(delay_s)
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    stats.seconds = time.monotonic() - started
    return stats
