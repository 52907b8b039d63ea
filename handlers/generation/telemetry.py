"""Prometheus metrics of the LLM generation stage.

Labels take only the configured model name and fixed outcome codes, never a user id or
free text. Production code shares `default_telemetry()`, registered once in the default
registry. Tests build an LLMTelemetry with their own CollectorRegistry.

The circuit and budget gauges get explicit `set` calls, never `Gauge.set_function`, because
prometheus-client's multi-process mode (PROMETHEUS_MULTIPROC_DIR) exports only values
written to its files, and a function's value never is. The documentation of
prometheus-client (0.26) lists set_function among the gauge features that mode lacks.
"""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .budget import Budget, BudgetRemaining
from .circuit import CircuitBreaker, CircuitState

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class LLMTelemetry:
    """The profilestream_llm_* metrics, registered in `registry`.

    Registering twice in one registry raises ValueError, so create one instance per registry.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "profilestream_llm_requests",
            "Model calls that reached the endpoint, by final outcome (ok or the failure outcome) after retries.",
            ["model", "outcome"], registry=registry,
        )
        self.latency = Histogram(
            "profilestream_llm_request_seconds",
            "Duration of one model call, retries and their waits included.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.prompt_tokens = Counter(
            "profilestream_llm_prompt_tokens", "Prompt tokens the endpoint reported.", ["model"], registry=registry,
        )
        self.completion_tokens = Counter(
            "profilestream_llm_completion_tokens", "Completion tokens the endpoint reported.", ["model"], registry=registry,
        )
        self.cost = Counter(
            "profilestream_llm_cost_usd",
            "Estimated cost in US dollars, from the reported tokens and the configured prices per 1k tokens.",
            ["model"], registry=registry,
        )
        self.retries = Counter(
            "profilestream_llm_retries", "Retried attempts, by the outcome of the attempt that failed.",
            ["model", "outcome"], registry=registry,
        )
        self.fallbacks = Counter(
            "profilestream_llm_fallbacks", "Profiles the rules generator served in place of the model, by reason.",
            ["model", "reason"], registry=registry,
        )
        self.circuit_state = Gauge(
            "profilestream_llm_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["model"], registry=registry, multiprocess_mode="livemax",
        )
        self.budget_requests_minute = Gauge(
            "profilestream_llm_budget_requests_minute_remaining",
            "Requests the client-side budget still allows in the current 60 s window; +Inf without a limit.",
            ["model"], registry=registry, multiprocess_mode="liveall",
        )
        self.budget_tokens_minute = Gauge(
            "profilestream_llm_budget_tokens_minute_remaining",
            "Tokens the client-side budget still allows in the current 60 s window; +Inf without a limit.",
            ["model"], registry=registry, multiprocess_mode="liveall",
        )
        self.budget_tokens_day = Gauge(
            "profilestream_llm_budget_tokens_day_remaining",
            "Tokens the client-side budget still allows today (UTC); +Inf without a limit.",
            ["model"], registry=registry, multiprocess_mode="liveall",
        )
        self.budget_tokens_day_limit = Gauge(
            "profilestream_llm_budget_tokens_day_limit",
            "Tokens the client-side budget allows per day (UTC), PROFILESTREAM_LLM_TOKENS_PER_DAY; +Inf without a limit.",
            ["model"], registry=registry, multiprocess_mode="liveall",
        )
        # The objects whose state the gauges show, by model. Only the last one watched for a model sets them.
        self._circuits: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, Budget] = {}

    def record_call(self, model: str, outcome: str, seconds: float) -> None:
        """Count one call that reached the endpoint, with its final outcome ("ok" on success) and duration."""
        self.requests.labels(model, outcome).inc()
        self.latency.labels(model).observe(seconds)

    def record_usage(self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.cost.labels(model).inc(cost_usd)

    def record_retry(self, model: str, outcome: str) -> None:
        self.retries.labels(model, outcome).inc()

    def record_fallback(self, model: str, reason: str) -> None:
        self.fallbacks.labels(model, reason).inc()

    def watch_circuit(self, model: str, circuit: CircuitBreaker) -> None:
        """Set the circuit state gauge of `model` from `circuit` now and at each of its state changes.

        An open circuit whose cool-down has ended reads 2 until the next call moves it to half-open.
        """
        self._circuits[model] = circuit
        self.circuit_state.labels(model).set(int(circuit.state))

        def on_state_change(state: CircuitState) -> None:
            if self._circuits.get(model) is circuit:
                self.circuit_state.labels(model).set(int(state))

        circuit.add_listener(on_state_change)

    def watch_budget(self, model: str, budget: Budget) -> None:
        """Set the budget gauges of `model` from `budget` now and after each of its reservations and settlements.

        A window also rolls over with time alone, which only `refresh_budget_gauges` shows,
        so a periodic task must call it. The worker calls it every 5 s (stream.generate.refresh_budget_gauges).
        """
        self._budgets[model] = budget
        self.budget_tokens_day_limit.labels(model).set(math.inf if budget.tokens_per_day is None else budget.tokens_per_day)
        self._set_budget_gauges(model, budget.remaining())

        def on_change(remaining: BudgetRemaining) -> None:
            if self._budgets.get(model) is budget:
                self._set_budget_gauges(model, remaining)

        budget.add_listener(on_change)

    def refresh_budget_gauges(self) -> None:
        """Set the budget gauges of every watched model from its budget now, showing windows that rolled over."""
        for model, budget in list(self._budgets.items()):
            self._set_budget_gauges(model, budget.remaining())

    def _set_budget_gauges(self, model: str, remaining: BudgetRemaining) -> None:
        self.budget_requests_minute.labels(model).set(remaining.requests_this_minute)
        self.budget_tokens_minute.labels(model).set(remaining.tokens_this_minute)
        self.budget_tokens_day.labels(model).set(remaining.tokens_today)


_default: LLMTelemetry | None = None


def default_telemetry() -> LLMTelemetry:
    """Return the process-wide LLMTelemetry in prometheus_client's default registry, creating it once."""
    global _default
    if _default is None:
        _default = LLMTelemetry()
    return _default


def refresh_default_budget_gauges() -> None:
    """Run LLMTelemetry.refresh_budget_gauges on default_telemetry(), if a generator has created it."""
    if _default is not None:
        _default.refresh_budget_gauges()
