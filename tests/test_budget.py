"""Client-side request and token budget: unit cases and hypothesis properties on a manual clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.generation.budget import WINDOW_S, Budget

# 2024-05-01 08:00:00 UTC, in Unix seconds.
START = datetime(2024, 5, 1, 8, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2024, 5, 2, tzinfo=UTC).timestamp()


class ManualClock:
    """A Unix-time clock that moves only when the test advances it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# Requests per minute.

def test_requests_within_limit_admitted(clock: ManualClock) -> None:
    budget = Budget(requests_per_minute=2, clock=clock)

    assert budget.try_acquire(10) is True
    assert budget.try_acquire(10) is True


def test_request_over_limit_rejected(clock: ManualClock) -> None:
    budget = Budget(requests_per_minute=2, clock=clock)
    budget.try_acquire(10)
    budget.try_acquire(10)

    assert budget.try_acquire(10) is False


def test_request_window_slides(clock: ManualClock) -> None:
    budget = Budget(requests_per_minute=2, clock=clock)
    budget.try_acquire(10)
    clock.advance(30)
    budget.try_acquire(10)
    clock.advance(30)

    assert budget.try_acquire(10) is True
    assert budget.try_acquire(10) is False


def test_rejected_request_reserves_nothing(clock: ManualClock) -> None:
    budget = Budget(requests_per_minute=1, tokens_per_day=1000, clock=clock)
    budget.try_acquire(100)

    budget.try_acquire(100)

    assert budget.remaining().tokens_today == 900


# Tokens per minute.

def test_tokens_over_minute_limit_rejected(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, clock=clock)
    budget.try_acquire(600)

    assert budget.try_acquire(401) is False
    assert budget.try_acquire(400) is True


def test_estimate_above_limit_never_admitted(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, clock=clock)

    assert budget.try_acquire(1001) is False


def test_minute_tokens_expire(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, clock=clock)
    budget.try_acquire(1000)
    clock.advance(WINDOW_S)

    assert budget.remaining().tokens_this_minute == 1000


def test_settle_lower_usage_frees_tokens(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, tokens_per_day=5000, clock=clock)
    budget.try_acquire(800)

    budget.settle(800, 300)

    assert budget.remaining().tokens_this_minute == 700
    assert budget.remaining().tokens_today == 4700


def test_settle_higher_usage_takes_tokens(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, tokens_per_day=5000, clock=clock)
    budget.try_acquire(300)

    budget.settle(300, 900)

    assert budget.remaining().tokens_this_minute == 100
    assert budget.remaining().tokens_today == 4100


def test_overrun_clamps_remaining_at_zero(clock: ManualClock) -> None:
    budget = Budget(tokens_per_minute=1000, clock=clock)
    budget.try_acquire(500)

    budget.settle(500, 1500)

    assert budget.remaining().tokens_this_minute == 0
    assert budget.try_acquire(1) is False


# Tokens per UTC day.

def test_day_limit_rejects(clock: ManualClock) -> None:
    budget = Budget(tokens_per_day=1000, clock=clock)
    budget.try_acquire(700)
    clock.advance(3600)

    assert budget.try_acquire(301) is False
    assert budget.try_acquire(300) is True


def test_day_resets_at_utc_midnight() -> None:
    clock = ManualClock(MIDNIGHT - 1)
    budget = Budget(tokens_per_day=1000, clock=clock)
    budget.try_acquire(1000)
    assert budget.try_acquire(1) is False

    clock.advance(1)

    assert budget.remaining().tokens_today == 1000
    assert budget.try_acquire(1000) is True


def test_correction_after_midnight_not_negative() -> None:
    clock = ManualClock(MIDNIGHT - 1)
    budget = Budget(tokens_per_day=1000, clock=clock)
    budget.try_acquire(800)
    clock.advance(2)

    budget.settle(800, 100)

    assert budget.remaining().tokens_today == 1000


# Remaining and settings.

def test_unlimited_remaining_infinite(clock: ManualClock) -> None:
    budget = Budget(clock=clock)
    budget.try_acquire(10**9)

    remaining = budget.remaining()

    assert remaining.requests_this_minute == math.inf
    assert remaining.tokens_this_minute == math.inf
    assert remaining.tokens_today == math.inf


def test_remaining_counts_reservations(clock: ManualClock) -> None:
    budget = Budget(requests_per_minute=5, tokens_per_minute=1000, tokens_per_day=10_000, clock=clock)
    budget.try_acquire(100)
    budget.try_acquire(250)

    remaining = budget.remaining()

    assert remaining.requests_this_minute == 3
    assert remaining.tokens_this_minute == 650
    assert remaining.tokens_today == 9650


def test_negative_estimate_rejected(clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="estimated_tokens=-1"):
        Budget(clock=clock).try_acquire(-1)


def test_negative_usage_rejected(clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="actual_tokens=-5"):
        Budget(clock=clock).settle(10, -5)


@pytest.mark.parametrize("name", ["requests_per_minute", "tokens_per_minute", "tokens_per_day"])
def test_zero_limit_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}=0"):
        Budget(**{name: 0})


# Properties over random sequences of reservations, corrections and clock steps.

STEPS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=90, allow_nan=False),  # seconds before the step
        st.integers(min_value=0, max_value=400),  # estimated tokens
        st.one_of(st.none(), st.integers(min_value=0, max_value=600)),  # reported usage, None: kept estimate
    ),
    max_size=60,
)


def admitted_in_window(times: list[float], end: float) -> list[int]:
    return [index for index, moment in enumerate(times) if end - WINDOW_S < moment <= end]


@settings(max_examples=100, deadline=None)
@given(steps=STEPS, limit=st.integers(min_value=1, max_value=6))
def test_requests_never_exceed_limit(steps: list, limit: int) -> None:
    clock = ManualClock()
    budget = Budget(requests_per_minute=limit, clock=clock)
    admitted: list[float] = []
    for seconds, estimate, _ in steps:
        clock.advance(seconds)
        if budget.try_acquire(estimate):
            admitted.append(clock.now)

        assert len(admitted_in_window(admitted, clock.now)) <= limit


@settings(max_examples=100, deadline=None)
@given(steps=STEPS, limit=st.integers(min_value=1, max_value=2000))
def test_reserved_tokens_never_exceed_limit(steps: list, limit: int) -> None:
    clock = ManualClock()
    budget = Budget(tokens_per_minute=limit, clock=clock)
    admitted: list[tuple[float, int]] = []
    for seconds, estimate, _ in steps:
        clock.advance(seconds)
        if budget.try_acquire(estimate):
            admitted.append((clock.now, estimate))
        in_window = sum(tokens for moment, tokens in admitted if clock.now - WINDOW_S < moment)

        assert in_window <= limit


@settings(max_examples=100, deadline=None)
@given(steps=STEPS, limit=st.integers(min_value=1, max_value=3000))
def test_day_tokens_match_usage(steps: list, limit: int) -> None:
    clock = ManualClock(MIDNIGHT - 600)
    budget = Budget(tokens_per_day=limit, clock=clock)
    used_by_day: dict[int, int] = {}
    for seconds, estimate, usage in steps:
        clock.advance(seconds)
        if not budget.try_acquire(estimate):
            continue
        day = int(clock.now // 86_400)
        used_by_day[day] = used_by_day.get(day, 0) + (estimate if usage is None else usage)
        if usage is not None:
            budget.settle(estimate, usage)

        assert budget.remaining().tokens_today == max(0, limit - used_by_day[day])


@settings(max_examples=100, deadline=None)
@given(steps=STEPS, request_limit=st.integers(1, 6), token_limit=st.integers(1, 2000), day_limit=st.integers(1, 5000))
def test_remaining_within_limits(steps: list, request_limit: int, token_limit: int, day_limit: int) -> None:
    clock = ManualClock()
    budget = Budget(requests_per_minute=request_limit, tokens_per_minute=token_limit, tokens_per_day=day_limit, clock=clock)
    for seconds, estimate, usage in steps:
        clock.advance(seconds)
        if budget.try_acquire(estimate) and usage is not None:
            budget.settle(estimate, usage)
        remaining = budget.remaining()

        assert 0 <= remaining.requests_this_minute <= request_limit
        assert 0 <= remaining.tokens_this_minute <= token_limit
        assert 0 <= remaining.tokens_today <= day_limit
