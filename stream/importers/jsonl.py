"""Event files: one JSON event document per line, plain or gzip-compressed.

A path ending in `.gz` is gzip, any other path is plain UTF-8 text. Lines end with "\\n".
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import orjson


def write_jsonl(events: Iterable[dict], path: Path) -> int:
    """Write each event as one line of compact JSON to `path` and return the line count.

    The gzip header stores no file name and a zero modification time, so the same events
    always produce the same bytes.
    """
    count = 0
    with _open_for_write(Path(path)) as sink:
        for event in events:
            sink.write(orjson.dumps(event) + b"\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, raw_bytes)` for each non-blank line of `path`, without parsing.

    Line numbers count from 1 and include blank lines, which are not yielded. The bytes
    exclude the line ending ("\\n" or "\\r\\n"). Lines that are not valid JSON are yielded
    as they are, so a consumer can dead-letter them.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as source:
        for line_number, line in enumerate(source, start=1):
            raw = line.rstrip(b"\r\n")
            if raw.strip():
                yield line_number, raw


@contextmanager
def _open_for_write(path: Path) -> Iterator[BinaryIO]:
    if path.suffix != ".gz":
        with path.open("wb") as plain:
            yield plain
        return
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed:
        yield compressed
