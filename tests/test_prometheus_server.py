"""The local Prometheus helper: start-up errors name the fix, and a started server scrapes its target."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from stream.services import ServiceError
from stream.services import prometheus as prometheus_module
from stream.services.prometheus import PrometheusServer, find_prometheus

needs_prometheus = pytest.mark.skipif(find_prometheus() is None, reason=f"no Prometheus server: {prometheus_module.INSTALL_HINT}")

METRICS_PAGE = b"# TYPE demo_up gauge\ndemo_up 1\n"


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(METRICS_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def metrics_target():
    """A /metrics page on a free 127.0.0.1 port, served from a thread; yields "127.0.0.1:PORT"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_missing_binary_names_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_module, "find_prometheus", lambda: None)
    with pytest.raises(ServiceError, match="apt-get install prometheus"):
        PrometheusServer(["127.0.0.1:1"]).start()


@needs_prometheus
def test_missing_rule_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "alerts.yml"
    with pytest.raises(ServiceError, match=str(missing)):
        PrometheusServer(["127.0.0.1:1"], rule_files=[missing]).start()


@needs_prometheus
def test_invalid_rule_file_shows_log(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text("groups:\n  - name: broken\n    rules:\n      - alert: Broken\n        expr: rate(\n", encoding="utf-8")
    server = PrometheusServer(["127.0.0.1:1"], rule_files=[rules])
    with pytest.raises(ServiceError, match="exited with code") as error:
        server.start()
    assert "alerts.yml" in str(error.value)
    assert server.log_path is None


@needs_prometheus
def test_server_scrapes_target(metrics_target: str) -> None:
    with PrometheusServer([metrics_target]) as server:
        server.wait_until(server.targets_up, "the target is not up", 30)
        server.wait_until(lambda: "demo_up" in server.metric_names(), "demo_up was not stored", 30)
        work_dir = server.log_path.parent
        assert work_dir.is_dir()
    assert not work_dir.exists()


@needs_prometheus
def test_bad_query_raises_service_error(metrics_target: str) -> None:
    with PrometheusServer([metrics_target]) as server:
        with pytest.raises(ServiceError, match="bad_data|parse error"):
            server.api("query", query="rate(")
