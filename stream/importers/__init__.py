"""Importers that convert public data sets into profilestream input events.

Each importer returns plain event documents (dicts that are exactly a post.v1, like.v1 or
follow.v1 schema document) sorted by `sort_events`, plus an `ImportStats` tally. The
helpers here are the rules every importer shares: timestamp format, text length limit and
ordering.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from handlers.errors import ProfilestreamError

# maxLength of "text" in post.v1.json, in code points (Python's len counts the same unit).
MAX_TEXT_CHARS = 20000
TRUNCATION_MARK = "\u2026"


class SourceDataError(ProfilestreamError):
    """A source file is missing or malformed. The message names the file and the row."""


@dataclass
class ImportStats:
    """Tally of one conversion run.

    `events` counts emitted events by kind ("post", "like", "follow"). `skipped` counts
    source rows that produced no event, by reason code. `adjusted` counts emitted events
    whose content was changed to fit the schema, by change code ("text_truncated").
    """

    events: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    adjusted: Counter[str] = field(default_factory=Counter)

    def count(self, event: dict) -> dict:
        """Count `event` by its kind and return it unchanged."""
        kind = event["schema"].split(".", 1)[0]
        self.events[kind] += 1
        return event

    def __str__(self) -> str:
        parts = [f"{sum(self.events.values())} events ({_format_counts(self.events)})"]
        if self.skipped:
            parts.append(f"skipped {sum(self.skipped.values())} rows ({_format_counts(self.skipped)})")
        if self.adjusted:
            parts.append(f"adjusted {_format_counts(self.adjusted)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Return the tally as plain sorted dicts, for logs and reports."""
        return {
            "events": dict(sorted(self.events.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "adjusted": dict(sorted(self.adjusted.items())),
        }


def _format_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{name}={count}" for name, count in sorted(counts.items()))


def convert_to_file(source: str, src_dir: Path, output: Path) -> ImportStats:
    """Convert the dump in `src_dir` with the importer named `source` and write `output`.

    `source` is "stackexchange" or "bluesky". The output is JSON lines, gzip-compressed
    when its name ends in `.gz`. Raises SourceDataError for an unknown source or bad data.
    """
    # Imported here because the importer modules import this package's helpers.
    from . import bluesky, stackexchange
    from .jsonl import write_jsonl

    importers = {"stackexchange": stackexchange.convert, "bluesky": bluesky.convert}
    if source not in importers:
        raise SourceDataError(f"unknown source {source!r}; expected one of: {', '.join(sorted(importers))}")
    events, stats = importers[source](Path(src_dir))
    write_jsonl(events, Path(output))
    return stats


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 in UTC with a `Z` suffix.

    Milliseconds are written when the time has no finer part, microseconds otherwise, so
    no source precision is lost.
    """
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    timespec = "milliseconds" if utc.microsecond % 1000 == 0 else "microseconds"
    return utc.isoformat(timespec=timespec) + "Z"


def fit_text(text: str, stats: ImportStats) -> str:
    """Return `text` cut to the schema's maxLength.

    Text longer than MAX_TEXT_CHARS keeps its first MAX_TEXT_CHARS - 1 code points
    followed by U+2026 (horizontal ellipsis), so the result is exactly MAX_TEXT_CHARS long.
    Each cut is counted as `adjusted["text_truncated"]`.
    """
    if len(text) <= MAX_TEXT_CHARS:
        return text
    stats.adjusted["text_truncated"] += 1
    return text[: MAX_TEXT_CHARS - 1] + TRUNCATION_MARK


def sort_events(events: list[dict]) -> list[dict]:
    """Return the events ordered by created_at as an instant, ties broken by event_id."""
    return sorted(events, key=lambda event: (datetime.fromisoformat(event["created_at"]), event["event_id"]))
