"""Fault injection for crash tests: the worker kills itself with SIGKILL at a named point.

`PROFILESTREAM_TEST_CRASH_AT=<point>:<n>` makes the n-th call of `crash_point(<point>)` send
SIGKILL to its own process, so nothing after that point runs: no offset commit, no flush,
no shutdown hook. The variable is read once, at the first call. Without it every call does
nothing. Points:

- `after_postgres_write`: in the generation stage, after every sink stored one profile
  version. Postgres is the last sink, so the version is in Postgres and on the profile
  topic, and the offset of its regeneration request is not committed yet.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal

from handlers.errors import ConfigError

CRASH_AT_VARIABLE = "PROFILESTREAM_TEST_CRASH_AT"
POINTS = frozenset({"after_postgres_write"})

logger = logging.getLogger(__name__)

_hits: collections.Counter = collections.Counter()


def crash_point(name: str, **context: object) -> None:
    """Kill this process with SIGKILL if `name` is the configured point and this is its n-th hit.

    `context` (for example the user id and version) goes into the log line written first.
    """
    target = _crash_target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] != target[1]:
        return
    details = " ".join(f"{key}={value}" for key, value in context.items())
    logger.warning("fault.crash_point point=%s hit=%d %s", name, _hits[name], details)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@functools.cache
def _crash_target() -> tuple[str, int] | None:
    value = os.environ.get(CRASH_AT_VARIABLE)
    if not value:
        return None
    name, _, count = value.rpartition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
        raise ConfigError(
            f"{CRASH_AT_VARIABLE}={value!r} is invalid; expected <point>:<n> with a point out of"
            f" {', '.join(sorted(POINTS))} and n >= 1, or leave it unset"
        )
    return name, int(count)
