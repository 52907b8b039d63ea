"""A single-node Apache Kafka broker (KRaft, broker and controller in one JVM) for development and tests.

The broker's jars come from Maven Central through `mvn dependency:copy-dependencies` and are
cached, so only the first start needs the network. Every broker gets a new temporary folder
with its configuration, data and log, deleted on stop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from . import LocalServer, ServiceError, log_tail, make_work_dir, run_tool, spawn, stop_process
from .ports import LOOPBACK, free_ports, is_listening

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
# kafka_2.13 4.4.0 logs through the SLF4J 1.7 API and brings log4j-core 2.25.5 but no binding
# between them, so without this binding the broker would log nothing.
LOG4J_VERSION = "2.25.5"
CACHE_DIR_VARIABLE = "PROFILESTREAM_CACHE_DIR"
_REQUIRED_JARS = (f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar", f"log4j-slf4j-impl-{LOG4J_VERSION}.jar")
_MAVEN_TIMEOUT_S = 900.0
_SETUP_TIMEOUT_S = 120.0  # for formatting the storage, which start_timeout_s does not bound
_POLL_INTERVAL_S = 0.25

_POM = f"""\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by stream.services.kafka: the runtime classpath of a Kafka {KAFKA_VERSION} broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>profilestream.local</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_VERSION}</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2_PROPERTIES = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.console.ref = console
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def default_cache_dir() -> Path:
    """Return $PROFILESTREAM_CACHE_DIR, or ~/.cache/profilestream when it is unset or empty."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "profilestream"


def ensure_kafka_jars(cache_dir: Path | None = None) -> Path:
    """Return the folder with the broker's jars, fetching them with Maven if they are missing.

    The folder is `<cache_dir>/kafka-4.4.0/lib`. Maven fills a temporary folder that is then
    renamed, so an interrupted fetch never leaves a partial `lib` behind. Raises ServiceError
    when `java` or `mvn` is missing or Maven fails.
    """
    version_dir = (cache_dir or default_cache_dir()) / f"kafka-{KAFKA_VERSION}"
    lib_dir = version_dir / "lib"
    if _has_required_jars(lib_dir):
        return lib_dir

    _require_executable("java", "install a Java 17 or newer runtime (on Debian: apt-get install openjdk-17-jre-headless)")
    maven = _require_executable("mvn", "install Maven 3 (on Debian: apt-get install maven)")
    version_dir.mkdir(parents=True, exist_ok=True)
    fetch_dir = Path(tempfile.mkdtemp(prefix=".fetch-", dir=version_dir))
    try:
        pom_path = fetch_dir / "pom.xml"
        pom_path.write_text(_POM, encoding="utf-8")
        started = time.monotonic()
        _run_maven(maven, pom_path, fetch_dir / "lib")
        log.info("kafka_jars_fetched folder=%s seconds=%.1f", lib_dir, time.monotonic() - started)
        os.replace(pom_path, version_dir / "pom.xml")
        _install_lib_dir(fetch_dir / "lib", lib_dir)
    finally:
        shutil.rmtree(fetch_dir, ignore_errors=True)
    return lib_dir


def _has_required_jars(lib_dir: Path) -> bool:
    return all((lib_dir / name).is_file() for name in _REQUIRED_JARS)


def _require_executable(name: str, fix: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name} not found on PATH, and the local Kafka broker needs it; {fix}")
    return found


def _run_maven(maven: str, pom_path: Path, output_dir: Path) -> None:
    log.info("kafka_jars_fetch_start version=%s output=%s", KAFKA_VERSION, output_dir)
    run_tool(
        [
            maven, "--batch-mode", "--quiet", "--file", pom_path,
            "dependency:copy-dependencies", f"-DoutputDirectory={output_dir}", "-DincludeScope=runtime",
        ],
        cwd=pom_path.parent,
        timeout_s=_MAVEN_TIMEOUT_S,
    )
    if not _has_required_jars(output_dir):
        raise ServiceError(f"Maven finished but {output_dir} lacks {', '.join(_REQUIRED_JARS)}; check {pom_path}")


def _install_lib_dir(fetched: Path, lib_dir: Path) -> None:
    """Rename `fetched` to `lib_dir`, unless a concurrent fetch already installed a complete one."""
    if _has_required_jars(lib_dir):
        return
    if lib_dir.exists():
        stale = lib_dir.with_name(f".stale-{uuid.uuid4().hex}")
        os.rename(lib_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(fetched, lib_dir)
    except OSError:
        if not _has_required_jars(lib_dir):
            raise


def new_cluster_id() -> str:
    """Return a random KRaft cluster id in the format of `kafka-storage random-uuid`.

    Kafka prints a Uuid as URL-safe base64 of its 16 bytes without padding, and never hands out
    one that starts with "-" because that would read as a command-line option.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


class KafkaBroker(LocalServer):
    """A single-node KRaft Kafka broker on 127.0.0.1, in a temporary folder removed on stop.

    Topics are never created automatically (auto.create.topics.enable=false), because the project
    creates its own with the partition counts it needs. `properties` overrides or adds broker
    settings. Use as a context manager or call `start()` and `stop()`, from a long-lived thread
    (see `stream.services`).
    """

    LOG_NAME = "broker.log"

    def __init__(
        self,
        *,
        heap: str = "512m",
        properties: Mapping[str, str] | None = None,
        jvm_options: Sequence[str] = (),
        cache_dir: Path | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        self.heap = heap
        self.extra_properties = dict(properties or {})
        self.jvm_options = list(jvm_options)
        self.cache_dir = cache_dir
        super().__init__(start_timeout_s=start_timeout_s, stop_timeout_s=stop_timeout_s)

    @property
    def bootstrap_servers(self) -> str:
        """Address for Kafka clients, "127.0.0.1:PORT"."""
        if self._port is None:
            raise ServiceError("the Kafka broker is not started; call start() first")
        return f"{LOOPBACK}:{self._port}"

    def start(self) -> KafkaBroker:
        """Fetch the jars if needed, format the storage, start the JVM and wait until it serves metadata.

        Raises ServiceError, with the last lines of the broker log, when the broker exits or does
        not respond within start_timeout_s.
        """
        if self._process is not None:
            raise ServiceError(f"the Kafka broker is already running at {self.bootstrap_servers}; call stop() first")
        if self._work_dir is not None:
            raise ServiceError("the Kafka broker was stopped with stop_server(); call start_server() or stop() first")
        lib_dir = ensure_kafka_jars(self.cache_dir)
        java = _require_executable("java", "install a Java 17 or newer runtime (on Debian: apt-get install openjdk-17-jre-headless)")
        started = time.monotonic()
        self._work_dir = make_work_dir("profilestream-kafka-")
        try:
            self._port, controller_port = free_ports(2)
            self._write_config(controller_port)
            self._format_storage(java, lib_dir)
            self._spawn(java, lib_dir)
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        log.info(
            "kafka_started bootstrap=%s pid=%s seconds=%.1f work_dir=%s",
            self.bootstrap_servers, self.pid, time.monotonic() - started, self._work_dir,
        )
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after stop_timeout_s) and delete its folder. Idempotent."""
        if self._process is not None:
            stop_process(self._process, stop_signal=signal.SIGTERM, timeout_s=self.stop_timeout_s, name="kafka")
            log.info("kafka_stopped port=%s pid=%s", self._port, self._process.pid)
            self._process = None
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        self._port = None

    def stop_server(self) -> None:
        """Stop the broker's JVM (SIGTERM, SIGKILL after stop_timeout_s) but keep its folder and ports.

        For outage tests: `start_server()` brings the same broker back with its topics, offsets
        and cluster id, at the same bootstrap address.
        """
        if self._process is None:
            raise ServiceError("the Kafka broker is not running; call start() or start_server() first")
        stop_process(self._process, stop_signal=signal.SIGTERM, timeout_s=self.stop_timeout_s, name="kafka")
        log.info("kafka_server_stopped port=%s pid=%s work_dir=%s", self._port, self._process.pid, self._work_dir)
        self._process = None

    def start_server(self) -> KafkaBroker:
        """Start the broker that `stop_server()` stopped, with the same configuration and data.

        Raises ServiceError when the broker runs already, when it was never started or was
        deleted by `stop()`, or when it does not serve metadata within start_timeout_s
        (another process may have taken one of its ports in the meantime).
        """
        if self._process is not None:
            raise ServiceError(f"the Kafka broker is already running at {self.bootstrap_servers}")
        if self._work_dir is None or self._port is None:
            raise ServiceError("the Kafka broker has no data directory; call start() to create one")
        lib_dir = ensure_kafka_jars(self.cache_dir)
        java = _require_executable("java", "install a Java 17 or newer runtime (on Debian: apt-get install openjdk-17-jre-headless)")
        started = time.monotonic()
        try:
            self._spawn(java, lib_dir)
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        log.info("kafka_server_started bootstrap=%s pid=%s seconds=%.1f", self.bootstrap_servers, self.pid,
                 time.monotonic() - started)
        return self

    def _spawn(self, java: str, lib_dir: Path) -> None:
        assert self._work_dir is not None
        self._process = spawn(
            [java, *self._jvm_arguments(lib_dir), "kafka.Kafka", self._work_dir / "server.properties"],
            log_path=self.log_path,
            cwd=self._work_dir,
            # The data is thrown away, so an orphaned broker needs no graceful shutdown.
            death_signal=signal.SIGKILL,
        )

    def _properties(self, controller_port: int) -> dict[str, str]:
        assert self._work_dir is not None
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{controller_port}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self._port},CONTROLLER://{LOOPBACK}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self._port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._work_dir / "data"),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50 makes the first consumer group join faster.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        properties.update(self.extra_properties)
        return properties

    def _write_config(self, controller_port: int) -> None:
        assert self._work_dir is not None
        lines = [f"{name}={value}" for name, value in self._properties(controller_port).items()]
        (self._work_dir / "server.properties").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self._work_dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES, encoding="utf-8")

    def _jvm_arguments(self, lib_dir: Path) -> list[str]:
        assert self._work_dir is not None
        return [
            f"-Xmx{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._work_dir / 'log4j2.properties'}",
            *self.jvm_options,
            "-cp", f"{lib_dir}/*",
        ]

    def _format_storage(self, java: str, lib_dir: Path) -> None:
        assert self._work_dir is not None
        # No --standalone: with controller.quorum.voters set the quorum is static, and
        # kafka-storage rejects the flag.
        run_tool(
            [
                java, *self._jvm_arguments(lib_dir), "kafka.tools.StorageTool", "format",
                "--cluster-id", new_cluster_id(), "--config", self._work_dir / "server.properties",
            ],
            cwd=self._work_dir,
            timeout_s=_SETUP_TIMEOUT_S,
        )

    def _wait_until_ready(self, started: float) -> None:
        assert self._process is not None
        assert self._port is not None
        assert self.log_path is not None
        deadline = started + self.start_timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServiceError(
                    f"the Kafka broker exited with code {self._process.returncode} during start;"
                    f" last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if is_listening(self._port) and _serves_metadata(self.bootstrap_servers):
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"the Kafka broker at {self.bootstrap_servers} did not respond within {self.start_timeout_s:g} s"
                    f" (start_timeout_s); last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)


def _serves_metadata(bootstrap_servers: str) -> bool:
    """Return whether the broker responds to a metadata request with at least one live broker."""

    async def probe() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=5000)
        try:
            await client.bootstrap()
            return bool(client.cluster.brokers())
        except KafkaError:
            return False
        finally:
            await client.close()

    # A private thread and event loop, so start() works whether or not the caller runs a loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(lambda: asyncio.run(probe())).result()
