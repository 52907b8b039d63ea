"""The zero-configuration demo: local Kafka and Postgres, the bundled real data, profiles.

Everything the demo starts is stopped on the way out, also on Ctrl+C or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from handlers.sinks.postgres import PostgresSink

from .openapi import CURRENT_PROFILE_PATH, OPENAPI_PATH
from .progress import wait_until_caught_up
from .replay import replay
from .report import format_profile
from .scrape_check import format_scrape_summary, summarize_scrape
from .services import ServiceError, spawn
from .services.kafka import KafkaBroker
from .services.ports import free_port
from .services.postgres import PostgresCluster
from .services.prometheus import INSTALL_HINT, PrometheusServer, find_prometheus
from .settings import ENV_PREFIX, Settings, load_settings, settings_environment
from .worker import prepare

BUNDLED_DATA = "stackexchange-quantumcomputing.jsonl.gz"
WORKER_STOP_TIMEOUT_S = 30.0
READ_API_TIMEOUT_S = 10.0
# The alert rules exist in a source checkout only; an installed wheel has no deploy/ folder.
ALERTS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


def bundled_data_path() -> Path:
    return Path(str(resources.files("stream").joinpath("data", BUNDLED_DATA)))


def run_demo(*, keep_running: bool, timeout_s: float, top: int, prometheus: bool = False) -> int:
    """Run the demo; with `prometheus`, a local Prometheus scrapes the worker and loads the alert rules."""
    if prometheus and find_prometheus() is None:
        raise ServiceError(f"--prometheus needs a prometheus binary; {INSTALL_HINT}, or leave out --prometheus")
    # SIGTERM and SIGINT unwind like Ctrl+C, so every service the demo started is stopped. SIGINT
    # gets the handler too, because a shell starts a background job with SIGINT ignored.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="profilestream-demo-")))
        print("starting Kafka and Postgres on 127.0.0.1 ...", flush=True)
        broker = stack.enter_context(KafkaBroker())
        cluster = stack.enter_context(PostgresCluster())
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            postgres_dsn=cluster.dsn,
            app_id="profilestream-demo",
            partitions=2,
            http_port=free_port(),
            data_dir=str(workdir / "worker-data"),
            kafka_session_timeout_s=10.0,
        )
        asyncio.run(prepare(settings))
        data = bundled_data_path()
        print(f"replaying {data.name} (Stack Exchange, CC BY-SA; see stream/data/ATTRIBUTION.md)", flush=True)
        sent = asyncio.run(replay(data, settings)).sent
        worker = stack.enter_context(_worker_process(settings, workdir / "worker.log"))
        print(f"worker running (pid {worker.pid}, log {workdir / 'worker.log'}, metrics http://{settings.http_host}:{settings.http_port}/metrics)", flush=True)
        scraper = stack.enter_context(_prometheus(settings)) if prometheus else None
        progress = _wait_for_worker(settings, worker, sent, timeout_s)
        profiles = asyncio.run(_fetch_top(settings, top))
        _print_report(profiles, settings, sent, progress, time.monotonic() - started, keep_running=keep_running)
        if profiles:
            _print_read_api_sample(settings, profiles[0]["user_id"])
        if scraper is not None:
            print()
            print(format_scrape_summary(summarize_scrape(scraper), scraper.url), flush=True)
        if keep_running:
            if scraper is not None:
                print(f"Prometheus UI: {scraper.url}/graph, alerts: {scraper.url}/alerts", flush=True)
            print("services keep running; press Ctrl+C to stop them", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                worker.wait()
    return 0


def _print_read_api_sample(settings: Settings, user_id: str) -> None:
    """Fetch one profile through the worker's read API and print the request, so the user can try it."""
    base = f"http://{settings.http_host}:{settings.http_port}"
    url = base + CURRENT_PROFILE_PATH.format(user_id=urllib.parse.quote(user_id, safe=""))
    try:
        with urllib.request.urlopen(url, timeout=READ_API_TIMEOUT_S) as response:
            outcome = f"HTTP {response.status}, {len(response.read())} bytes of JSON"
    except OSError as error:  # HTTPError and URLError included
        outcome = f"failed: {error}"
    print(f"Read API: curl {url}  ({outcome}; OpenAPI description at {base}{OPENAPI_PATH})", flush=True)


def _prometheus(settings: Settings) -> PrometheusServer:
    rule_files = [ALERTS_FILE] if ALERTS_FILE.is_file() else []
    server = PrometheusServer([f"{settings.http_host}:{settings.http_port}"], rule_files=rule_files)
    loaded = f", alert rules from {ALERTS_FILE}" if rule_files else ", no alert rules (deploy/ is not next to this package)"
    print(f"starting Prometheus on 127.0.0.1, scraping the worker every {server.scrape_interval_s} s{loaded} ...", flush=True)
    return server


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _worker_process(settings: Settings, log_path: Path):
    # The worker gets the demo's settings: the local services plus the user's own settings,
    # such as an LLM endpoint or the profile language.
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.update(settings_environment(settings))
    # SIGTERM on the demo's death stops the worker too, even when the demo is killed.
    process = spawn([sys.executable, "-m", "stream", "worker"], log_path=log_path, cwd=Path.cwd(),
                    death_signal=signal.SIGTERM, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class _Progress:
    startup_s: float = 0.0
    processing_s: float = 0.0
    records: int = 0


def _wait_for_worker(settings: Settings, worker: subprocess.Popen, sent: int, timeout_s: float) -> _Progress:
    """Wait until the worker has committed everything; measure its start-up and processing time."""
    started = time.monotonic()
    first_commit_at: float | None = None
    progress = _Progress()
    with tqdm(total=sent, desc="worker progress", unit="record") as bar:

        def on_poll(lag: int, committed: int) -> None:
            nonlocal first_commit_at
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")
            if committed and first_commit_at is None:
                first_commit_at = time.monotonic()
            bar.total = max(bar.total, committed + lag)
            bar.n = committed
            bar.refresh()
            progress.records = committed

        asyncio.run(wait_until_caught_up(settings, timeout_s=timeout_s, on_poll=on_poll))
    finished = time.monotonic()
    first_commit_at = first_commit_at or finished
    progress.startup_s = first_commit_at - started
    progress.processing_s = finished - first_commit_at
    return progress


async def _fetch_top(settings: Settings, top: int) -> list[dict]:
    sink = PostgresSink(settings.postgres_dsn.get_secret_value(), pool_max=1)
    await sink.start()
    try:
        return await sink.fetch_top(top)
    finally:
        await sink.close()


def _print_report(profiles: list[dict], settings: Settings, sent: int, progress: _Progress, total_s: float,
                  *, keep_running: bool) -> None:
    print()
    heading = "Profile of the most active user:" if len(profiles) == 1 else f"Profiles of the {len(profiles)} most active users:"
    print(heading)
    print()
    for profile in profiles:
        print(format_profile(profile))
        print()
    rate = progress.records / max(progress.processing_s, 1e-9)
    print(f"{sent} events replayed. The worker joined its group and committed its first offsets after"
          f" {progress.startup_s:.1f} s, then committed {progress.records} records (events plus internal"
          f" audience and regeneration records) in {progress.processing_s:.1f} s, about {rate:.0f} records/s."
          f" Demo wall time {total_s:.1f} s.")
    dsn = settings.postgres_dsn.get_secret_value()
    print(f"Stored in Postgres at {dsn} (tables profiles_current and profiles_history) and on the compacted"
          f" topic {settings.topic_profiles!r} at {settings.kafka_bootstrap_servers}.")
    query = f"PROFILESTREAM_POSTGRES_DSN={dsn} .venv/bin/profilestream profiles --top 3"
    if keep_running:
        print(f"Both stay until Ctrl+C stops the demo. Try: {query}")
    else:
        print("Both are removed when the demo exits. Run it with --keep-running to query them, for example"
              f" with: {query.replace(dsn, '<the printed DSN>')}")
