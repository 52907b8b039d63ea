"""Circuit breaker state machine: unit cases and hypothesis properties on a manual clock."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from handlers.generation.circuit import OPEN_AT_ONCE_OUTCOMES, UNHEALTHY_OUTCOMES, CircuitBreaker, CircuitState

THRESHOLD = 3
COOLDOWN_S = 10.0
MAX_COOLDOWN_S = 35.0
HEALTHY_OUTCOMES = (None, "ungrounded", "refusal", "truncated", "invalid_json", "schema_invalid")
ALL_OUTCOMES = (*HEALTHY_OUTCOMES, *sorted(UNHEALTHY_OUTCOMES), *sorted(OPEN_AT_ONCE_OUTCOMES))


class ManualClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_circuit(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=THRESHOLD, cooldown_s=COOLDOWN_S, max_cooldown_s=MAX_COOLDOWN_S, clock=clock)


def fail(circuit: CircuitBreaker, times: int, outcome: str = "server_error") -> None:
    for _ in range(times):
        circuit.record(circuit.acquire(), outcome)


def open_circuit(circuit: CircuitBreaker) -> None:
    fail(circuit, THRESHOLD)
    assert circuit.state is CircuitState.OPEN


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def circuit(clock: ManualClock) -> CircuitBreaker:
    return make_circuit(clock)


# Closed.

def test_new_circuit_closed(circuit: CircuitBreaker) -> None:
    assert circuit.state is CircuitState.CLOSED
    assert circuit.rejects_calls() is False


def test_closed_permit_not_probe(circuit: CircuitBreaker) -> None:
    permit = circuit.acquire()

    assert permit is not None
    assert permit.probe is False


def test_failures_below_threshold_stay_closed(circuit: CircuitBreaker) -> None:
    fail(circuit, THRESHOLD - 1)

    assert circuit.state is CircuitState.CLOSED
    assert circuit.consecutive_failures == THRESHOLD - 1


@pytest.mark.parametrize("outcome", sorted(UNHEALTHY_OUTCOMES))
def test_threshold_failures_open(circuit: CircuitBreaker, outcome: str) -> None:
    fail(circuit, THRESHOLD, outcome)

    assert circuit.state is CircuitState.OPEN


def test_quota_opens_at_once(circuit: CircuitBreaker) -> None:
    fail(circuit, 1, "quota_exhausted")

    assert circuit.state is CircuitState.OPEN
    assert circuit.opened_by == "quota_exhausted"


def test_success_resets_failure_count(circuit: CircuitBreaker) -> None:
    fail(circuit, THRESHOLD - 1)
    circuit.record(circuit.acquire(), None)
    fail(circuit, THRESHOLD - 1)

    assert circuit.state is CircuitState.CLOSED
    assert circuit.consecutive_failures == THRESHOLD - 1


@pytest.mark.parametrize("outcome", HEALTHY_OUTCOMES[1:])
def test_unusable_reply_counts_healthy(circuit: CircuitBreaker, outcome: str) -> None:
    fail(circuit, THRESHOLD - 1)
    circuit.record(circuit.acquire(), outcome)

    assert circuit.consecutive_failures == 0


def test_released_permit_not_counted(circuit: CircuitBreaker) -> None:
    fail(circuit, THRESHOLD - 1)
    circuit.release(circuit.acquire())

    assert circuit.consecutive_failures == THRESHOLD - 1
    assert circuit.state is CircuitState.CLOSED


# Open.

def test_open_rejects_before_cooldown(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S - 0.001)

    assert circuit.rejects_calls() is True
    assert circuit.acquire() is None
    assert circuit.state is CircuitState.OPEN


def test_open_reports_wait(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(4.0)

    assert circuit.seconds_until_probe() == pytest.approx(COOLDOWN_S - 4.0)


def test_stale_success_keeps_open(circuit: CircuitBreaker) -> None:
    early = circuit.acquire()
    open_circuit(circuit)

    circuit.record(early, None)

    assert circuit.state is CircuitState.OPEN


# Half-open.

def test_cooldown_end_admits_probe(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)

    probe = circuit.acquire()

    assert probe is not None
    assert probe.probe is True
    assert circuit.state is CircuitState.HALF_OPEN


def test_half_open_rejects_second_call(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)
    circuit.acquire()

    assert circuit.rejects_calls() is True
    assert circuit.acquire() is None


def test_probe_success_closes(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)

    circuit.record(circuit.acquire(), None)

    assert circuit.state is CircuitState.CLOSED
    assert circuit.consecutive_failures == 0
    assert circuit.cooldown_s == COOLDOWN_S


def test_probe_failure_doubles_cooldown(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)

    circuit.record(circuit.acquire(), "timeout")

    assert circuit.state is CircuitState.OPEN
    assert circuit.cooldown_s == 2 * COOLDOWN_S
    assert circuit.seconds_until_probe() == 2 * COOLDOWN_S


def test_cooldown_capped_at_max(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    for _ in range(5):
        clock.advance(circuit.cooldown_s)
        circuit.record(circuit.acquire(), "connection_error")

    assert circuit.cooldown_s == MAX_COOLDOWN_S


def test_success_after_backoff_resets_cooldown(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)
    circuit.record(circuit.acquire(), "timeout")
    clock.advance(circuit.cooldown_s)
    circuit.record(circuit.acquire(), None)

    open_circuit(circuit)

    assert circuit.seconds_until_probe() == COOLDOWN_S


def test_unusable_probe_reply_closes(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)

    circuit.record(circuit.acquire(), "ungrounded")

    assert circuit.state is CircuitState.CLOSED


def test_released_probe_frees_slot(circuit: CircuitBreaker, clock: ManualClock) -> None:
    open_circuit(circuit)
    clock.advance(COOLDOWN_S)
    circuit.release(circuit.acquire())

    probe = circuit.acquire()

    assert probe is not None
    assert probe.probe is True
    assert circuit.state is CircuitState.HALF_OPEN


# Misuse and settings.

def test_permit_settled_twice_rejected(circuit: CircuitBreaker) -> None:
    permit = circuit.acquire()
    circuit.record(permit, None)

    with pytest.raises(ValueError, match="already recorded or released"):
        circuit.release(permit)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold=0"),
        ({"cooldown_s": 0}, "cooldown_s=0"),
        ({"cooldown_s": float("nan")}, "cooldown_s=nan"),
        ({"max_cooldown_s": 5.0}, "max_cooldown_s=5.0"),
        ({"max_cooldown_s": float("inf")}, "max_cooldown_s=inf"),
    ],
    ids=["threshold", "cooldown", "cooldown-nan", "max-below-cooldown", "max-infinite"],
)
def test_invalid_setting_rejected(override: dict, message: str) -> None:
    arguments = {"failure_threshold": THRESHOLD, "cooldown_s": COOLDOWN_S, "max_cooldown_s": MAX_COOLDOWN_S}
    arguments.update(override)

    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**arguments)


# Properties over random sequences of calls, results and clock steps.

class CircuitMachine(RuleBasedStateMachine):
    """Drives one circuit with random operations and checks its guarantees after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.circuit = make_circuit(self.clock)
        self.outstanding: list = []

    @rule(seconds=st.floats(min_value=0, max_value=2 * MAX_COOLDOWN_S, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def acquire(self) -> None:
        state_before = self.circuit.state
        cooling_down = state_before is CircuitState.OPEN and self.circuit.seconds_until_probe() > 0
        predicted_rejection = self.circuit.rejects_calls()

        permit = self.circuit.acquire()

        assert (permit is None) == predicted_rejection
        if cooling_down:
            assert permit is None
        if permit is not None:
            self.outstanding.append(permit)
            if permit.probe:
                assert self.circuit.state is CircuitState.HALF_OPEN

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), outcome=st.sampled_from(ALL_OUTCOMES))
    def record(self, data: st.DataObject, outcome: str | None) -> None:
        permit = self.outstanding.pop(data.draw(st.integers(0, len(self.outstanding) - 1)))
        was_current_probe = permit.probe and self.circuit.state is CircuitState.HALF_OPEN

        self.circuit.record(permit, outcome)

        if was_current_probe and outcome in HEALTHY_OUTCOMES:
            assert self.circuit.state is CircuitState.CLOSED
        if was_current_probe and outcome not in HEALTHY_OUTCOMES:
            assert self.circuit.state is CircuitState.OPEN

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        permit = self.outstanding.pop(data.draw(st.integers(0, len(self.outstanding) - 1)))
        state_before = self.circuit.state

        self.circuit.release(permit)

        assert self.circuit.state is state_before

    @invariant()
    def at_most_one_probe_in_flight(self) -> None:
        assert sum(permit.probe for permit in self.outstanding) <= 1

    @invariant()
    def half_open_only_with_probe_or_free_slot(self) -> None:
        if self.circuit.state is not CircuitState.HALF_OPEN:
            assert not any(permit.probe for permit in self.outstanding)

    @invariant()
    def cooldown_within_bounds(self) -> None:
        assert COOLDOWN_S <= self.circuit.cooldown_s <= MAX_COOLDOWN_S

    @invariant()
    def open_wait_within_cooldown(self) -> None:
        # The tolerance absorbs float rounding in clock + cooldown - clock.
        assert 0 <= self.circuit.seconds_until_probe() <= self.circuit.cooldown_s + 1e-9


CircuitMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
test_circuit_properties = CircuitMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.sampled_from(ALL_OUTCOMES), max_size=30))
def test_opens_exactly_on_failure_run(outcomes: list[str | None]) -> None:
    circuit = make_circuit(ManualClock())
    run = 0
    for outcome in outcomes:
        circuit.record(circuit.acquire(), outcome)
        run = 0 if outcome in HEALTHY_OUTCOMES else run + 1
        should_open = outcome in OPEN_AT_ONCE_OUTCOMES or run >= THRESHOLD

        assert (circuit.state is CircuitState.OPEN) == should_open
        if should_open:
            return
