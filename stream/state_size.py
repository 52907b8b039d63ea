"""Estimate the size of the user-state table without encoding every entry."""

from __future__ import annotations

import random
from collections.abc import Mapping

import orjson

SAMPLE_SIZE = 256


def estimate_json_bytes(table: Mapping, *, sample_size: int = SAMPLE_SIZE, rng: random.Random | None = None) -> float:
    """Estimate the JSON-encoded size of all values of `table`, in bytes.

    Encodes a uniform random sample of up to `sample_size` values and scales their mean size
    by the entry count, so each call costs one pass over the values plus `sample_size`
    encodings. The result is exact when the table has at most `sample_size` entries. It
    estimates the size of the changelog values, not the Python heap size, which is larger.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be at least 1, got {sample_size}")
    values = list(table.values())
    if not values:
        return 0.0
    sample = values if len(values) <= sample_size else (rng or random).sample(values, sample_size)
    encoded = sum(len(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)) for value in sample)
    return encoded / len(sample) * len(values)
