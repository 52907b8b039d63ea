"""The demo as a user runs it: `profilestream demo --prometheus` on the bundled data, with an LLM endpoint.

The user's LLM settings reach the demo's worker through the environment, here pointing at the
test suite's LLM stub. The stub's first reply is a server error and its second a truncated
reply, so the retry and fallback metrics get series too. The demo starts its own Kafka broker,
Postgres cluster, worker and Prometheus, so this is the slowest single test (about 2 minutes
on 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from stream.metrics_catalogue import catalogue
from stream.services.prometheus import INSTALL_HINT, find_prometheus
from tests.llm_stub import TEST_API_KEY, llm_stub_server, status, truncated  # noqa: F401 (fixture)

REPOSITORY = Path(__file__).resolve().parents[1]
ALERTS_FILE = REPOSITORY / "deploy" / "prometheus" / "alerts.yml"
DEMO_TIMEOUT_S = 540
MODEL = "stub-model"
SERVICE_DIR_PREFIXES = ("profilestream-kafka-", "profilestream-postgres-", "profilestream-prometheus-")
# The bundled data has no invalid records and no account deletions.
UNOBSERVED_ON_BUNDLED_DATA = {"profilestream_dead_letters_total", "profilestream_erasures_total"}


def service_dirs_of(pid: int) -> set[Path]:
    """Return the service folders that process `pid` created and that still exist.

    stream.services writes the creating process id into each folder's owner.pid, which separates
    the demo's folders from those of test sessions running at the same time.
    """
    temp = Path(tempfile.gettempdir())
    found = set()
    for prefix in SERVICE_DIR_PREFIXES:
        for path in temp.glob(f"{prefix}*"):
            try:
                owner = (path / "owner.pid").read_text().strip()
            except OSError:
                continue
            if owner == str(pid):
                found.add(path)
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def demo(llm_stub_server) -> dict:
    """Run the demo once; return its exit code, output and the service folders it left behind."""
    llm_stub_server.reset()
    llm_stub_server.script(status(500, retry_after_ms="10"), truncated())
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROFILESTREAM_")}
    env.update({
        "PROFILESTREAM_LLM_BASE_URL": llm_stub_server.base_url,
        "PROFILESTREAM_LLM_MODEL": MODEL,
        "PROFILESTREAM_LLM_API_KEY": TEST_API_KEY,
        "PROFILESTREAM_LLM_TOKENS_PER_DAY": "100000000",
    })
    # An asyncio subprocess, because the stub serves on this event loop while the demo runs.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream", "demo", "--prometheus", "--top", "2", "--timeout", "400",
        cwd=REPOSITORY, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), DEMO_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    return {"returncode": process.returncode, "stdout": stdout.decode(), "stderr": stderr.decode(),
            "left_behind": service_dirs_of(process.pid), "llm_requests": len(llm_stub_server.requests)}


pytestmark = [
    pytest.mark.skipif(find_prometheus() is None, reason=f"no Prometheus server: {INSTALL_HINT}"),
    pytest.mark.timeout(DEMO_TIMEOUT_S + 60),
]


def test_demo_exits_zero(demo: dict) -> None:
    assert demo["returncode"] == 0, demo["stderr"][-3000:]


def test_demo_prints_profiles(demo: dict) -> None:
    assert "Profiles of the 2 most active users:" in demo["stdout"]
    generators = re.findall(r"^se:\d+ +v\d+ +generator=(\S+)", demo["stdout"], re.MULTILINE)
    assert len(generators) == 2
    assert MODEL in generators, demo["stdout"][-2000:]


def test_demo_worker_calls_llm(demo: dict) -> None:
    assert demo["llm_requests"] > 0


def test_demo_read_api_answers(demo: dict) -> None:
    assert re.search(r"^Read API: curl http://127\.0\.0\.1:\d+/users/se%3A\d+/profile +\(HTTP 200,", demo["stdout"],
                     re.MULTILINE), demo["stdout"][-2000:]


def test_demo_prometheus_stores_observed_families(demo: dict) -> None:
    match = re.search(r"stores series of (\d+) of the (\d+) metric families", demo["stdout"])
    assert match, demo["stdout"][-2000:]
    assert int(match[2]) == len(catalogue())
    missing = re.search(r"^No series yet, .*?: (.*)\.$", demo["stdout"], re.MULTILINE)
    names = missing[1].split(", ") if missing else []
    unexpected = set(names) - UNOBSERVED_ON_BUNDLED_DATA
    assert not unexpected, f"the demo's Prometheus has no series of {sorted(unexpected)}"


def test_demo_alert_rules_evaluate(demo: dict) -> None:
    rules = sum(len(group["rules"]) for group in yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"])
    assert f"{rules} of {rules} alert rules evaluate without error" in demo["stdout"], demo["stdout"][-2000:]


def test_demo_stops_its_services(demo: dict) -> None:
    assert not demo["left_behind"]
