"""The demo as a user runs it: `profilestream demo --prometheus` on the bundled data.

It starts its own Kafka broker, Postgres cluster, worker and Prometheus, so this is the
slowest single test (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from stream.metrics_catalogue import catalogue
from stream.services.prometheus import INSTALL_HINT, find_prometheus

REPOSITORY = Path(__file__).resolve().parents[1]
ALERTS_FILE = REPOSITORY / "deploy" / "prometheus" / "alerts.yml"
DEMO_TIMEOUT_S = 540
SERVICE_DIR_PREFIXES = ("profilestream-kafka-", "profilestream-postgres-", "profilestream-prometheus-")
# Families a run without an LLM endpoint, invalid records or account deletions never observes.
UNOBSERVED_WITHOUT_FAULTS = re.compile(r"profilestream_(llm_.*|dead_letters_total|erasures_total)")


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


@pytest.fixture(scope="module")
def demo() -> dict:
    """Run the demo once; return its exit code, output and the service folders it left behind."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROFILESTREAM_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "stream", "demo", "--prometheus", "--top", "2", "--timeout", "400"],
        cwd=REPOSITORY, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return {"returncode": process.returncode, "stdout": stdout, "stderr": stderr,
            "left_behind": service_dirs_of(process.pid)}


pytestmark = [
    pytest.mark.skipif(find_prometheus() is None, reason=f"no Prometheus server: {INSTALL_HINT}"),
    pytest.mark.timeout(DEMO_TIMEOUT_S + 60),
]


def test_demo_exits_zero(demo: dict) -> None:
    assert demo["returncode"] == 0, demo["stderr"][-3000:]


def test_demo_prints_profiles(demo: dict) -> None:
    assert "Profiles of the 2 most active users:" in demo["stdout"]
    assert len(re.findall(r"^se:\d+ +v\d+ +generator=rules", demo["stdout"], re.MULTILINE)) == 2


def test_demo_read_api_answers(demo: dict) -> None:
    assert re.search(r"^Read API: curl http://127\.0\.0\.1:\d+/users/se%3A\d+/profile +\(HTTP 200,", demo["stdout"],
                     re.MULTILINE), demo["stdout"][-2000:]


def test_demo_prometheus_stores_observed_families(demo: dict) -> None:
    match = re.search(r"stores series of (\d+) of the (\d+) metric families", demo["stdout"])
    assert match, demo["stdout"][-2000:]
    assert int(match[2]) == len(catalogue())
    missing = re.search(r"^No series yet, .*?: (.*)\.$", demo["stdout"], re.MULTILINE)
    names = missing[1].split(", ") if missing else []
    unexpected = [name for name in names if not UNOBSERVED_WITHOUT_FAULTS.fullmatch(name)]
    assert not unexpected, f"the demo's Prometheus has no series of {unexpected}"


def test_demo_alert_rules_evaluate(demo: dict) -> None:
    rules = sum(len(group["rules"]) for group in yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"])
    assert f"{rules} of {rules} alert rules evaluate without error" in demo["stdout"], demo["stdout"][-2000:]


def test_demo_stops_its_services(demo: dict) -> None:
    assert not demo["left_behind"]
