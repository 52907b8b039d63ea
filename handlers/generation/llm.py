"""The LLM generator: a profile.v1 document written by a model behind any OpenAI-compatible endpoint.

The model writes only interests, traits, summary and confidence, through structured output.
Every other field comes from the request. A reply is used only when the assembled document
is valid and grounded, and every failure raises GenerationError with one of these outcomes:

- timeout, rate_limited, server_error, connection_error: transient, `retriable` is True;
- quota_exhausted: HTTP 429 with error code insufficient_quota, which waiting does not fix;
- truncated, refusal, invalid_json, schema_invalid, ungrounded: the reply itself is unusable;
- budget_exhausted: the client-side Budget allowed no request, so nothing was sent.

Retries happen here rather than in the openai client, because the client (checked in
openai 3.60.0) retries every HTTP 429, insufficient_quota included, and its retries and
waits are not bounded by one overall deadline. Each attempt, retries included, takes one
request and the estimated tokens from the budget. A retry that the budget does not allow
is skipped, and the error of the last attempt is raised.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import logging
import math
import random
import re
import time
from datetime import UTC, datetime

import openai
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from openai.types.chat import ChatCompletion

import schemas
from handlers.features import MIN_INTEREST_EVIDENCE

from ..errors import GenerationError
from .budget import Budget
from .prompt import build_messages, estimate_tokens, language_name
from .telemetry import LLMTelemetry, default_telemetry

logger = logging.getLogger(__name__)

MODEL_FIELDS = ("interests", "traits", "summary", "confidence")
RESPONSE_FORMAT_NAME = "profile_description"
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_DETAIL_CHARS = 300

# Keywords kept when deriving the response schema from profile.v1. Bounds such as minimum,
# maxItems and maxLength are left out because not every OpenAI-compatible server accepts
# them in strict mode. Validating the assembled document against profile.v1 enforces them.
_STRICT_SCHEMA_KEYWORDS = frozenset({"type", "description", "enum", "items", "properties"})

# A keyword screen for traits that name a sensitive attribute. It catches explicit words
# only, so the prompt instruction remains the main control against paraphrased inferences.
_SENSITIVE_WORDS = re.compile(
    r"\b(?:health\w*|medical|illness\w*|disease\w*|diagnos\w*|disab\w*|pregnan\w*|mental|depress\w*|"
    r"anxiety|autis\w*|religio\w*|faith|church\w*|mosque\w*|christian\w*|catholic\w*|muslim\w*|islam\w*|"
    r"jewish|judaism|hindu\w*|buddhis\w*|atheis\w*|politic\w*|democrat\w*|republican\w*|partisan|leftist|"
    r"left-wing|right-wing|gay|lesbian\w*|bisexual\w*|homosexual\w*|heterosexual\w*|transgender|queer|"
    r"lgbt\w*|sexual\w*|ethnic\w*|racial\w*)\b",
    re.IGNORECASE,
)
_SENSITIVE_WORDS_ZH = (
    "健康", "疾病", "患有", "病情", "抑郁", "焦虑症", "残疾", "怀孕", "宗教", "信仰", "基督", "天主教",
    "佛教", "伊斯兰", "穆斯林", "犹太", "无神论", "政治", "政党", "党员", "左派", "右派", "同性恋",
    "双性恋", "跨性别", "性取向", "性向", "种族", "民族", "族裔",
)


def model_output_schema() -> dict:
    """Derive the structured-output schema for the model-written fields from profile.v1.

    OpenAI strict mode requires every property to be required and additionalProperties to
    be false on every object, and supports no `format` keyword.
    """
    profile = schemas.load("profile.v1")
    part = {"type": "object", "properties": {name: profile["properties"][name] for name in MODEL_FIELDS}}
    return _strict_schema(part)


def _strict_schema(node: dict) -> dict:
    strict = {key: value for key, value in node.items() if key in _STRICT_SCHEMA_KEYWORDS}
    if "properties" in node:
        strict["properties"] = {name: _strict_schema(child) for name, child in node["properties"].items()}
        strict["required"] = list(node["properties"])
        strict["additionalProperties"] = False
    if "items" in node:
        strict["items"] = _strict_schema(node["items"])
    return strict


def sensitive_term(text: str) -> str | None:
    """Return the first sensitive-attribute keyword in `text`, or None."""
    match = _SENSITIVE_WORDS.search(text)
    if match:
        return match.group(0)
    return next((word for word in _SENSITIVE_WORDS_ZH if word in text), None)


class LLMGenerator:
    """Profile generator backed by a chat model behind an OpenAI-compatible endpoint.

    `timeout_s` bounds one whole `generate` call, retries and waits included, and
    `connect_timeout_s` bounds each TCP connect. `max_retries` counts retries after the
    first attempt. `max_output_tokens` caps the reply (sent as max_completion_tokens).
    `budget`, if given, must allow each attempt (see the module docstring). The prices in
    US dollars per 1000 prompt and completion tokens only feed the estimated cost metric.
    `telemetry` defaults to default_telemetry().
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        language: str,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 2,
        max_output_tokens: int = 1200,
        budget: Budget | None = None,
        telemetry: LLMTelemetry | None = None,
        prompt_price_per_1k_usd: float = 0.0,
        completion_price_per_1k_usd: float = 0.0,
    ) -> None:
        _check_settings(base_url, api_key, model, timeout_s, connect_timeout_s, max_retries, max_output_tokens)
        _check_prices(prompt_price_per_1k_usd, completion_price_per_1k_usd)
        language_name(language)
        self.model = model
        self.language = language
        self.budget = budget
        self.telemetry = telemetry if telemetry is not None else default_telemetry()
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._max_output_tokens = max_output_tokens
        self._prompt_price_per_1k_usd = prompt_price_per_1k_usd
        self._completion_price_per_1k_usd = completion_price_per_1k_usd
        if budget is not None:
            self.telemetry.watch_budget(model, budget)
        self._response_format = {
            "type": "json_schema",
            "json_schema": {"name": RESPONSE_FORMAT_NAME, "strict": True, "schema": model_output_schema()},
        }
        self._part_validator = Draft202012Validator(self._response_format["json_schema"]["schema"])
        # _complete retries, so the client's own retries stay off (see the module docstring).
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            max_retries=0,
        )

    async def generate(self, request: dict, *, generated_at: datetime) -> dict:
        """Generate the profile for `request` (see handlers.features.build_request).

        Returns a complete profile.v1 document with generator set to the model name, or
        raises GenerationError. `generated_at` must be timezone-aware. Every call that
        sends a request is counted in the telemetry with its outcome and duration.
        """
        if generated_at.tzinfo is None:
            raise ValueError(f"generated_at {generated_at.isoformat()} has no timezone; pass an aware datetime such as datetime.now(UTC)")
        messages = build_messages(request, self.language)
        # The reply may take up to max_output_tokens, so the reservation covers that until
        # the endpoint reports the real usage.
        estimated_tokens = estimate_tokens(messages) + self._max_output_tokens
        if not self._reserve(estimated_tokens):
            raise GenerationError("budget_exhausted", self._budget_detail(estimated_tokens))
        started = time.monotonic()
        try:
            completion, attempts = await self._complete(messages, request, estimated_tokens)
            part = self._parse(completion)
            check_grounding(part, request)
            document = self._assemble(request, part, generated_at)
            _validate_profile(document)
        except GenerationError as error:
            self.telemetry.record_call(self.model, error.outcome, time.monotonic() - started)
            raise
        elapsed_s = time.monotonic() - started
        self.telemetry.record_call(self.model, "ok", elapsed_s)
        _log_usage(request, completion, attempts, elapsed_s)
        return document

    async def close(self) -> None:
        """Close the HTTP connections of the client."""
        await self._client.close()

    async def _complete(self, messages: list[dict], request: dict, estimated_tokens: int) -> tuple[ChatCompletion, int]:
        """Send the chat completion request, retrying transient failures within `timeout_s`.

        The caller has reserved the first attempt in the budget. Each retry reserves its own.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        attempt = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    attempt += 1
                    try:
                        completion = await self._client.chat.completions.create(
                            model=self.model,
                            messages=messages,
                            response_format=self._response_format,
                            max_completion_tokens=self._max_output_tokens,
                        )
                        self._account_usage(completion, estimated_tokens)
                        return completion, attempt
                    except openai.APIError as exc:
                        error = self._classify(exc)
                        delay_s = _retry_delay_s(exc, attempt)
                        if isinstance(exc, openai.APIStatusError) and self.budget is not None:
                            # An error reply reports no usage. NOTE: returning the estimate
                            # assumes that the endpoint counts no tokens for an error reply.
                            self.budget.settle(estimated_tokens, 0)
                    except json.JSONDecodeError as exc:
                        # openai 3.60.0 raises this for an HTTP 200 body that is not JSON.
                        raise GenerationError("invalid_json", f"reply from model {self.model!r} is not a JSON chat completion: {exc}") from None
                    if not error.retriable or attempt > self._max_retries or loop.time() + delay_s >= deadline:
                        raise error
                    logger.info(
                        "llm_retry user_id=%s version=%s model=%s outcome=%s attempt=%d delay_s=%.2f detail=%s",
                        request["user_id"], request["version"], self.model, error.outcome, attempt, delay_s, error.detail,
                    )
                    await asyncio.sleep(delay_s)
                    if not self._reserve(estimated_tokens):
                        logger.info(
                            "llm_retry_skipped user_id=%s version=%s model=%s outcome=%s attempt=%d reason=budget_exhausted",
                            request["user_id"], request["version"], self.model, error.outcome, attempt,
                        )
                        raise error
                    self.telemetry.record_retry(self.model, error.outcome)
        except TimeoutError:
            raise GenerationError(
                "timeout",
                f"model {self.model!r} sent no complete reply within {self._timeout_s} s (attempts: {attempt});"
                " raise timeout_s or use a faster model",
                retriable=True,
            ) from None

    def _reserve(self, estimated_tokens: int) -> bool:
        return self.budget is None or self.budget.try_acquire(estimated_tokens)

    def _budget_detail(self, estimated_tokens: int) -> str:
        left = self.budget.remaining()
        return (
            f"the client-side budget of model {self.model!r} allows no request of about {estimated_tokens} tokens now"
            f" (left: {left.requests_this_minute:g} requests and {left.tokens_this_minute:g} tokens in the last minute,"
            f" {left.tokens_today:g} tokens today UTC); wait, or raise the budget limits"
        )

    def _account_usage(self, completion: object, estimated_tokens: int) -> None:
        """Count the reported tokens and their cost, and correct the budget's estimate with them.

        A reply without usage keeps the estimate in the budget and adds nothing to the counters.
        """
        usage = getattr(completion, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        completion_tokens = getattr(usage, "completion_tokens", None)
        if not _is_count(prompt_tokens) or not _is_count(completion_tokens):
            return
        cost_usd = (prompt_tokens * self._prompt_price_per_1k_usd + completion_tokens * self._completion_price_per_1k_usd) / 1000
        self.telemetry.record_usage(self.model, prompt_tokens, completion_tokens, cost_usd)
        if self.budget is not None:
            self.budget.settle(estimated_tokens, prompt_tokens + completion_tokens)

    def _classify(self, exc: openai.APIError) -> GenerationError:
        """Map an openai client error to a GenerationError outcome, without the API key."""
        if isinstance(exc, openai.APITimeoutError):
            return GenerationError("timeout", self._scrub(f"request to model {self.model!r} timed out"), retriable=True)
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return GenerationError("connection_error", self._scrub(f"cannot reach the model endpoint: {cause}"), retriable=True)
        if not isinstance(exc, openai.APIStatusError):
            return GenerationError("invalid_json", self._scrub(f"reply from model {self.model!r} is not a valid chat completion: {exc}"))
        status = exc.status_code
        message = exc.body.get("message") if isinstance(exc.body, dict) else None
        detail = self._scrub(f"HTTP {status} from the model endpoint, error code {exc.code!r}: {message or exc.message}")
        if status == 429 and exc.code == "insufficient_quota":
            return GenerationError("quota_exhausted", f"{detail}; add credit or raise the quota of the API key")
        if status == 429:
            return GenerationError("rate_limited", detail, retriable=True)
        if status == 408:
            return GenerationError("timeout", detail, retriable=True)
        if status >= 500:
            return GenerationError("server_error", detail, retriable=True)
        # NOTE: other 4xx statuses (bad key, unknown model, unsupported response_format) are
        # configuration faults. No outcome fits them better than server_error, but they are
        # not retried.
        return GenerationError("server_error", f"{detail}; check the endpoint URL, API key and model name")

    def _scrub(self, text: str) -> str:
        """Shorten `text` and remove the API key from it, in case the server echoed it."""
        key = self._client.api_key
        if len(key) >= 8:
            text = text.replace(key, "[api key]")
        return text[:MAX_DETAIL_CHARS]

    def _parse(self, completion: ChatCompletion) -> dict:
        """Return the model-written fields of `completion`, checked against the response schema."""
        if not isinstance(completion, ChatCompletion):
            raise GenerationError("invalid_json", f"reply from model {self.model!r} is a {type(completion).__name__}, not a chat completion")
        choice = completion.choices[0] if getattr(completion, "choices", None) else None
        message = getattr(choice, "message", None)
        if message is None:
            raise GenerationError("invalid_json", f"reply from model {self.model!r} has no message")
        if message.refusal or choice.finish_reason == "content_filter":
            reason = message.refusal or "finish_reason content_filter"
            raise GenerationError("refusal", f"model {self.model!r} returned a refusal: {reason[:200]}")
        if choice.finish_reason == "length":
            raise GenerationError(
                "truncated",
                f"reply from model {self.model!r} stopped at max_output_tokens={self._max_output_tokens}; raise max_output_tokens",
            )
        if not message.content:
            raise GenerationError("invalid_json", f"reply from model {self.model!r} has no content")
        try:
            part = json.loads(message.content)
        except ValueError as exc:
            raise GenerationError("invalid_json", f"reply from model {self.model!r} is not valid JSON: {exc}") from None
        error = best_match(self._part_validator.iter_errors(part))
        if error is not None:
            raise GenerationError("schema_invalid", _describe(error))
        return part

    def _assemble(self, request: dict, part: dict, generated_at: datetime) -> dict:
        """Build the profile.v1 document, in the field order of rules.build_profile."""
        return {
            "schema": "profile.v1",
            "user_id": request["user_id"],
            "version": request["version"],
            "generated_at": generated_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "generator": self.model,
            "fallback_reason": None,
            "trigger_reasons": list(request["reasons"]),
            "interests": part["interests"],
            "activity": copy.deepcopy(request["activity"]),
            "social": dict(request["social"]),
            "traits": part["traits"],
            "summary": part["summary"],
            "language": self.language,
            "confidence": part["confidence"],
            "watermark": dict(request["watermark"]),
        }


def check_grounding(part: dict, request: dict) -> None:
    """Raise GenerationError("ungrounded") unless every claim in `part` is backed by `request`.

    Each interest must name a topic from the request's interests and cite at least
    MIN_INTEREST_EVIDENCE distinct ids, each trait at least one id, all of them ids from the request (interest evidence
    or recent post event ids). A trait that names a sensitive attribute is rejected too.
    A topic listed twice raises GenerationError("schema_invalid").
    """
    topics = {interest["topic"] for interest in request["interests"]}
    known_ids = {event_id for interest in request["interests"] for event_id in interest["evidence"]}
    known_ids.update(post["event_id"] for post in request["recent_posts"])
    seen_topics = set()
    for interest in part["interests"]:
        topic = interest["topic"]
        if topic not in topics:
            raise GenerationError("ungrounded", f"interest topic {topic[:100]!r} is not among the request's interests")
        if topic in seen_topics:
            raise GenerationError("schema_invalid", f"interest topic {topic[:100]!r} appears twice")
        seen_topics.add(topic)
        _check_evidence(f"interest {topic[:100]!r}", interest["evidence"], known_ids)
        if len(set(interest["evidence"])) < MIN_INTEREST_EVIDENCE:
            raise GenerationError(
                "ungrounded", f"interest {topic[:100]!r} cites {len(set(interest['evidence']))} distinct event ids;"
                f" at least {MIN_INTEREST_EVIDENCE} are required")
    for trait in part["traits"]:
        name = trait["trait"]
        _check_evidence(f"trait {name[:100]!r}", trait["evidence"], known_ids)
        term = sensitive_term(name)
        if term is not None:
            raise GenerationError("ungrounded", f"trait {name[:100]!r} names a sensitive attribute ({term!r})")


def _check_evidence(claim: str, evidence: list[str], known_ids: set[str]) -> None:
    if not evidence:
        raise GenerationError("ungrounded", f"{claim} cites no evidence")
    unknown = [event_id for event_id in evidence if event_id not in known_ids]
    if unknown:
        raise GenerationError("ungrounded", f"{claim} cites event ids not in the request: {unknown[:3]!r}"[:MAX_DETAIL_CHARS])


def _validate_profile(document: dict) -> None:
    error = best_match(schemas.validator("profile.v1").iter_errors(document))
    if error is not None:
        raise GenerationError("schema_invalid", _describe(error))


def _describe(error) -> str:
    location = "/".join(str(part) for part in error.absolute_path) or "(document)"
    return f"{location}: {error.message}"[:MAX_DETAIL_CHARS]


def _retry_delay_s(exc: openai.APIError, attempt: int) -> float:
    """Return the server's Retry-After delay if it sent one, else exponential backoff with jitter."""
    response = getattr(exc, "response", None)
    if response is not None:
        delay_s = _parse_retry_after(response.headers)
        if delay_s is not None:
            return delay_s
    backoff_s = min(INITIAL_RETRY_DELAY_S * 2 ** (attempt - 1), MAX_RETRY_DELAY_S)
    return backoff_s * random.uniform(0.75, 1.0)


def _parse_retry_after(headers) -> float | None:
    """Read retry-after-ms (milliseconds) or Retry-After (seconds or an HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _log_usage(request: dict, completion: ChatCompletion, attempts: int, elapsed_s: float) -> None:
    usage = completion.usage
    details = getattr(usage, "prompt_tokens_details", None)
    logger.debug(
        "llm_profile_generated user_id=%s version=%s model=%s attempts=%d elapsed_ms=%d"
        " prompt_tokens=%s cached_tokens=%s completion_tokens=%s",
        request["user_id"], request["version"], completion.model, attempts, elapsed_s * 1000,
        getattr(usage, "prompt_tokens", None), getattr(details, "cached_tokens", None),
        getattr(usage, "completion_tokens", None),
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_prices(prompt_price_per_1k_usd: float, completion_price_per_1k_usd: float) -> None:
    for name, price in (("prompt_price_per_1k_usd", prompt_price_per_1k_usd),
                        ("completion_price_per_1k_usd", completion_price_per_1k_usd)):
        if not (math.isfinite(price) and price >= 0):
            raise ValueError(f"{name}={price} must be a finite price of 0 or more US dollars per 1000 tokens")


def _check_settings(base_url: str, api_key: str, model: str, timeout_s: float, connect_timeout_s: float,
                    max_retries: int, max_output_tokens: int) -> None:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url {base_url!r} is not an http(s) URL; use the endpoint root such as https://api.openai.com/v1")
    if not api_key:
        raise ValueError("api_key is empty; set it (any non-empty value works for an endpoint that ignores keys)")
    if not model:
        raise ValueError("model is empty; set the model name the endpoint serves")
    if not timeout_s > 0 or not connect_timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s} and connect_timeout_s={connect_timeout_s} must both be positive seconds")
    if max_retries < 0:
        raise ValueError(f"max_retries={max_retries} is negative; use 0 to disable retries")
    if max_output_tokens < 1:
        raise ValueError(f"max_output_tokens={max_output_tokens} must be at least 1")
