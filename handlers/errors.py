"""The exception hierarchy: one root, behaviour carried as class attributes.

The consumer decides between retrying and dead-lettering from `retriable` and `dead_letter`,
never from a list of exception types.
"""

from __future__ import annotations


class ProfilestreamError(Exception):
    """Root of every error profilestream raises on purpose."""

    retriable: bool = False
    dead_letter: bool = False


class ConfigError(ProfilestreamError):
    """A setting is missing or invalid; the message names the environment variable."""


class InvalidRecord(ProfilestreamError):
    """An input record that can never be applied; it goes to the dead-letter topic.

    `reason` is a short stable code (a metric label and a header value); `detail` is the
    human-readable explanation naming the bad value.
    """

    dead_letter = True

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class GenerationError(ProfilestreamError):
    """The model could not produce a valid profile; the deterministic generator serves."""

    def __init__(self, outcome: str, detail: str, *, retriable: bool = False) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail
        self.retriable = retriable


class SinkUnavailable(ProfilestreamError):
    """Postgres or the broker rejected a write for a reason that may pass; retry later.

    `kind` is a short stable code for metric labels, such as "acquire_timeout" or "deadlock".
    """

    retriable = True

    def __init__(self, message: str, *, kind: str = "unavailable") -> None:
        super().__init__(message)
        self.kind = kind


class ProfileTooLarge(ProfilestreamError):
    """A profile does not fit in one record of the profile topic, even after trimming; not retriable."""
