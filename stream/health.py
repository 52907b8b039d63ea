"""Readiness of the worker: the status it depends on, the verdict, and the client check of `profilestream health`.

This module imports no Kafka or HTTP server library, so the health command starts fast.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from .settings import Settings

NOT_ASSIGNED = "no_partitions_assigned"
RECOVERING = "table_recovery_pending"
STALLED = "consumer_stalled"

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 2
PROBE_TIMEOUT_S = 5.0


@dataclass
class WorkerStatus:
    """What readiness depends on, updated by the rebalance signals and the consumer monitor."""

    assigned_partitions: frozenset[TopicPartition] = frozenset()
    recovered: bool = False
    stalled_partitions: frozenset[TopicPartition] = frozenset()


@dataclass(frozen=True)
class Readiness:
    """The readiness verdict. `reasons` names every failed condition and is empty when ready."""

    ready: bool
    reasons: tuple[str, ...]
    assigned_partitions: tuple[str, ...] = field(default=())
    stalled_partitions: tuple[str, ...] = field(default=())

    def as_json(self) -> dict:
        return {
            "ready": self.ready,
            "reasons": list(self.reasons),
            "assigned_partitions": list(self.assigned_partitions),
            "stalled_partitions": list(self.stalled_partitions),
        }


def readiness(status: WorkerStatus) -> Readiness:
    """Decide readiness: input partitions assigned, table recovery finished, and no stalled partition."""
    reasons = []
    if not status.assigned_partitions:
        reasons.append(NOT_ASSIGNED)
    if not status.recovered:
        reasons.append(RECOVERING)
    if status.stalled_partitions:
        reasons.append(STALLED)
    return Readiness(
        ready=not reasons,
        reasons=tuple(reasons),
        assigned_partitions=_names(status.assigned_partitions),
        stalled_partitions=_names(status.stalled_partitions),
    )


def _names(partitions: frozenset[TopicPartition]) -> tuple[str, ...]:
    return tuple(f"{partition.topic}:{partition.partition}" for partition in sorted(partitions))


def readiness_url(settings: Settings) -> str:
    """Return the worker's /readyz URL, reaching a wildcard listen address through loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.http_host, settings.http_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}/readyz"


def probe_readiness(url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Fetch a worker's /readyz, print its JSON body and return the exit code.

    Returns 0 when the worker is ready (200), 1 when it is not (503), and 2 when it cannot
    be reached or returns anything other than readiness JSON.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        print(f"profilestream: invalid URL {url!r}; give an http:// or https:// URL of the worker's /readyz", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return _print_verdict(url, response.status, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return _print_verdict(url, error.code, error.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", error)
        print(f"profilestream: cannot reach {url}: {reason}; check that the worker runs and the URL "
              "(or PROFILESTREAM_HTTP_HOST and PROFILESTREAM_HTTP_PORT)", file=sys.stderr)
        return EXIT_UNREACHABLE


def _print_verdict(url: str, status: int, body: bytes) -> int:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if status not in (200, 503) or not isinstance(document, dict) or "ready" not in document:
        print(f"profilestream: {url} returned HTTP {status} without readiness JSON; check that the URL ends in /readyz",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(document, indent=2))
    return EXIT_READY if status == 200 and document["ready"] is True else EXIT_NOT_READY
