"""The generation facade: the LLM generator when one is configured, the rules generator otherwise.

When the model fails with a GenerationError, the rules generator serves the same request,
so a failing model never leaves a request without a profile.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime

from ..errors import GenerationError
from . import rules
from .llm import LLMGenerator

logger = logging.getLogger(__name__)


class ProfileGenerator:
    """Profile generation facade with the rules generator as the fallback for the LLM generator.

    `fallback_counts` counts fallbacks by GenerationError outcome since construction.
    """

    def __init__(self, *, language: str, llm: LLMGenerator | None = None) -> None:
        if language not in rules.SUPPORTED_LANGUAGES:
            raise ValueError(f"profile language {language!r} is not supported by the rules generator; use one of {rules.SUPPORTED_LANGUAGES}")
        if llm is not None and llm.language != language:
            raise ValueError(f"LLM generator language {llm.language!r} differs from profile language {language!r}; configure both alike")
        self.language = language
        self.fallback_counts: Counter[str] = Counter()
        self._llm = llm

    async def generate(self, request: dict) -> tuple[dict, str]:
        """Generate the profile for `request` and return it with the outcome.

        The outcome is "rules" when no LLM is configured, "llm" when the model's profile
        passed validation, and "fallback:<GenerationError outcome>" when the rules generator
        served in place of the model.
        """
        generated_at = datetime.now(UTC)
        if self._llm is None:
            return rules.build_profile(request, language=self.language, generated_at=generated_at), "rules"
        try:
            profile = await self._llm.generate(request, generated_at=generated_at)
        except GenerationError as error:
            self._log_fallback(request, error)
            profile = rules.build_profile(request, language=self.language, generated_at=generated_at, fallback_reason=error.outcome)
            return profile, f"fallback:{error.outcome}"
        return profile, "llm"

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
