"""Metric labels never take user ids: the series count stays flat as users grow."""

from datetime import UTC, datetime

import orjson
from prometheus_client import REGISTRY

from stream.ingest import IngestStage
from stream.records import Record
from stream.settings import load_settings

USERS = 100_000
# The registry is shared with every test of the session, so the budget covers all of the
# project's series (a full run reached 400); 100,000 users with an id label would add 100,000.
SERIES_BUDGET = 1000


class DiscardingEmitter:
    async def dead_letter(self, record, error) -> None: ...

    async def audience(self, user_id, message) -> None: ...

    async def regenerate(self, user_id, request) -> None: ...

    async def post_index(self, post_id, message) -> None: ...


def series() -> set[tuple]:
    return {(sample.name, tuple(sorted(sample.labels.items()))) for family in REGISTRY.collect() for sample in family.samples}


def event(n: int) -> Record:
    kind = ("post", "like", "follow")[n % 3]
    user = f"user-{n}"
    base = {"event_id": f"e{n}", "created_at": "2024-06-01T12:00:00Z"}
    if kind == "post":
        document = {**base, "schema": "post.v1", "user_id": user, "post_id": f"p{n}", "text": f"topic{n} words", "tags": [f"tag{n}"]}
    elif kind == "like":
        document = {**base, "schema": "like.v1", "user_id": user, "post_id": f"p{n}", "post_author_id": f"user-{n + 1}"}
    else:
        document = {**base, "schema": "follow.v1", "follower_id": user, "followee_id": f"user-{n + 1}"}
    topic = {"post": "posts", "like": "likes", "follow": "follows"}[kind]
    value = b"{broken" if n % 1000 < 3 else orjson.dumps(document)
    return Record(topic, 0, n, user.encode(), value)


async def test_series_flat_for_many_users():
    stage = IngestStage(load_settings(min_events_new_user=1), {}, DiscardingEmitter(), clock=lambda: datetime(2025, 1, 1, tzinfo=UTC))
    await stage.handle_batch([event(n) for n in range(1000)])
    after_first_thousand = series()
    for start in range(1000, USERS, 10_000):
        await stage.handle_batch([event(n) for n in range(start, min(start + 10_000, USERS))])
    assert series() - after_first_thousand == set()
    assert len(series()) < SERIES_BUDGET
