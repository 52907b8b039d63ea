"""The Postgres sink: the latest profile of each user and every version ever written, on asyncpg.

`profiles_current` has one row per user with the highest version seen. `profiles_history`
has one row per (user_id, version). Writes are idempotent, so replaying a batch after a crash
changes nothing, and a lower or equal version never replaces a higher one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson

from handlers.errors import InvalidRecord, SinkUnavailable

from . import postgres_metrics
from .postgres_metrics import PostgresMetrics, default_postgres_metrics

log = logging.getLogger(__name__)

# Each entry is one schema version: MIGRATIONS[0] is version 1. Append new versions, never edit old ones.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS profiles_current (
        user_id      text        PRIMARY KEY,
        version      bigint      NOT NULL,
        generated_at timestamptz NOT NULL,
        generator    text        NOT NULL,
        profile      jsonb       NOT NULL,
        updated_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS profiles_history (
        user_id      text,
        version      bigint,
        generated_at timestamptz,
        generator    text,
        profile      jsonb,
        PRIMARY KEY (user_id, version)
    );
    CREATE INDEX IF NOT EXISTS profiles_current_posts_total_idx
        ON profiles_current (((profile #>> '{activity,posts_total}')::bigint) DESC NULLS LAST, user_id);
    """,
)

_CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Serializes concurrent migrate() calls, for example several workers starting at once.
_MIGRATION_LOCK_KEY = 0x70726F66696C6573  # "profiles" in ASCII

_INSERT_HISTORY = """
INSERT INTO profiles_history (user_id, version, generated_at, generator, profile)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::jsonb[])
ON CONFLICT (user_id, version) DO NOTHING
"""
_UPSERT_CURRENT = """
INSERT INTO profiles_current (user_id, version, generated_at, generator, profile)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::jsonb[])
ON CONFLICT (user_id) DO UPDATE SET
    version = EXCLUDED.version,
    generated_at = EXCLUDED.generated_at,
    generator = EXCLUDED.generator,
    profile = EXCLUDED.profile,
    updated_at = now()
WHERE profiles_current.version < EXCLUDED.version
"""
_SELECT_TOP = """
SELECT profile FROM profiles_current
ORDER BY (profile #>> '{activity,posts_total}')::bigint DESC NULLS LAST, user_id
LIMIT $1
"""
# The primary key (user_id, version) serves both the filter and the order.
_SELECT_HISTORY_PAGE = """
SELECT profile FROM profiles_history
WHERE user_id = $1 AND ($2::bigint IS NULL OR version < $2::bigint)
ORDER BY version DESC
LIMIT $3
"""

# Errors that mean the server or the network failed, not the statement, so a later retry may pass.
# OperatorInterventionError covers a server shutdown (57P01) and a canceled statement (57014).
_SERVER_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
_CONNECTION_ERRORS = (OSError, *_SERVER_ERRORS)
# 40P01 and 40001: Postgres rolled the transaction back, and running it again is safe.
_RETRIABLE_TRANSACTION_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_TRANSACTION_ERROR_KINDS = {"40P01": postgres_metrics.DEADLOCK, "40001": postgres_metrics.SERIALIZATION_FAILURE}

_ACQUIRE_TIMEOUT_SETTING = "PROFILESTREAM_POSTGRES_ACQUIRE_TIMEOUT_S"
_POOL_MAX_SETTING = "PROFILESTREAM_POSTGRES_POOL_MAX"
_DSN_SETTING = "PROFILESTREAM_POSTGRES_DSN"


def strip_nul(value: object) -> object:
    """Return a copy of `value` without U+0000 in any string, keys included.

    Postgres text and jsonb columns reject U+0000, so a profile that quotes it would fail the
    whole batch. Other values pass through unchanged.
    """
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, Mapping):
        return {strip_nul(key): strip_nul(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strip_nul(item) for item in value]
    return value


def describe_target(dsn: str) -> str:
    """Return "host:port/database" of a postgresql:// DSN, without the user name or password."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["localhost"])[0]
    try:
        port = parts.port or int(query.get("port", ["5432"])[0])
    except ValueError:
        port = "?"
    database = parts.path.lstrip("/") or query.get("dbname", ["(default)"])[0]
    return f"{host}:{port}/{database}"


async def migrate(dsn: str, *, timeout_s: float = 30.0, ssl: ssl_module.SSLContext | str | None = None) -> None:
    """Bring the schema at `dsn` to the latest version in MIGRATIONS. Idempotent and safe to run concurrently.

    Applied versions are recorded in `schema_migrations`. `ssl` is asyncpg's argument (an
    sslmode name or a context; None keeps the DSN's sslmode). Raises SinkUnavailable when the
    server cannot be reached.
    """
    target = describe_target(dsn)
    try:
        connection = await asyncpg.connect(dsn, timeout=timeout_s, ssl=ssl)
    except (TimeoutError, *_CONNECTION_ERRORS) as exc:
        raise SinkUnavailable(
            f"cannot connect to Postgres at {target} to migrate the schema: {exc};"
            f" check that the server runs and that {_DSN_SETTING} points to it"
        ) from exc
    try:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await connection.execute(_CREATE_SCHEMA_MIGRATIONS)
            applied = {row["version"] for row in await connection.fetch("SELECT version FROM schema_migrations")}
            for version, statements in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                await connection.execute(statements)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                log.info("postgres_migrated target=%s version=%s", target, version)
        unknown = sorted(version for version in applied if version > len(MIGRATIONS))
        if unknown:
            log.warning(
                "postgres_schema_newer target=%s versions=%s known_max=%s", target, unknown, len(MIGRATIONS)
            )
    finally:
        await connection.close()


@dataclass(frozen=True, slots=True)
class _Row:
    user_id: str
    version: int
    generated_at: datetime
    generator: str
    profile: dict


def _to_row(profile: Mapping) -> _Row:
    """Extract the column values of one profile.v1 document, or raise InvalidRecord naming the field."""
    clean = strip_nul(profile)
    if not isinstance(clean, dict):
        raise InvalidRecord("invalid_profile", f"profile is {type(profile).__name__}, expected a dict")
    user_id = clean.get("user_id")
    version = clean.get("version")
    generator = clean.get("generator")
    if not isinstance(user_id, str) or not user_id:
        raise InvalidRecord("invalid_profile", f"user_id is {user_id!r}, expected a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidRecord("invalid_profile", f"version of user {user_id!r} is {version!r}, expected an integer >= 1")
    if not isinstance(generator, str) or not generator:
        raise InvalidRecord("invalid_profile", f"generator of user {user_id!r} is {generator!r}, expected a non-empty string")
    return _Row(user_id, version, _parse_generated_at(clean.get("generated_at"), user_id), generator, clean)


def _parse_generated_at(value: object, user_id: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidRecord(
            "invalid_profile", f"generated_at of user {user_id!r} is {value!r}, expected an RFC 3339 date-time"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _latest_per_user(rows: Sequence[_Row]) -> list[_Row]:
    """Keep each user's highest version, the first one given when a version repeats.

    One INSERT ... ON CONFLICT DO UPDATE may not touch a row twice, so the current table gets
    one row per user. The first copy wins, as it does in the history table.
    """
    latest: dict[str, _Row] = {}
    for row in rows:
        kept = latest.get(row.user_id)
        if kept is None or row.version > kept.version:
            latest[row.user_id] = row
    return list(latest.values())


def _columns(rows: Sequence[_Row]) -> tuple[list, list, list, list, list]:
    return (
        [row.user_id for row in rows],
        [row.version for row in rows],
        [row.generated_at for row in rows],
        [row.generator for row in rows],
        [row.profile for row in rows],
    )


def _encode_jsonb(value: object) -> str:
    return orjson.dumps(value).decode("utf-8")


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=orjson.loads, format="text"
    )


def _is_broken(connection: asyncpg.Connection) -> bool:
    """Tell whether a borrowed connection closed while in use."""
    try:
        return connection.is_closed()
    except asyncpg.InterfaceError:
        # A connection that closes returns itself to the pool, and then its proxy rejects every call.
        return True


class PostgresSink:
    """Store profiles in `profiles_current` and `profiles_history` through a bounded asyncpg pool.

    Call `start()` before use and `close()` after, or use `async with`. Run `migrate()` first.
    Failures of the server or the network raise SinkUnavailable (retriable), and a malformed
    profile raises InvalidRecord. `ssl` is asyncpg's TLS argument, as for `migrate()`.
    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        pool_max: int = 5,
        acquire_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
        max_attempts: int = 5,
        retry_delay_s: float = 0.05,
        metrics: PostgresMetrics | None = None,
        ssl: ssl_module.SSLContext | str | None = None,
    ) -> None:
        if pool_max < 1:
            raise ValueError(f"pool_max must be at least 1, got {pool_max}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self._dsn = dsn
        self.ssl = ssl
        self.target = describe_target(dsn)
        self.pool_max = pool_max
        self.acquire_timeout_s = acquire_timeout_s
        self.command_timeout_s = command_timeout_s
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self._pool: asyncpg.Pool | None = None
        self._retries = 0
        self._metrics = metrics or default_postgres_metrics()
        # Connection requests not yet released: borrowed, connecting or waiting for a free connection.
        self._requested = 0

    @property
    def retries(self) -> int:
        """Number of transactions run again after a deadlock or serialization failure."""
        return self._retries

    async def start(self) -> None:
        """Open the pool with one connection; raise SinkUnavailable when the server cannot be reached."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self.pool_max,
                command_timeout=self.command_timeout_s,
                init=_init_connection,
                timeout=self.acquire_timeout_s,
                ssl=self.ssl,
            )
        except (TimeoutError, *_CONNECTION_ERRORS) as exc:
            raise SinkUnavailable(
                f"cannot connect to Postgres at {self.target}: {exc};"
                f" check that the server runs and that {_DSN_SETTING} points to it",
                kind=postgres_metrics.CONNECTION_FAILED,
            ) from exc
        log.info("postgres_sink_started target=%s pool_max=%s", self.target, self.pool_max)

    async def close(self, *, timeout_s: float = 10.0) -> None:
        """Close the pool, waiting up to `timeout_s` for borrowed connections before terminating them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout_s)
        except TimeoutError:
            log.warning("postgres_sink_close_timeout target=%s timeout_s=%s action=terminate", self.target, timeout_s)
            pool.terminate()
        log.info("postgres_sink_closed target=%s", self.target)

    async def __aenter__(self) -> PostgresSink:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """Borrow a pooled connection, waiting at most acquire_timeout_s.

        Raises SinkUnavailable when no connection becomes free in time, when connecting fails,
        or when inside the block a statement exceeds command_timeout_s or the connection breaks.
        """
        if self._pool is None:
            raise RuntimeError("PostgresSink is not started; await sink.start() first")
        pool = self._pool
        # Only this sink borrows from the pool, so a request waits when pool_max requests are ahead of it.
        if self._requested >= self.pool_max:
            self._metrics.acquire_waits.inc()
        self._requested += 1
        try:
            started = time.perf_counter()
            try:
                connection = await pool.acquire(timeout=self.acquire_timeout_s)
            except TimeoutError:
                self._metrics.acquire_timeouts.inc()
                raise SinkUnavailable(
                    f"no connection to Postgres at {self.target} became free within {self.acquire_timeout_s} s;"
                    f" raise acquire_timeout_s ({_ACQUIRE_TIMEOUT_SETTING}) or pool_max={self.pool_max}"
                    f" ({_POOL_MAX_SETTING}), or look for long transactions",
                    kind=postgres_metrics.ACQUIRE_TIMEOUT,
                ) from None
            except _CONNECTION_ERRORS as exc:
                raise SinkUnavailable(
                    f"cannot connect to Postgres at {self.target}: {exc};"
                    f" check that the server runs and that {_DSN_SETTING} points to it",
                    kind=postgres_metrics.CONNECTION_FAILED,
                ) from exc
            self._metrics.acquire_seconds.observe(time.perf_counter() - started)
            try:
                yield connection
            except TimeoutError as exc:
                raise SinkUnavailable(
                    f"a statement on Postgres at {self.target} timed out after {self.command_timeout_s} s"
                    " (command_timeout_s)",
                    kind=postgres_metrics.STATEMENT_TIMEOUT,
                ) from exc
            except _SERVER_ERRORS as exc:
                raise SinkUnavailable(
                    f"the connection to Postgres at {self.target} failed: {exc}", kind=postgres_metrics.CONNECTION_FAILED
                ) from exc
            except asyncpg.InternalClientError as exc:
                # asyncpg 0.32 raises it when the server ends the session during a statement, for example
                # "cannot switch to state 12; another operation (2) is in progress" on a fast shutdown.
                raise SinkUnavailable(
                    f"the connection to Postgres at {self.target} failed: {exc}", kind=postgres_metrics.CONNECTION_FAILED
                ) from exc
            except (OSError, asyncpg.InterfaceError) as exc:
                # An OSError of the caller's own code or misuse of the connection is not a sink failure,
                # unless the connection broke, as when a transaction ends on a closed connection.
                if not _is_broken(connection):
                    raise
                raise SinkUnavailable(
                    f"the connection to Postgres at {self.target} failed: {exc}", kind=postgres_metrics.CONNECTION_FAILED
                ) from exc
            finally:
                await self._release(pool, connection)
        finally:
            self._requested -= 1

    async def _release(self, pool: asyncpg.Pool, connection: asyncpg.Connection) -> None:
        """Return a connection to the pool without raising, so a failed reset never hides the block's outcome."""
        try:
            # Without a timeout, asyncpg would reuse acquire_timeout_s for the reset query.
            await pool.release(connection, timeout=self.command_timeout_s)
        except Exception as exc:  # noqa: BLE001
            # asyncpg 0.32 terminates the connection on any failed reset, timeouts and
            # InternalClientError included, and the pool opens a new one when needed.
            log.warning("postgres_release_failed target=%s error=%r action=connection_closed", self.target, exc)

    async def write(self, profiles: Sequence[Mapping]) -> int:
        """Store a batch of profile.v1 documents in one transaction; return the number of current rows changed.

        Every version goes to the history table once. A user's current row changes only when
        the batch has a higher version than the stored one. Rows are written in (user_id,
        version) order, so concurrent writers lock rows in the same order. A deadlock or
        serialization failure is retried up to max_attempts times in all, then raises
        SinkUnavailable.
        """
        if not profiles:
            return 0
        rows = sorted((_to_row(profile) for profile in profiles), key=lambda row: (row.user_id, row.version))
        latest = _latest_per_user(rows)
        started = time.perf_counter()
        for attempt in range(1, self.max_attempts + 1):
            try:
                changed = await self._write_once(rows, latest)
            except SinkUnavailable as exc:
                self._metrics.write_errors.labels(exc.kind).inc()
                raise
            except _RETRIABLE_TRANSACTION_ERRORS as exc:
                kind = _TRANSACTION_ERROR_KINDS[exc.sqlstate]
                self._metrics.write_errors.labels(kind).inc()
                if attempt == self.max_attempts:
                    raise SinkUnavailable(
                        f"writing {len(rows)} profiles to Postgres at {self.target} failed {attempt} times in a row"
                        f" with a {kind.replace('_', ' ')} (SQLSTATE {exc.sqlstate}), so concurrent transactions keep"
                        " conflicting on these rows; retry the batch later and look for transactions that hold them long",
                        kind=kind,
                    ) from exc
                self._retries += 1
                delay_s = self.retry_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                log.warning(
                    "postgres_write_retry target=%s sqlstate=%s attempt=%s max_attempts=%s delay_s=%.3f profiles=%s",
                    self.target, exc.sqlstate, attempt, self.max_attempts, delay_s, len(rows),
                )
                await asyncio.sleep(delay_s)
                continue
            self._metrics.write_seconds.observe(time.perf_counter() - started)
            return changed
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _write_once(self, rows: Sequence[_Row], latest: Sequence[_Row]) -> int:
        async with self.acquire() as connection:
            async with connection.transaction():
                await connection.execute(_INSERT_HISTORY, *_columns(rows))
                status = await connection.execute(_UPSERT_CURRENT, *_columns(latest))
        # The status is "INSERT 0 <rows>", counting inserted and updated rows but not skipped ones.
        return int(status.rsplit(" ", 1)[1])

    async def erase(self, user_id: str) -> None:
        """Delete every stored version of the user's profile."""
        async with self.acquire() as connection:
            async with connection.transaction():
                await connection.execute("DELETE FROM profiles_history WHERE user_id = $1", user_id)
                await connection.execute("DELETE FROM profiles_current WHERE user_id = $1", user_id)

    async def stored_versions(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Return the current stored version of each of `user_ids` that has a profile."""
        try:
            async with self.acquire() as connection:
                rows = await connection.fetch(
                    "SELECT user_id, version FROM profiles_current WHERE user_id = ANY($1::text[])", list(user_ids)
                )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise SinkUnavailable(f"could not read stored versions from Postgres: {exc!r}") from exc
        return {row["user_id"]: row["version"] for row in rows}

    async def fetch_current(self, user_id: str) -> dict | None:
        """Return the user's current profile, or None if none is stored."""
        async with self.acquire() as connection:
            return await connection.fetchval("SELECT profile FROM profiles_current WHERE user_id = $1", user_id)

    async def fetch_history(self, user_id: str) -> list[dict]:
        """Return every stored version of the user's profile, oldest first."""
        async with self.acquire() as connection:
            rows = await connection.fetch(
                "SELECT profile FROM profiles_history WHERE user_id = $1 ORDER BY version", user_id
            )
        return [row["profile"] for row in rows]

    async def fetch_history_page(self, user_id: str, *, limit: int, before_version: int | None = None) -> list[dict]:
        """Return up to `limit` versions of the user's profile, newest first, only versions below `before_version` if given."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        async with self.acquire() as connection:
            rows = await connection.fetch(_SELECT_HISTORY_PAGE, user_id, before_version, limit)
        return [row["profile"] for row in rows]

    async def fetch_top(self, limit: int) -> list[dict]:
        """Return up to `limit` current profiles, most activity.posts_total first, ties by user_id."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        async with self.acquire() as connection:
            rows = await connection.fetch(_SELECT_TOP, limit)
        return [row["profile"] for row in rows]
