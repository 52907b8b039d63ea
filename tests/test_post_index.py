"""The post index joins likes with the liked post's topics, in either arrival order."""

import orjson

from handlers import state as user_state
from stream.post_index import MAX_PENDING_LIKES, PostIndexStage
from stream.records import Record


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
