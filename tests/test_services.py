"""Tests of the local services: the Kafka broker, the Postgres cluster and the jar cache."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.services import ServiceError, make_work_dir
from stream.services import kafka as kafka_service
from stream.services.kafka import KafkaBroker, ensure_kafka_jars, new_cluster_id
from stream.services.ports import free_ports, is_listening
from stream.services.postgres import PostgresCluster

REPOSITORY = Path(__file__).resolve().parent.parent
EXIT_TIMEOUT_S = 30.0


def is_alive(pid: int) -> bool:
    """Return whether `pid` runs; a zombie that no parent reaped counts as exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_for_exit(pid: int, timeout_s: float = EXIT_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.1)
    return False


def exited_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# Ports


def test_free_ports_distinct() -> None:
    ports = free_ports(5)

    assert len(set(ports)) == 5
    assert all(1024 <= port <= 65535 for port in ports)


def test_free_ports_rejects_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        free_ports(0)


# Kafka


async def test_broker_round_trip(kafka_bootstrap: str) -> None:
    topic = f"round-trip-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"value-1", key=b"key-1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()

    assert record.key == b"key-1"
    assert record.value == b"value-1"


def test_broker_stop_idempotent() -> None:
    broker = KafkaBroker().start()
    pid = broker.pid
    work_dir = broker.work_dir
    port = int(broker.bootstrap_servers.rsplit(":", 1)[1])
    assert pid is not None and work_dir is not None

    broker.stop()
    broker.stop()

    assert not is_alive(pid)
    assert not work_dir.exists()
    assert not is_listening(port)
    assert broker.pid is None


def test_broker_start_timeout_names_log() -> None:
    broker = KafkaBroker(start_timeout_s=0.5)

    with pytest.raises(ServiceError, match="did not respond within") as raised:
        broker.start()

    assert "broker.log" in str(raised.value)
    assert broker.work_dir is None
    assert broker.pid is None


def test_cluster_id_format() -> None:
    for _ in range(200):
        cluster_id = new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")


# Kafka jars


def test_jars_reuse_skips_maven(monkeypatch: pytest.MonkeyPatch) -> None:
    lib_dir = ensure_kafka_jars()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("mvn ran although the jars are cached")

    monkeypatch.setattr(kafka_service, "_run_maven", fail)

    assert ensure_kafka_jars() == lib_dir


def test_jars_fetch_into_empty_cache(tmp_path: Path) -> None:
    lib_dir = ensure_kafka_jars(tmp_path)
    version_dir = tmp_path / f"kafka-{kafka_service.KAFKA_VERSION}"

    assert lib_dir == version_dir / "lib"
    assert (lib_dir / f"kafka_2.13-{kafka_service.KAFKA_VERSION}.jar").is_file()
    assert (lib_dir / f"log4j-slf4j-impl-{kafka_service.LOG4J_VERSION}.jar").is_file()
    assert (version_dir / "pom.xml").is_file()
    assert sorted(path.name for path in version_dir.iterdir()) == ["lib", "pom.xml"]


def test_jars_missing_maven_names_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = shutil.which("java")
    assert java is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))

    with pytest.raises(ServiceError, match="apt-get install maven"):
        ensure_kafka_jars(tmp_path / "cache")


# Postgres


async def test_postgres_accepts_query(postgres_dsn: str) -> None:
    connection = await asyncpg.connect(postgres_dsn)
    try:
        value = await connection.fetchval("SELECT 40 + 2")
    finally:
        await connection.close()

    assert value == 42


def test_postgres_stop_idempotent() -> None:
    cluster = PostgresCluster().start()
    pid = cluster.pid
    work_dir = cluster.work_dir
    port = cluster.port
    assert pid is not None and work_dir is not None

    cluster.stop()
    cluster.stop()

    assert not is_alive(pid)
    assert not work_dir.exists()
    assert not is_listening(port)


def test_postgres_dsn_format() -> None:
    with PostgresCluster(database="other_db") as cluster:
        dsn = cluster.dsn
        port = cluster.port

    assert dsn == f"postgresql://postgres@127.0.0.1:{port}/other_db"


def test_postgres_rejects_bad_database_name() -> None:
    with pytest.raises(ValueError, match="invalid"):
        PostgresCluster(database='x"; DROP')


# Child processes


_SERVICE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from stream.services.kafka import KafkaBroker
    from stream.services.postgres import PostgresCluster

    service = {"kafka": KafkaBroker, "postgres": PostgresCluster}[sys.argv[1]]().start()
    print(service.pid, service.work_dir, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("service", ["postgres", "kafka"])
def test_service_dies_with_parent(service: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _SERVICE_SCRIPT, service],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    work_dir = None
    try:
        assert parent.stdout is not None
        pid_text, work_dir = parent.stdout.readline().split()
        server_pid = int(pid_text)
        assert is_alive(server_pid)

        parent.send_signal(signal.SIGKILL)
        parent.wait()

        assert wait_for_exit(server_pid)
    finally:
        parent.kill()
        parent.wait()
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)


def test_orphaned_work_dir_removed() -> None:
    prefix = f"profilestream-test-{uuid.uuid4().hex[:8]}-"
    orphan = Path(tempfile.mkdtemp(prefix=prefix))
    (orphan / "owner.pid").write_text(str(exited_pid()))
    live = Path(tempfile.mkdtemp(prefix=prefix))
    (live / "owner.pid").write_text(str(os.getpid()))

    created = make_work_dir(prefix)
    try:
        assert not orphan.exists()
        assert live.exists()
        assert (created / "owner.pid").read_text() == str(os.getpid())
    finally:
        shutil.rmtree(created, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
