"""SIGKILL the worker at random points of a replay, restart it each time, and compare with a clean run.

The posts of the bundled data are replayed at a fixed rate while the worker is killed and
restarted KILLS times (20 with PROFILESTREAM_TEST_LONG=1, else 5). A kill lands either at a
random time after the start (start-up, table recovery, joining the group) or at a random time
after the worker processed its first record. Then a last worker catches up, and what it left
must equal a clean run of the same data without kills: the profiles in Postgres, and the
events_applied and totals of every user's state in the changelog topic. The profile topic may
hold a version more than once (a crash between the topic write and the Postgres write), but
it must hold exactly the versions Postgres holds.

Only post events are used: they arrive on one topic, so each user's posts are processed in
file order in both runs and the decisions must match exactly. With likes, the order of a
like and the post-index record of the liked post differs between runs, and so would the
versions.

PROFILESTREAM_TEST_SEED fixes the random kill points; the seed in use is printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import pytest_asyncio

from stream.progress import group_lag_when_ready
from stream.replay import replay
from stream.worker import prepare
from tests.delivery_checks import (
    StoredProfiles,
    bundled_posts,
    check_topic_matches_postgres,
    create_database,
    distinct_events_per_user,
    drop_database,
    events_processed,
    kill,
    metric_sum,
    read_postgres,
    read_profile_topic,
    read_user_states,
    run_until_caught_up,
    state_counts,
    write_lines,
)
from tests.worker_harness import WorkerProcess, isolated_settings

LONG = os.environ.get("PROFILESTREAM_TEST_LONG") == "1"
KILLS = 20 if LONG else 5
# Estimated seconds of one kill cycle: start-up, the wait for the dead member's session
# (10 s in isolated_settings) and some processing; 20 s measured on 2 CPUs. The replay rate
# spreads the posts over KILLS cycles, so nearly every restarted worker finds new records.
CYCLE_ESTIMATE_S = 18.0
START_UP_KILL_S = (0.5, 5.0)  # a start-up kill lands this many seconds after the start
PROCESSING_KILL_S = (0.0, 6.0)  # a processing kill lands this long after the first record
FIRST_RECORD_TIMEOUT_S = 60.0  # longer without a record means nothing was left to process

# The module fixture runs both replays, and the suite's default timeout of 300 s is too short for 20 kills.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800 if LONG else 600)]


def versions(stored: StoredProfiles) -> dict[str, int]:
    return {user_id: version for user_id, (version, _) in stored.current.items()}


def interests(stored: StoredProfiles) -> dict[str, list]:
    return {user_id: topics for user_id, (_, topics) in stored.current.items()}


async def clean_run(settings, workdir, posts_path) -> dict:
    await replay(posts_path, settings, progress=False)
    worker = await run_until_caught_up(settings, workdir / "clean.log")
    worker.stop()
    return {
        "stored": await read_postgres(settings.postgres_dsn.get_secret_value()),
        "states": await read_user_states(settings),
    }


async def kill_at_random_point(worker: WorkerProcess, rng: random.Random) -> str:
    """Wait for a random point of the worker's run, SIGKILL it, and return the kind of point."""
    if rng.random() < 0.25:
        await asyncio.sleep(rng.uniform(*START_UP_KILL_S))
        kind = "start_up"
    else:
        deadline = time.monotonic() + FIRST_RECORD_TIMEOUT_S
        while events_processed(worker) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        kind = "processing" if events_processed(worker) > 0 else "idle"
        await asyncio.sleep(rng.uniform(*PROCESSING_KILL_S))
    worker.check_alive()
    kill(worker)
    return kind


async def killed_run(settings, workdir, posts_path, posts_count: int, rng: random.Random) -> dict:
    rate_per_s = posts_count / (KILLS * CYCLE_ESTIMATE_S)
    replaying = asyncio.create_task(replay(posts_path, settings, rate_per_s=rate_per_s, progress=False))
    kinds = []
    lag_at_kill = []
    try:
        for cycle in range(KILLS):
            worker = WorkerProcess(settings, workdir / f"killed-{cycle}.log").start()
            try:
                kinds.append(await kill_at_random_point(worker, rng))
            finally:
                worker.stop()
            lag_at_kill.append((await group_lag_when_ready(settings))[0])
        await replaying
    finally:
        replaying.cancel()
    worker = await run_until_caught_up(settings, workdir / "final.log")
    try:
        samples = worker.metrics()
    finally:
        worker.stop()
    return {
        "kinds": kinds,
        "lag_at_kill": lag_at_kill,
        "samples": samples,
        "stored": await read_postgres(settings.postgres_dsn.get_secret_value()),
        "topic": await read_profile_topic(settings),
        "states": await read_user_states(settings),
    }


@pytest_asyncio.fixture(scope="module")
async def runs(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    seed = int(os.environ.get("PROFILESTREAM_TEST_SEED") or random.randrange(2**32))
    workdir = tmp_path_factory.mktemp("crash-kill")
    posts = bundled_posts()
    posts_path = write_lines(workdir / "posts.jsonl", posts)
    clean_dsn = await create_database(postgres_dsn)
    killed_dsn = await create_database(postgres_dsn)
    clean = isolated_settings(kafka_bootstrap, clean_dsn, workdir / "clean")
    killed = isolated_settings(kafka_bootstrap, killed_dsn, workdir / "killed")
    await prepare(clean)
    await prepare(killed)

    started = time.monotonic()
    # The clean run shares the machine with the killed one; only the end results are compared.
    clean_result, killed_result = await asyncio.gather(
        clean_run(clean, workdir, posts_path),
        killed_run(killed, workdir, posts_path, len(posts), random.Random(seed)),
    )
    elapsed_s = time.monotonic() - started
    topic = killed_result["topic"]
    print(f"crash kill: seed={seed} kills={KILLS} kinds={killed_result['kinds']}"
          f" lag_at_kill={killed_result['lag_at_kill']} elapsed_s={elapsed_s:.0f}"
          f" topic_records={sum(topic.copies.values())} topic_duplicates={topic.duplicates}"
          f" topic_ignored={topic.ignored} versions={sum(killed_result['stored'].history.values())}"
          f" resent_in_final_run={metric_sum(killed_result['samples'], 'profilestream_regenerations_resent_total'):.0f}")
    yield {"seed": seed, "posts": posts, "clean": clean_result, "killed": killed_result}
    await drop_database(postgres_dsn, clean_dsn)
    await drop_database(postgres_dsn, killed_dsn)


async def test_every_kill_landed(runs):
    assert len(runs["killed"]["kinds"]) == KILLS


async def test_profile_versions_match_clean_run(runs):
    assert versions(runs["killed"]["stored"]) == versions(runs["clean"]["stored"]), f"seed {runs['seed']}"


async def test_profile_interests_match_clean_run(runs):
    assert interests(runs["killed"]["stored"]) == interests(runs["clean"]["stored"]), f"seed {runs['seed']}"


async def test_topic_matches_postgres(runs):
    check_topic_matches_postgres(runs["killed"]["stored"], runs["killed"]["topic"])


async def test_state_counts_match_clean_run(runs):
    killed = state_counts(runs["killed"]["states"])
    clean = state_counts(runs["clean"]["states"])
    assert killed == clean, f"seed {runs['seed']}"


async def test_state_counts_each_event_once(runs):
    expected = distinct_events_per_user(runs["posts"])
    applied = {user_id: applied for user_id, (applied, _) in state_counts(runs["killed"]["states"]).items()}
    assert applied == dict(expected), f"seed {runs['seed']}"
