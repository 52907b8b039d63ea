"""The metric families a Prometheus server stored from its scrapes, compared with the metric catalogue."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .metrics_catalogue import MetricFamily, catalogue
from .services.prometheus import PrometheusServer

TARGET_UP_TIMEOUT_S = 30.0
RULES_EVALUATED_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ScrapeSummary:
    """Catalogued metric families with and without stored series, and the state of every loaded rule."""

    received: list[MetricFamily]
    missing: list[MetricFamily]
    rules: list[dict]

    @property
    def firing(self) -> list[str]:
        return sorted(rule["name"] for rule in self.rules if rule.get("state") == "firing")

    @property
    def broken_rules(self) -> list[str]:
        """Rules whose last evaluation failed, each with its error."""
        return [f"{rule['name']}: {rule.get('lastError')}" for rule in self.rules if rule.get("health") == "err"]


def summarize_scrape(prometheus: PrometheusServer) -> ScrapeSummary:
    """Wait for a successful scrape and one rule evaluation after now, then compare with the catalogue.

    Raises TimeoutError when no target is up or the rules are not evaluated in time.
    """
    prometheus.wait_until(prometheus.targets_up, "the worker target is not up", TARGET_UP_TIMEOUT_S)
    # Two intervals later, Prometheus has stored a scrape that started after this call.
    time.sleep(2 * prometheus.scrape_interval_s)
    prometheus.wait_until(
        lambda: all(rule["health"] != "unknown" for rule in prometheus.rules()),
        "the rules were not evaluated", RULES_EVALUATED_TIMEOUT_S,
    )
    names = prometheus.metric_names()
    received, missing = [], []
    for family in catalogue():
        has_series = any(name in names for name in family.series_names)
        (received if has_series else missing).append(family)
    return ScrapeSummary(received, missing, prometheus.rules())


def format_scrape_summary(summary: ScrapeSummary, url: str) -> str:
    """Render the summary as the lines the demo prints."""
    total = len(summary.received) + len(summary.missing)
    lines = [f"Prometheus at {url} stores series of {len(summary.received)} of the {total} metric families"
             " listed in docs/metrics.md."]
    if summary.missing:
        names = ", ".join(family.query_name for family in summary.missing)
        lines.append(f"No series yet, because nothing in this run observed them (for example no invalid record,"
                     f" no account deletion or no LLM endpoint): {names}.")
    if summary.rules:
        healthy = len(summary.rules) - len(summary.broken_rules)
        lines.append(f"{healthy} of {len(summary.rules)} alert rules evaluate without error;"
                     f" firing: {', '.join(summary.firing) or 'none'}.")
        lines.extend(f"rule error: {error}" for error in summary.broken_rules)
    return "\n".join(lines)
