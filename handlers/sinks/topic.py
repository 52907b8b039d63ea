"""The profile topic sink: one record per profile version, keyed by user id.

A record must fit the producer's max_request_size, so a profile whose record would be larger
than `max_record_bytes` is trimmed for the topic in these steps, until the record fits:
1. every evidence list (of interests and of traits) keeps only its first event id;
2. traits are dropped, the last one first;
3. interests are dropped, the last (lightest) one first.
Trimming keeps a valid profile.v1 document valid, and the record carries the
`profile-trimmed` header naming the steps taken. Other sinks store the full profile. A
profile that does not fit even without traits and interests raises ProfileTooLarge, which is
not retriable.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import orjson
from prometheus_client import Counter

from handlers.errors import ProfileTooLarge

VERSION_HEADER = "profile-version"
TRIMMED_HEADER = "profile-trimmed"
# Faust's default producer_max_request_size (faust-streaming 0.15), the producer the worker uses.
DEFAULT_MAX_RECORD_BYTES = 1_000_000
# Bytes a record needs beyond its key, value and header bytes: aiokafka 0.14 estimates 85 for
# an empty record (batch header and record overhead) plus a few length bytes per header.
RECORD_OVERHEAD_BYTES = 256
# The TRIMMED_HEADER value at its maximum length, whose bytes are reserved before trimming starts.
_ALL_STEPS = "evidence,traits,interests"

TRIMMED = Counter(
    "profilestream_topic_sink_trimmed_profiles",
    "Profiles the topic sink trimmed to fit one record, by the last trim step needed (evidence, traits, interests).",
    ["step"],
)
# Every step exports 0 from the start, so Prometheus has the series before the first trim.
for _step in _ALL_STEPS.split(","):
    TRIMMED.labels(_step)
VERSIONS_PUBLISHED = Counter(
    "profilestream_profile_versions_published",
    "Profile versions the topic sink published and the broker acknowledged, trimmed ones included and tombstones not."
    " A version published again after a crash or batch retry between the topic and Postgres writes counts again,"
    " as its second record on the topic does (docs/delivery.md).",
)

logger = logging.getLogger(__name__)

Send = Callable[[bytes, bytes | None, list[tuple[str, bytes]]], Awaitable[None]]


class TopicSink:
    """Publish profiles to a compacted topic through `send(key, value, headers)`.

    `send` must return only once the broker has acknowledged the record. Consumers compare
    the `profile-version` header and ignore a version lower than one they have seen.
    `max_record_bytes` must not exceed the producer's max_request_size.
    """

    name = "topic"

    def __init__(self, send: Send, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        if max_record_bytes <= RECORD_OVERHEAD_BYTES:
            raise ValueError(f"max_record_bytes must be more than {RECORD_OVERHEAD_BYTES}, got {max_record_bytes}")
        self._send = send
        self.max_record_bytes = max_record_bytes

    async def write(self, profiles: list[dict]) -> int:
        """Publish each profile, trimmed if needed, and raise ProfileTooLarge when one cannot fit."""
        for profile in profiles:
            key = profile["user_id"].encode()
            headers = [(VERSION_HEADER, str(profile["version"]).encode())]
            fixed_bytes = RECORD_OVERHEAD_BYTES + len(key) + _header_bytes(headers) + len(TRIMMED_HEADER) + len(_ALL_STEPS)
            value, steps = fit_profile(profile, self.max_record_bytes - fixed_bytes)
            if steps:
                headers.append((TRIMMED_HEADER, ",".join(steps).encode()))
                TRIMMED.labels(steps[-1]).inc()
                logger.warning("topic_sink.profile_trimmed user_id=%s version=%s steps=%s bytes=%s max_record_bytes=%s",
                               profile["user_id"], profile["version"], ",".join(steps), len(value), self.max_record_bytes)
            await self._send(key, value, headers)
            VERSIONS_PUBLISHED.inc()
        return len(profiles)

    async def erase(self, user_id: str) -> None:
        """Publish a tombstone so compaction removes the user's profile."""
        await self._send(user_id.encode(), None, [])


def fit_profile(profile: dict, max_value_bytes: int) -> tuple[bytes, list[str]]:
    """Encode `profile` in at most `max_value_bytes`, trimming by the module's steps.

    Returns the encoded value and the names of the steps taken. `profile` is not changed.
    Raises ProfileTooLarge when the profile does not fit after every step.
    """
    value = orjson.dumps(profile)
    if len(value) <= max_value_bytes:
        return value, []
    trimmed = dict(profile)
    trimmed["interests"] = [dict(interest, evidence=interest["evidence"][:1]) for interest in profile["interests"]]
    trimmed["traits"] = [dict(trait, evidence=trait["evidence"][:1]) for trait in profile["traits"]]
    steps = ["evidence"]
    value = orjson.dumps(trimmed)
    for field in ("traits", "interests"):
        while len(value) > max_value_bytes and trimmed[field]:
            if steps[-1] != field:
                steps.append(field)
            trimmed[field] = trimmed[field][:-1]
            value = orjson.dumps(trimmed)
    if len(value) > max_value_bytes:
        raise ProfileTooLarge(
            f"version {profile['version']} of user {profile['user_id']!r} is {len(value)} bytes without evidence,"
            f" traits and interests, more than the {max_value_bytes} bytes left for the value of one profile record;"
            " raise the topic sink's max_record_bytes together with the producer's max_request_size"
            " and the topic's max.message.bytes"
        )
    return value, steps



def _header_bytes(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(name.encode()) + len(value) for name, value in headers)
