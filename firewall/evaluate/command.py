"""`firewall evaluate`: drive a live endpoint with benign traffic, attacks and load; write the report.

The phases run in this order, each on its own slice of the data so that the firewall's memory of
one phase does not help it in the next: benign traffic (the first images), one block of images per
attack scenario (the last images; the baseline is attacked on the same images as the target), and
the cost measurement last (cycling through the benign images). Every simulated client's id starts
with ``eval-<run id>-``, so the alert log can be matched to this run alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

EXIT_ERROR = 2


class UsageError(Exception):
    """An argument that cannot work, found before any traffic is sent."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def _name_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part and part != "none"]


def configure_cli(parser: argparse.ArgumentParser) -> None:
    endpoints = parser.add_argument_group("endpoints")
    endpoints.add_argument("--target", required=True, metavar="HOST:PORT", help="the endpoint under test")
    endpoints.add_argument("--model", default="mnist", help="model name at the target (default: mnist)")
    endpoints.add_argument("--target-kind", choices=("auto", "firewall", "model"), default="auto")
    endpoints.add_argument("--baseline", metavar="HOST:PORT", help="the bare model server, for comparison")
    endpoints.add_argument("--baseline-model", help="model name at the baseline (default: --model)")
    endpoints.add_argument("--baseline-kind", choices=("auto", "firewall", "model"), default="auto")
    endpoints.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: 10)")
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", required=True, type=Path, help="MNIST folder, CIFAR-10 zip, .npz or class folders")
    data.add_argument("--classes", type=_positive_int, default=10, help="number of classes (default: 10)")
    data.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder (default: ./evaluation)")
    data.add_argument("--alerts", type=Path, help="the firewall's alert log (JSON lines), read after the run")
    data.add_argument("--run-id", help="tag in every client id (default: random)")
    data.add_argument("--seed", type=int, default=0)
    attacks = parser.add_argument_group("attacks")
    attacks.add_argument(
        "--attacks", type=_name_list, default=["hopskipjump", "boundary", "signopt", "geoda"],
        help="label-only attacks, comma-separated, or none (default: hopskipjump,boundary,signopt,geoda)",
    )  # fmt: skip
    attacks.add_argument("--score-attack", type=_name_list, default=["simba"], help="simba or none (default: simba)")
    attacks.add_argument("--sybil-attack", type=_name_list, default=["hopskipjump"], help="attack spread over many ids")
    attacks.add_argument("--sybil-clients", type=_positive_int, default=8, help="client ids of the Sybil attacker")
    attacks.add_argument("--attack-images", type=_positive_int, default=2, help="images per scenario (default: 2)")
    attacks.add_argument("--queries", type=_positive_int, default=300, help="query budget per attack (default: 300)")
    attacks.add_argument("--max-l2", type=float, help="largest L2 distortion counted as success (default: by data)")
    benign = parser.add_argument_group("benign traffic")
    benign.add_argument("--benign-images", type=_non_negative_int, default=200, help="0: all left (default: 200)")
    benign.add_argument("--benign-clients", type=_positive_int, default=20)
    benign.add_argument("--benign-interval", type=float, default=0.1, help="mean seconds between a client's queries")
    benign.add_argument("--retry-rate", type=float, default=0.05, help="share of requests sent twice, byte-identical")
    cost = parser.add_argument_group("cost")
    cost.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="callers per level (default: 1,16,64)")
    cost.add_argument("--cost-seconds", type=float, default=2.0, help="seconds per level, endpoint and round (0: skip)")
    cost.add_argument("--cost-rounds", type=_positive_int, default=2, help="alternating rounds per level (default: 2)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        from firewall.evaluate.data import DataError
        from firewall.evaluate.endpoint import EndpointError
    except ImportError as error:
        return _fail(f"{error.name} is missing; install the extra: pip install 'inference-firewall[eval]'")
    try:
        report_files = evaluate(args)
    except (UsageError, DataError, EndpointError) as error:
        return _fail(str(error))
    except ImportError as error:
        return _fail(f"{error.name} is missing; install the extra: pip install 'inference-firewall[eval]'")
    print(f"firewall evaluate: wrote {', '.join(str(path) for path in report_files)}")
    return 0


def _fail(message: str) -> int:
    print(f"firewall evaluate: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def evaluate(args: argparse.Namespace) -> list[Path]:
    import numpy as np
    from tqdm import tqdm

    from firewall.evaluate import alerts as alert_log
    from firewall.evaluate.attacks import ATTACKS, LABEL_ONLY_ATTACKS, SCORE_ATTACKS, AttackRun, run_attack
    from firewall.evaluate.benign import accuracy, run_benign
    from firewall.evaluate.cost import measure_cost
    from firewall.evaluate.data import load_dataset
    from firewall.evaluate.endpoint import Endpoint
    from firewall.evaluate.report import scenario_summary, write_report

    _check_names(args.attacks, LABEL_ONLY_ATTACKS, "--attacks")
    _check_names(args.score_attack, SCORE_ATTACKS, "--score-attack")
    _check_names(args.sybil_attack, tuple(ATTACKS), "--sybil-attack")
    if args.alerts is not None and not args.alerts.is_file():
        raise UsageError(f"alert log {args.alerts} does not exist")
    logging.getLogger("art").setLevel(logging.ERROR)  # ART warns about each estimator it wraps
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    dataset = load_dataset(args.data)
    max_l2 = args.max_l2 if args.max_l2 is not None else dataset.default_max_l2
    scenarios = [(name, 1) for name in args.attacks + args.score_attack]
    scenarios += [(name, args.sybil_clients) for name in args.sybil_attack]
    attack_images = len(scenarios) * args.attack_images
    benign_count = len(dataset.images) - attack_images
    if args.benign_images:
        benign_count = min(benign_count, args.benign_images)
    if benign_count < args.benign_clients:
        raise UsageError(f"{len(dataset.images)} images are too few for {attack_images} attack and the benign images")

    endpoints = {"target": Endpoint(args.target, args.model, args.target_kind, args.timeout)}
    if args.baseline:
        baseline_model = args.baseline_model or args.model
        endpoints["baseline"] = Endpoint(args.baseline, baseline_model, args.baseline_kind, args.timeout)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_id = args.run_id or secrets.token_hex(3)
    prefix = f"eval-{run_id}"
    roles: dict[str, str] = {}
    np.random.seed(args.seed)  # ART draws from NumPy's global generator

    cost_slots = len(args.concurrency) * args.cost_rounds * len(endpoints) if args.cost_seconds > 0 else 0
    total = benign_count + attack_images * len(endpoints) + cost_slots
    with tqdm(total=total, unit="step", desc="benign", disable=None, file=sys.stderr) as progress:
        benign_ids = [f"{prefix}-benign-{k}" for k in range(args.benign_clients)]
        roles.update(dict.fromkeys(benign_ids, "benign"))
        benign_images, benign_labels = dataset.images[:benign_count], dataset.labels[:benign_count]
        benign = run_benign(
            endpoints["target"], benign_images, benign_labels, benign_ids, args.benign_interval, args.retry_rate,
            args.seed, on_query=lambda: progress.update(1),
        )  # fmt: skip
        benign_report = {"target": benign.summary()}
        if "baseline" in endpoints:
            roles[f"{prefix}-accuracy"] = "benign"
            baseline_accuracy = accuracy(endpoints["baseline"], benign_images, benign_labels, f"{prefix}-accuracy")
            benign_report["baseline"] = {"accuracy": baseline_accuracy}

        runs: list[AttackRun] = []
        verifications = 0
        first_image = len(dataset.images) - attack_images
        for position, (name, clients) in enumerate(scenarios):
            scenario = name if clients == 1 else f"sybil-{name}"
            progress.set_description(scenario)
            for offset in range(args.attack_images):
                index = first_image + position * args.attack_images + offset
                for endpoint_name, endpoint in endpoints.items():
                    tag = f"{prefix}-{scenario}-{endpoint_name}-{index}"
                    ids = [tag] if clients == 1 else [f"{tag}-{k}" for k in range(clients)]
                    verifier = f"{prefix}-verify-{verifications}"
                    verifications += 1
                    roles.update(dict.fromkeys(ids, "attack"))
                    roles[verifier] = "verify"
                    runs.append(
                        run_attack(
                            ATTACKS[name], endpoint, endpoint_name, dataset.images[index], index,
                            int(dataset.labels[index]), ids, verifier, args.queries, args.classes, max_l2,
                        )
                    )  # fmt: skip
                    progress.update(1)

        cost = []
        if cost_slots:
            progress.set_description("cost")
            cost = measure_cost(
                endpoints, benign_images, args.concurrency, args.cost_seconds, args.cost_rounds, f"{prefix}-cost",
                on_slot=lambda: progress.update(1),
            )  # fmt: skip
    for endpoint in endpoints.values():
        endpoint.close()

    alerts = None
    alerts_report = None
    if args.alerts is not None:
        alerts = alert_log.read_alerts(args.alerts, prefix + "-")
        first = alert_log.first_alert_times(alerts)
        for run in runs:
            moments = [first[client] for client in run.client_ids if client in first]
            if moments:
                run.first_alert = alert_log.queries_before([moment for _, moment in run.sent], min(moments))
        alerted_benign = {alert.client_id for alert in alerts if alert.client_id in set(benign_ids)}
        benign_report["target"]["alerted_clients"] = len(alerted_benign)
        benign_report["target"]["alerted_clients_share"] = len(alerted_benign) / len(benign_ids)
        by_rule: dict[str, dict[str, int]] = {}  # rule -> role -> findings
        for alert in alerts:
            role = roles.get(alert.client_id) or ("cost" if alert.client_id.startswith(f"{prefix}-cost-") else "other")
            by_rule.setdefault(alert.rule, {}).setdefault(role, 0)
            by_rule[alert.rule][role] += alert.count
        alerts_report = {"lines": len(alerts), "by_rule": by_rule}

    scenario_reports = []
    for name, clients in scenarios:
        scenario = name if clients == 1 else f"sybil-{name}"
        entry = {"scenario": scenario, "attack": name, "label_only": ATTACKS[name].label_only, "client_ids": clients}
        for endpoint_name in endpoints:
            chosen = [
                run for run in runs
                if run.attack == name and run.endpoint == endpoint_name and len(run.client_ids) == clients
            ]  # fmt: skip
            entry[endpoint_name] = scenario_summary(chosen, alerts is not None)
        scenario_reports.append(entry)

    report = {
        "setup": {
            "target": args.target,
            "target_kind": endpoints["target"].kind,
            "baseline": args.baseline,
            "baseline_kind": endpoints["baseline"].kind if "baseline" in endpoints else None,
            "model": args.model,
            "data": str(args.data),
            "dataset": dataset.name,
            "benign_images": benign_count,
            "benign_clients": args.benign_clients,
            "benign_interval_s": args.benign_interval,
            "retry_rate": args.retry_rate,
            "attack_images": args.attack_images,
            "query_budget": args.queries,
            "max_l2": max_l2,
            "sybil_clients": args.sybil_clients,
            "cost": {"callers": args.concurrency, "seconds": args.cost_seconds, "rounds": args.cost_rounds},
            "alerts": str(args.alerts) if args.alerts else None,
            "run_id": run_id,
            "seed": args.seed,
            "started": started.isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - clock,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        },
        "benign": benign_report,
        "scenarios": scenario_reports,
        "runs": [run.summary() for run in runs],
        "cost": [level.summary() for level in cost],
        "alerts": alerts_report,
    }
    return write_report(report, out, runs, alerts, cost, roles)


def _check_names(names: list[str], known: tuple[str, ...], option: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"{option}: unknown attack {unknown[0]!r} (choose from {', '.join(known)})")
