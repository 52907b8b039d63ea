"""The generation stage with erasure requests and profiles the producer rejects for their size."""

import orjson
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from faust.exceptions import ProducerSendError
from prometheus_client import REGISTRY

from handlers.errors import InvalidRecord, SinkUnavailable
from stream import generate
from stream.generate import GenerationStage
from stream.records import Record

DELETED_AT = 1_717_218_000.0


class EchoGenerator:
    async def generate(self, request: dict) -> tuple[dict, str]:
        return {"user_id": request["user_id"], "version": request["version"], "generator": "rules"}, "rules"


class LoggingSink:
    """Record writes and erasures in one shared log, in call order."""

    def __init__(self, name: str, log: list[tuple], erase_failures: list[Exception] | None = None) -> None:
        self.name = name
        self.log = log
        self.erase_failures = list(erase_failures or [])

    async def write(self, profiles: list[dict]) -> int:
        for profile in profiles:
            self.log.append((self.name, "write", profile["user_id"], profile["version"]))
        return len(profiles)

    async def erase(self, user_id: str) -> None:
        if self.erase_failures:
            raise self.erase_failures.pop(0)
        self.log.append((self.name, "erase", user_id))


def record(message: dict) -> Record:
    return Record("regenerate", 0, 0, message["user_id"].encode(), orjson.dumps(message))


def regenerate(user_id: str, version: int, erased_at: float | None = None) -> Record:
    message = {"user_id": user_id, "version": version}
    if erased_at is not None:
        message["erased_at"] = erased_at
    return record(message)


def erase(user_id: str, deleted_at: float = DELETED_AT) -> Record:
    return record({"action": "erase", "user_id": user_id, "event_id": "d1", "deleted_at": deleted_at})


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_erasure_drops_older_request_in_batch():
    log: list[tuple] = []
    stage = GenerationStage(EchoGenerator(), [LoggingSink("postgres", log), LoggingSink("topic", log)])
    dropped_before = counter("profilestream_generations_total", generator="none", outcome="erased")
    profiles = await stage.handle_batch([regenerate("u1", 3), regenerate("u2", 1), erase("u1")])
    assert [profile["user_id"] for profile in profiles] == ["u2"]
    assert ("postgres", "erase", "u1") in log
    assert ("topic", "erase", "u1") in log
    assert not [entry for entry in log if entry[1] == "write" and entry[2] == "u1"]
    assert counter("profilestream_generations_total", generator="none", outcome="erased") == dropped_before + 1


async def test_request_after_erasure_generated_after_it():
    log: list[tuple] = []
    stage = GenerationStage(EchoGenerator(), [LoggingSink("topic", log)])
    batch = [regenerate("u1", 5), erase("u1"), regenerate("u1", 1, erased_at=DELETED_AT), regenerate("u1", 4)]
    profiles = await stage.handle_batch(batch)
    assert [(profile["user_id"], profile["version"]) for profile in profiles] == [("u1", 1)]
    assert log == [("topic", "erase", "u1"), ("topic", "write", "u1", 1)]


async def test_later_erasure_drops_recreated_request():
    log: list[tuple] = []
    stage = GenerationStage(EchoGenerator(), [LoggingSink("topic", log)])
    batch = [regenerate("u1", 1, erased_at=DELETED_AT), erase("u1", DELETED_AT + 60)]
    assert await stage.handle_batch(batch) == []
    assert log == [("topic", "erase", "u1")]


async def test_erasure_retried_until_sink_recovers(monkeypatch):
    monkeypatch.setattr(generate, "RETRY_INITIAL_S", 0.001)
    log: list[tuple] = []
    flaky = LoggingSink("postgres", log, erase_failures=[SinkUnavailable("down"), SinkUnavailable("still down")])
    stage = GenerationStage(EchoGenerator(), [flaky])
    retries_before = counter("profilestream_erasures_total", sink="postgres", outcome="retry")
    await stage.handle_batch([erase("u1")])
    assert log == [("postgres", "erase", "u1")]
    assert counter("profilestream_erasures_total", sink="postgres", outcome="retry") == retries_before + 2


async def test_rejected_erasure_still_erases_other_sinks():
    log: list[tuple] = []
    broken = LoggingSink("postgres", log, erase_failures=[InvalidRecord("invalid_profile", "rejected by the test sink")])
    stage = GenerationStage(EchoGenerator(), [broken, LoggingSink("topic", log)])
    rejected_before = counter("profilestream_erasures_total", sink="postgres", outcome="rejected")
    await stage.handle_batch([erase("u1")])
    assert log == [("topic", "erase", "u1")]
    assert counter("profilestream_erasures_total", sink="postgres", outcome="rejected") == rejected_before + 1


async def test_malformed_erasure_request_skipped():
    stage = GenerationStage(EchoGenerator(), [LoggingSink("topic", [])])
    bad = Record("regenerate", 0, 0, b"u1", b'{"action": "erase", "user_id": "u1"}')
    invalid_before = counter("profilestream_generations_total", generator="none", outcome="invalid_request")
    assert await stage.handle_batch([bad, regenerate("u1", 1)]) == [{"user_id": "u1", "version": 1, "generator": "rules"}]
    assert counter("profilestream_generations_total", generator="none", outcome="invalid_request") == invalid_before + 1


class SizeLimitedSink:
    """Reject one user's profile the way Faust's producer does when a record is over max_request_size."""

    name = "topic"

    def __init__(self, too_large_user: str) -> None:
        self.too_large_user = too_large_user
        self.written: list[str] = []

    async def write(self, profiles: list[dict]) -> int:
        for profile in profiles:
            if profile["user_id"] == self.too_large_user:
                try:
                    raise MessageSizeTooLargeError("The message is 2000000 bytes when serialized")
                except MessageSizeTooLargeError as exc:
                    raise ProducerSendError(f"Error while sending: {exc!r}") from exc
            self.written.append(profile["user_id"])
        return len(profiles)

    async def erase(self, user_id: str) -> None: ...


async def test_producer_size_error_rejects_one_profile():
    sink = SizeLimitedSink("u2")
    stage = GenerationStage(EchoGenerator(), [sink])
    rejected_before = counter("profilestream_sink_writes_total", sink="topic", outcome="rejected")
    profiles = await stage.handle_batch([regenerate("u1", 1), regenerate("u2", 1), regenerate("u3", 1)])
    assert sorted(profile["user_id"] for profile in profiles) == ["u1", "u3"]
    assert sorted(sink.written) == ["u1", "u3"]
    assert counter("profilestream_sink_writes_total", sink="topic", outcome="rejected") == rejected_before + 1


async def test_other_producer_error_propagates():
    class FailingSink(SizeLimitedSink):
        async def write(self, profiles: list[dict]) -> int:
            raise ProducerSendError("Error while sending: KafkaTimeoutError()")

    stage = GenerationStage(EchoGenerator(), [FailingSink("u1")])
    with pytest.raises(ProducerSendError):
        await stage.handle_batch([regenerate("u1", 1)])
