"""A second worker joins during a replay, so partitions move while their records are in flight.

The first worker is busy with a backlog when the second one starts: records it has processed
but not committed yet move to the second worker with their partition, which processes them
again after recovering the state from the changelog. Every user's `events_applied` must still
equal the number of the user's distinct events in the input. Only post events are used (one
input topic), so those counts follow from the replayed file alone.
"""

from __future__ import annotations

import pytest_asyncio

from stream.replay import replay
from stream.services.ports import free_port
from stream.worker import prepare
from tests.delivery_checks import (
    bundled_posts,
    check_topic_matches_postgres,
    create_database,
    distinct_events_per_user,
    drop_database,
    events_processed,
    metric_sum,
    read_postgres,
    read_profile_topic,
    read_user_states,
    run_until_caught_up,
    wait_for,
    write_lines,
)
from tests.worker_harness import WorkerProcess, isolated_settings

PARTITIONS = 4
# The second worker starts once the first has processed this many of the about 5000 posts.
JOIN_AFTER_EVENTS = 500


@pytest_asyncio.fixture(scope="module")
async def rebalanced_run(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rebalance")
    posts = bundled_posts()
    dsn = await create_database(postgres_dsn)
    settings = isolated_settings(kafka_bootstrap, dsn, workdir / "first", partitions=PARTITIONS)
    second_settings = settings.model_copy(update={"http_port": free_port(), "data_dir": str(workdir / "second" / "worker-data")})
    await prepare(settings)
    await replay(write_lines(workdir / "posts.jsonl", posts), settings, progress=False)

    first = WorkerProcess(settings, workdir / "first.log").start()
    second = None
    try:
        await wait_for(lambda: events_processed(first) >= JOIN_AFTER_EVENTS, timeout_s=180,
                       description=f"processing of {JOIN_AFTER_EVENTS} records")
        processed_at_join = events_processed(first)
        second = await run_until_caught_up(second_settings, workdir / "second.log")
        first.check_alive()
        samples = [first.metrics(), second.metrics()]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    run = {
        "posts": posts,
        "samples": samples,
        "stored": await read_postgres(dsn),
        "topic": await read_profile_topic(settings),
        "states": await read_user_states(settings),
    }
    applied = [metric_sum(worker, "profilestream_events_total", outcome="applied") for worker in samples]
    duplicates = [metric_sum(worker, "profilestream_events_total", outcome="duplicate") for worker in samples]
    rebalances = [metric_sum(worker, "profilestream_kafka_rebalances_total") for worker in samples]
    print(f"rebalance: processed_at_join={processed_at_join:.0f} applied={applied} duplicates={duplicates}"
          f" rebalances={rebalances} topic_duplicates={run['topic'].duplicates} topic_ignored={run['topic'].ignored}")
    yield run
    await drop_database(postgres_dsn, dsn)


async def test_both_workers_processed_events(rebalanced_run):
    for samples in rebalanced_run["samples"]:
        assert metric_sum(samples, "profilestream_events_total") > 0


async def test_second_worker_took_partitions(rebalanced_run):
    _, second = rebalanced_run["samples"]
    assert metric_sum(second, "profilestream_kafka_assigned_partitions") > 0


async def test_events_applied_once_per_user(rebalanced_run):
    expected = distinct_events_per_user(rebalanced_run["posts"])
    assert {user_id: state["events_applied"] for user_id, state in rebalanced_run["states"].items()} == dict(expected)


async def test_post_totals_once_per_user(rebalanced_run):
    expected = distinct_events_per_user(rebalanced_run["posts"])
    assert {user_id: state["totals"]["posts"] for user_id, state in rebalanced_run["states"].items()} == dict(expected)


async def test_topic_matches_postgres(rebalanced_run):
    check_topic_matches_postgres(rebalanced_run["stored"], rebalanced_run["topic"])


async def test_latest_versions_reach_postgres(rebalanced_run):
    decided = {user_id: state["profile"]["version"] for user_id, state in rebalanced_run["states"].items()
               if state["profile"]["version"] > 0}
    stored = {user_id: version for user_id, (version, _) in rebalanced_run["stored"].current.items()}
    assert stored == decided
