"""A real Prometheus scrapes a real worker: every catalogued metric arrives, and the deploy files query only scraped metrics.

One worker on the test broker and database, with the LLM stub as its model endpoint,
processes the Stack Exchange fixture, a few invalid records and one account deletion. The
stub's first reply is a server error and its second a truncated reply, so the retry and
fallback metrics get series too. A Prometheus started from Debian's `prometheus` package on a free loopback port
scrapes the worker every second and loads deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio

from stream.importers import jsonl, stackexchange
from stream.metrics_catalogue import catalogue
from stream.openapi import CURRENT_PROFILE_PATH, OPENAPI_PATH
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.services.prometheus import INSTALL_HINT, PrometheusServer, find_prometheus
from stream.worker import prepare
from tests.llm_stub import TEST_API_KEY, llm_stub_server, status, truncated  # noqa: F401 (fixture)
from tests.test_deploy import ALERTS_FILE, DASHBOARD_FILE, K8S_DIR, METRIC_NAME, k8s_document, promql_expressions
from tests.worker_harness import WorkerProcess, isolated_settings

FIXTURE = Path(__file__).parent / "fixtures" / "stackexchange"
MODEL = "stub-model"
CATCH_UP_TIMEOUT_S = 120
PROMETHEUS_READY_TIMEOUT_S = 30
SCRAPE_TIMEOUT_S = 30
BAD_LINES = [
    b'{"schema": "post.v1", "event_id": "bad:1", "user_id": "edge:u2", "post_id": "x", "crea',
    b'{"schema": "post.v1", "event_id": "bad:2", "user_id": "edge:u2", "post_id": "x",'
    b' "created_at": "2099-01-01T00:00:00Z", "text": "from the future"}',
    b'{"schema": "like.v1", "event_id": "bad:3", "user_id": "edge:u2", "post_id": 7,'
    b' "post_author_id": "se:1", "created_at": "2018-09-02T00:00:00Z"}',
]
# Grafana's variables, replaced by values Prometheus accepts so the panel queries can run.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}

pytestmark = pytest.mark.skipif(find_prometheus() is None, reason=f"no Prometheus server: {INSTALL_HINT}")


def catalogue_series() -> set[str]:
    return {name for family in catalogue() for name in family.series_names}


def names_in(expression: str) -> set[str]:
    return set(METRIC_NAME.findall(expression))


def dashboard_panels() -> list[dict]:
    """Return the dashboard's panels without its rows, which hold no queries."""
    panels = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))["panels"]
    return [panel for panel in panels if panel["type"] != "row"]


def grafana_to_promql(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


def http_status(port: int, path: str) -> int:
    """GET a path of the worker's HTTP server and return the status code."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def run(kafka_bootstrap, module_database, llm_stub_server, tmp_path_factory):
    """Run the worker and Prometheus until every catalogued series arrived or time ran out.

    Yields {"prometheus": PrometheusServer, "worker_port": the worker's HTTP port}. Both keep
    running until the module's tests finish.
    """
    workdir = tmp_path_factory.mktemp("prometheus-scrape")
    llm_stub_server.reset()
    llm_stub_server.script(status(500, retry_after_ms="10"), truncated())
    settings = isolated_settings(
        kafka_bootstrap, module_database, workdir,
        llm_base_url=llm_stub_server.base_url, llm_model=MODEL, llm_api_key=TEST_API_KEY,
        llm_timeout_s=10.0, llm_tokens_per_day=10_000_000, min_events_new_user=2,
    )
    events, _ = stackexchange.convert(FIXTURE)
    events_path = workdir / "events.jsonl"
    jsonl.write_jsonl(events, events_path)
    deletion = {"schema": "user_deleted.v1", "event_id": "deleted:1", "user_id": events[-1]["user_id"],
                "deleted_at": "2024-01-01T00:00:00Z"}
    with events_path.open("ab") as file:
        file.write(b"".join(line + b"\n" for line in [*BAD_LINES, json.dumps(deletion).encode()]))
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    prometheus = PrometheusServer([f"127.0.0.1:{settings.http_port}"], rule_files=[ALERTS_FILE]).start()
    try:
        await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S, on_poll=lambda *_: worker.check_alive())
        # The read API metrics get series with the first request, and a 404 counts too.
        http_status(settings.http_port, OPENAPI_PATH)
        http_status(settings.http_port, CURRENT_PROFILE_PATH.format(user_id=events[0]["user_id"]))
        await asyncio.to_thread(prometheus.wait_until, prometheus.targets_up, "the worker target is not up",
                                PROMETHEUS_READY_TIMEOUT_S)
        expected = catalogue_series()
        try:
            await asyncio.to_thread(prometheus.wait_until, lambda: expected <= prometheus.metric_names(),
                                    "not every catalogued series arrived", SCRAPE_TIMEOUT_S)
        except TimeoutError:
            pass  # test_catalogue_series_scraped names the missing series.
        yield {"prometheus": prometheus, "worker_port": settings.http_port}
    finally:
        prometheus.stop()
        worker.stop()


@pytest.fixture
def scrape(run: dict) -> PrometheusServer:
    return run["prometheus"]


async def test_catalogue_series_scraped(scrape: PrometheusServer) -> None:
    missing = catalogue_series() - scrape.metric_names()
    assert not missing, f"Prometheus never received {sorted(missing)}"


async def test_dead_letter_series_scraped(scrape: PrometheusServer) -> None:
    result = scrape.api("query", query="sum(profilestream_dead_letters_total)")
    assert float(result["result"][0]["value"][1]) == len(BAD_LINES)


async def test_dashboard_panels_use_scraped_metrics(scrape: PrometheusServer) -> None:
    scraped = scrape.metric_names()
    for panel in dashboard_panels():
        for target in panel["targets"]:
            unknown = names_in(target["expr"]) - scraped
            assert not unknown, f"panel {panel['title']!r} queries {sorted(unknown)}, which the scrape lacks"


async def test_dashboard_panel_queries_run(scrape: PrometheusServer) -> None:
    for panel in dashboard_panels():
        for target in panel["targets"]:
            query = grafana_to_promql(target["expr"])
            assert "$" not in query, f"panel {panel['title']!r} uses a Grafana variable this test does not replace"
            scrape.api("query", query=query)


@pytest.mark.parametrize("source", [ALERTS_FILE, K8S_DIR / "prometheusrule.yaml"], ids=lambda path: path.name)
async def test_alert_rules_use_scraped_metrics(scrape: PrometheusServer, source: Path) -> None:
    scraped = scrape.metric_names()
    for expression in promql_expressions(source):
        unknown = names_in(expression) - scraped
        assert not unknown, f"{source.name}: {expression!r} uses {sorted(unknown)}, which the scrape lacks"


async def test_autoscaler_query_uses_scraped_metrics(scrape: PrometheusServer) -> None:
    for trigger in k8s_document("ScaledObject")["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        assert names_in(query) <= scrape.metric_names(), query
        scrape.api("query", query=query)


async def test_alert_rules_evaluate(scrape: PrometheusServer) -> None:
    """Prometheus evaluates every rule of alerts.yml against the real series without an error."""

    def evaluated() -> bool:
        rules = [rule for group in scrape.api("rules")["groups"] for rule in group["rules"]]
        return bool(rules) and all(rule["health"] != "unknown" for rule in rules)

    await asyncio.to_thread(scrape.wait_until, evaluated, "the rules were not evaluated", PROMETHEUS_READY_TIMEOUT_S)
    for group in scrape.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probe_path_ok_after_catch_up(run: dict, path: str) -> None:
    """The paths of the Deployment's probes return 200 on a worker that has caught up."""
    assert http_status(run["worker_port"], path) == 200

