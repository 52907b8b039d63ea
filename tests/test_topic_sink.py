"""The profile topic sink: records within the size limit, trimmed by the documented steps."""

import copy
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given, settings, strategies as st
from prometheus_client import REGISTRY

import schemas
from handlers import features, significance, state as user_state
from handlers.errors import ProfileTooLarge
from handlers.events import PostEvent
from handlers.generation import rules
from handlers.sinks.topic import RECORD_OVERHEAD_BYTES, TRIMMED_HEADER, TopicSink, fit_profile

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def big_profile(topics: int = 12, replies: int = 60) -> dict:
    """A valid rules profile with `topics` interests and both traits, each with several evidence ids."""
    state = user_state.new_state("u1")
    for n in range(replies):
        tags = (f"topic-{n % topics}", f"topic-{(n + 1) % topics}")
        event = PostEvent(f"event-{n:04d}-" + "x" * 40, "u1", f"p{n}", T0 + timedelta(hours=n), "text", tags=tags,
                          reply_to_post_id="p0")
        user_state.apply_post(state, event)
    version = significance.take_snapshot(state)
    request = features.build_request(state, version, ("new_user",))
    return rules.build_profile(request, language="en", generated_at=T0 + timedelta(days=30))


def is_valid(value: bytes) -> bool:
    return schemas.validator("profile.v1").is_valid(orjson.loads(value))


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None, list]] = []

    async def send(self, key: bytes, value: bytes | None, headers: list) -> None:
        self.records.append((key, value, headers))


def test_fixture_profile_is_big_and_valid():
    profile = big_profile()
    assert len(profile["interests"]) >= 10
    assert len(profile["traits"]) == 2
    assert all(len(interest["evidence"]) > 1 for interest in profile["interests"])
    assert is_valid(orjson.dumps(profile))


def test_small_profile_unchanged():
    profile = big_profile()
    value, steps = fit_profile(profile, 1_000_000)
    assert value == orjson.dumps(profile)
    assert steps == []


def test_evidence_cut_first():
    profile = big_profile()
    full = len(orjson.dumps(profile))
    value, steps = fit_profile(profile, full - 1)
    trimmed = orjson.loads(value)
    assert steps == ["evidence"]
    assert len(value) <= full - 1
    assert all(interest["evidence"] == original["evidence"][:1]
               for interest, original in zip(trimmed["interests"], profile["interests"]))
    assert len(trimmed["interests"]) == len(profile["interests"])
    assert len(trimmed["traits"]) == len(profile["traits"])


def test_traits_then_interests_dropped():
    profile = big_profile()
    without_evidence = {**profile, "interests": [dict(i, evidence=i["evidence"][:1]) for i in profile["interests"]],
                        "traits": []}
    limit = len(orjson.dumps(without_evidence)) - 1
    value, steps = fit_profile(profile, limit)
    trimmed = orjson.loads(value)
    assert steps == ["evidence", "traits", "interests"]
    assert trimmed["traits"] == []
    assert len(trimmed["interests"]) == len(profile["interests"]) - 1
    assert [i["topic"] for i in trimmed["interests"]] == [i["topic"] for i in profile["interests"][:-1]]
    assert is_valid(value)


def test_profile_not_changed_by_trim():
    profile = big_profile()
    before = copy.deepcopy(profile)
    _, steps = fit_profile(profile, len(orjson.dumps(profile)) // 2)
    assert steps
    assert profile == before


def test_too_large_even_when_trimmed():
    profile = big_profile()
    with pytest.raises(ProfileTooLarge) as caught:
        fit_profile(profile, 300)
    assert "'u1'" in str(caught.value)
    assert "max_record_bytes" in str(caught.value)
    assert not caught.value.retriable


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(200, 6000))
def test_trimmed_value_fits_and_stays_valid(limit):
    profile = big_profile()
    try:
        value, steps = fit_profile(profile, limit)
    except ProfileTooLarge:
        bare = {**profile, "interests": [], "traits": []}
        assert len(orjson.dumps(bare)) > limit
        return
    assert len(value) <= limit
    assert is_valid(value)
    assert bool(steps) == (len(orjson.dumps(profile)) > limit)


async def test_sink_sends_trimmed_record_with_header():
    profile = big_profile()
    recorder = Recorder()
    limit = len(orjson.dumps(profile)) // 3
    trimmed_before = REGISTRY.get_sample_value("profilestream_topic_sink_trimmed_profiles_total", {"step": "interests"}) or 0.0
    sink = TopicSink(recorder.send, max_record_bytes=limit)
    assert await sink.write([profile]) == 1
    [(key, value, headers)] = recorder.records
    assert key == b"u1"
    assert dict(headers)[TRIMMED_HEADER] == b"evidence,traits,interests"
    assert dict(headers)["profile-version"] == b"1"
    assert DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) <= limit
    assert is_valid(value)
    assert REGISTRY.get_sample_value("profilestream_topic_sink_trimmed_profiles_total", {"step": "interests"}) == trimmed_before + 1


async def test_sink_sends_full_record_without_header():
    profile = big_profile()
    recorder = Recorder()
    await TopicSink(recorder.send).write([profile])
    [(_, value, headers)] = recorder.records
    assert value == orjson.dumps(profile)
    assert [name for name, _ in headers] == ["profile-version"]


async def test_sink_rejects_profile_that_cannot_fit():
    recorder = Recorder()
    sink = TopicSink(recorder.send, max_record_bytes=RECORD_OVERHEAD_BYTES + 400)
    with pytest.raises(ProfileTooLarge):
        await sink.write([big_profile()])
    assert recorder.records == []


def versions_published() -> float:
    value = REGISTRY.get_sample_value("profilestream_profile_versions_published_total")
    assert value is not None, "profilestream_profile_versions_published_total has no sample"
    return value


async def test_published_versions_counted():
    profile = big_profile()
    second = dict(profile, version=profile["version"] + 1)
    trimmed = dict(profile, version=profile["version"] + 2)
    before = versions_published()
    await TopicSink(Recorder().send).write([profile, second])
    await TopicSink(Recorder().send, max_record_bytes=len(orjson.dumps(profile)) // 3).write([trimmed])
    assert versions_published() == before + 3


async def test_tombstones_and_failures_not_counted():
    async def failing_send(key: bytes, value: bytes | None, headers: list) -> None:
        raise ConnectionError("broker unreachable")

    before = versions_published()
    await TopicSink(Recorder().send).erase("u1")
    with pytest.raises(ProfileTooLarge):
        await TopicSink(Recorder().send, max_record_bytes=RECORD_OVERHEAD_BYTES + 400).write([big_profile()])
    with pytest.raises(ConnectionError):
        await TopicSink(failing_send).write([big_profile()])
    assert versions_published() == before


def test_sink_limit_must_exceed_overhead():
    with pytest.raises(ValueError, match="max_record_bytes"):
        TopicSink(Recorder().send, max_record_bytes=RECORD_OVERHEAD_BYTES)


@pytest.mark.parametrize("headers", [0, 1, 2, 8])
def test_overhead_covers_aiokafka_estimate(headers):
    key = b"u" * 256
    value = b"v" * 5000
    header_list = [(f"h{n}", b"value") for n in range(headers)]
    estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, header_list)
    ours = RECORD_OVERHEAD_BYTES + len(key) + len(value) + sum(len(name) + len(data) for name, data in header_list)
    assert ours >= estimate
