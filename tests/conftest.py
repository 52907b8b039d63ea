"""Shared fixtures: real local services, started once per session and only when a test requests them.

Environment variables point the suite at services that already run:
- PROFILESTREAM_TEST_KAFKA: bootstrap servers ("host:port,...") of a broker that allows topic creation;
- PROFILESTREAM_TEST_POSTGRES_DSN: a postgresql:// DSN of a role that may create and drop databases.
Without them the suite starts a `KafkaBroker` (about 6 to 12 s, plus a one-time jar fetch with
Maven) or a `PostgresCluster` (about 1.5 s) from `stream.services`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from handlers.sinks.postgres import migrate
from stream.services.kafka import KafkaBroker
from stream.services.postgres import PostgresCluster

TEST_KAFKA_VARIABLE = "PROFILESTREAM_TEST_KAFKA"
TEST_POSTGRES_VARIABLE = "PROFILESTREAM_TEST_POSTGRES_DSN"


# Services


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of the session's Kafka broker. Tests create their own uniquely named topics."""
    configured = os.environ.get(TEST_KAFKA_VARIABLE)
    if configured:
        yield configured
        return
    with KafkaBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of the session's Postgres server. Tests that write should use `fresh_database` instead."""
    configured = os.environ.get(TEST_POSTGRES_VARIABLE)
    if configured:
        yield configured
        return
    with PostgresCluster() as cluster:
        yield cluster.dsn


# Databases


def with_database(dsn: str, database: str) -> str:
    """Return `dsn` with its database path replaced by `database`."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@pytest.fixture
async def fresh_database(postgres_dsn: str) -> AsyncIterator[str]:
    """DSN of a new, migrated database on the session's server, dropped after the test."""
    async for dsn in _temporary_database(postgres_dsn):
        yield dsn


@pytest.fixture(scope="module")
async def module_database(postgres_dsn: str) -> AsyncIterator[str]:
    """Like `fresh_database`, shared by the tests of one module (for one long worker run)."""
    async for dsn in _temporary_database(postgres_dsn):
        yield dsn


async def _temporary_database(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    await _execute(postgres_dsn, f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(postgres_dsn, name)
        await migrate(dsn)
        yield dsn
    finally:
        # FORCE ends sessions that a failed test left open (PostgreSQL 13 or newer).
        await _execute(postgres_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
