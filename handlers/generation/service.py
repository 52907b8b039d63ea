"""The generation facade: the LLM generator when one is configured, the rules generator otherwise.

When the model fails with a GenerationError, the rules generator serves the same request,
so a failing model never leaves a request without a profile. The facade also bounds the
model calls in flight and checks the circuit breaker before each call. An open circuit makes
the rules generator serve at once, with fallback_reason circuit_open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import UTC, datetime

from ..errors import GenerationError
from . import rules
from .circuit import CircuitBreaker, CircuitState, Permit
from .llm import LLMGenerator

logger = logging.getLogger(__name__)

# Outcomes of calls that never reached the endpoint, so the circuit breaker does not count them.
NOT_SENT_OUTCOMES = frozenset({"budget_exhausted"})


class ProfileGenerator:
    """Profile generation facade with the rules generator as the fallback for the LLM generator.

    At most `max_concurrent_calls` model calls run at once. Later calls wait for a slot
    without a time limit, which is backpressure on the caller, and each call that holds a
    slot ends within the LLM generator's `timeout_s`. `circuit`, if given, is checked
    before each call. `fallback_counts` counts fallbacks by GenerationError outcome since
    construction, and the LLM generator's telemetry counts them too.
    """

    def __init__(
        self,
        *,
        language: str,
        llm: LLMGenerator | None = None,
        circuit: CircuitBreaker | None = None,
        max_concurrent_calls: int = 4,
    ) -> None:
        if language not in rules.SUPPORTED_LANGUAGES:
            raise ValueError(f"profile language {language!r} is not supported by the rules generator; use one of {rules.SUPPORTED_LANGUAGES}")
        if llm is not None and llm.language != language:
            raise ValueError(f"LLM generator language {llm.language!r} differs from profile language {language!r}; configure both alike")
        if max_concurrent_calls < 1:
            raise ValueError(f"max_concurrent_calls={max_concurrent_calls} must be at least 1")
        self.language = language
        self.fallback_counts: Counter[str] = Counter()
        self.circuit = circuit
        self._llm = llm
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        if llm is not None and circuit is not None:
            llm.telemetry.watch_circuit(llm.model, circuit)

    async def generate(self, request: dict) -> tuple[dict, str]:
        """Generate the profile for `request` and return it with the outcome.

        The outcome is "rules" when no LLM is configured, "llm" when the model's profile
        passed validation, and "fallback:<GenerationError outcome>" when the rules generator
        served in place of the model. Besides the LLM generator's outcomes, the fallback
        reason can be circuit_open, when the circuit breaker rejected the call.
        """
        generated_at = datetime.now(UTC)
        if self._llm is None:
            return rules.build_profile(request, language=self.language, generated_at=generated_at), "rules"
        try:
            profile = await self._call_model(self._llm, request, generated_at)
        except GenerationError as error:
            self._log_fallback(request, error)
            self._llm.telemetry.record_fallback(self._llm.model, error.outcome)
            profile = rules.build_profile(request, language=self.language, generated_at=generated_at, fallback_reason=error.outcome)
            return profile, f"fallback:{error.outcome}"
        return profile, "llm"

    async def _call_model(self, llm: LLMGenerator, request: dict, generated_at: datetime) -> dict:
        """Run one model call inside a concurrency slot, with the circuit breaker's permission."""
        # Checked before waiting for a slot too, so that an open circuit rejects at once
        # even while earlier calls hold every slot.
        if self.circuit is not None and self.circuit.rejects_calls():
            raise self._circuit_open_error(llm)
        async with self._slots:
            permit = self.circuit.acquire() if self.circuit is not None else None
            if self.circuit is not None and permit is None:
                raise self._circuit_open_error(llm)
            try:
                profile = await llm.generate(request, generated_at=generated_at)
            except GenerationError as error:
                self._settle(permit, error.outcome)
                raise
            except BaseException:
                # Cancelled, or failed in a way that is no evidence about the endpoint's health.
                if permit is not None:
                    self.circuit.release(permit)
                raise
            self._settle(permit, None)
            return profile

    def _settle(self, permit: Permit | None, outcome: str | None) -> None:
        """Return `permit` to the circuit with the call's outcome (None for success)."""
        if permit is None:
            return
        if outcome in NOT_SENT_OUTCOMES:
            self.circuit.release(permit)
        else:
            self.circuit.record(permit, outcome)

    def _circuit_open_error(self, llm: LLMGenerator) -> GenerationError:
        circuit = self.circuit
        if circuit.state is CircuitState.HALF_OPEN:
            wait = "a probe call is testing the endpoint"
        else:
            wait = f"a probe call goes through in {circuit.seconds_until_probe():.1f} s"
        return GenerationError(
            "circuit_open",
            f"the circuit breaker of model {llm.model!r} is open after {circuit.opened_by}"
            f" ({circuit.consecutive_failures} unhealthy calls in a row), so no request was sent; {wait}",
        )

    async def close(self) -> None:
        """Close the LLM generator's connections, if there is one."""
        if self._llm is not None:
            await self._llm.close()

    def _log_fallback(self, request: dict, error: GenerationError) -> None:
        """Log the first fallback of each outcome as a warning and later ones at debug level."""
        self.fallback_counts[error.outcome] += 1
        count = self.fallback_counts[error.outcome]
        level = logging.WARNING if count == 1 else logging.DEBUG
        logger.log(
            level,
            "llm_fallback outcome=%s user_id=%s version=%s count=%d detail=%s",
            error.outcome, request["user_id"], request["version"], count, error.detail,
        )
