"""LLM generator and fallback facade against the local OpenAI-compatible stub server."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import time
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

import schemas
from handlers.errors import GenerationError
from handlers.generation.budget import Budget
from handlers.generation.circuit import CircuitBreaker, CircuitState
from handlers.generation.llm import LLMGenerator, check_grounding, model_output_schema
from handlers.generation.prompt import build_messages
from handlers.generation.service import ProfileGenerator
from handlers.generation.telemetry import LLMTelemetry
from tests import llm_stub as stub
from tests.llm_stub import TEST_API_KEY, LLMStub, build_test_request, llm_stub, llm_stub_server  # noqa: F401

MODEL = "stub-model-1"
TIMEOUT_S = 1.0
# Slack for event-loop scheduling and connection teardown when checking elapsed time.
TIMING_SLACK_S = 0.5

FAULTS = [
    pytest.param(stub.truncated(), "truncated", False, id="truncated"),
    pytest.param(stub.refusal(), "refusal", False, id="refusal"),
    pytest.param(stub.ok(content="Sure! Here is the profile you asked for."), "invalid_json", False, id="invalid-json"),
    pytest.param(stub.non_json_body(), "invalid_json", False, id="non-json-body"),
    pytest.param(stub.schema_breaking("missing"), "schema_invalid", False, id="missing-field"),
    pytest.param(stub.schema_breaking("extra"), "schema_invalid", False, id="extra-field"),
    pytest.param(stub.ungrounded(), "ungrounded", False, id="ungrounded"),
    pytest.param(stub.quota_exhausted(), "quota_exhausted", False, id="quota"),
    pytest.param(stub.rate_limited(retry_after="1"), "rate_limited", True, id="rate-limited"),
    pytest.param(stub.server_error(), "server_error", True, id="server-error"),
    pytest.param(stub.status(401, error_code="invalid_api_key", message="Incorrect API key provided"), "server_error", False,
                 id="unauthorized"),
    pytest.param(stub.hang(), "timeout", True, id="hang"),
]


@pytest_asyncio.fixture
async def make_generator(llm_stub: LLMStub):  # noqa: F811
    """Factory of LLM generators aimed at the stub. The fixture closes them after the test."""
    created: list[LLMGenerator] = []

    def make(**overrides) -> LLMGenerator:
        settings = {
            "base_url": llm_stub.base_url,
            "api_key": TEST_API_KEY,
            "model": MODEL,
            "language": "en",
            "timeout_s": TIMEOUT_S,
            "connect_timeout_s": TIMEOUT_S,
            "max_retries": 0,
        }
        settings.update(overrides)
        generator = LLMGenerator(**settings)
        created.append(generator)
        return generator

    yield make
    for generator in created:
        await generator.close()


def now() -> datetime:
    return datetime.now(UTC)


def schema_errors(document: dict) -> list[str]:
    return [error.message for error in schemas.validator("profile.v1").iter_errors(document)]


def known_event_ids(request: dict) -> set[str]:
    ids = {event_id for interest in request["interests"] for event_id in interest["evidence"]}
    ids.update(post["event_id"] for post in request["recent_posts"])
    return ids


def closed_port_url() -> str:
    """Return a base URL on 127.0.0.1 whose port was free a moment ago, so connecting fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def generation_error(generator: LLMGenerator, request: dict) -> GenerationError:
    with pytest.raises(GenerationError) as caught:
        await generator.generate(request, generated_at=now())
    return caught.value


def all_objects(node: object):
    """Yield every dict nested in a JSON-like value, the value itself included."""
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from all_objects(child)
    elif isinstance(node, list):
        for child in node:
            yield from all_objects(child)


# Successful generation.

async def test_ok_profile_matches_schema(make_generator) -> None:
    profile = await make_generator().generate(build_test_request(), generated_at=now())

    assert schema_errors(profile) == []


async def test_ok_generator_is_model_name(make_generator) -> None:
    profile = await make_generator().generate(build_test_request(), generated_at=now())

    assert profile["generator"] == MODEL
    assert profile["fallback_reason"] is None


async def test_ok_interests_grounded(make_generator) -> None:
    request = build_test_request()
    topics = {interest["topic"] for interest in request["interests"]}

    profile = await make_generator().generate(request, generated_at=now())

    assert profile["interests"]
    for interest in profile["interests"]:
        assert interest["topic"] in topics
        assert interest["evidence"]
        assert set(interest["evidence"]) <= known_event_ids(request)


async def test_ok_traits_grounded(make_generator) -> None:
    request = build_test_request()

    profile = await make_generator().generate(request, generated_at=now())

    assert profile["traits"]
    for trait in profile["traits"]:
        assert trait["evidence"]
        assert set(trait["evidence"]) <= known_event_ids(request)


async def test_ok_copies_request_fields(make_generator) -> None:
    request = build_test_request(user_id="user-copy", version=7)

    profile = await make_generator().generate(request, generated_at=now())

    assert profile["schema"] == "profile.v1"
    assert profile["user_id"] == "user-copy"
    assert profile["version"] == 7
    assert profile["trigger_reasons"] == request["reasons"]
    assert profile["activity"] == request["activity"]
    assert profile["social"] == request["social"]
    assert profile["watermark"] == request["watermark"]
    assert profile["language"] == "en"


async def test_model_user_id_rejected(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request(user_id="user-real")
    output = stub.grounded_output({"messages": build_messages(request, "en")})
    output["user_id"] = "user-forged"
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "schema_invalid"


async def test_ok_generated_at_utc(make_generator) -> None:
    moment = datetime(2024, 6, 1, 12, 30, tzinfo=UTC)

    profile = await make_generator().generate(build_test_request(), generated_at=moment)

    assert profile["generated_at"] == "2024-06-01T12:30:00Z"


async def test_naive_generated_at_rejected(make_generator) -> None:
    with pytest.raises(ValueError, match="no timezone"):
        await make_generator().generate(build_test_request(), generated_at=datetime(2024, 6, 1, 12, 30))


async def test_ok_logs_token_usage(make_generator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="handlers.generation.llm")

    await make_generator().generate(build_test_request(), generated_at=now())

    assert "prompt_tokens=" in caplog.text
    assert "prompt_tokens=None" not in caplog.text


# The request sent to the endpoint.

async def test_request_sends_prompt_messages(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()

    await make_generator().generate(request, generated_at=now())

    assert llm_stub.requests[0].messages == build_messages(request, "en")


async def test_request_uses_structured_output(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    await make_generator().generate(build_test_request(), generated_at=now())

    response_format = llm_stub.requests[0].body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    assert response_format["json_schema"]["schema"] == model_output_schema()


async def test_request_names_model_and_limit(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    await make_generator(max_output_tokens=321).generate(build_test_request(), generated_at=now())

    body = llm_stub.requests[0].body
    assert body["model"] == MODEL
    assert body["max_completion_tokens"] == 321


async def test_request_sends_api_key(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    await make_generator().generate(build_test_request(), generated_at=now())

    assert llm_stub.requests[0].headers["Authorization"] == f"Bearer {TEST_API_KEY}"


async def test_request_zh_language_instruction(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request(["今天学习了异步编程和消息队列。"], lang="zh", hashtags=("编程",))

    profile = await make_generator(language="zh").generate(request, generated_at=now())

    system = llm_stub.requests[0].content("system")
    assert "Simplified Chinese" in system
    assert 'language code "zh"' in system
    assert profile["language"] == "zh"


def test_response_schema_strict() -> None:
    schema = model_output_schema()

    for node in all_objects(schema):
        if "properties" in node:
            assert node["additionalProperties"] is False
            assert node["required"] == list(node["properties"])
        assert "format" not in node


def test_response_schema_covers_model_fields() -> None:
    assert model_output_schema()["required"] == ["interests", "traits", "summary", "confidence"]


# Faults, one outcome each.

@pytest.mark.parametrize(("reply", "outcome", "retriable"), FAULTS)
async def test_fault_outcome(make_generator, llm_stub: LLMStub, reply, outcome: str, retriable: bool) -> None:  # noqa: F811
    llm_stub.script(reply)

    error = await generation_error(make_generator(), build_test_request())

    assert error.outcome == outcome


@pytest.mark.parametrize(("reply", "outcome", "retriable"), FAULTS)
async def test_fault_retriable_flag(make_generator, llm_stub: LLMStub, reply, outcome: str, retriable: bool) -> None:  # noqa: F811
    llm_stub.script(reply)

    error = await generation_error(make_generator(), build_test_request())

    assert error.retriable is retriable


@pytest.mark.parametrize(("reply", "outcome", "retriable"), FAULTS)
async def test_fault_falls_back_to_rules(make_generator, llm_stub: LLMStub, reply, outcome: str, retriable: bool) -> None:  # noqa: F811
    llm_stub.script(reply)
    generator = ProfileGenerator(language="en", llm=make_generator())

    profile, result = await generator.generate(build_test_request())

    assert result == f"fallback:{outcome}"
    assert schema_errors(profile) == []
    assert profile["generator"] == "rules"
    assert profile["fallback_reason"] == outcome


async def test_connection_refused_outcome(make_generator) -> None:
    error = await generation_error(make_generator(base_url=closed_port_url()), build_test_request())

    assert error.outcome == "connection_error"
    assert error.retriable is True


async def test_connection_refused_falls_back(make_generator) -> None:
    generator = ProfileGenerator(language="en", llm=make_generator(base_url=closed_port_url()))

    profile, result = await generator.generate(build_test_request())

    assert result == "fallback:connection_error"
    assert profile["fallback_reason"] == "connection_error"


# Grounding and content checks on otherwise valid replies.

def grounded(request: dict) -> dict:
    return stub.grounded_output({"messages": build_messages(request, "en")})


async def test_unknown_topic_ungrounded(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["interests"][0]["topic"] = "cryptocurrency"
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "ungrounded"
    assert "cryptocurrency" in error.detail


async def test_interest_without_evidence_ungrounded(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["interests"][0]["evidence"] = []
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "ungrounded"


async def test_trait_without_evidence_ungrounded(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["traits"][0]["evidence"] = []
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "ungrounded"


async def test_trait_unknown_event_ungrounded(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["traits"][0]["evidence"] = [stub.NEVER_PRODUCED_EVENT_ID]
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "ungrounded"
    assert stub.NEVER_PRODUCED_EVENT_ID in error.detail


@pytest.mark.parametrize("trait", ["deeply religious", "politically active", "likely has depression", "关注宗教话题", "政治立场偏左"])
async def test_sensitive_trait_rejected(make_generator, llm_stub: LLMStub, trait: str) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["traits"][0]["trait"] = trait
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "ungrounded"
    assert "sensitive attribute" in error.detail


@pytest.mark.parametrize("trait", ["asks detailed technical questions", "replies quickly", "经常分享技术笔记"])
async def test_plain_trait_accepted(make_generator, llm_stub: LLMStub, trait: str) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["traits"][0]["trait"] = trait
    llm_stub.script(stub.ok(output))

    profile = await make_generator().generate(request, generated_at=now())

    assert profile["traits"][0]["trait"] == trait


async def test_duplicate_topic_rejected(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["interests"].append(dict(output["interests"][0]))
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "schema_invalid"


@pytest.mark.parametrize(
    ("field", "value"),
    [("confidence", 1.5), ("summary", ""), ("summary", "x" * 1001)],
    ids=["confidence-above-one", "summary-empty", "summary-too-long"],
)
async def test_out_of_bounds_schema_invalid(make_generator, llm_stub: LLMStub, field: str, value: object) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output[field] = value
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "schema_invalid"


async def test_weight_above_one_schema_invalid(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    request = build_test_request()
    output = grounded(request)
    output["interests"][0]["weight"] = 1.5
    llm_stub.script(stub.ok(output))

    error = await generation_error(make_generator(), request)

    assert error.outcome == "schema_invalid"


# Timeouts.

async def test_hang_times_out_within_budget(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.hang())
    generator = make_generator(max_retries=2)
    started = time.monotonic()

    error = await generation_error(generator, build_test_request())

    elapsed = time.monotonic() - started
    assert error.outcome == "timeout"
    assert elapsed >= TIMEOUT_S - 0.05
    assert elapsed < TIMEOUT_S + TIMING_SLACK_S


async def test_slow_within_budget_succeeds(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.slow(0.3))

    profile = await make_generator().generate(build_test_request(), generated_at=now())

    assert profile["generator"] == MODEL


async def test_slow_beyond_budget_times_out(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.slow(TIMEOUT_S + 0.5))
    started = time.monotonic()

    error = await generation_error(make_generator(), build_test_request())

    assert error.outcome == "timeout"
    assert time.monotonic() - started < TIMEOUT_S + TIMING_SLACK_S


# Retries.

async def test_rate_limit_retry_after_honoured(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.rate_limited(retry_after="1"), stub.ok())

    profile = await make_generator(timeout_s=3.0, max_retries=2).generate(build_test_request(), generated_at=now())

    assert profile["generator"] == MODEL
    assert len(llm_stub.requests) == 2
    assert llm_stub.requests[1].received_at - llm_stub.requests[0].received_at >= 1.0


async def test_rate_limit_retry_logged(make_generator, llm_stub: LLMStub, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, logger="handlers.generation.llm")
    llm_stub.script(stub.rate_limited(retry_after_ms="50"), stub.ok())

    await make_generator(max_retries=1).generate(build_test_request(user_id="user-retry"), generated_at=now())

    assert "llm_retry user_id=user-retry version=1" in caplog.text
    assert "outcome=rate_limited" in caplog.text


async def test_quota_not_retried(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.quota_exhausted(), stub.ok())

    error = await generation_error(make_generator(max_retries=2), build_test_request())

    assert error.outcome == "quota_exhausted"
    assert len(llm_stub.requests) == 1


async def test_server_error_retried(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.server_error(), stub.ok())

    profile = await make_generator(timeout_s=2.0, max_retries=1).generate(build_test_request(), generated_at=now())

    assert profile["generator"] == MODEL
    assert len(llm_stub.requests) == 2


async def test_retries_exhausted(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(*[stub.rate_limited(retry_after_ms="50")] * 4)

    error = await generation_error(make_generator(max_retries=2), build_test_request())

    assert error.outcome == "rate_limited"
    assert len(llm_stub.requests) == 3


async def test_retry_after_beyond_budget_not_awaited(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.rate_limited(retry_after="30"), stub.ok())
    started = time.monotonic()

    error = await generation_error(make_generator(max_retries=2), build_test_request())

    assert error.outcome == "rate_limited"
    assert len(llm_stub.requests) == 1
    assert time.monotonic() - started < TIMEOUT_S


async def test_invalid_reply_not_retried(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.truncated(), stub.ok())

    await generation_error(make_generator(max_retries=2), build_test_request())

    assert len(llm_stub.requests) == 1


# The API key stays out of errors and logs.

async def test_api_key_absent_from_error(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.status(401, error_code="invalid_api_key", message=f"Incorrect API key provided: {TEST_API_KEY}."))

    error = await generation_error(make_generator(), build_test_request())

    assert TEST_API_KEY not in str(error)
    assert "[api key]" in error.detail


async def test_api_key_absent_from_logs(make_generator, llm_stub: LLMStub, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    llm_stub.script(
        stub.rate_limited(retry_after_ms="10"),
        stub.status(401, error_code="invalid_api_key", message=f"Incorrect API key provided: {TEST_API_KEY}."),
    )
    generator = ProfileGenerator(language="en", llm=make_generator(max_retries=1))

    await generator.generate(build_test_request())

    assert "llm_fallback" in caplog.text
    assert TEST_API_KEY not in caplog.text


def test_api_key_absent_from_repr() -> None:
    generator = LLMGenerator(base_url="http://127.0.0.1:9/v1", api_key=TEST_API_KEY, model=MODEL, language="en")

    assert TEST_API_KEY not in repr(generator)
    assert TEST_API_KEY not in repr(vars(generator))


# Settings checks.

@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"base_url": "127.0.0.1:8000"}, "not an http"),
        ({"api_key": ""}, "api_key is empty"),
        ({"model": ""}, "model is empty"),
        ({"timeout_s": 0}, "positive"),
        ({"max_retries": -1}, "negative"),
        ({"max_output_tokens": 0}, "at least 1"),
        ({"language": "xx"}, "'xx'"),
        ({"prompt_price_per_1k_usd": -0.01}, "prompt_price_per_1k_usd=-0.01"),
        ({"completion_price_per_1k_usd": float("nan")}, "completion_price_per_1k_usd=nan"),
    ],
    ids=["base-url", "api-key", "model", "timeout", "retries", "output-tokens", "language", "prompt-price",
         "completion-price"],
)
def test_invalid_setting_rejected(override: dict, message: str) -> None:
    settings = {"base_url": "http://127.0.0.1:9/v1", "api_key": TEST_API_KEY, "model": MODEL, "language": "en"}
    settings.update(override)

    with pytest.raises(ValueError, match=message):
        LLMGenerator(**settings)


# The facade.

async def test_facade_without_llm_uses_rules() -> None:
    generator = ProfileGenerator(language="en")

    profile, result = await generator.generate(build_test_request())

    assert result == "rules"
    assert profile["generator"] == "rules"
    assert profile["fallback_reason"] is None
    assert schema_errors(profile) == []


async def test_facade_llm_outcome(make_generator) -> None:
    generator = ProfileGenerator(language="en", llm=make_generator())

    profile, result = await generator.generate(build_test_request())

    assert result == "llm"
    assert profile["generator"] == MODEL


async def test_facade_zh_fallback_in_chinese(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.refusal())
    generator = ProfileGenerator(language="zh", llm=make_generator(language="zh"))

    profile, result = await generator.generate(build_test_request(["今天学习了异步编程。"], lang="zh"))

    assert result == "fallback:refusal"
    assert profile["language"] == "zh"
    assert "共发帖" in profile["summary"]


async def test_facade_logs_fallback_once_per_outcome(
    make_generator, llm_stub: LLMStub, caplog: pytest.LogCaptureFixture,  # noqa: F811
) -> None:
    caplog.set_level(logging.DEBUG, logger="handlers.generation.service")
    llm_stub.script(stub.server_error(), stub.server_error(), stub.refusal())
    generator = ProfileGenerator(language="en", llm=make_generator())

    for user_id in ("user-a", "user-b", "user-c"):
        await generator.generate(build_test_request(user_id=user_id))

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "outcome=server_error user_id=user-a version=1" in warnings[0]
    assert "outcome=refusal user_id=user-c version=1" in warnings[1]
    assert generator.fallback_counts == {"server_error": 2, "refusal": 1}


def test_facade_language_mismatch_rejected() -> None:
    llm = LLMGenerator(base_url="http://127.0.0.1:9/v1", api_key=TEST_API_KEY, model=MODEL, language="zh")

    with pytest.raises(ValueError, match="differs"):
        ProfileGenerator(language="en", llm=llm)


def test_facade_unsupported_language_rejected() -> None:
    with pytest.raises(ValueError, match="'ja'"):
        ProfileGenerator(language="ja")


def test_facade_zero_concurrency_rejected() -> None:
    with pytest.raises(ValueError, match="max_concurrent_calls=0"):
        ProfileGenerator(language="en", max_concurrent_calls=0)


# Circuit breaker, budget, concurrency and metrics.

CIRCUIT_THRESHOLD = 5
CIRCUIT_COOLDOWN_S = 30.0


class ManualClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def telemetry(registry: CollectorRegistry) -> LLMTelemetry:
    return LLMTelemetry(registry)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Return the value of one sample, 0.0 if it was never set."""
    value = registry.get_sample_value(name, {"model": MODEL, **labels})
    return 0.0 if value is None else value


def make_circuit(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=CIRCUIT_THRESHOLD, cooldown_s=CIRCUIT_COOLDOWN_S,
                          max_cooldown_s=4 * CIRCUIT_COOLDOWN_S, clock=clock)


async def generate_many(generator: ProfileGenerator, count: int, prefix: str = "user") -> list[str]:
    """Generate profiles for `count` users one after another and return the outcomes."""
    results = []
    for index in range(count):
        _, result = await generator.generate(build_test_request(user_id=f"{prefix}-{index}"))
        results.append(result)
    return results


async def open_with_server_errors(generator: ProfileGenerator, llm_stub: LLMStub) -> list[str]:  # noqa: F811
    llm_stub.script(*[stub.server_error()] * CIRCUIT_THRESHOLD)
    return await generate_many(generator, CIRCUIT_THRESHOLD)


async def test_server_errors_open_circuit(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(ManualClock()))

    results = await open_with_server_errors(generator, llm_stub)

    assert results == ["fallback:server_error"] * CIRCUIT_THRESHOLD
    assert generator.circuit.state is CircuitState.OPEN


async def test_open_circuit_skips_endpoint(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(ManualClock()))
    await open_with_server_errors(generator, llm_stub)
    started = time.monotonic()

    results = await generate_many(generator, 3, prefix="after")

    assert results == ["fallback:circuit_open"] * 3
    assert len(llm_stub.requests) == CIRCUIT_THRESHOLD
    assert time.monotonic() - started < TIMING_SLACK_S


async def test_open_circuit_fallback_reason(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(ManualClock()))
    await open_with_server_errors(generator, llm_stub)

    profile, _ = await generator.generate(build_test_request())

    assert profile["generator"] == "rules"
    assert profile["fallback_reason"] == "circuit_open"
    assert schema_errors(profile) == []


async def test_open_circuit_logs_cause(make_generator, llm_stub: LLMStub, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    clock = ManualClock()
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(clock))
    await open_with_server_errors(generator, llm_stub)
    clock.now += 10.0
    caplog.set_level(logging.WARNING, logger="handlers.generation.service")

    await generator.generate(build_test_request(user_id="user-blocked"))

    assert "llm_fallback outcome=circuit_open user_id=user-blocked" in caplog.text
    assert "after server_error (5 unhealthy calls in a row)" in caplog.text
    assert "in 20.0 s" in caplog.text


async def test_probe_success_closes_circuit(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    clock = ManualClock()
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(clock))
    await open_with_server_errors(generator, llm_stub)
    clock.now += CIRCUIT_COOLDOWN_S

    _, result = await generator.generate(build_test_request())

    assert result == "llm"
    assert len(llm_stub.requests) == CIRCUIT_THRESHOLD + 1
    assert generator.circuit.state is CircuitState.CLOSED


async def test_half_open_admits_one_probe(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    clock = ManualClock()
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(clock))
    await open_with_server_errors(generator, llm_stub)
    clock.now += CIRCUIT_COOLDOWN_S
    llm_stub.script(stub.slow(0.3))

    results = await asyncio.gather(*(generator.generate(build_test_request(user_id=f"probe-{index}")) for index in range(3)))

    outcomes = sorted(result for _, result in results)
    assert outcomes == ["fallback:circuit_open", "fallback:circuit_open", "llm"]
    assert len(llm_stub.requests) == CIRCUIT_THRESHOLD + 1


async def test_quota_opens_circuit_at_once(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.quota_exhausted())
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(ManualClock()))

    results = await generate_many(generator, 2)

    assert results == ["fallback:quota_exhausted", "fallback:circuit_open"]
    assert len(llm_stub.requests) == 1


async def test_circuit_gauge_follows_state(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    generator = ProfileGenerator(language="en", llm=make_generator(telemetry=telemetry), circuit=make_circuit(ManualClock()))
    assert metric(registry, "profilestream_llm_circuit_state") == CircuitState.CLOSED

    await open_with_server_errors(generator, llm_stub)

    assert metric(registry, "profilestream_llm_circuit_state") == CircuitState.OPEN


async def test_budget_rejects_third_request(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm = make_generator(budget=Budget(requests_per_minute=2))
    generator = ProfileGenerator(language="en", llm=llm)

    results = await generate_many(generator, 3)

    assert results == ["llm", "llm", "fallback:budget_exhausted"]
    assert len(llm_stub.requests) == 2


async def test_budget_fallback_reason(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    generator = ProfileGenerator(language="en", llm=make_generator(budget=Budget(requests_per_minute=1)))
    await generator.generate(build_test_request(user_id="user-first"))

    profile, _ = await generator.generate(build_test_request())

    assert profile["generator"] == "rules"
    assert profile["fallback_reason"] == "budget_exhausted"


async def test_budget_error_names_limits(make_generator) -> None:
    llm = make_generator(budget=Budget(tokens_per_day=10))

    error = await generation_error(llm, build_test_request())

    assert error.outcome == "budget_exhausted"
    assert "10 tokens today" in error.detail


async def test_budget_denial_keeps_circuit_closed(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    circuit = CircuitBreaker(failure_threshold=1, clock=ManualClock())
    generator = ProfileGenerator(language="en", llm=make_generator(budget=Budget(requests_per_minute=1)), circuit=circuit)

    results = await generate_many(generator, 3)

    assert results == ["llm", "fallback:budget_exhausted", "fallback:budget_exhausted"]
    assert circuit.state is CircuitState.CLOSED


async def test_budget_corrected_by_usage(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    budget = Budget(tokens_per_minute=100_000, tokens_per_day=1_000_000)

    await make_generator(budget=budget).generate(build_test_request(), generated_at=now())

    used = llm_stub.usages[0]["prompt_tokens"] + llm_stub.usages[0]["completion_tokens"]
    assert budget.remaining().tokens_this_minute == 100_000 - used
    assert budget.remaining().tokens_today == 1_000_000 - used


async def test_budget_error_reply_refunds_tokens(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.server_error())
    budget = Budget(requests_per_minute=10, tokens_per_minute=100_000)

    await generation_error(make_generator(budget=budget), build_test_request())

    assert budget.remaining().tokens_this_minute == 100_000
    assert budget.remaining().requests_this_minute == 9


async def test_budget_blocks_retry(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.script(stub.status(500, retry_after_ms="10"), stub.ok())
    llm = make_generator(max_retries=2, budget=Budget(requests_per_minute=1))

    error = await generation_error(llm, build_test_request())

    assert error.outcome == "server_error"
    assert len(llm_stub.requests) == 1


async def test_budget_gauges_report_remaining(make_generator, telemetry, registry) -> None:
    budget = Budget(requests_per_minute=5, tokens_per_minute=100_000)
    llm = make_generator(budget=budget, telemetry=telemetry)

    await llm.generate(build_test_request(), generated_at=now())

    assert metric(registry, "profilestream_llm_budget_requests_minute_remaining") == 4
    assert metric(registry, "profilestream_llm_budget_tokens_minute_remaining") == budget.remaining().tokens_this_minute
    assert metric(registry, "profilestream_llm_budget_tokens_day_remaining") == float("inf")
    assert metric(registry, "profilestream_llm_budget_tokens_day_limit") == float("inf")


async def test_budget_day_limit_gauge(make_generator, telemetry, registry) -> None:
    make_generator(budget=Budget(tokens_per_day=50_000), telemetry=telemetry)

    assert metric(registry, "profilestream_llm_budget_tokens_day_limit") == 50_000


async def test_usage_counters_match_stub(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm = make_generator(telemetry=telemetry)

    for user_id in ("user-a", "user-b"):
        await llm.generate(build_test_request(user_id=user_id), generated_at=now())

    assert metric(registry, "profilestream_llm_prompt_tokens_total") == sum(usage["prompt_tokens"] for usage in llm_stub.usages)
    assert metric(registry, "profilestream_llm_completion_tokens_total") == sum(
        usage["completion_tokens"] for usage in llm_stub.usages)


async def test_cost_counter_uses_prices(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm = make_generator(telemetry=telemetry, prompt_price_per_1k_usd=0.5, completion_price_per_1k_usd=2.0)

    await llm.generate(build_test_request(), generated_at=now())

    usage = llm_stub.usages[0]
    expected = usage["prompt_tokens"] * 0.5 / 1000 + usage["completion_tokens"] * 2.0 / 1000
    assert expected > 0
    assert metric(registry, "profilestream_llm_cost_usd_total") == pytest.approx(expected)


async def test_rejected_reply_tokens_counted(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm_stub.script(stub.ungrounded())

    await generation_error(make_generator(telemetry=telemetry), build_test_request())

    assert metric(registry, "profilestream_llm_prompt_tokens_total") == llm_stub.usages[0]["prompt_tokens"]


async def test_requests_counted_by_outcome(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm_stub.script(stub.server_error())
    generator = ProfileGenerator(language="en", llm=make_generator(telemetry=telemetry))

    await generate_many(generator, 2)

    assert metric(registry, "profilestream_llm_requests_total", outcome="server_error") == 1
    assert metric(registry, "profilestream_llm_requests_total", outcome="ok") == 1
    assert metric(registry, "profilestream_llm_request_seconds_count") == 2


async def test_blocked_call_not_counted_as_request(make_generator, telemetry, registry) -> None:
    llm = make_generator(telemetry=telemetry, budget=Budget(tokens_per_day=10))

    await generation_error(llm, build_test_request())

    assert metric(registry, "profilestream_llm_request_seconds_count") == 0


async def test_retries_counted_by_outcome(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm_stub.script(stub.rate_limited(retry_after_ms="10"), stub.status(500, retry_after_ms="10"), stub.ok())

    await make_generator(telemetry=telemetry, max_retries=2, timeout_s=3.0).generate(build_test_request(), generated_at=now())

    assert metric(registry, "profilestream_llm_retries_total", outcome="rate_limited") == 1
    assert metric(registry, "profilestream_llm_retries_total", outcome="server_error") == 1


async def test_fallbacks_counted_by_reason(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm_stub.script(stub.refusal(), stub.refusal())
    generator = ProfileGenerator(language="en", llm=make_generator(telemetry=telemetry))

    await generate_many(generator, 3)

    assert metric(registry, "profilestream_llm_fallbacks_total", reason="refusal") == 2
    assert metric(registry, "profilestream_llm_requests_total", outcome="ok") == 1


async def test_metric_labels_exclude_request_data(make_generator, llm_stub: LLMStub, telemetry, registry) -> None:  # noqa: F811
    llm_stub.script(stub.server_error(), stub.ungrounded())
    generator = ProfileGenerator(language="en", llm=make_generator(telemetry=telemetry, budget=Budget(requests_per_minute=2)),
                                 circuit=make_circuit(ManualClock()))
    request = build_test_request(user_id="user-label-check")

    for _ in range(3):
        await generator.generate(request)

    label_values = {value for family in registry.collect() for sample in family.samples for value in sample.labels.values()}
    request_values = {request["user_id"], *known_event_ids(request), *(post["text"] for post in request["recent_posts"])}
    assert label_values
    assert label_values.isdisjoint(request_values)
    assert not any("user-label-check" in value for value in label_values)


async def test_concurrent_calls_bounded(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    llm_stub.default_reply = stub.slow(0.2)
    generator = ProfileGenerator(language="en", llm=make_generator(), max_concurrent_calls=3)

    results = await asyncio.gather(*(generator.generate(build_test_request(user_id=f"user-{index}")) for index in range(9)))

    assert [result for _, result in results] == ["llm"] * 9
    assert llm_stub.max_in_flight == 3


async def test_cancelled_probe_frees_slot(make_generator, llm_stub: LLMStub) -> None:  # noqa: F811
    clock = ManualClock()
    generator = ProfileGenerator(language="en", llm=make_generator(), circuit=make_circuit(clock))
    await open_with_server_errors(generator, llm_stub)
    clock.now += CIRCUIT_COOLDOWN_S
    llm_stub.script(stub.hang())
    probe = asyncio.create_task(generator.generate(build_test_request(user_id="user-probe")))
    while len(llm_stub.requests) <= CIRCUIT_THRESHOLD:
        await asyncio.sleep(0.01)

    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    _, result = await generator.generate(build_test_request())

    assert result == "llm"
    assert generator.circuit.state is CircuitState.CLOSED


# A rate-limit storm: every request gets HTTP 429 with Retry-After 1 for STORM_S seconds.

STORM_S = 3.0
STORM_REQUESTS = 50
STORM_SLOTS = 4
STORM_RETRIES = 2
STORM_TIMEOUT_S = 5.0
STORM_COOLDOWN_S = 0.5
STORM_OUTCOMES = {"llm", "fallback:rate_limited", "fallback:circuit_open"}
# Replies take a moment, so that calls overlap at the stub.
STORM_REPLY_DELAY_S = 0.02


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def storm(llm_stub_server: LLMStub):  # noqa: F811
    """Run STORM_REQUESTS generations at once through a storm and one after it.

    Yields the outcomes, the elapsed time, the arrival times of each request's attempts,
    the maximum of requests in flight at the stub, and the outcome of the call after the storm.
    """
    llm_stub_server.reset()
    llm = LLMGenerator(base_url=llm_stub_server.base_url, api_key=TEST_API_KEY, model=MODEL, language="en",
                       timeout_s=STORM_TIMEOUT_S, max_retries=STORM_RETRIES, telemetry=LLMTelemetry(CollectorRegistry()))
    circuit = CircuitBreaker(failure_threshold=CIRCUIT_THRESHOLD, cooldown_s=STORM_COOLDOWN_S, max_cooldown_s=STORM_COOLDOWN_S)
    generator = ProfileGenerator(language="en", llm=llm, circuit=circuit, max_concurrent_calls=STORM_SLOTS)
    requests = [build_test_request(user_id=f"storm-{index}") for index in range(STORM_REQUESTS)]
    try:
        llm_stub_server.default_reply = stub.slow(STORM_REPLY_DELAY_S)
        llm_stub_server.outage(dataclasses.replace(stub.rate_limited(retry_after="1"), delay_s=STORM_REPLY_DELAY_S), STORM_S)
        storm_ends = time.monotonic() + STORM_S
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*(generator.generate(request) for request in requests)), 60)
        elapsed_s = time.monotonic() - started
        storm_requests = list(llm_stub_server.requests)
        max_in_flight = llm_stub_server.max_in_flight
        await asyncio.sleep(max(0.0, storm_ends - time.monotonic()) + STORM_COOLDOWN_S)
        _, after = await generator.generate(build_test_request(user_id="after-storm"))
    finally:
        await generator.close()
    attempts = collections.defaultdict(list)
    for recorded in storm_requests:
        attempts[recorded.content("user")].append(recorded.received_at)
    yield {"outcomes": [result for _, result in results], "elapsed_s": elapsed_s, "attempts": list(attempts.values()),
           "max_in_flight": max_in_flight, "after": after}
    llm_stub_server.reset()


async def test_storm_every_request_served(storm) -> None:
    assert len(storm["outcomes"]) == STORM_REQUESTS
    assert set(storm["outcomes"]) <= STORM_OUTCOMES


async def test_storm_elapsed_bounded(storm) -> None:
    assert storm["elapsed_s"] < STORM_S + STORM_TIMEOUT_S


async def test_storm_retries_wait_retry_after(storm) -> None:
    gaps = [later - earlier for times in storm["attempts"] for earlier, later in zip(times, times[1:])]

    assert gaps
    assert min(gaps) >= 1.0


async def test_storm_attempts_within_max_retries(storm) -> None:
    assert max(len(times) for times in storm["attempts"]) <= STORM_RETRIES + 1


async def test_storm_in_flight_bounded(storm) -> None:
    assert storm["max_in_flight"] <= STORM_SLOTS


async def test_storm_recovers_after_outage(storm) -> None:
    assert storm["after"] == "llm"


def test_single_citation_interest_ungrounded():
    request = stub.build_test_request()
    interest = request["interests"][0]
    part = {"interests": [{"topic": interest["topic"], "weight": 1.0, "evidence": interest["evidence"][:1]}], "traits": []}
    with pytest.raises(GenerationError) as caught:
        check_grounding(part, request)
    assert caught.value.outcome == "ungrounded"
    part["interests"][0]["evidence"] = interest["evidence"][:2]
    check_grounding(part, request)
