"""The generation stage: coalescing per user and the generations-per-minute budget."""

import asyncio
import weakref

import orjson

from handlers.errors import InvalidRecord
from stream import generate, metrics
from stream.generate import GenerationStage, GenerationRateLimit, refresh_generation_budget_gauge
from stream.records import Record


class EchoGenerator:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    async def generate(self, request: dict) -> tuple[dict, str]:
        self.requests.append((request["user_id"], request["version"]))
        return {"user_id": request["user_id"], "version": request["version"], "generator": "rules"}, "rules"


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.written: list[dict] = []

    async def write(self, profiles: list[dict]) -> int:
        self.written.extend(profiles)
        return len(profiles)


def request(user_id: str, version: int) -> Record:
    return Record("regenerate", 0, version, user_id.encode(), orjson.dumps({"user_id": user_id, "version": version}))


async def test_batch_keeps_latest_version_per_user():
    generator = EchoGenerator()
    sink = ListSink()
    stage = GenerationStage(generator, [sink])
    await stage.handle_batch([request("u1", 1), request("u2", 1), request("u1", 3), request("u1", 2)])
    assert sorted(generator.requests) == [("u1", 3), ("u2", 1)]
    assert len(sink.written) == 2


async def test_invalid_request_skipped():
    generator = EchoGenerator()
    stage = GenerationStage(generator, [ListSink()])
    bad = Record("regenerate", 0, 0, b"u1", b'{"user_id": 5}')
    assert await stage.handle_batch([bad, request("u1", 1)]) == [{"user_id": "u1", "version": 1, "generator": "rules"}]


def test_budget_refills_over_time():
    now = [0.0]
    budget = GenerationRateLimit(60, clock=lambda: now[0])
    waits = [budget.wait_s() for _ in range(61)]
    assert waits[:60] == [0.0] * 60
    assert waits[60] > 0
    now[0] += 1.0
    assert budget.wait_s() == 0.0


def test_budget_gauge_refills_while_idle(monkeypatch):
    # Only this test's budget may set the process-wide gauge.
    monkeypatch.setattr(generate, "_rate_limits", weakref.WeakSet())
    now = [0.0]
    budget = GenerationRateLimit(60, clock=lambda: now[0])
    for _ in range(60):
        budget.wait_s()
    assert metrics.BUDGET_REMAINING._value.get() == 0
    now[0] += 30.0
    refresh_generation_budget_gauge()
    assert metrics.BUDGET_REMAINING._value.get() == 30
    assert budget.wait_s() == 0.0


def test_budget_zero_is_unlimited():
    budget = GenerationRateLimit(0)
    assert all(budget.wait_s() == 0.0 for _ in range(1000))


class RejectingSink:
    name = "rejecting"

    async def write(self, profiles: list[dict]) -> int:
        raise InvalidRecord("invalid_profile", "profile rejected by the test sink")


async def test_rejected_write_skips_profile():
    stage = GenerationStage(EchoGenerator(), [RejectingSink()])
    assert await stage.handle_batch([request("u1", 1)]) == []


async def test_batch_runs_generations_concurrently():
    running = 0
    peak = 0

    class SlowGenerator(EchoGenerator):
        async def generate(self, request: dict) -> tuple[dict, str]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return await super().generate(request)

    stage = GenerationStage(SlowGenerator(), [ListSink()], concurrency=3)
    await stage.handle_batch([request(f"u{n}", 1) for n in range(10)])
    assert peak == 3


def resent_request(user_id: str, version: int, offset: int) -> Record:
    body = {"user_id": user_id, "version": version, "replayed": True, "marker": "resent"}
    return Record("regenerate", 0, offset, user_id.encode(), orjson.dumps(body))


class RecordingGenerator(EchoGenerator):
    async def generate(self, request: dict) -> tuple[dict, str]:
        profile, outcome = await super().generate(request)
        profile["marker"] = request.get("marker", "original")
        return profile, outcome


async def test_original_request_wins_over_resent_one():
    sink = ListSink()
    stage = GenerationStage(RecordingGenerator(), [sink])
    await stage.handle_batch([request("u1", 4), resent_request("u1", 4, offset=9)])
    assert [profile["marker"] for profile in sink.written] == ["original"]


async def test_original_request_replaces_earlier_resent_one():
    sink = ListSink()
    stage = GenerationStage(RecordingGenerator(), [sink])
    await stage.handle_batch([resent_request("u1", 4, offset=1), request("u1", 4)])
    assert [profile["marker"] for profile in sink.written] == ["original"]


class StoringSink(ListSink):
    name = "storing"

    def __init__(self, stored: dict[str, int]) -> None:
        super().__init__()
        self.stored = stored

    async def stored_versions(self, user_ids: list[str]) -> dict[str, int]:
        return {user_id: self.stored[user_id] for user_id in user_ids if user_id in self.stored}


async def test_stored_versions_are_skipped():
    generator = EchoGenerator()
    topic, postgres = ListSink(), StoringSink({"u1": 5, "u2": 1})
    stage = GenerationStage(generator, [topic, postgres])
    await stage.handle_batch([request("u1", 5), request("u2", 2), request("u3", 1)])
    assert sorted(generator.requests) == [("u2", 2), ("u3", 1)]
    assert sorted(profile["user_id"] for profile in topic.written) == ["u2", "u3"]
