"""The ingest stage with user_deleted events and oversized records, on an in-memory table."""

from datetime import UTC, datetime

import orjson

from handlers.errors import InvalidRecord
from stream.dead_letters import DEAD_LETTER_VALUE_MAX_BYTES, ORIGINAL_BYTES_HEADER, bounded_copy
from stream.ingest import IngestStage
from stream.records import Record
from stream.settings import load_settings

NOW = datetime(2025, 1, 1, tzinfo=UTC)


class RecordingEmitter:
    def __init__(self) -> None:
        self.dead_letters: list[tuple[Record, InvalidRecord]] = []
        self.regenerations: list[tuple[str, dict]] = []

    async def dead_letter(self, record: Record, error: InvalidRecord) -> None:
        self.dead_letters.append((record, error))

    async def audience(self, user_id: str, message: dict) -> None: ...

    async def regenerate(self, user_id: str, request: dict) -> None:
        self.regenerations.append((user_id, request))

    async def post_index(self, post_id: str, message: dict) -> None: ...


def post(n: int, hour: int, user: str = "u1") -> Record:
    document = {"schema": "post.v1", "event_id": f"{user}:e{n}", "user_id": user, "post_id": f"{user}:p{n}",
                "created_at": f"2024-06-01T{hour:02d}:00:00Z", "text": "qubits", "tags": ["qiskit"]}
    return Record("posts", 0, n, user.encode(), orjson.dumps(document))


def user_deleted(hour: int, event_id: str = "d1", user: str = "u1") -> Record:
    document = {"schema": "user_deleted.v1", "event_id": event_id, "user_id": user,
                "deleted_at": f"2024-06-01T{hour:02d}:00:00Z"}
    return Record("users", 0, 0, user.encode(), orjson.dumps(document))


def audience(hour: int, user: str = "u1") -> Record:
    message = {"kind": "followed", "user_id": user, "event_id": f"f{hour}", "at": datetime(2024, 6, 1, hour, tzinfo=UTC).timestamp(), "step": 1}
    return Record("profilestream-audience", 0, 0, user.encode(), orjson.dumps(message))


def make_stage(**overrides) -> tuple[IngestStage, dict, RecordingEmitter]:
    table: dict[str, dict] = {}
    emitter = RecordingEmitter()
    stage = IngestStage(load_settings(min_events_new_user=2, **overrides), table, emitter, clock=lambda: NOW)
    return stage, table, emitter


async def test_deletion_replaces_state_with_marker():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), post(2, 2), post(3, 3, user="u2")])
    outcomes = await stage.handle_batch([user_deleted(5)])
    assert outcomes == ["applied"]
    assert table["u1"] == {"user_id": "u1", "erased": {"deleted_at": datetime(2024, 6, 1, 5, tzinfo=UTC).timestamp(), "event_id": "d1"}}
    assert table["u2"]["events_applied"] == 1
    user_id, request = emitter.regenerations[-1]
    assert user_id == "u1"
    assert request["action"] == "erase"
    assert request["event_id"] == "d1"


async def test_old_events_after_deletion_dropped():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), post(2, 2), user_deleted(5)])
    marker = dict(table["u1"])
    requests_before = len(emitter.regenerations)
    outcomes = await stage.handle_batch([post(1, 1), post(2, 2), post(3, 5), audience(4), audience(9)])
    assert outcomes == ["user_erased"] * 5
    assert table["u1"] == marker
    assert len(emitter.regenerations) == requests_before


async def test_newer_event_recreates_user():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), post(2, 2), user_deleted(5)])
    outcomes = await stage.handle_batch([post(3, 6), post(4, 7)])
    assert outcomes == ["applied", "applied"]
    assert table["u1"]["events_applied"] == 2
    user_id, request = emitter.regenerations[-1]
    assert request["version"] == 1
    assert request["reasons"] == ["new_user"]
    assert request["erased_at"] == datetime(2024, 6, 1, 5, tzinfo=UTC).timestamp()


async def test_replayed_deletion_does_nothing():
    stage, table, emitter = make_stage()
    await stage.handle_batch([post(1, 1), user_deleted(5)])
    marker = dict(table["u1"])
    requests_before = len(emitter.regenerations)
    assert await stage.handle_batch([user_deleted(5)]) == ["duplicate"]
    assert await stage.handle_batch([user_deleted(3, event_id="d0")]) == ["duplicate"]
    assert table["u1"] == marker
    assert len(emitter.regenerations) == requests_before


async def test_deletion_in_same_batch_as_events():
    stage, table, emitter = make_stage()
    outcomes = await stage.handle_batch([post(1, 1), post(2, 2), user_deleted(5), post(1, 1), post(3, 6)])
    assert outcomes == ["applied", "applied", "applied", "user_erased", "applied"]
    assert table["u1"]["events_applied"] == 1
    actions = [request.get("action", "regenerate") for _, request in emitter.regenerations]
    assert actions == ["regenerate", "erase"]


async def test_deletion_with_wrong_key_dead_lettered():
    stage, table, emitter = make_stage()
    record = Record("users", 0, 0, b"u2", user_deleted(5).value)
    assert await stage.handle_batch([record]) == ["dead_letter"]
    assert emitter.dead_letters[0][1].reason == "key_mismatch"
    assert table == {}


async def test_oversized_record_copy_bounded():
    stage, table, emitter = make_stage()
    value = b'{"schema": "post.v1", "text": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    record = Record("posts", 0, 7, b"u1", value)
    assert await stage.handle_batch([record, post(1, 1)]) == ["dead_letter", "applied"]
    [(copy, error)] = emitter.dead_letters
    assert error.reason == "oversized"
    assert str(len(value)) in error.detail
    assert copy.value == value[:DEAD_LETTER_VALUE_MAX_BYTES]
    assert dict(copy.headers)[ORIGINAL_BYTES_HEADER] == str(len(value)).encode()
    assert copy.offset == 7


async def test_event_size_limit_from_settings():
    stage, table, emitter = make_stage(max_event_bytes=1024)
    small = post(1, 1)
    large = Record("posts", 0, 2, b"u1", small.value.replace(b'"qubits"', b'"' + b"q" * 1100 + b'"'))
    assert await stage.handle_batch([small, large]) == ["applied", "dead_letter"]
    assert "1024 bytes" in emitter.dead_letters[0][1].detail


def test_bounded_copy_keeps_small_record():
    record = post(1, 1)
    assert bounded_copy(record) is record


def test_bounded_copy_cuts_value_only():
    record = Record("posts", 1, 2, b"u1", b"y" * 100, headers=(("trace", b"abc"),))
    copy = bounded_copy(record, max_value_bytes=10)
    assert copy.value == b"y" * 10
    assert copy.key == b"u1"
    assert copy.headers == (("trace", b"abc"), (ORIGINAL_BYTES_HEADER, b"100"))
