"""Smoke test of the benchmarks' core functions on a slice of the bundled data: structure, not speed."""

import math

import pytest

from bench import state_size, trigger_economy
from bench.ingest_throughput import copy_events
from handlers import state as user_state
from stream.demo import bundled_data_path
from stream.importers.jsonl import read_jsonl

# The first 2,000 events span March and April 2018, and recall needs a month that starts after
# a profile exists.
SLICE = 2_000
REFERENCE_GROUPS = ("default", "baseline", "reference")


@pytest.fixture(scope="module")
def events():
    return state_size.load_events(limit=SLICE)


@pytest.fixture(scope="module")
def rows(events):
    policies = [policy for policy in trigger_economy.default_policies() if policy.group != "extended"]
    return {row["policy"]: row for row in trigger_economy.evaluate(events, policies)}


@pytest.fixture(scope="module")
def full_rows():
    # Cost is compared on all events, because on a short prefix the default's first profiles at
    # five events can outnumber every-10's.
    policies = [policy for policy in trigger_economy.default_policies() if policy.group in REFERENCE_GROUPS]
    return {row["policy"]: row for row in trigger_economy.evaluate(state_size.load_events(), policies)}


def test_load_events_limit(events):
    assert len(events) == SLICE


def test_state_sizes_finite(events):
    result = state_size.measure_bundled(events, passes=1)
    assert result["users"] > 0
    for name, value in result["state_bytes"].items():
        assert math.isfinite(value), name
        assert value > 0, name
    assert math.isfinite(result["apply_us_mean"])
    assert math.isfinite(result["apply_to_round_trip_p50"])


def test_heavy_user_state_bounded():
    result = state_size.measure_heavy(3_000, checkpoints=(1_000, 3_000))
    first, last = result["checkpoints"]
    assert first["events"] == 1_000
    assert last["events"] == 3_000
    assert last["topics"] <= user_state.MAX_TOPICS + user_state.MAX_TOPICS // 4
    assert last["seen_ids"] <= user_state.MAX_SEEN_EVENTS + user_state.SEEN_EVICTION_BATCH
    assert last["hour_buckets"] <= user_state.WINDOW_HOURS
    assert last["recent_posts"] <= user_state.MAX_RECENT_POSTS
    assert math.isfinite(last["apply_to_round_trip"])


def test_baselines_generate_more(full_rows):
    default = full_rows[trigger_economy.DEFAULT]["generations"]
    assert default > 0
    assert full_rows[trigger_economy.EVERY_10]["generations"] > default
    assert full_rows[trigger_economy.EVERY_EVENT]["generations"] > default


def test_first_profile_only_is_cheapest(rows):
    floor = rows[trigger_economy.FIRST_ONLY]["generations"]
    assert all(row["generations"] >= floor for row in rows.values())


def test_recall_finite_and_bounded(rows):
    for name, row in rows.items():
        assert row["user_months"] > 0, name
        assert 0.0 <= row["recall_at_5"] <= 1.0, name
        assert math.isfinite(row["per_1000"]), name


def test_goal_marked_against_every_10(rows):
    assert rows[trigger_economy.EVERY_10]["meets_goal"] is None
    assert rows[trigger_economy.DEFAULT]["meets_goal"] in (True, False)


def test_shared_replay_matches_separate(events):
    policies = [policy for policy in trigger_economy.default_policies()
                if policy.name in (trigger_economy.DEFAULT, trigger_economy.EVERY_10)]
    together = trigger_economy.replay_policies(events, policies)
    for policy, joint in zip(policies, together):
        [alone] = trigger_economy.replay_policies(events, [policy])
        assert joint.generations == alone.generations, policy.name
        assert dict(joint.profiles) == dict(alone.profiles), policy.name


def test_copies_get_fresh_ids():
    lines = [line for _, line in read_jsonl(bundled_data_path())][:50]
    copies = list(copy_events(lines, 3))
    assert len(copies) == 150
    assert len({document["event_id"] for document in copies}) == 150
    assert [document["user_id"] for document in copies[:50]] == [document["user_id"] for document in copies[100:]]


def test_copies_oldest_first():
    lines = [line for _, line in read_jsonl(bundled_data_path())][:50]
    copies = list(copy_events(lines, 3))
    original_times = [document["created_at"] for document in copies[100:]]
    assert original_times[0] == "2018-03-12T17:00:45.567Z"
    assert copies[49]["created_at"] < copies[50]["created_at"]
    assert copies[99]["created_at"] < copies[100]["created_at"]


def test_copies_before_1990_rejected():
    lines = [line for _, line in read_jsonl(bundled_data_path())]
    with pytest.raises(ValueError, match="before 1990"):
        list(copy_events(lines, 1_000))
