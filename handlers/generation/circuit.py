"""A circuit breaker that stops calling a model endpoint that keeps failing.

Closed: every call passes, and consecutive unhealthy outcomes are counted. The circuit
opens after `failure_threshold` of them in a row, or at once on quota_exhausted.
Open: every call is rejected until the cool-down ends.
Half-open: the first call after the cool-down is the probe, and every other call is
rejected while it runs. A healthy probe closes the circuit and resets the cool-down. An
unhealthy probe reopens it with the cool-down doubled, up to `max_cooldown_s`.

Every admitted call gets a Permit, which the caller returns once, through `record` with
the call's outcome or through `release` when the call ended without reaching the
endpoint. Returning a permit twice raises ValueError. Outcomes of calls admitted before the last state change are
ignored, because they describe the endpoint as it was then.

The class is pure logic for one asyncio event loop: it neither sleeps nor locks, and
`clock` (time.monotonic by default) is the only source of time.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Outcomes that mean the endpoint is unhealthy. rate_limited reaches the circuit only after
# the generator's own retries, so one throttled attempt does not count.
UNHEALTHY_OUTCOMES = frozenset({"timeout", "server_error", "connection_error", "rate_limited"})
# Outcomes after which waiting for more failures is pointless: no call succeeds until
# someone adds credit.
OPEN_AT_ONCE_OUTCOMES = frozenset({"quota_exhausted"})


class CircuitState(enum.IntEnum):
    """Circuit state. The values are those of the circuit state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Permit:
    """Permission for one call, returned by CircuitBreaker.acquire."""

    __slots__ = ("epoch", "probe", "settled")

    def __init__(self, epoch: int, probe: bool) -> None:
        self.epoch = epoch
        self.probe = probe
        self.settled = False

    def __repr__(self) -> str:
        return f"Permit(epoch={self.epoch}, probe={self.probe}, settled={self.settled})"


class CircuitBreaker:
    """Circuit breaker state machine with the transitions of the module docstring.

    `cooldown_s` is the first open period in seconds of `clock`, and `max_cooldown_s` caps
    the doubling after failed probes.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold={failure_threshold} must be at least 1")
        if not (math.isfinite(cooldown_s) and cooldown_s > 0):
            raise ValueError(f"cooldown_s={cooldown_s} must be a positive number of seconds")
        if not (math.isfinite(max_cooldown_s) and max_cooldown_s >= cooldown_s):
            raise ValueError(f"max_cooldown_s={max_cooldown_s} must be a finite number of seconds of at least cooldown_s={cooldown_s}")
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._epoch = 0
        self._failures = 0
        self._cooldown_s = cooldown_s
        self._open_until = -math.inf
        self._opened_by: str | None = None
        self._probe: Permit | None = None
        self._listeners: list[Callable[[CircuitState], None]] = []

    def add_listener(self, listener: Callable[[CircuitState], None]) -> None:
        """Call `listener` with the new state at every state change, such as to set a metric."""
        self._listeners.append(listener)

    @property
    def state(self) -> CircuitState:
        """Current state. An open circuit whose cool-down has ended stays OPEN until the next `acquire`."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Unhealthy outcomes in a row since the circuit last closed or saw a healthy call."""
        return self._failures

    @property
    def opened_by(self) -> str | None:
        """Outcome that last opened the circuit, None if it never opened."""
        return self._opened_by

    @property
    def cooldown_s(self) -> float:
        """Length of the current (or, when closed, the next) open period, in seconds."""
        return self._cooldown_s

    def seconds_until_probe(self) -> float:
        """Return the seconds left before an open circuit admits a probe, 0.0 when not open."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def rejects_calls(self) -> bool:
        """Return whether `acquire` would return None now, without changing any state."""
        if self._state is CircuitState.OPEN:
            return self._clock() < self._open_until
        if self._state is CircuitState.HALF_OPEN:
            return self._probe is not None
        return False

    def acquire(self) -> Permit | None:
        """Return a Permit for one call, or None when the circuit rejects the call.

        The first call after the cool-down moves an open circuit to half-open and gets
        the probe permit (`permit.probe` is True).
        """
        if self._state is CircuitState.OPEN:
            if self._clock() < self._open_until:
                return None
            self._enter(CircuitState.HALF_OPEN)
            logger.info("llm_circuit_half_open cooldown_s=%.1f", self._cooldown_s)
        if self._state is CircuitState.HALF_OPEN:
            if self._probe is not None:
                return None
            self._probe = Permit(self._epoch, probe=True)
            return self._probe
        return Permit(self._epoch, probe=False)

    def record(self, permit: Permit, outcome: str | None) -> None:
        """Record the result of the call that `permit` admitted.

        `outcome` is None for a successful call, else the GenerationError outcome. Outcomes
        outside UNHEALTHY_OUTCOMES and OPEN_AT_ONCE_OUTCOMES (an unusable reply, say) count
        as healthy, because the endpoint did reply. Raises ValueError if `permit` was
        already recorded or released.
        """
        self._settle(permit)
        if permit.epoch != self._epoch:
            return
        if outcome in OPEN_AT_ONCE_OUTCOMES:
            self._on_failure(permit, outcome, at_once=True)
        elif outcome in UNHEALTHY_OUTCOMES:
            self._on_failure(permit, outcome, at_once=False)
        else:
            self._on_success(permit)

    def release(self, permit: Permit) -> None:
        """Return a permit whose call never reached the endpoint (cancelled, or blocked by a budget).

        A released probe lets the next call become the probe. Raises ValueError if `permit`
        was already recorded or released.
        """
        self._settle(permit)
        if permit is self._probe:
            self._probe = None

    def _settle(self, permit: Permit) -> None:
        if permit.settled:
            raise ValueError(f"{permit!r} was already recorded or released; return each permit once")
        permit.settled = True

    def _on_success(self, permit: Permit) -> None:
        self._failures = 0
        if permit is self._probe:
            self._cooldown_s = self.base_cooldown_s
            self._enter(CircuitState.CLOSED)
            logger.info("llm_circuit_closed")

    def _on_failure(self, permit: Permit, outcome: str, *, at_once: bool) -> None:
        self._failures += 1
        if permit is self._probe:
            self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
            self._open(outcome)
        elif at_once or self._failures >= self.failure_threshold:
            self._open(outcome)

    def _open(self, outcome: str) -> None:
        self._open_until = self._clock() + self._cooldown_s
        self._opened_by = outcome
        self._enter(CircuitState.OPEN)
        logger.warning(
            "llm_circuit_opened outcome=%s consecutive_failures=%d cooldown_s=%.1f",
            outcome, self._failures, self._cooldown_s,
        )

    def _enter(self, state: CircuitState) -> None:
        """Switch to `state`. Permits issued before the switch no longer affect the circuit."""
        self._state = state
        self._epoch += 1
        self._probe = None
        if state is CircuitState.CLOSED:
            self._failures = 0
        for listener in self._listeners:
            listener(state)
