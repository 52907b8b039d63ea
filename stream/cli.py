"""The `profilestream` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiokafka.errors import KafkaError

from handlers.errors import ConfigError, ProfilestreamError

from .logs import LogOptions, configure_logging
from .settings import load_settings

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profilestream", description="Live user profiles from a Kafka event stream.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("worker", help="run the stream worker (settings from PROFILESTREAM_* variables)")
    commands.add_parser("topics", help="create the topics the worker needs and check their partition counts")
    commands.add_parser("migrate", help="create or upgrade the Postgres tables (needs PROFILESTREAM_POSTGRES_DSN)")

    importer = commands.add_parser("import", help="convert a public data dump into event JSON lines")
    importer.add_argument("source", choices=["stackexchange", "bluesky"], help="format of the dump")
    importer.add_argument("folder", type=Path, help="folder of the dump (Posts.xml etc., or posts.jsonl and follows.csv)")
    importer.add_argument("-o", "--output", type=Path, required=True, help="output file; a .gz suffix compresses it")

    replay = commands.add_parser("replay", help="produce a JSON-lines event file into the input topics")
    replay.add_argument("file", type=Path, help="JSON lines, plain or .gz")
    replay.add_argument("--rate", type=float, default=None, help="maximum events per second (default: unlimited)")
    replay.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    profiles = commands.add_parser("profiles", help="print current profiles from Postgres")
    profiles.add_argument("--user", help="print this user's current profile and history as JSON")
    profiles.add_argument("--top", type=int, default=10, help="number of most active users to list (default: 10)")

    api = commands.add_parser("api", help="serve the read API over Postgres without a worker, for example on a read replica")
    api.add_argument("--host", help="address to listen on (default: PROFILESTREAM_HTTP_HOST)")
    api.add_argument("--port", type=_tcp_port, help="TCP port to listen on, 0 for a free one (default: PROFILESTREAM_HTTP_PORT)")

    health = commands.add_parser("health", help="print a running worker's readiness; exit 0 ready, 1 not ready, 2 unreachable")
    health.add_argument("--url", help="readiness URL (default: /readyz on PROFILESTREAM_HTTP_HOST:PROFILESTREAM_HTTP_PORT)")

    demo = commands.add_parser("demo", help="start local Kafka and Postgres, replay the bundled data, print profiles")
    demo.add_argument("--keep-running", action="store_true", help="keep the services up after printing, until Ctrl+C")
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the worker to catch up (default: 600)")
    demo.add_argument("--top", type=int, default=10, help="number of profiles to print (default: 10)")
    demo.add_argument("--prometheus", action="store_true",
                      help="also start a local Prometheus (Debian's prometheus package) that scrapes the worker and"
                           " loads deploy/prometheus/alerts.yml, and print which metric families it stored")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(LogOptions.from_settings(load_settings()))
    except ConfigError:
        # The command reports the configuration error itself; log plainly until then.
        configure_logging(LogOptions())
    try:
        return _run(args)
    except ConfigError as error:
        print(f"profilestream: {error}", file=sys.stderr)
        return 2
    except ProfilestreamError as error:
        print(f"profilestream: {error}", file=sys.stderr)
        return 1
    except KafkaError as error:
        print(f"profilestream: Kafka request failed: {error}; check that the brokers in"
              " PROFILESTREAM_KAFKA_BOOTSTRAP_SERVERS are running and reachable", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"profilestream: {error}; check the addresses in PROFILESTREAM_POSTGRES_DSN and"
              " PROFILESTREAM_KAFKA_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("profilestream: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "import":
        from .importers import convert_to_file

        stats = convert_to_file(args.source, args.folder, args.output)
        print(f"wrote {args.output}: {stats}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(keep_running=args.keep_running, timeout_s=args.timeout, top=args.top, prometheus=args.prometheus)
    settings = load_settings()
    if args.command == "worker":
        from .worker import run_worker

        run_worker(settings)
        return 0
    if args.command == "api":
        from .api_server import serve_api

        host = settings.http_host if args.host is None else args.host
        port = settings.http_port if args.port is None else args.port
        asyncio.run(serve_api(settings, host, port))
        return 0
    if args.command == "health":
        from .health import probe_readiness, readiness_url

        return probe_readiness(args.url or readiness_url(settings))
    if args.command == "topics":
        from .topics import ensure_topics

        created = asyncio.run(ensure_topics(settings))
        print(f"created topics: {', '.join(created) or 'none (all existed)'}")
        return 0
    if args.command == "migrate":
        from handlers.sinks.postgres import migrate

        from .postgres_tls import postgres_ssl

        asyncio.run(migrate(_require_dsn(settings), ssl=postgres_ssl(settings)))
        print("migrations applied")
        return 0
    if args.command == "replay":
        from .replay import replay

        stats = asyncio.run(replay(args.file, settings, rate_per_s=args.rate, progress=not args.no_progress))
        print(f"sent {stats.sent} records in {stats.seconds:.1f} s ({stats.unroutable} unroutable, sent unkeyed to "
              f"{settings.topic_posts}); per topic: {stats.by_topic}")
        return 0
    if args.command == "profiles":
        from .postgres_tls import postgres_ssl
        from .report import print_profiles

        asyncio.run(print_profiles(_require_dsn(settings), user_id=args.user, top=args.top, ssl=postgres_ssl(settings)))
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")


def _tcp_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is invalid; expected an integer from 0 to 65535")
    return port


def _require_dsn(settings) -> str:
    if settings.postgres_dsn is None:
        raise ConfigError("PROFILESTREAM_POSTGRES_DSN is not set; set it to the Postgres connection string")
    return settings.postgres_dsn.get_secret_value()
