"""Worker metrics set outside the stages: state size, pending regenerations, producer errors."""

from __future__ import annotations

import random

import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from stream.health import WorkerStatus
from stream.kafka_metrics import ConsumerMonitor
from stream.producer_metrics import ProducerErrorSensor
from stream.settings import load_settings
from stream.state_size import estimate_json_bytes
from stream.watchdog import PartitionOffsets, Watchdog


def sample_value(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"{name} has no sample"
    return value


def test_state_size_exact_for_small_table() -> None:
    table = {f"user-{n}": {"user_id": f"user-{n}", "events": list(range(n))} for n in range(10)}
    expected = sum(len(orjson.dumps(value)) for value in table.values())
    assert estimate_json_bytes(table) == expected


def test_state_size_empty_table() -> None:
    assert estimate_json_bytes({}) == 0.0


def test_state_size_estimate_near_total() -> None:
    """Two sizes of entries, 90% small and 10% large: a 256-entry sample lands within 25% of the total."""
    table = {f"user-{n}": {"text": "x" * (2000 if n % 10 == 0 else 100)} for n in range(5000)}
    exact = sum(len(orjson.dumps(value)) for value in table.values())
    estimate = estimate_json_bytes(table, rng=random.Random(7))
    assert estimate == pytest.approx(exact, rel=0.25)
    assert estimate != exact


def test_state_size_non_string_keys() -> None:
    """A non-string dict key is encoded as a string, as JSON does, instead of failing the estimate."""
    assert estimate_json_bytes({"u": {1: "a"}}) == len(b'{"1":"a"}')


def test_state_size_rejects_empty_sample() -> None:
    with pytest.raises(ValueError, match="sample_size"):
        estimate_json_bytes({"u": {}}, sample_size=0)


def test_producer_error_sensor_counts() -> None:
    before = sample_value("profilestream_kafka_producer_errors_total")
    sensor = ProducerErrorSensor()
    sensor.on_send_error(producer=None, exc=RuntimeError("broker down"), state=None)
    sensor.on_send_error(producer=None, exc=RuntimeError("broker down"), state=None)
    assert sample_value("profilestream_kafka_producer_errors_total") == before + 2


async def test_pending_regenerations_sum_regenerate_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(app_id="pending-test", topic_posts="pending-posts")
    regenerate = settings.topic_regenerate
    offsets = {
        TopicPartition(regenerate, 0): PartitionOffsets(committed=10, start=0, end=25),
        TopicPartition(regenerate, 1): PartitionOffsets(committed=None, start=5, end=12),
        TopicPartition("pending-posts", 0): PartitionOffsets(committed=0, start=0, end=1000),
    }
    status = WorkerStatus(assigned_partitions=frozenset(offsets), recovered=True)
    monitor = ConsumerMonitor(settings, status, Watchdog(60.0))

    async def fetch(partitions):
        return {partition: offsets[partition] for partition in partitions}

    monkeypatch.setattr(monitor, "_fetch", fetch)
    await monitor.poll()
    assert sample_value("profilestream_regenerations_pending") == 15 + 7
    assert REGISTRY.get_sample_value("profilestream_kafka_consumer_lag", {"topic": "pending-posts", "partition": "0"}) == 1000


class _Exited(Exception):
    pass


def _stalled_monitor(monkeypatch: pytest.MonkeyPatch, exit_after_s: float) -> tuple[ConsumerMonitor, list[int], list[float]]:
    from stream import kafka_metrics

    settings = load_settings(app_id="watchdog-exit-test", watchdog_exit_after_s=exit_after_s)
    partition = TopicPartition(settings.topic_posts, 0)
    status = WorkerStatus(assigned_partitions=frozenset({partition}), recovered=True,
                          stalled_partitions=frozenset({partition}))
    monitor = ConsumerMonitor(settings, status, Watchdog(60.0))
    codes: list[int] = []
    now = [1000.0]

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(kafka_metrics.os, "_exit", fake_exit)
    monkeypatch.setattr(kafka_metrics.time, "monotonic", lambda: now[0])
    return monitor, codes, now


def test_watchdog_exits_after_stall_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, codes, now = _stalled_monitor(monkeypatch, exit_after_s=30.0)
    monitor._exit_if_stalled_too_long()
    now[0] += 29.0
    monitor._exit_if_stalled_too_long()
    assert codes == []
    now[0] += 1.0
    with pytest.raises(_Exited):
        monitor._exit_if_stalled_too_long()
    assert codes == [3]


def test_watchdog_exit_disabled_by_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, codes, now = _stalled_monitor(monkeypatch, exit_after_s=0.0)
    monitor._exit_if_stalled_too_long()
    now[0] += 86400.0
    monitor._exit_if_stalled_too_long()
    assert codes == []


def test_watchdog_stall_clock_resets_when_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, codes, now = _stalled_monitor(monkeypatch, exit_after_s=30.0)
    monitor._exit_if_stalled_too_long()
    now[0] += 20.0
    monitor.status.stalled_partitions = frozenset()
    monitor._exit_if_stalled_too_long()
    monitor.status.stalled_partitions = frozenset(monitor.status.assigned_partitions)
    now[0] += 20.0
    monitor._exit_if_stalled_too_long()
    assert codes == []
