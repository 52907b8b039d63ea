"""Real local services for development and tests: a Kafka broker and a throwaway Postgres cluster.

`stream.services.kafka.KafkaBroker` and `stream.services.postgres.PostgresCluster` start their
server as a child process. This module contains what both share: the error type and the child
process helpers. Each child runs in its own process group, so a Ctrl+C in the terminal reaches
only the Python parent, which then stops the child. On Linux the kernel also sends the child a
signal when the parent dies, even by SIGKILL, so no server outlives a killed test run.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from handlers.errors import ProfilestreamError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LOG_TAIL_LINES = 40
_OWNER_FILE = "owner.pid"

if sys.platform == "linux":
    # Resolved in the parent, because the forked child should only call the function.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _prctl.restype = ctypes.c_int
else:
    _prctl = None


class ServiceError(ProfilestreamError):
    """A local service could not be fetched, started or stopped; the message names the fix."""


class LocalServer:
    """Base of the local Kafka, Postgres and Prometheus servers: a child process in a temporary folder.

    Subclasses set `LOG_NAME`, the file in the folder that receives the server's output, and
    implement `start()`, which returns the server, and the idempotent `stop()`.
    """

    LOG_NAME = "server.log"

    def __init__(self, *, start_timeout_s: float, stop_timeout_s: float) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._work_dir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def work_dir(self) -> Path | None:
        """Temporary folder with the server's configuration, data and log; None when stopped."""
        return self._work_dir

    @property
    def log_path(self) -> Path | None:
        return None if self._work_dir is None else self._work_dir / self.LOG_NAME

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None when not running."""
        return None if self._process is None else self._process.pid

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def make_work_dir(prefix: str) -> Path:
    """Create a temporary folder for one service and record the owning process id in it.

    First deletes the folders with the same prefix whose owner no longer runs. Those are left
    behind when a parent is killed before it can clean up.
    """
    _remove_orphaned_work_dirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def _remove_orphaned_work_dirs(prefix: str) -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _process_exists(owner):
            log.info("service_work_dir_remove path=%s owner_pid=%s reason=owner_gone", path, owner)
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """Build a preexec_fn that makes the kernel send `death_signal` when the parent dies.

    The kernel sends the signal when the thread that forked the child exits, so start services
    from a thread that lives as long as they do, such as the main thread.
    """
    if _prctl is None:
        return None
    parent_pid = os.getpid()

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl, and then no signal would come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), int(death_signal))

    return preexec


def spawn(
    command: Sequence[str | Path],
    *,
    log_path: Path,
    cwd: Path,
    death_signal: signal.Signals,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server child in its own process group, with stdout and stderr appended to `log_path`.

    `user` runs the child as that account, which requires root. The switch happens before the
    death signal is set, because Linux clears that setting when the user id changes.
    """
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [str(part) for part in command],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_parent(death_signal),
            env=None if env is None else dict(env),
            **_user_arguments(user),
        )


def run_tool(command: Sequence[str | Path], *, cwd: Path, timeout_s: float, user: str | None = None) -> str:
    """Run a short-lived setup command and return its output, or raise ServiceError with the output."""
    argv = [str(part) for part in command]
    try:
        completed = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            preexec_fn=_die_with_parent(signal.SIGKILL),
            check=False,
            **_user_arguments(user),
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.output or b"").decode("utf-8", "replace")
        raise ServiceError(f"{argv[0]} timed out after {timeout_s:.0f} s; its output:\n{_tail(output)}") from None
    output = completed.stdout.decode("utf-8", "replace")
    if completed.returncode != 0:
        raise ServiceError(
            f"{' '.join(argv)} failed with exit code {completed.returncode}; its output:\n{_tail(output)}"
        )
    return output


def stop_process(process: subprocess.Popen[bytes], *, stop_signal: signal.Signals, timeout_s: float, name: str) -> None:
    """Send `stop_signal` to the child's process group, then SIGKILL if it has not exited in `timeout_s`."""
    if process.poll() is not None:
        return
    _signal_group(process, stop_signal)
    try:
        process.wait(timeout=timeout_s)
        return
    except subprocess.TimeoutExpired:
        log.warning("service_stop_timeout service=%s pid=%s timeout_s=%s action=SIGKILL", name, process.pid, timeout_s)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of a service log, or a note that it could not be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(collections.deque(handle, maxlen=lines)).rstrip()
    except OSError as exc:
        return f"(log {path} could not be read: {exc})"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _user_arguments(user: str | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
