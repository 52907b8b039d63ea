"""Dead-letter copies that fit the dead-letter topic.

Faust's producer rejects a record above its max_request_size (1,000,000 bytes by default in
faust-streaming 0.15) and the broker one above the topic's max.message.bytes (about 1 MiB by
default). A full copy of a record that was rejected for its size would fail the same way and
stop the ingest agent, so a copy keeps at most DEAD_LETTER_VALUE_MAX_BYTES of the value.
"""

from __future__ import annotations

import dataclasses

from .records import Record

DEAD_LETTER_VALUE_MAX_BYTES = 256 * 1024
# Present only on a cut copy: the length of the original value in bytes.
ORIGINAL_BYTES_HEADER = "dlq-original-value-bytes"


def bounded_copy(record: Record, max_value_bytes: int = DEAD_LETTER_VALUE_MAX_BYTES) -> Record:
    """Return `record` with its value cut to the first `max_value_bytes` bytes, if it is longer.

    A cut copy carries the original length in the ORIGINAL_BYTES_HEADER header.
    NOTE: the key and the headers are kept unchanged, so a record whose key or headers alone
    come near the producer's limit still fails to send.
    """
    if record.value is None or len(record.value) <= max_value_bytes:
        return record
    headers = (*record.headers, (ORIGINAL_BYTES_HEADER, str(len(record.value)).encode()))
    return dataclasses.replace(record, value=record.value[:max_value_bytes], headers=headers)
