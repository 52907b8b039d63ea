"""Smoke test of bench.memory's in-process pipeline on a slice of the bundled data: structure, not memory."""

from bench import memory
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl
from stream.settings import load_settings

SLICE = 600


def slice_lines() -> list[bytes]:
    lines = []
    for _, line in read_jsonl(bundled_data_path()):
        lines.append(line)
        if len(lines) == SLICE:
            break
    return lines


def test_copies_get_new_post_ids():
    documents = list(memory.fresh_post_copies(slice_lines(), 2))
    assert len(documents) == 2 * SLICE
    first, second = documents[0], documents[SLICE]
    assert first["post_id"] != second["post_id"]
    assert first["post_id"].rsplit(":", 1)[0] == second["post_id"].rsplit(":", 1)[0]
    likes = [document for document in documents if document["schema"] == "like.v1"]
    assert likes
    assert all(document["post_id"].endswith(document["event_id"].rsplit(":", 1)[1]) for document in likes)


async def test_pipeline_joins_likes_and_expires_posts():
    settings = load_settings(post_index_retention_s=24 * 3600.0)
    pipeline = memory.LocalPipeline(settings, partitions=2)
    documents = list(memory.fresh_post_copies(slice_lines(), 2))
    records = [memory.input_record(settings, document, 2, offset) for offset, document in enumerate(documents)]
    for start in range(0, len(records), 100):
        await pipeline.feed(records[start:start + 100])
    assert pipeline.dead_letters == 0
    assert len(pipeline.states) > 0
    posts = sum(1 for document in documents if document["schema"] == "post.v1")
    assert 0 < len(pipeline.posts) < posts
    assert pipeline.audience_records == []
    assert pipeline.index_records == []
