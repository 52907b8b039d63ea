"""The post index joins likes with the liked post's topics, in either arrival order."""

from datetime import UTC, datetime

import orjson
from prometheus_client import REGISTRY

from handlers import state as user_state
from stream.ingest import IngestStage
from stream.post_index import MAX_PENDING_LIKES, SOURCE_IDLE_S, PostIndexStage
from stream.records import Record
from stream.settings import load_settings


class RecordingEmitter:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    async def audience(self, user_id: str, message: dict) -> None:
        self.sent.append((user_id, message))


def record(offset: int, message: dict) -> Record:
    return Record("post-index", 0, offset, message["post_id"].encode(), orjson.dumps(message))


POST = {"kind": "post", "post_id": "p1", "topics": [["qiskit", 1.0], ["grover", 0.25]]}


def like(n: int) -> dict:
    return {"kind": "like", "post_id": "p1", "user_id": f"u{n}", "event_id": f"l{n}", "at": 1000.0 + n}


async def test_like_after_post_joins():
    emitter = RecordingEmitter()
    stage = PostIndexStage({}, emitter)
    await stage.handle_batch([record(0, POST), record(1, like(1))])
    assert emitter.sent == [("u1", {"kind": "liked_topics", "user_id": "u1", "event_id": "l1", "at": 1001.0,
                                    "step": 1, "topics": POST["topics"]})]


async def test_like_before_post_waits():
    emitter = RecordingEmitter()
    table: dict = {}
    stage = PostIndexStage(table, emitter)
    await stage.handle_batch([record(0, like(1))])
    assert emitter.sent == []
    assert table["p1"]["pending"] == [["u1", "l1", 1001.0]]
    await stage.handle_batch([record(1, POST)])
    assert [user for user, _ in emitter.sent] == ["u1"]
    assert table["p1"]["pending"] == []


async def test_pending_likes_bounded():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter())
    await stage.handle_batch([record(n, like(n)) for n in range(MAX_PENDING_LIKES + 5)])
    assert len(table["p1"]["pending"]) == MAX_PENDING_LIKES


async def test_repeated_pending_like_kept_once():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter())
    await stage.handle_batch([record(0, like(1)), record(1, like(1))])
    assert len(table["p1"]["pending"]) == 1


def test_liked_topics_feed_interests():
    state = user_state.new_state("u1")
    user_state.apply_liked_topics(state, "l1", 1000.0, [("qiskit", 1.0)])
    user_state.apply_liked_topics(state, "l1", 1000.0, [("qiskit", 1.0)])
    [(topic, weight, evidence)] = user_state.top_interests(state, 5)
    assert topic == "qiskit"
    assert weight == user_state.LIKED_TOPIC_FACTOR
    assert evidence == ["l1"]


DAY = 24 * 3600.0
RETENTION_S = 10 * DAY


def at_record(offset: int, message: dict, partition: int = 0) -> Record:
    return Record("post-index", partition, offset, message["post_id"].encode(), orjson.dumps(message))


def post_at(post_id: str, at: float, topics=(("qiskit", 1.0),)) -> dict:
    return {"kind": "post", "post_id": post_id, "topics": [list(topic) for topic in topics], "at": at}


def like_at(post_id: str, n: int, at: float) -> dict:
    return {"kind": "like", "post_id": post_id, "user_id": f"u{n}", "event_id": f"l{n}", "at": at}


def counter(kind: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("profilestream_post_index_records_total", {"kind": kind, "outcome": outcome}) or 0.0


async def test_like_of_expired_post_gets_no_topics():
    emitter = RecordingEmitter()
    table: dict = {}
    stage = PostIndexStage(table, emitter, retention_s=RETENTION_S)
    expired_before = counter("post", "expired")
    await stage.handle_batch([at_record(0, post_at("p1", 0.0))])
    await stage.handle_batch([at_record(1, post_at("p2", 11 * DAY)), at_record(2, like_at("p2", 1, 11 * DAY))])
    assert "p1" not in table
    assert counter("post", "expired") == expired_before + 1
    emitter.sent.clear()
    await stage.handle_batch([at_record(3, like_at("p1", 2, 11 * DAY))])
    assert emitter.sent == []


async def test_post_within_retention_joins():
    emitter = RecordingEmitter()
    stage = PostIndexStage({}, emitter, retention_s=RETENTION_S)
    await stage.handle_batch([at_record(0, post_at("p1", 2 * DAY))])
    await stage.handle_batch([at_record(1, post_at("p2", 11 * DAY)), at_record(2, like_at("p1", 1, 11 * DAY))])
    assert [user for user, _ in emitter.sent] == ["u1"]


async def test_slower_kind_holds_horizon_back():
    emitter = RecordingEmitter()
    table: dict = {}
    stage = PostIndexStage(table, emitter, retention_s=RETENTION_S)
    # Posts are read 30 days ahead of likes, as during a catch-up.
    await stage.handle_batch([at_record(0, post_at("p1", 0.0)), at_record(1, like_at("p0", 0, 0.0)),
                              at_record(2, post_at("p2", 30 * DAY))])
    assert "p1" in table
    await stage.handle_batch([at_record(3, like_at("p1", 1, 1 * DAY))])
    assert [user for user, _ in emitter.sent] == ["u1"]


async def test_partitions_expire_separately():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S)
    await stage.handle_batch([at_record(0, post_at("p1", 0.0), partition=0), at_record(0, like_at("p3", 1, 0.0), partition=0)])
    await stage.handle_batch([at_record(1, post_at("p2", 0.0), partition=1),
                              at_record(2, post_at("p4", 30 * DAY), partition=1),
                              at_record(3, like_at("p4", 2, 30 * DAY), partition=1)])
    assert "p1" in table
    assert "p2" not in table


async def test_waiting_likes_expire():
    emitter = RecordingEmitter()
    table: dict = {}
    stage = PostIndexStage(table, emitter, retention_s=RETENTION_S)
    expired_before = counter("like", "expired")
    await stage.handle_batch([at_record(0, like_at("p1", 1, 0.0)), at_record(1, like_at("p1", 2, 1 * DAY))])
    assert table["p1"]["at"] == 1 * DAY
    await stage.handle_batch([at_record(2, post_at("p2", 12 * DAY)), at_record(3, like_at("p2", 3, 12 * DAY))])
    assert "p1" not in table
    assert counter("like", "expired") == expired_before + 2
    emitter.sent.clear()
    await stage.handle_batch([at_record(4, post_at("p1", 0.0))])
    assert emitter.sent == []
    assert "p1" not in table


async def test_entries_without_time_stamped_then_expire():
    table: dict = {"old": {"topics": [["qiskit", 1.0]], "pending": []}}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S)
    await stage.handle_batch([at_record(0, post_at("p1", 5 * DAY)), at_record(1, like_at("p1", 1, 5 * DAY))])
    assert table["old"]["at"] == 5 * DAY
    await stage.handle_batch([at_record(2, post_at("p2", 14 * DAY)), at_record(3, like_at("p2", 2, 14 * DAY))])
    assert "old" in table
    await stage.handle_batch([at_record(4, post_at("p3", 16 * DAY)), at_record(5, like_at("p3", 3, 16 * DAY))])
    assert "old" not in table


async def test_post_record_without_time_stamped():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S)
    await stage.handle_batch([at_record(0, like_at("p0", 0, 3 * DAY)), at_record(1, POST)])
    assert table["p1"]["at"] == 3 * DAY
    assert table["p1"]["partition"] == 0


async def test_malformed_records_dropped():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S)
    dropped_before = counter("invalid", "dropped")
    timeless_like = {"kind": "like", "post_id": "p1", "user_id": "u1", "event_id": "l1"}
    await stage.handle_batch([at_record(0, timeless_like), at_record(1, {"kind": "boost", "post_id": "p1"}),
                              Record("post-index", 0, 2, b"p1", b"[1, 2]")])
    assert counter("invalid", "dropped") == dropped_before + 3
    assert table == {}


async def test_table_bounded_over_long_stream():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=30 * DAY)
    interval = 1800.0
    posts_in_retention = int(30 * DAY / interval)
    largest = 0
    for start in range(0, 20_000, 100):
        records = []
        for n in range(start, start + 100):
            records.append(at_record(n, post_at(f"p{n}", n * interval)))
            if n % 3 == 0:
                records.append(at_record(n, like_at(f"p{max(0, n - 50)}", n, n * interval)))
        await stage.handle_batch(records)
        largest = max(largest, len(table))
    assert largest <= 2 * posts_in_retention
    assert len(table) >= posts_in_retention


async def test_ingest_sends_time_and_source():
    class Collecting(RecordingEmitter):
        def __init__(self) -> None:
            super().__init__()
            self.indexed: list[dict] = []

        async def dead_letter(self, record, error) -> None: ...

        async def regenerate(self, user_id, request) -> None: ...

        async def post_index(self, post_id: str, message: dict) -> None:
            self.indexed.append(message)

    emitter = Collecting()
    stage = IngestStage(load_settings(), {}, emitter, clock=lambda: datetime(2025, 1, 1, tzinfo=UTC))
    document = {"schema": "post.v1", "event_id": "e1", "user_id": "u1", "post_id": "p1",
                "created_at": "2024-06-01T12:00:00Z", "text": "qubits", "tags": ["qiskit"]}
    await stage.handle_batch([Record("posts", 3, 0, b"u1", orjson.dumps(document))])
    assert emitter.indexed == [{"kind": "post", "post_id": "p1", "topics": [["qiskit", 1.0], ["qubits", 0.25]],
                                "at": datetime(2024, 6, 1, 12, tzinfo=UTC).timestamp(), "source": 3}]


async def test_expired_post_counted_once():
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S)
    await stage.handle_batch([at_record(0, post_at("p2", 12 * DAY)), at_record(1, like_at("p2", 1, 12 * DAY))])
    expired_before = counter("post", "expired")
    indexed_before = counter("post", "indexed")
    await stage.handle_batch([at_record(2, post_at("p1", 0.0))])
    assert counter("post", "expired") == expired_before + 1
    assert counter("post", "indexed") == indexed_before
    assert "p1" not in table


def from_source(message: dict, source: int) -> dict:
    return {**message, "source": source}


async def test_slower_source_holds_horizon_back():
    emitter = RecordingEmitter()
    table: dict = {}
    stage = PostIndexStage(table, emitter, retention_s=RETENTION_S)
    # Input partition 1 of the posts topic is read 30 days behind input partition 0.
    await stage.handle_batch([at_record(0, from_source(post_at("p1", 0.0), 1)),
                              at_record(1, from_source(post_at("p2", 30 * DAY), 0))])
    assert "p1" in table
    await stage.handle_batch([at_record(2, from_source(like_at("p1", 1, 1 * DAY), 1))])
    assert [user for user, _ in emitter.sent] == ["u1"]


async def test_idle_source_stops_holding_horizon():
    now = [0.0]
    table: dict = {}
    stage = PostIndexStage(table, RecordingEmitter(), retention_s=RETENTION_S, clock=lambda: now[0])
    await stage.handle_batch([at_record(0, from_source(post_at("p1", 0.0), 1))])
    now[0] = SOURCE_IDLE_S / 2
    await stage.handle_batch([at_record(1, from_source(post_at("p2", 30 * DAY), 0))])
    assert "p1" in table
    now[0] = SOURCE_IDLE_S + 1
    await stage.handle_batch([at_record(2, from_source(post_at("p3", 30 * DAY), 0))])
    assert "p1" not in table
