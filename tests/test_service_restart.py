"""Stopping a local service and starting it again at the same address with the same data, for outage tests."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.services import ServiceError
from stream.services.kafka import KafkaBroker
from stream.services.ports import is_listening
from stream.services.postgres import PostgresCluster


async def test_postgres_restart_keeps_data_and_port():
    with PostgresCluster() as cluster:
        dsn, port, work_dir = cluster.dsn, cluster.port, cluster.work_dir
        connection = await asyncpg.connect(dsn)
        await connection.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('before')")
        await connection.close()

        cluster.stop_server()
        assert cluster.pid is None
        assert not is_listening(port)
        with pytest.raises(OSError):
            await asyncpg.connect(dsn, timeout=5)

        cluster.start_server()
        connection = await asyncpg.connect(dsn)
        try:
            assert await connection.fetchval("SELECT value FROM kept") == "before"
        finally:
            await connection.close()
        assert cluster.port == port
        assert cluster.work_dir == work_dir
    assert not work_dir.exists()


def test_postgres_start_after_stop_server_rejected():
    with PostgresCluster() as cluster:
        cluster.stop_server()
        with pytest.raises(ServiceError, match="start_server"):
            cluster.start()
        with pytest.raises(ServiceError, match="not running"):
            cluster.stop_server()


def test_postgres_start_server_needs_cluster():
    with pytest.raises(ServiceError, match="call start"):
        PostgresCluster().start_server()


async def test_broker_restart_keeps_records_and_address():
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    with KafkaBroker() as broker:
        bootstrap, work_dir = broker.bootstrap_servers, broker.work_dir
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"before")
        finally:
            await producer.stop()

        broker.stop_server()
        assert broker.pid is None
        with pytest.raises(ServiceError, match="start_server"):
            broker.start()
        broker.start_server()

        assert broker.bootstrap_servers == bootstrap
        assert broker.work_dir == work_dir
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            record = await consumer.getone()
        finally:
            await consumer.stop()
        assert record.value == b"before"
    assert not work_dir.exists()
