"""Command line for the local services.

    python -m stream.services fetch-kafka   # fetch the Kafka jars into the cache, print their folder
    python -m stream.services run           # start Kafka and Postgres until Ctrl+C or SIGTERM
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import ServiceError
from .kafka import KafkaBroker, ensure_kafka_jars
from .postgres import PostgresCluster

log = logging.getLogger(__name__)


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stream.services", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for the Kafka jars (default: $PROFILESTREAM_CACHE_DIR or ~/.cache/profilestream)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-kafka", help="fetch the Kafka broker jars with Maven if missing and print their folder")
    run = commands.add_parser(
        "run", help="start a Kafka broker and a Postgres cluster, print their addresses, stop both on Ctrl+C or SIGTERM"
    )
    run.add_argument("--kafka-heap", default="512m", help="maximum JVM heap of the broker, as for -Xmx (default: 512m)")
    return parser.parse_args(argv)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_services(cache_dir: Path | None, kafka_heap: str) -> None:
    """Start both services, print their addresses and block until SIGINT or SIGTERM, then stop both."""
    # SIGTERM acts like Ctrl+C, so the with block stops the services in either case, even
    # while they are still starting. SIGINT gets the handler too because a shell starts
    # background jobs with SIGINT ignored.
    previous_handlers = {
        signum: signal.signal(signum, _raise_keyboard_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with KafkaBroker(heap=kafka_heap, cache_dir=cache_dir) as broker, PostgresCluster() as cluster:
            print(f"KAFKA_BOOTSTRAP={broker.bootstrap_servers}", flush=True)
            print(f"POSTGRES_DSN={cluster.dsn}", flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        log.info("services_stopped reason=signal")
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    arguments = _parse_arguments(argv)
    try:
        if arguments.command == "fetch-kafka":
            print(ensure_kafka_jars(arguments.cache_dir), flush=True)
        else:
            _run_services(arguments.cache_dir, arguments.kafka_heap)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
