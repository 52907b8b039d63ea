"""The metrics catalogue against docs/metrics.md, the metric definitions in the source, and the live registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from stream.metrics_catalogue import MetricFamily, catalogue, catalogue_table

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "metrics.md"
TABLE_START = "<!-- metrics-table:start -->"
TABLE_END = "<!-- metrics-table:end -->"
# A metric definition: Counter("name", ...), also with the name on the next line.
DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")
# Labels whose values grow with the data and would make the series count unbounded.
UNBOUNDED_LABELS = {"user_id", "post_id", "event_id", "follower_id", "followee_id", "text", "key", "offset"}


def source_definitions() -> dict[str, str]:
    """Return {metric name: type} of every metric object created in stream/ and handlers/."""
    found = {}
    for folder in ("stream", "handlers"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for kind, name in DEFINITION.findall(path.read_text(encoding="utf-8")):
                found[name] = kind.lower()
    return found


def families() -> dict[str, MetricFamily]:
    return {family.name: family for family in catalogue()}


def registered_families() -> dict[str, str]:
    """Return {name: type} of the profilestream families in the default registry once every worker module registered its metrics."""
    import stream.app  # noqa: F401  (importing registers stream.metrics)
    from handlers.generation.telemetry import default_telemetry
    from handlers.sinks.postgres_metrics import default_postgres_metrics

    default_telemetry()
    default_postgres_metrics()
    return {family.name: family.type for family in REGISTRY.collect() if family.name.startswith("profilestream_")}


def test_doc_table_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    assert text[start:end].strip() == catalogue_table(), (
        "docs/metrics.md is out of date; paste the output of catalogue_table() between the markers")


def test_catalogue_matches_source_definitions() -> None:
    defined = source_definitions()
    catalogued = {name: family.type for name, family in families().items()}
    assert len(defined) >= 30
    assert defined == catalogued


def test_catalogue_matches_registry() -> None:
    registered = registered_families()
    catalogued = {name: family.type for name, family in families().items()}
    assert registered == catalogued


def test_catalogue_names_unique() -> None:
    names = [family.name for family in catalogue()]
    series = [name for family in catalogue() for name in family.series_names]
    assert len(names) == len(set(names))
    assert len(series) == len(set(series))


@pytest.mark.parametrize("name", sorted(families()))
def test_family_follows_conventions(name: str) -> None:
    family = families()[name]
    assert name.startswith("profilestream_")
    assert family.help.endswith("."), f"{name}: help text is not a sentence"
    assert not set(family.labels) & UNBOUNDED_LABELS, f"{name}: labels {family.labels} include an unbounded value"
    if family.type == "histogram":
        assert name.endswith("_seconds"), f"{name}: a histogram here measures time, so its unit suffix is _seconds"
    if family.type == "counter":
        assert not name.endswith("_total"), f"{name}: prometheus_client adds _total to counters"


def test_series_names_by_type() -> None:
    assert MetricFamily("a", "counter", (), "").series_names == ("a_total",)
    assert MetricFamily("a", "gauge", (), "").series_names == ("a",)
    assert MetricFamily("a_seconds", "histogram", (), "").series_names == ("a_seconds_bucket", "a_seconds_count", "a_seconds_sum")


def test_query_name_adds_total_to_counters() -> None:
    assert MetricFamily("a", "counter", (), "").query_name == "a_total"
    assert MetricFamily("a_seconds", "histogram", (), "").query_name == "a_seconds"


def test_table_escapes_pipes() -> None:
    assert all(row.count(" | ") == 3 for row in catalogue_table().splitlines()[2:])
