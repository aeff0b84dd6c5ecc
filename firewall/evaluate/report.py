"""The evaluation's output: report.json (every number), report.md (tables) and PNG plots beside them."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from firewall.evaluate.adaptive import adaptive_markdown  # noqa: E402
from firewall.evaluate.alerts import Alert  # noqa: E402
from firewall.evaluate.attacks import AttackRun  # noqa: E402
from firewall.evaluate.cost import CostLevel  # noqa: E402

PLOT_DETECTION = "queries_to_detection.png"
PLOT_SCORES = "scores.png"
PLOT_LATENCY = "latency_cdf.png"


def scenario_summary(runs: list[AttackRun], alerts_read: bool) -> dict:
    attempted = [run for run in runs if run.ended != "skipped"]
    refusals = [run.first_refusal for run in attempted if run.first_refusal is not None]
    alerted = [run.first_alert for run in attempted if run.first_alert is not None]
    distortions = [run.best_l2 for run in attempted if run.best_l2 is not None]
    count = len(attempted)
    return {
        "runs": count,
        "skipped": len(runs) - count,
        "success_rate": sum(run.success for run in attempted) / count if count else None,
        "refused_rate": len(refusals) / count if count else None,
        "median_queries_to_refusal": median(refusals) if refusals else None,
        "alerted_rate": (len(alerted) / count if count else None) if alerts_read else None,
        "median_queries_to_alert": median(alerted) if alerted else None,
        "median_queries": median(run.queries for run in attempted) if attempted else None,
        "median_best_l2": median(distortions) if distortions else None,
        "throttled_tries": sum(run.throttled for run in attempted),
    }


def write_report(
    report: dict,
    out: Path,
    runs: list[AttackRun],
    alerts: list[Alert] | None,
    cost: list[CostLevel],
    roles: dict[str, str],
) -> list[Path]:
    """Write the files; ``roles`` maps each client id of the run to benign, attack, verify or cost."""
    plots = [_plot_detection(runs, report["setup"]["query_budget"], out / PLOT_DETECTION)]
    if alerts and any(alert.score is not None for alert in alerts):
        plots.append(_plot_scores(alerts, roles, out / PLOT_SCORES))
    if cost:
        plots.append(_plot_latency(cost, out / PLOT_LATENCY))
    report["plots"] = [plot.name for plot in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *plots]


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"# Firewall evaluation: {setup['model']} on {setup['dataset']}",
        "",
        f"Target `{setup['target']}` ({setup['target_kind']}), baseline "
        + (f"`{setup['baseline']}` ({setup['baseline_kind']})" if setup["baseline"] else "none")
        + f". Run `{setup['run_id']}` started {setup['started']}, {setup['wall_s']:.0f} s, on {setup['machine']}.",
        "",
        f"Query budget {setup['query_budget']} per attack, {setup['attack_images']} image(s) per scenario, success = "
        f"misclassified by a fresh client with L2 distortion <= {setup['max_l2']}. "
        + (f"Alert log: `{setup['alerts']}`." if setup["alerts"] else "No alert log given."),
        "",
        "## Attacks",
        "",
        "| scenario | endpoint | runs | success | refused | median queries to refusal | alerted "
        "| median queries to alert | median best L2 | throttled tries |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in report["scenarios"]:
        for endpoint in ("target", "baseline"):
            if endpoint not in scenario:
                continue
            s = scenario[endpoint]
            lines.append(
                f"| {scenario['scenario']} | {endpoint} | {s['runs']} | {_percent(s['success_rate'])} "
                f"| {_percent(s['refused_rate'])} | {_cell(s['median_queries_to_refusal'], 0)} "
                f"| {_percent(s['alerted_rate'])} | {_cell(s['median_queries_to_alert'], 0)} "
                f"| {_cell(s['median_best_l2'])} | {s['throttled_tries']} |"
            )
    lines += adaptive_markdown(report.get("adaptive") or [], setup["max_l2"])
    benign = report["benign"]
    target = benign["target"]
    lines += [
        "",
        "## Benign traffic",
        "",
        f"{target['clients']} clients, {target['queries']} queries ({target['retries']} byte-identical retries).",
        "",
        "| endpoint | refused queries | false positives per query | false positives per client | alerted clients "
        "| throttled tries | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| target | {target['refused_queries']} | {_percent(target['false_positives_per_query'])} "
        f"| {_percent(target['false_positives_per_client'])} | {_cell(target.get('alerted_clients'))} "
        f"| {target['throttled_tries']} | {_percent(target['accuracy'])} |",
    ]
    if "baseline" in benign:
        lines.append(f"| baseline | - | - | - | - | - | {_percent(benign['baseline']['accuracy'])} |")
    lines += patterns_markdown(report.get("benign_patterns") or [])
    if report["cost"]:
        lines += [
            "",
            "## Cost",
            "",
            "| callers | target p50 ms | target p99 ms | target req/s | baseline p50 ms | baseline p99 ms "
            "| baseline req/s | target / baseline throughput | refused (target) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for level in report["cost"]:
            t, b = level["target"], level.get("baseline", {})
            lines.append(
                f"| {level['callers']} | {_cell(t['p50_ms'])} | {_cell(t['p99_ms'])} | {_cell(t['requests_per_s'], 0)} "
                f"| {_cell(b.get('p50_ms'))} | {_cell(b.get('p99_ms'))} | {_cell(b.get('requests_per_s'), 0)} "
                f"| {_cell(level.get('throughput_ratio'))} | {t['refused']} |"
            )
    if report.get("alerts"):
        alerts = report["alerts"]
        summary = f"{alerts['lines']} alert lines about this run's clients; findings by rule and role:"
        lines += ["", "## Alert log", "", summary, ""]
        lines += ["| rule | role | findings |", "| --- | --- | ---: |"]
        for rule, by_role in sorted(alerts["by_rule"].items()):
            for role, count in sorted(by_role.items()):
                lines.append(f"| {rule} | {role} | {count} |")
    lines += ["", "## Plots", ""] + [f"![{plot}]({plot})" for plot in report["plots"]]
    return "\n".join(lines) + "\n"


def patterns_markdown(entries: list[dict]) -> list[str]:
    """The benign traffic patterns (firewall.evaluate.patterns): every refusal is a false positive."""
    if not entries:
        return []
    lines = [
        "",
        "## Benign traffic patterns",
        "",
        "Every refusal here is a false positive. Alerted: clients with at least one warning-level alert "
        "(needs `--alerts`). Agreement: answered queries whose label equals the bare model's on the same query.",
        "",
        "| pattern | clients | queries | refused clients | refused queries | alerted clients | accuracy "
        "| bare model accuracy | agreement with bare model | throttled tries |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in entries:
        lines.append(
            f"| {entry['pattern']} | {entry['clients']} | {entry['queries']} | {entry['refused_clients']} "
            f"| {entry['refused_queries']} | {_cell(entry.get('alerted_clients'))} | {_percent(entry.get('accuracy'))} "
            f"| {_percent(entry.get('baseline_accuracy'))} | {_percent(entry.get('agreement_with_baseline'))} "
            f"| {entry['throttled_tries']} |"
        )
    for entry in entries:
        if entry.get("first_pass_clients") is not None:
            lines += [
                "",
                f"{entry['pattern']}: {entry['refused_clients']} of {entry['clients']} ids refused "
                f"({_percent(entry['refused_clients_share'])}); of the {entry['first_pass_clients']} ids whose images "
                f"no earlier id had sent, {entry['first_pass_refused_clients']} refused "
                f"({_percent(entry['first_pass_refused_share'])}). The other ids re-send held-out images, re-encoded "
                "and lightly augmented (there are fewer images than ids).",
            ]
    return lines


def _plot_detection(runs: list[AttackRun], budget: int, path: Path) -> Path:
    target_runs = [run for run in runs if run.endpoint == "target" and run.ended != "skipped"]
    scenarios = list(dict.fromkeys(_scenario_name(run) for run in target_runs))
    series: dict[str, tuple[str, str, list[tuple[float, int]]]] = {  # label -> colour, marker, points
        "refused (client view)": ("tab:red", "o", []),
        "not refused within the budget": ("tab:gray", "x", []),
        "first alert (alert log)": ("tab:blue", "^", []),
    }
    for x, scenario in enumerate(scenarios):
        here = [run for run in target_runs if _scenario_name(run) == scenario]
        offsets = np.linspace(-0.15, 0.15, len(here)) if len(here) > 1 else [0.0]
        for offset, run in zip(offsets, here):
            if run.first_refusal is None:
                series["not refused within the budget"][2].append((x + offset, budget))
            else:
                series["refused (client view)"][2].append((x + offset, run.first_refusal))
            if run.first_alert is not None:
                series["first alert (alert log)"][2].append((x + offset + 0.05, run.first_alert))
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(scenarios)), 4))
    for label, (color, marker, points) in series.items():
        if points:
            axis.scatter(*zip(*points), color=color, marker=marker, label=label)
    axis.legend(fontsize=8)
    axis.set_xticks(range(len(scenarios)), scenarios, rotation=20)
    axis.set_yscale("log")
    _log_axis(axis.yaxis)
    axis.set_ylim(0.8, budget * 1.5)
    axis.set_ylabel("queries until first detection")
    axis.set_title("Queries to detection per attack (target)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _log_axis(axis) -> None:
    """Plain numbers at 1, 2, 5 per decade on a log axis, and no labels on the other ticks (they overlap)."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _scenario_name(run: AttackRun) -> str:
    return f"sybil-{run.attack}" if len(run.client_ids) > 1 else run.attack


def _plot_scores(alerts: list[Alert], roles: dict[str, str], path: Path) -> Path:
    rules = sorted({alert.rule for alert in alerts if alert.score is not None})
    columns = min(2, len(rules))
    rows = -(-len(rules) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(rules) :]:
        axis.set_visible(False)
    for axis, rule in zip(axes.flat, rules):
        scored = [alert for alert in alerts if alert.rule == rule and alert.score is not None]
        for role, color in (("benign", "tab:green"), ("attack", "tab:red")):
            scores = [alert.score for alert in scored if roles.get(alert.client_id) == role]
            if scores:
                axis.hist(scores, bins=30, alpha=0.6, color=color, label=f"{role} ({len(scores)})")
        thresholds = {alert.threshold for alert in scored if alert.threshold is not None}
        for threshold in thresholds:
            axis.axvline(threshold, color="black", linestyle="--", linewidth=1)
        axis.set_title(rule)
        axis.set_xlabel("score (dashed: threshold)")
        axis.legend(fontsize=8)
    figure.suptitle("Alert scores, benign vs attack clients (alerts only: each episode's first and strongest)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_latency(cost: list[CostLevel], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(cost), figsize=(4.5 * len(cost), 3.6), squeeze=False)
    for axis, level in zip(axes[0], cost):
        for name, load in level.loads.items():
            latencies = np.sort(np.array(load.latencies_s) * 1000.0)
            if len(latencies):
                axis.plot(latencies, np.arange(1, len(latencies) + 1) / len(latencies), label=name)
        axis.set_xscale("log")
        _log_axis(axis.xaxis)
        axis.set_xlabel("latency (ms)")
        axis.set_ylabel("share of requests")
        axis.set_title(f"{level.callers} concurrent caller(s)")
        axis.legend(fontsize=8)
    figure.suptitle("Latency CDF, target vs baseline")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
