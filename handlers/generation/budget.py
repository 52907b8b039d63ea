"""A client-side budget of model requests and tokens.

Three limits, each optional: requests per minute and tokens per minute over a sliding
60-second window, and tokens per UTC calendar day. A call reserves one request and its
estimated tokens before it is sent. When the reply reports the real usage, `settle`
records the difference at the time of the reply, so an estimate that was too high frees
tokens and one that was too low uses more.

The budget never waits: `try_acquire` returns False and the caller serves the request
another way. A lock guards the state, so any thread may call `remaining`.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class BudgetRemaining:
    """Requests and tokens the budget still allows now, math.inf for a limit that is not set."""

    requests_this_minute: float
    tokens_this_minute: float
    tokens_today: float


class Budget:
    """Requests-per-minute, tokens-per-minute and tokens-per-UTC-day limits. None disables a limit.

    `clock` returns Unix time in seconds (time.time by default). It decides the UTC day,
    so it must be a wall clock. If the clock steps back, entries stamped in the future
    stay in the minute window until the clock passes them, which errs on the strict side.
    """

    def __init__(
        self,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        tokens_per_day: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, limit in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute),
                            ("tokens_per_day", tokens_per_day)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name}={limit} must be at least 1; use None for no limit")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.tokens_per_day = tokens_per_day
        self._clock = clock
        self._lock = threading.Lock()
        self._request_times: collections.deque[float] = collections.deque()
        # (time, tokens) entries of the minute window. Corrections from `settle` may be negative.
        self._token_entries: collections.deque[tuple[float, int]] = collections.deque()
        self._tokens_in_window = 0
        self._day = -1
        self._tokens_on_day = 0
        self._listeners: list[Callable[[BudgetRemaining], None]] = []

    def add_listener(self, listener: Callable[[BudgetRemaining], None]) -> None:
        """Call `listener` with what the budget allows after every `try_acquire` and `settle`, such as to set metrics.

        The budget calls it outside its lock, in the thread that called `try_acquire` or `settle`.
        """
        self._listeners.append(listener)

    def try_acquire(self, estimated_tokens: int) -> bool:
        """Reserve one request and `estimated_tokens` tokens if every limit allows both.

        Returns False, reserving nothing, when a limit would be exceeded. A call whose
        estimate alone exceeds tokens_per_minute or tokens_per_day is never admitted.
        """
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens={estimated_tokens} is negative; pass the estimated prompt and reply tokens")
        with self._lock:
            admitted = self._reserve(estimated_tokens)
            remaining = self._remaining()
        self._notify(remaining)
        return admitted

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Replace a reservation's estimate with the usage the endpoint reported.

        The correction counts at the current time. Day usage never drops below zero, which
        matters only when the reply arrives on the UTC day after the reservation.
        """
        if estimated_tokens < 0 or actual_tokens < 0:
            raise ValueError(f"estimated_tokens={estimated_tokens} and actual_tokens={actual_tokens} must not be negative")
        with self._lock:
            now = self._advance()
            self._add_tokens(now, actual_tokens - estimated_tokens)
            remaining = self._remaining()
        self._notify(remaining)

    def remaining(self) -> BudgetRemaining:
        """Return how many requests and tokens the limits still allow at this moment."""
        with self._lock:
            self._advance()
            return self._remaining()

    def _reserve(self, estimated_tokens: int) -> bool:
        """Reserve as `try_acquire` does. The caller holds the lock."""
        now = self._advance()
        if self.requests_per_minute is not None and len(self._request_times) >= self.requests_per_minute:
            return False
        if self.tokens_per_minute is not None and self._minute_tokens() + estimated_tokens > self.tokens_per_minute:
            return False
        if self.tokens_per_day is not None and self._tokens_on_day + estimated_tokens > self.tokens_per_day:
            return False
        self._request_times.append(now)
        self._add_tokens(now, estimated_tokens)
        return True

    def _remaining(self) -> BudgetRemaining:
        """Return what the limits allow as of the last `_advance`. The caller holds the lock."""
        return BudgetRemaining(
            requests_this_minute=_left(self.requests_per_minute, len(self._request_times)),
            tokens_this_minute=_left(self.tokens_per_minute, self._minute_tokens()),
            tokens_today=_left(self.tokens_per_day, self._tokens_on_day),
        )

    def _notify(self, remaining: BudgetRemaining) -> None:
        for listener in self._listeners:
            listener(remaining)

    def _advance(self) -> float:
        """Drop window entries older than WINDOW_S, start a new day at UTC midnight, and return now."""
        now = self._clock()
        cutoff = now - WINDOW_S
        while self._request_times and self._request_times[0] <= cutoff:
            self._request_times.popleft()
        while self._token_entries and self._token_entries[0][0] <= cutoff:
            self._tokens_in_window -= self._token_entries.popleft()[1]
        day = math.floor(now / SECONDS_PER_DAY)
        if day != self._day:
            self._day = day
            self._tokens_on_day = 0
        return now

    def _add_tokens(self, now: float, tokens: int) -> None:
        if tokens == 0:
            return
        self._token_entries.append((now, tokens))
        self._tokens_in_window += tokens
        self._tokens_on_day = max(0, self._tokens_on_day + tokens)

    def _minute_tokens(self) -> int:
        # A negative correction can outlive the reservation it corrects in the window.
        return max(0, self._tokens_in_window)


def _left(limit: int | None, used: int) -> float:
    if limit is None:
        return math.inf
    return max(0, limit - used)
