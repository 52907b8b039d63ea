"""The crash point of stream.faults: SIGKILL at the configured hit, nothing otherwise."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from stream.faults import CRASH_AT_VARIABLE

ROOT = Path(__file__).parent.parent

# Calls the point five times and prints the hit count after each call that returned.
SCRIPT = """
from stream.faults import crash_point
for hit in range(1, 6):
    crash_point("after_postgres_write", user_id="u1", version=hit)
    print(hit, flush=True)
"""


def run_script(crash_at: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if crash_at is not None:
        env[CRASH_AT_VARIABLE] = crash_at
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_crash_point_kills_at_nth_hit():
    result = run_script("after_postgres_write:3")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2"]
    assert "fault.crash_point point=after_postgres_write hit=3 user_id=u1 version=3" in result.stderr


def test_crash_point_without_variable_does_nothing():
    result = run_script(None)
    assert result.returncode == 0
    assert result.stdout.split() == ["1", "2", "3", "4", "5"]


def test_crash_point_ignores_other_points():
    result = run_script("after_postgres_write:9")
    assert result.returncode == 0
    assert result.stdout.split() == ["1", "2", "3", "4", "5"]


def test_crash_point_rejects_unknown_point():
    result = run_script("after_topic_write:1")
    assert result.returncode == 1
    assert "ConfigError" in result.stderr
    assert "'after_topic_write:1' is invalid" in result.stderr


def test_crash_point_rejects_missing_count():
    result = run_script("after_postgres_write")
    assert result.returncode == 1
    assert "ConfigError" in result.stderr
