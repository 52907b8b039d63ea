"""Run the real worker as a subprocess against the test broker and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream.services import spawn
from stream.services.ports import free_port
from stream.settings import ENV_PREFIX, Settings, load_settings

STOP_TIMEOUT_S = 30


def isolated_settings(kafka_bootstrap: str, postgres_dsn: str | None, tmp_path: Path, **overrides) -> Settings:
    """Settings with an app id and topic names of their own, so tests never share state."""
    suffix = uuid.uuid4().hex[:8]
    values = {
        "kafka_bootstrap_servers": kafka_bootstrap,
        "postgres_dsn": postgres_dsn,
        "app_id": f"test-{suffix}",
        "topic_posts": f"posts-{suffix}",
        "topic_likes": f"likes-{suffix}",
        "topic_follows": f"follows-{suffix}",
        "topic_users": f"users-{suffix}",
        "topic_profiles": f"profiles-{suffix}",
        "topic_dead_letter": f"dead-letter-{suffix}",
        "partitions": 2,
        "http_port": free_port(),
        "data_dir": str(tmp_path / "worker-data"),
        "kafka_session_timeout_s": 10.0,
    }
    values.update(overrides)
    return load_settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """`python -m stream worker` with the given settings, its output in a log file."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        # Variables added after the settings, such as the test-only PROFILESTREAM_TEST_CRASH_AT.
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        # SIGKILL when the test process dies: a stalled worker may not finish a SIGTERM shutdown,
        # and no worker may outlive a test run.
        self.process = spawn([sys.executable, "-m", "stream", "worker"], log_path=self.log_path,
                             cwd=Path(__file__).parent.parent, death_signal=signal.SIGKILL, env=env)
        return self

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker exited with {self.process.returncode}; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Scrape /metrics and return {(sample name, sorted labels): value}."""
        url = f"http://127.0.0.1:{self.settings.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples
