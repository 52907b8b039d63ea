"""A Prometheus server on 127.0.0.1 that scrapes local workers, for the demo and the tests.

It runs the `prometheus` binary on PATH, such as the one of Debian's `prometheus` package
(tested with 2.42), with a generated config and its TSDB in a temporary folder that `stop()` removes.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from . import LocalServer, ServiceError, log_tail, make_work_dir, spawn, stop_process
from .ports import LOOPBACK, free_port

log = logging.getLogger(__name__)

JOB_NAME = "profilestream"
INSTALL_HINT = "install Debian's prometheus package (apt-get install prometheus) or put a prometheus binary on PATH"
_POLL_INTERVAL_S = 0.5
_REQUEST_TIMEOUT_S = 5.0


def find_prometheus() -> str | None:
    """Return the path of the `prometheus` binary on PATH or in /usr/bin, or None."""
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    return found


class PrometheusServer(LocalServer):
    """Prometheus scraping `targets` ("host:port" of worker HTTP servers) every `scrape_interval_s`.

    `rule_files` are loaded as alerting and recording rules and evaluated at the same interval.
    Use as a context manager or call `start()` and `stop()`.
    """

    LOG_NAME = "prometheus.log"

    def __init__(
        self,
        targets: Sequence[str],
        *,
        rule_files: Sequence[Path] = (),
        scrape_interval_s: int = 1,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.targets = list(targets)
        self.rule_files = [Path(path) for path in rule_files]
        self.scrape_interval_s = scrape_interval_s
        super().__init__(start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)

    @property
    def url(self) -> str:
        """Base URL of the web UI and HTTP API, "http://127.0.0.1:PORT"."""
        if self._port is None:
            raise ServiceError("Prometheus is not started; call start() first")
        return f"http://{LOOPBACK}:{self._port}"

    def start(self) -> PrometheusServer:
        """Write the config, start Prometheus and wait until it reports ready.

        Raises ServiceError when the binary is missing, a rule file does not exist, or the
        server exits or is not ready within start_timeout_s (with the end of its log).
        """
        if self._process is not None:
            raise ServiceError(f"Prometheus is already running at {self.url}; call stop() first")
        binary = find_prometheus()
        if binary is None:
            raise ServiceError(f"no prometheus binary found; {INSTALL_HINT}")
        for path in self.rule_files:
            if not path.is_file():
                raise ServiceError(f"Prometheus rule file {path} does not exist; pass an existing alerts file")
        self._work_dir = make_work_dir("profilestream-prometheus-")
        try:
            self._port = free_port()
            config_path = self._write_config()
            command = [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self._work_dir / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{self._port}",
            ]
            self._process = spawn(command, log_path=self.log_path, cwd=self._work_dir, death_signal=signal.SIGKILL)
            self.wait_until(self._ready, "Prometheus did not report ready", self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("prometheus_started url=%s pid=%s targets=%s", self.url, self._process.pid, ",".join(self.targets))
        return self

    def stop(self) -> None:
        """Stop Prometheus (SIGTERM, SIGKILL after stop_timeout_s) and delete its folder. Idempotent."""
        if self._process is not None:
            stop_process(self._process, stop_signal=signal.SIGTERM, timeout_s=self.stop_timeout_s, name="prometheus")
            log.info("prometheus_stopped port=%s pid=%s", self._port, self._process.pid)
            self._process = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None

    def api(self, path: str, **params: str) -> object:
        """GET an /api/v1 endpoint and return its `data`. Raises ServiceError unless the status is success."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=_REQUEST_TIMEOUT_S) as response:
                document = json.load(response)
        except urllib.error.HTTPError as error:
            # The API sends a JSON body with `error` for a bad query too.
            with error:
                body = error.read()
            try:
                document = json.loads(body)
            except ValueError:
                raise ServiceError(f"Prometheus API /api/v1/{path} returned HTTP {error.code}: {body[:200]!r}") from None
        if document.get("status") != "success":
            raise ServiceError(f"Prometheus API /api/v1/{path} failed: {document.get('error', document)}")
        return document["data"]

    def metric_names(self) -> set[str]:
        """Return the names of every series Prometheus has stored."""
        return set(self.api("label/__name__/values"))

    def targets_up(self) -> bool:
        """Return whether every scrape target's last scrape succeeded."""
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(target["health"] == "up" for target in targets)

    def rules(self) -> list[dict]:
        """Return every loaded rule with its state, health and last error."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_until(self, condition: Callable[[], bool], failure: str, timeout_s: float) -> None:
        """Poll `condition()` until it returns true. Raises TimeoutError naming `failure` with the log's end.

        A refused connection counts as false, because the server may not listen yet.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ServiceError(f"Prometheus exited with code {self._process.returncode}; log:\n{self._log_tail()}")
            try:
                if condition():
                    return
            except OSError:
                pass
            time.sleep(_POLL_INTERVAL_S)
        raise TimeoutError(f"{failure} within {timeout_s} s; Prometheus log:\n{self._log_tail()}")

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=_REQUEST_TIMEOUT_S) as response:
            return response.status == 200

    def _write_config(self) -> Path:
        interval = f"{self.scrape_interval_s}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path.resolve()) for path in self.rule_files],
            "scrape_configs": [{"job_name": JOB_NAME, "static_configs": [{"targets": self.targets}]}],
        }
        # Prometheus reads YAML, and JSON is valid YAML, so no YAML library is needed.
        path = self._work_dir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def _log_tail(self) -> str:
        return "(no log)" if self.log_path is None else log_tail(self.log_path)
