"""Benchmark: how many profile generations a trigger policy costs and how fresh it keeps profiles.

Replays the bundled Stack Exchange events in time order through `handlers.state` and, after
each update of a user's state, `handlers.significance.decide`, the way `stream.ingest` does. Each
policy is either a set of `Thresholds` or a baseline that regenerates after every N events
of a user (N = 10 and N = 1). A first-profile-only reference shows the cost of first profiles
alone.

Cost is generations per 1,000 input events. Freshness is recall@5, averaged over user-months.
A user-month counts when the user tagged at least one post that month and already had a
profile at the start of it. Its recall@5 is the share of the month's distinct tags among the
top 5 interests of that profile (`features.build_request(...)["interests"]` at generation
time). Because policies profile different users, each policy is also compared with the every-10
baseline on the user-months that both evaluate ("paired").

    python -m bench.trigger_economy [--plot PATH] [--json PATH] [--all]
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import orjson

from handlers import features, significance, state as user_state
from handlers.events import Event, PostEvent
from handlers.significance import Thresholds
from handlers.topics import normalize_topic

from .state_size import PostIndex, apply_event, load_events

TOP_K = 5
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
# The grid the trigger settings are tuned on: drift, volume and cooldown.
SWEEP_DRIFT = (0.2, 0.35, 0.5, 0.7)
SWEEP_NEW_CONTENT = (50, 100, 200)
SWEEP_COOLDOWN_S = (6 * HOUR_S, DAY_S, 7 * DAY_S)
# The same grid again with the two settings that set the cost floor on this data.
SWEEP_STALE_S = (30 * DAY_S, 90 * DAY_S, 365 * DAY_S)
SWEEP_MIN_EVENTS_NEW_USER = (5, 10, 20, 50)
GOAL_FACTOR = 10
EVERY_10 = "every-10-events"
EVERY_EVENT = "every-event"
FIRST_ONLY = "first-profile-only"
DEFAULT = "default"
PLOT_PATH = Path(__file__).with_name("trigger_economy.png")


@dataclass(frozen=True, slots=True)
class Policy:
    """A trigger policy: `thresholds` for `significance.decide`, or a baseline of every `every_events` events."""

    name: str
    group: str
    thresholds: Thresholds | None = None
    every_events: int | None = None
    first_only: bool = False

    def reasons(self, state: dict) -> tuple[str, ...] | None:
        """Return the reasons to regenerate now, or None to keep the current profile.

        With `first_only`, the policy generates one profile once the user has `every_events` events.
        """
        if self.thresholds is not None:
            decision = significance.decide(state, self.thresholds)
            significance.record_decision(state, decision)
            return decision.reasons if decision.regenerate else None
        if self.first_only and state["profile"]["version"] > 0:
            return None
        new_events = state["events_applied"] - state["profile"]["events_applied"]
        return ("baseline",) if new_events >= self.every_events else None


@dataclass
class PolicyRun:
    """Outcome of one replay: generation count and, per user, (event time, top topics) of each profile."""

    policy: Policy
    input_events: int
    generations: int = 0
    profiles: dict[str, list[tuple[float, tuple[str, ...]]]] = field(default_factory=lambda: defaultdict(list))

    @property
    def per_1000(self) -> float:
        return 1000.0 * self.generations / self.input_events


def default_policies() -> list[Policy]:
    """Return the default thresholds, the baselines, a first-profile-only reference and the sweep.

    Every policy's `group` is "default", "baseline", "reference", "grid" (drift x new content
    x cooldown with the default staleness and new-user settings) or "extended" (the same grid
    with other staleness and new-user settings).
    """
    base = Thresholds()
    policies = [
        Policy(DEFAULT, "default", base),
        Policy(EVERY_10, "baseline", every_events=10),
        Policy(EVERY_EVENT, "baseline", every_events=1),
        # The cost floor of first profiles alone, at the default's new-user threshold.
        Policy(FIRST_ONLY, "reference", every_events=base.min_events_new_user, first_only=True),
    ]
    for stale_s in SWEEP_STALE_S:
        for min_events in SWEEP_MIN_EVENTS_NEW_USER:
            is_grid = stale_s == base.stale_after_s and min_events == base.min_events_new_user
            for drift in SWEEP_DRIFT:
                for new_content in SWEEP_NEW_CONTENT:
                    for cooldown_s in SWEEP_COOLDOWN_S:
                        thresholds = replace(base, min_events_new_user=min_events, interest_drift=drift,
                                             new_content_events=new_content, cooldown_s=cooldown_s,
                                             stale_after_s=stale_s)
                        if thresholds != base:
                            policies.append(Policy(policy_name(thresholds), "grid" if is_grid else "extended", thresholds))
    return policies


def policy_name(thresholds: Thresholds) -> str:
    return (
        f"drift={thresholds.interest_drift:g} content={thresholds.new_content_events}"
        f" cooldown={thresholds.cooldown_s / HOUR_S:g}h stale={thresholds.stale_after_s / DAY_S:g}d"
        f" new={thresholds.min_events_new_user}"
    )


def replay_policies(events: list[Event], policies: list[Policy]) -> list[PolicyRun]:
    """Apply `events` in order to fresh states and record every profile each policy generates.

    All policies share one replay: the `handlers.state` apply functions never read or write
    `state["profile"]`, so each policy keeps its own profile snapshot per user and swaps it in
    for its decision. A profile is stamped with the time of the event that triggered it, so
    "current at the start of a month" means generated from events before that month.
    """
    runs = [PolicyRun(policy, len(events)) for policy in policies]
    snapshots: list[dict[str, dict]] = [{} for _ in policies]
    states: dict[str, dict] = {}
    index = PostIndex()
    for event in events:
        at = event.created_at.timestamp()
        for user in apply_event(states, index, event):
            state = states[user]
            for run, profiles in zip(runs, snapshots):
                if user not in profiles:
                    profiles[user] = user_state.new_state(user)["profile"]
                state["profile"] = profiles[user]
                reasons = run.policy.reasons(state)
                if reasons is None:
                    continue
                version = significance.take_snapshot(state)
                interests = features.build_request(state, version, reasons)["interests"]
                run.profiles[user].append((at, tuple(item["topic"] for item in interests[:TOP_K])))
                run.generations += 1
    return runs


def monthly_tags(events: list[Event]) -> dict[tuple[str, str], set[str]]:
    """Map (user, "YYYY-MM") to the distinct topics of the tags and hashtags the user posted that month."""
    used: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event in events:
        if not isinstance(event, PostEvent):
            continue
        topics = {normalize_topic(label) for label in (*event.tags, *event.hashtags)} - {""}
        if topics:
            used[(event.user_id, event.created_at.strftime("%Y-%m"))].update(topics)
    return dict(used)


def month_start(month: str) -> float:
    year, number = month.split("-")
    return datetime(int(year), int(number), 1, tzinfo=UTC).timestamp()


def recall_by_user_month(run: PolicyRun, used: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], float]:
    """Return recall@5 for each user-month whose user had a profile at the start of the month."""
    recalls = {}
    for (user, month), tags in used.items():
        history = run.profiles.get(user)
        if not history:
            continue
        index = bisect.bisect_left([at for at, _ in history], month_start(month)) - 1
        if index < 0:
            continue
        topics = set(history[index][1])
        recalls[(user, month)] = len(tags & topics) / len(tags)
    return recalls


def evaluate(events: list[Event], policies: list[Policy]) -> list[dict]:
    """Replay every policy and return one result row per policy, in the given order.

    Besides each policy's own recall, a row contains the "paired" comparison with the every-10
    baseline: both policies' mean recall on the user-months that both evaluate.
    """
    used = monthly_tags(events)
    runs = replay_policies(events, policies)
    recalls = [recall_by_user_month(run, used) for run in runs]
    baseline = next((by_month for run, by_month in zip(runs, recalls) if run.policy.name == EVERY_10), None)
    rows = []
    for run, by_month in zip(runs, recalls):
        thresholds = run.policy.thresholds
        paired = sorted(set(by_month) & set(baseline)) if baseline is not None else []
        rows.append({
            "policy": run.policy.name,
            "group": run.policy.group,
            "thresholds": asdict(thresholds) if thresholds else None,
            "every_events": run.policy.every_events,
            "input_events": run.input_events,
            "generations": run.generations,
            "per_1000": run.per_1000,
            "profiled_users": sum(1 for history in run.profiles.values() if history),
            "tagged_user_months": len(used),
            "user_months": len(by_month),
            "recall_at_5": _mean(by_month.values()),
            "paired_user_months": len(paired),
            "recall_at_5_paired": _mean(by_month[key] for key in paired),
            "every_10_recall_at_5_paired": _mean(baseline[key] for key in paired),
        })
    mark_goal(rows)
    return rows


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def mark_goal(rows: list[dict]) -> None:
    """Mark each row against the goal: at most 1/10 of every-10's generations at equal or better recall.

    `meets_goal` compares the rows' own recall@5. `meets_goal_covered` also requires at least
    as many evaluated user-months as every-10 and equal or better recall on the paired ones,
    so a policy cannot pass by profiling fewer users. Both are None without an every-10 row.
    """
    baseline = next((row for row in rows if row["policy"] == EVERY_10), None)
    for row in rows:
        if baseline is None or row is baseline:
            row["meets_goal"] = row["meets_goal_covered"] = None
            continue
        row["meets_goal"] = (
            row["per_1000"] <= baseline["per_1000"] / GOAL_FACTOR and row["recall_at_5"] >= baseline["recall_at_5"]
        )
        row["meets_goal_covered"] = (
            row["meets_goal"]
            and row["user_months"] >= baseline["user_months"]
            and row["recall_at_5_paired"] >= row["every_10_recall_at_5_paired"]
        )


def pareto_front(rows: list[dict]) -> list[dict]:
    """Return the threshold rows that no other threshold row beats on both cost and recall, cheapest first."""
    candidates = [row for row in rows if row["thresholds"] is not None]
    front = []
    for row in candidates:
        dominated = any(
            other["per_1000"] <= row["per_1000"] and other["recall_at_5"] >= row["recall_at_5"]
            and (other["per_1000"] < row["per_1000"] or other["recall_at_5"] > row["recall_at_5"])
            for other in candidates
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda row: row["per_1000"])


def format_table(rows: list[dict], *, full: bool = False) -> str:
    """Format the default, the baselines, the grid and the Pareto front (every row with `full`)."""
    header = (
        f"{'policy':<58} {'gens':>5} {'per 1k':>7} {'users':>5} {'recall@5':>8} {'n':>4}"
        f" {'paired':>6} {'vs e10':>6} {'goal':>4} {'+cov':>4}"
    )
    sections = [("reference points", [row for row in rows if row["group"] in ("default", "baseline", "reference")])]
    if full:
        sections.append(("all sweep points", [row for row in rows if row["group"] in ("grid", "extended")]))
    else:
        sections.append(("grid (stale=30d new=5)", [row for row in rows if row["group"] == "grid"]))
        sections.append(("Pareto front of all threshold policies", pareto_front(rows)))
        sections.append(("policies meeting the goal", [row for row in rows if row["meets_goal"]]))
    goal = {True: "yes", False: "no", None: "-"}
    lines = [header]
    for title, section in sections:
        lines.append(f"-- {title} ({len(section)})")
        for row in section:
            lines.append(
                f"{row['policy']:<58} {row['generations']:>5} {row['per_1000']:>7.1f} {row['profiled_users']:>5}"
                f" {row['recall_at_5']:>8.3f}"
                f" {row['user_months']:>4} {row['recall_at_5_paired']:>6.3f} {row['every_10_recall_at_5_paired']:>6.3f}"
                f" {goal[row['meets_goal']]:>4} {goal[row['meets_goal_covered']]:>4}"
            )
    if rows:
        lines.append(
            f"users: users with a profile; n: user-months evaluated, of {rows[0]['tagged_user_months']} with tagged posts;"
            " paired / vs e10: this policy's and every-10's recall@5 on the user-months both evaluate;"
            " goal: <= 1/10 of every-10's generations at >= its recall@5; +cov: and >= its n and paired recall"
        )
    baseline = next((row for row in rows if row["policy"] == EVERY_10), None)
    if baseline is not None:
        floor = 1000.0 * baseline["profiled_users"] / baseline["input_events"]
        lines.append(
            f"cost floor: every-10 profiles {baseline['profiled_users']} users, so a policy that profiles the same"
            f" users needs at least {floor:.1f} first profiles per 1k events; the goal allows"
            f" {baseline['per_1000'] / GOAL_FACTOR:.1f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Write generations per 1,000 events (log x) against recall@5 (y) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(9, 6), dpi=110)
    colors = dict(zip(SWEEP_MIN_EVENTS_NEW_USER, ("tab:blue", "tab:orange", "tab:purple", "tab:brown")))
    markers = dict(zip(SWEEP_STALE_S, ("o", "^", "D")))
    for min_events, color in colors.items():
        for stale_s, marker in markers.items():
            group = [
                row for row in rows
                if row["group"] in ("grid", "extended")
                and row["thresholds"]["min_events_new_user"] == min_events
                and row["thresholds"]["stale_after_s"] == stale_s
            ]
            if group:
                axes.scatter([row["per_1000"] for row in group], [row["recall_at_5"] for row in group], s=14,
                             color=color, marker=marker, alpha=0.55,
                             label=f"sweep: new user {min_events} events, stale {stale_s / DAY_S:g} d")
    for row in rows:
        if row["group"] == "default":
            axes.scatter(row["per_1000"], row["recall_at_5"], s=180, marker="*", color="tab:green", zorder=4,
                         edgecolors="black", linewidths=0.5, label="default thresholds")
        elif row["group"] in ("baseline", "reference"):
            axes.scatter(row["per_1000"], row["recall_at_5"], s=60, marker="s", color="tab:red", zorder=4)
            axes.annotate(row["policy"], (row["per_1000"], row["recall_at_5"]), textcoords="offset points",
                          xytext=(0, 8), ha="center", fontsize=8, color="tab:red")
    baseline = next((row for row in rows if row["policy"] == EVERY_10), None)
    if baseline is not None:
        limit = baseline["per_1000"] / GOAL_FACTOR
        left = min(row["per_1000"] for row in rows if row["per_1000"] > 0) / 1.5
        axes.axvline(limit, color="grey", linestyle="--", linewidth=1)
        axes.axhline(baseline["recall_at_5"], color="grey", linestyle=":", linewidth=1)
        axes.fill_between([left, limit], baseline["recall_at_5"], 1.0, color="tab:green", alpha=0.08,
                          label=f"goal: <= 1/{GOAL_FACTOR} of every-10's generations, recall >= every-10")
        axes.set_xlim(left=left)
    recalls = [row["recall_at_5"] for row in rows if row["recall_at_5"] == row["recall_at_5"]]
    axes.set_ylim(min(recalls) - 0.02, max(recalls) + 0.03)
    axes.set_xscale("log")
    axes.set_xlabel("profile generations per 1,000 input events (log scale)")
    axes.set_ylabel("recall@5 of the month's tags (profile current at month start)")
    axes.set_title("Trigger policies on the bundled Stack Exchange events")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, ncol=3)
    figure.savefig(path, bbox_inches="tight")
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trigger_economy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=PLOT_PATH, help=f"PNG to write (default: {PLOT_PATH})")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument("--all", action="store_true", help="print every sweep point, not only the grid and the Pareto front")
    args = parser.parse_args(argv)
    rows = evaluate(load_events(), default_policies())
    print(format_table(rows, full=args.all))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
