"""An OpenAI-compatible chat completions server on 127.0.0.1 with scripted replies, for tests.

Each test scripts the replies to its next requests with `LLMStub.script`; once the script
runs out, the stub sends `LLMStub.default_reply` (a grounded `ok` reply). `LLMStub.outage`
replaces the default reply for a number of seconds. The stub records every request with
its arrival time on time.monotonic(), so tests can read the prompt and measure retry
delays, the usage of every completion it sends, and the most requests it had in flight
at once. Use it through the `llm_stub` fixture:

    from tests.llm_stub import llm_stub, llm_stub_server  # noqa: F401 (pytest fixtures)
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from aiohttp import web

from handlers import features, state as user_state
from handlers.events import PostEvent

NEVER_PRODUCED_EVENT_ID = "evt-never-produced-by-this-user"
TEST_API_KEY = "sk-test-stub-0123456789abcdef"
BASE_TIME = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
DEFAULT_POSTS = (
    "Profiling asyncio event loops in Python today, the scheduler overhead is tiny.",
    "Kafka consumer groups rebalance less with cooperative sticky assignment.",
    "Wrote a small Kafka producer benchmark in Python, batching matters most.",
    "Postgres jsonb indexes made the profile lookups fast enough.",
)


@dataclass(frozen=True)
class Reply:
    """One scripted reply. `output` replaces the grounded model output, and `content` the raw message content."""

    behaviour: str
    delay_s: float = 0.0
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error: dict | None = None
    output: dict | None = None
    content: str | None = None


def ok(output: dict | None = None, *, content: str | None = None) -> Reply:
    return Reply("ok", output=output, content=content)


def slow(delay_s: float, output: dict | None = None) -> Reply:
    return Reply("ok", delay_s=delay_s, output=output)


def hang() -> Reply:
    return Reply("hang")


def status(code: int, *, error_code: str | None = None, message: str = "stub error",
           retry_after: str | None = None, retry_after_ms: str | None = None) -> Reply:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if retry_after_ms is not None:
        headers["retry-after-ms"] = retry_after_ms
    error = {"message": message, "type": error_code or "server_error", "param": None, "code": error_code}
    return Reply("status", status=code, headers=headers, error=error)


def rate_limited(*, retry_after: str | None = None, retry_after_ms: str | None = None) -> Reply:
    return status(429, error_code="rate_limit_exceeded", message="Rate limit reached for requests",
                  retry_after=retry_after, retry_after_ms=retry_after_ms)


def quota_exhausted() -> Reply:
    return status(429, error_code="insufficient_quota",
                  message="You exceeded your current quota, please check your plan and billing details.")


def server_error() -> Reply:
    return status(500, message="The server had an error while processing your request.")


def truncated() -> Reply:
    return Reply("truncated")


def schema_breaking(mode: str) -> Reply:
    """Return a reply that is valid JSON but breaks the response schema: `missing` or `extra` field."""
    if mode not in ("missing", "extra"):
        raise ValueError(f"schema_breaking mode {mode!r} is unknown; use 'missing' or 'extra'")
    return Reply("schema_breaking", content=mode)


def ungrounded() -> Reply:
    return Reply("ungrounded")


def refusal() -> Reply:
    return Reply("refusal")


def non_json_body() -> Reply:
    """Return a reply whose HTTP 200 body is not JSON, as from a misconfigured proxy."""
    return Reply("non_json_body")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stub received it; `received_at` is on time.monotonic()."""

    received_at: float
    headers: dict[str, str]
    body: dict

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]

    def content(self, role: str) -> str:
        return next(message["content"] for message in self.messages if message["role"] == role)


class LLMStub:
    """The stub server; `base_url` is set once `start` has run."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.usages: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.default_reply = ok()
        self._outage_reply: Reply | None = None
        self._outage_until = 0.0
        self._replies: collections.deque[Reply] = collections.deque()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self._replies.extend(replies)

    def outage(self, reply: Reply, duration_s: float) -> None:
        """Send `reply` to every unscripted request for the next `duration_s` seconds, then the default reply again."""
        self._outage_reply = reply
        self._outage_until = time.monotonic() + duration_s

    def reset(self) -> None:
        """Forget the script, the outage and the recorded requests, and release hanging requests."""
        self._replies.clear()
        self.requests.clear()
        self.usages.clear()
        self.max_in_flight = 0
        self.default_reply = ok()
        self._outage_reply = None
        self._release.set()
        self._release = asyncio.Event()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, shutdown_timeout=0.5)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._reply(request)
        finally:
            self.in_flight -= 1

    def _next_reply(self) -> Reply:
        if self._replies:
            return self._replies.popleft()
        if self._outage_reply is not None and time.monotonic() < self._outage_until:
            return self._outage_reply
        return self.default_reply

    async def _reply(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(RecordedRequest(time.monotonic(), dict(request.headers), body))
        reply = self._next_reply()
        if reply.behaviour == "hang":
            await self._release.wait()
            return web.Response(status=503)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.behaviour == "status":
            return web.json_response({"error": reply.error}, status=reply.status, headers=reply.headers)
        if reply.behaviour == "non_json_body":
            return web.Response(text="upstream connect error", content_type="application/json")
        completion = completion_body(body, reply, len(self.requests))
        self.usages.append(completion["usage"])
        return web.json_response(completion)


def completion_body(request_body: dict, reply: Reply, number: int) -> dict:
    """Build the chat.completion object that `reply` scripts for `request_body`."""
    output = reply.output if reply.output is not None else grounded_output(request_body)
    content = reply.content if reply.content is not None else json.dumps(output, ensure_ascii=False)
    finish_reason = "stop"
    refusal_text = None
    if reply.behaviour == "truncated":
        content = content[: len(content) // 2]
        finish_reason = "length"
    elif reply.behaviour == "schema_breaking":
        broken = dict(output)
        if reply.content == "missing":
            del broken["summary"]
        else:
            broken["password"] = "hunter2"
        content = json.dumps(broken)
    elif reply.behaviour == "ungrounded":
        broken = dict(output)
        broken["interests"] = [dict(interest, evidence=[NEVER_PRODUCED_EVENT_ID]) for interest in output["interests"]]
        content = json.dumps(broken)
    elif reply.behaviour == "refusal":
        content = None
        refusal_text = "I'm sorry, I can't help with that request."
    prompt_chars = sum(len(message["content"]) for message in request_body["messages"])
    completion_chars = len(content or refusal_text)
    return {
        "id": f"chatcmpl-stub-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request_body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": refusal_text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        # A rough count (four characters per token), enough to check that usage is read.
        "usage": {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": completion_chars // 4 + 1,
            "total_tokens": prompt_chars // 4 + completion_chars // 4 + 2,
        },
    }


def grounded_output(request_body: dict) -> dict:
    """Build a model output that cites only the topics and event ids found in the user message."""
    user_content = next(message["content"] for message in request_body["messages"] if message["role"] == "user")
    data = json.loads(user_content)
    interests = [
        {"topic": interest["topic"], "weight": interest["weight"], "evidence": interest["evidence"][:3]}
        for interest in data["interests"][:5]
    ]
    posts = data["posts"]
    traits = []
    if posts:
        traits.append({"trait": "shares technical observations", "confidence": 0.6, "evidence": [posts[-1]["event_id"]]})
    topics = ", ".join(interest["topic"] for interest in interests[:3]) or "a few subjects"
    return {"interests": interests, "traits": traits, "summary": f"Writes mostly about {topics}.", "confidence": 0.55}


def build_test_request(texts: Sequence[str] = DEFAULT_POSTS, *, user_id: str = "user-1", version: int = 1,
                       hashtags: tuple[str, ...] = ("python", "kafka"), lang: str = "en") -> dict:
    """Build a generation request by applying one PostEvent per text to a new user state.

    Every third post is a reply, and posts are one hour apart from BASE_TIME on.
    """
    state = user_state.new_state(user_id)
    for index, text in enumerate(texts):
        event = PostEvent(
            event_id=f"{user_id}-post-event-{index}",
            user_id=user_id,
            post_id=f"{user_id}-post-{index}",
            created_at=BASE_TIME + timedelta(hours=index),
            text=text,
            lang=lang,
            hashtags=hashtags,
            reply_to_post_id=f"other-post-{index}" if index % 3 == 2 else None,
        )
        user_state.apply_post(state, event)
    return features.build_request(state, version, ("new_user",))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llm_stub_server():
    stub = LLMStub()
    await stub.start()
    yield stub
    await stub.close()


@pytest.fixture
def llm_stub(llm_stub_server: LLMStub) -> LLMStub:
    """The session's stub server with an empty script and no recorded requests."""
    llm_stub_server.reset()
    return llm_stub_server
