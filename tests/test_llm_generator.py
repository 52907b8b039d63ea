"""LLM generator and fallback facade against the local OpenAI-compatible stub server."""

from __future__ import annotations

import logging
import socket
import time
from datetime import UTC, datetime

import pytest
import pytest_asyncio

import schemas
from handlers.errors import GenerationError
from handlers.generation.llm import LLMGenerator, model_output_schema
from handlers.generation.prompt import build_messages
from handlers.generation.service import ProfileGenerator
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
    ],
    ids=["base-url", "api-key", "model", "timeout", "retries", "output-tokens", "language"],
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
