"""The worker with an LLM endpoint: validated model profiles, and fallback on broken replies."""

from __future__ import annotations

from pathlib import Path

import pytest_asyncio

import schemas
from handlers.sinks.postgres import PostgresSink
from stream.importers import jsonl, stackexchange
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.worker import prepare
from tests.llm_stub import TEST_API_KEY, llm_stub_server, schema_breaking, truncated  # noqa: F401 (fixture)
from tests.worker_harness import WorkerProcess, isolated_settings

FIXTURE = Path(__file__).parent / "fixtures" / "stackexchange"
MODEL = "stub-model"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def profiles(kafka_bootstrap, module_database, llm_stub_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("llm-end-to-end")
    llm_stub_server.reset()
    llm_stub_server.script(schema_breaking("extra"), truncated())
    settings = isolated_settings(
        kafka_bootstrap, module_database, workdir,
        llm_base_url=llm_stub_server.base_url, llm_model=MODEL, llm_api_key=TEST_API_KEY,
        llm_timeout_s=10.0, generation_concurrency=1, min_events_new_user=2,
    )
    events, _ = stackexchange.convert(FIXTURE)
    events_path = workdir / "events.jsonl"
    jsonl.write_jsonl(events, events_path)
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    try:
        await wait_until_caught_up(settings, timeout_s=180, on_poll=lambda *_: worker.check_alive())
    finally:
        worker.stop()
    sink = PostgresSink(module_database, pool_max=1)
    await sink.start()
    try:
        current = await sink.fetch_top(1000)
        history = [row for profile in current for row in await sink.fetch_history(profile["user_id"])]
    finally:
        await sink.close()
    yield {"current": current, "history": history, "requests": len(llm_stub_server.requests), "log": worker.log_tail(200)}


async def test_model_profiles_validated(profiles):
    model_made = [profile for profile in profiles["history"] if profile["generator"] == MODEL]
    assert len(model_made) >= 3
    for profile in model_made:
        assert list(schemas.validator("profile.v1").iter_errors(profile)) == []
        assert profile["fallback_reason"] is None


async def test_broken_replies_fall_back(profiles):
    fallbacks = sorted(profile["fallback_reason"] for profile in profiles["history"] if profile["generator"] == "rules")
    assert fallbacks == ["schema_invalid", "truncated"]


async def test_every_version_called_model(profiles):
    assert profiles["requests"] == len(profiles["history"])


async def test_api_key_never_logged(profiles):
    assert TEST_API_KEY not in profiles["log"]
