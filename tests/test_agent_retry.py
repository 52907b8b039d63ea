"""Agents run a failed batch again instead of letting Faust acknowledge it unprocessed."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from stream import app as faust_app
from stream.records import Record


def retries(agent: str) -> float:
    return REGISTRY.get_sample_value("profilestream_batch_retries_total", {"agent": agent}) or 0.0


async def test_failed_batch_runs_again(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(faust_app, "AGENT_RETRY_INITIAL_S", 0.01)
    calls: list[int] = []

    async def flaky(records: list[Record]) -> None:
        calls.append(len(records))
        if len(calls) < 3:
            raise TypeError("'NoneType' object is not iterable")

    before = retries("post-index")
    records = [Record("post-index", 0, 7, b"p1", b"{}")]
    await faust_app._handle_until_done("post-index", flaky, records)
    assert calls == [1, 1, 1]
    assert retries("post-index") == before + 2


async def test_cancellation_is_not_retried(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(faust_app, "AGENT_RETRY_INITIAL_S", 0.01)
    calls: list[int] = []

    async def cancelled(records: list[Record]) -> None:
        calls.append(1)
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await faust_app._handle_until_done("ingest", cancelled, [])
    assert calls == [1]


def test_table_reads_are_copies():
    backing = {b"u1": {"user_id": "u1", "totals": {"posts": 1}}}
    table = faust_app._StrKeyedTable(backing)
    state = table["u1"]
    state["totals"]["posts"] = 99
    assert backing[b"u1"]["totals"]["posts"] == 1
