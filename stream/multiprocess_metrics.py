"""Prometheus multi-process mode: one /metrics view over several worker processes on one host.

prometheus-client switches to this mode when PROMETHEUS_MULTIPROC_DIR is set before it is
imported. Every process then writes its samples to files in that folder, and a scrape
merges the files of all processes, dead ones included. Each gauge declares a
`multiprocess_mode` that sets how its values merge, and the live* modes drop the values of
processes marked dead.
"""

from __future__ import annotations

import atexit
import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, multiprocess

from handlers.errors import ConfigError

logger = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """Return the folder of multi-process mode, or None when the mode is off."""
    return os.environ.get(MULTIPROC_DIR_VARIABLE) or None


def scrape_registry() -> CollectorRegistry:
    """Return the registry /metrics renders: the default one, or a new one that merges every process's files."""
    path = multiprocess_dir()
    if path is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def mark_dead_at_exit() -> None:
    """In multi-process mode, remove this process's live gauges from the merged view when it exits.

    A process killed with SIGKILL runs no exit hook, so its supervisor must call
    `prometheus_client.multiprocess.mark_process_dead(pid)` for it. Raises ConfigError when
    PROMETHEUS_MULTIPROC_DIR is not a folder.
    """
    path = multiprocess_dir()
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{MULTIPROC_DIR_VARIABLE}={path} is not a folder; create it (empty) or unset the variable")
    pid = os.getpid()
    atexit.register(multiprocess.mark_process_dead, pid, path)
    logger.info("metrics.multiprocess folder=%s pid=%s", path, pid)


def clear_gauge_series(gauge: Gauge, *labelvalues: str) -> None:
    """Drop one labelled series of `gauge`, or set it to 0 in multi-process mode.

    prometheus-client (0.26) cannot remove a series in multi-process mode, because the
    process's file keeps the last value. A 0 leaves a livesum total right and never wins a livemax.
    """
    if multiprocess_dir() is None:
        gauge.remove(*labelvalues)
    else:
        gauge.labels(*labelvalues).set(0)
