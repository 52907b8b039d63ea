"""SIGKILL between the Postgres write of a profile and the offset commit of its request.

The worker kills itself at the `after_postgres_write` crash point (stream/faults.py): the
version is in Postgres and on the profile topic, and its regeneration request is not
committed. After a restart the request is consumed again, the generation stage finds the
version stored and skips it, so the topic gets no second copy.

One generation at a time (PROFILESTREAM_GENERATION_CONCURRENCY=1), so at the crash no other
profile is half written, and the topic must end with exactly one record per version. Only
post events are used, so each user's state can be compared with the input.
"""

from __future__ import annotations

import re
import signal
import subprocess

import orjson
import pytest
import pytest_asyncio

from stream.faults import CRASH_AT_VARIABLE
from stream.replay import replay
from stream.worker import prepare
from tests.delivery_checks import (
    bundled_posts,
    check_topic_matches_postgres,
    committed_offsets,
    create_database,
    distinct_events_per_user,
    drop_database,
    metric_sum,
    read_postgres,
    read_profile_topic,
    read_topic,
    read_user_states,
    run_until_caught_up,
    write_lines,
)
from tests.worker_harness import WorkerProcess, isolated_settings

# The fifth profile write: early in the run, with more requests waiting behind it.
CRASH_HIT = 5
CRASH_TIMEOUT_S = 180
CRASH_LINE = re.compile(r"fault\.crash_point point=after_postgres_write hit=\d+ user_id=(\S+) version=(\d+)")


async def request_position(settings, user_id: str, version: int) -> tuple[int, int]:
    """Return (partition, offset) of the first regeneration request for `version` of `user_id`."""
    for record in await read_topic(settings.kafka_bootstrap_servers, settings.topic_regenerate):
        request = orjson.loads(record.value)
        if request.get("user_id") == user_id and request.get("version") == version:
            return record.partition, record.offset
    raise AssertionError(f"no regeneration request for version {version} of {user_id} on {settings.topic_regenerate}")


@pytest_asyncio.fixture(scope="module")
async def crashed_run(kafka_bootstrap, postgres_dsn, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crash-point")
    posts = bundled_posts()
    dsn = await create_database(postgres_dsn)
    settings = isolated_settings(kafka_bootstrap, dsn, workdir, generation_concurrency=1)
    await prepare(settings)
    await replay(write_lines(workdir / "posts.jsonl", posts), settings, progress=False)

    first = WorkerProcess(settings, workdir / "crash.log", extra_env={CRASH_AT_VARIABLE: f"after_postgres_write:{CRASH_HIT}"})
    first.start()
    try:
        status = first.process.wait(CRASH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not reach the crash point within {CRASH_TIMEOUT_S} s:\n{first.log_tail()}")
    finally:
        first.stop()
    crash_log = first.log_path.read_text(errors="replace")
    match = CRASH_LINE.search(crash_log)
    assert match is not None, f"no fault.crash_point line; worker exited with {status}:\n{first.log_tail()}"
    crashed = (match.group(1), int(match.group(2)))
    partition, offset = await request_position(settings, *crashed)
    at_crash = {
        "committed": (await committed_offsets(settings, settings.topic_regenerate))[partition],
        "stored": await read_postgres(dsn),
        "topic": await read_profile_topic(settings),
    }

    second = await run_until_caught_up(settings, workdir / "restart.log")
    try:
        samples = second.metrics()
    finally:
        second.stop()
    run = {
        "posts": posts,
        "status": status,
        "crashed": crashed,
        "request_offset": offset,
        "at_crash": at_crash,
        "committed_after": (await committed_offsets(settings, settings.topic_regenerate))[partition],
        "samples": samples,
        "stored": await read_postgres(dsn),
        "topic": await read_profile_topic(settings),
        "states": await read_user_states(settings),
    }
    print(f"crash point: crashed={crashed} request_offset={offset} committed_at_crash={at_crash['committed']}"
          f" committed_after={run['committed_after']} topic_duplicates={run['topic'].duplicates}"
          f" already_stored_after_restart={metric_sum(samples, 'profilestream_generations_total', outcome='already_stored'):.0f}"
          f" versions={sum(run['stored'].history.values())}")
    yield run
    await drop_database(postgres_dsn, dsn)


async def test_worker_died_at_crash_point(crashed_run):
    assert crashed_run["status"] == -signal.SIGKILL


async def test_crashed_version_stored_before_commit(crashed_run):
    at_crash = crashed_run["at_crash"]
    assert at_crash["stored"].history[crashed_run["crashed"]] == 1
    assert at_crash["topic"].copies[crashed_run["crashed"]] == 1
    # The request was not committed, so the restarted worker must consume it again.
    assert at_crash["committed"] <= crashed_run["request_offset"]


async def test_crashed_request_consumed_after_restart(crashed_run):
    assert crashed_run["committed_after"] > crashed_run["request_offset"]


async def test_crashed_version_written_once(crashed_run):
    assert crashed_run["stored"].history[crashed_run["crashed"]] == 1
    assert crashed_run["topic"].copies[crashed_run["crashed"]] == 1


async def test_no_version_on_topic_twice(crashed_run):
    repeated = {key: count for key, count in crashed_run["topic"].copies.items() if count > 1}
    assert repeated == {}


async def test_topic_matches_postgres(crashed_run):
    check_topic_matches_postgres(crashed_run["stored"], crashed_run["topic"])


async def test_latest_versions_reach_postgres(crashed_run):
    decided = {user_id: state["profile"]["version"] for user_id, state in crashed_run["states"].items()
               if state["profile"]["version"] > 0}
    stored = {user_id: version for user_id, (version, _) in crashed_run["stored"].current.items()}
    assert stored == decided


async def test_user_states_count_each_event_once(crashed_run):
    expected = distinct_events_per_user(crashed_run["posts"])
    assert {user_id: state["events_applied"] for user_id, state in crashed_run["states"].items()} == dict(expected)
