"""The profile topic sink: one record per profile version, keyed by user id."""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson

VERSION_HEADER = "profile-version"

Send = Callable[[bytes, bytes | None, list[tuple[str, bytes]]], Awaitable[None]]


class TopicSink:
    """Publish profiles to a compacted topic through `send(key, value, headers)`.

    `send` must return only once the broker has acknowledged the record. Consumers compare
    the `profile-version` header and ignore a version lower than one they have seen.
    """

    name = "topic"

    def __init__(self, send: Send) -> None:
        self._send = send

    async def write(self, profiles: list[dict]) -> int:
        for profile in profiles:
            headers = [(VERSION_HEADER, str(profile["version"]).encode())]
            await self._send(profile["user_id"].encode(), orjson.dumps(profile), headers)
        return len(profiles)

    async def erase(self, user_id: str) -> None:
        """Publish a tombstone so compaction removes the user's profile."""
        await self._send(user_id.encode(), None, [])
