"""The catalogue of the worker's own Prometheus metric families, read from their definitions in `stream` and `handlers`.

docs/metrics.md shows `catalogue_table()`, and the tests check that table, the metric
definitions in the source and a real Prometheus scrape against `catalogue()`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

# The series each family type exports, as suffixes of the family name. prometheus_client
# also exports a `_created` series for counters and histograms, which queries rarely need.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}


@dataclass(frozen=True)
class MetricFamily:
    """One metric family: its name without type suffix, type, label names and help text."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    @property
    def series_names(self) -> tuple[str, ...]:
        """Names of the series this family exports, such as `<name>_total` for a counter."""
        return tuple(self.name + suffix for suffix in SERIES_SUFFIXES[self.type])

    @property
    def query_name(self) -> str:
        """The name a PromQL query uses: `<name>_total` for a counter, the family name otherwise."""
        return self.name + "_total" if self.type == "counter" else self.name


def _modules() -> Iterator[ModuleType]:
    """Import and yield every module of the `stream` and `handlers` packages except `__main__`."""
    import handlers
    import stream

    for package in (stream, handlers):
        yield package
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not module.name.endswith(".__main__"):
                yield importlib.import_module(module.name)


def _metric_holder(value: object, module: ModuleType) -> bool:
    """Return whether `value` is a class of `module` that creates its metrics in a `registry` given to it."""
    if not isinstance(value, type) or value.__module__ != module.__name__:
        return False
    try:
        parameters = inspect.signature(value).parameters
    except (TypeError, ValueError):  # Some built-in types, such as exception classes, have none.
        return False
    return "registry" in parameters and all(
        parameter.default is not inspect.Parameter.empty for parameter in parameters.values())


def _metric_objects() -> list[MetricWrapperBase]:
    """Return every metric object the worker's modules define, at module level or in a metric holder class.

    A holder class such as LLMTelemetry is built here with a private registry, so the call
    leaves the default registry untouched.
    """
    found: dict[str, MetricWrapperBase] = {}
    for module in _modules():
        for value in list(vars(module).values()):
            if isinstance(value, MetricWrapperBase):
                found[value.describe()[0].name] = value
            elif _metric_holder(value, module):
                for attribute in vars(value(registry=CollectorRegistry())).values():
                    if isinstance(attribute, MetricWrapperBase):
                        found[attribute.describe()[0].name] = attribute
    return list(found.values())


def catalogue() -> list[MetricFamily]:
    """Return the worker's own metric families, sorted by name."""
    families = []
    for metric in _metric_objects():
        [description] = metric.describe()
        # prometheus_client has no public accessor for the label names of a metric object.
        labels = tuple(metric._labelnames)
        families.append(MetricFamily(description.name, description.type, labels, description.documentation))
    return sorted(families, key=lambda family: family.name)


def catalogue_table() -> str:
    """Render the catalogue as the Markdown table of docs/metrics.md."""
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for family in catalogue():
        labels = ", ".join(f"`{label}`" for label in family.labels) or "none"
        meaning = family.help.replace("|", "\\|")
        rows.append(f"| `{family.query_name}` | {family.type} | {labels} | {meaning} |")
    return "\n".join(rows)
