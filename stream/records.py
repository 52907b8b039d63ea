"""The record type the stream stages work on, independent of the Kafka client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = field(default=())

    def position(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def dead_letter_headers(record: Record, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record: the original headers plus the error and its origin."""
    return [
        *record.headers,
        ("dlq-reason", reason.encode()),
        ("dlq-error", detail.encode("utf-8", "replace")[:1000]),
        ("dlq-source-topic", record.topic.encode()),
        ("dlq-source-partition", str(record.partition).encode()),
        ("dlq-source-offset", str(record.offset).encode()),
    ]
