"""One evaluation, phase by phase: benign traffic, attack scenarios, cost; then the alert log and the report.

Each phase gets its own slice of the data, so that the firewall's memory of one phase does not
help it in the next: benign traffic takes the first images, each attack scenario its own block of
the last images (the baseline is attacked on the same images as the target), the benign traffic
patterns (``--benign-patterns``, ``firewall.evaluate.patterns``) each their own slice just before
the attacks' images (the large ``distinct-ids`` run reuses every image the attacks leave), and the cost phase
cycles through the benign images, last, so its load cannot disturb the detection results. Every
simulated client's id starts with ``eval-<run id>-``, so the alert log can be matched to this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from firewall.evaluate import adaptive
from firewall.evaluate import alerts as alert_log
from firewall.evaluate.attacks import ATTACKS, LABEL_ONLY_ATTACKS, SCORE_ATTACKS, AttackRun, run_attack
from firewall.evaluate.benign import BenignResult, accuracy, run_benign
from firewall.evaluate.benign_phase import BenignPatterns
from firewall.evaluate.cost import CostLevel, measure_cost
from firewall.evaluate.data import Dataset, load_dataset
from firewall.evaluate.endpoint import Endpoint
from firewall.evaluate.errors import EvaluationError
from firewall.evaluate.report import scenario_summary, write_report


@dataclass(frozen=True)
class Scenario:
    attack: str
    clients: int  # client ids the attacker spreads its queries over (more than one: a Sybil attack)
    images: list[int]  # indices in the data set

    @property
    def name(self) -> str:
        return self.attack if self.clients == 1 else f"sybil-{self.attack}"


class Evaluation:
    def __init__(self, args: argparse.Namespace):
        _check_names(args.attacks, LABEL_ONLY_ATTACKS, "--attacks")
        _check_names(args.score_attack, SCORE_ATTACKS, "--score-attack")
        _check_names(args.sybil_attack, tuple(ATTACKS), "--sybil-attack")
        _check_names(args.adaptive_attack, adaptive.ADAPTIVE_ATTACKS, "--adaptive-attack")
        if args.alerts is not None and not args.alerts.is_file():
            raise EvaluationError(f"alert log {args.alerts} does not exist")
        self.args = args
        self.dataset: Dataset = load_dataset(args.data)
        self.max_l2 = args.max_l2 if args.max_l2 is not None else self.dataset.default_max_l2
        self.patterns = BenignPatterns(args, self.dataset)
        self.scenarios, self.benign_count = self._split_data()
        self.endpoints = {"target": Endpoint(args.target, args.model, args.target_kind, args.timeout)}
        if args.baseline:
            model = args.baseline_model or args.model
            self.endpoints["baseline"] = Endpoint(args.baseline, model, args.baseline_kind, args.timeout)
        self.judge = self._judge() if args.adaptive_attack else None  # after the endpoints: their errors first
        self.run_id = args.run_id or secrets.token_hex(3)
        self.prefix = f"eval-{self.run_id}"
        self.roles: dict[str, str] = {}  # client id -> benign | attack | verify | cost

    def _split_data(self) -> tuple[list[Scenario], int]:
        args, count = self.args, len(self.dataset.images)
        plan = [(name, 1) for name in args.attacks + args.score_attack]
        plan += [(name, args.sybil_clients) for name in args.sybil_attack]
        first = count - len(plan) * args.attack_images
        scenarios = [
            Scenario(name, clients, list(range(first + k * args.attack_images, first + (k + 1) * args.attack_images)))
            for k, (name, clients) in enumerate(plan)
        ]
        # each adaptive attack: its own block of images, just before the attack scenarios' blocks
        self.adaptive_blocks: dict[str, list[int]] = {}
        for name in args.adaptive_attack:
            first -= args.adaptive_images
            self.adaptive_blocks[name] = list(range(first, first + args.adaptive_images))
        first = self.patterns.place(first, args.benign_clients)  # their slices lie just before the attacks'
        benign_count = min(first, args.benign_images) if args.benign_images else first
        if benign_count < args.benign_clients:
            raise EvaluationError(f"{count} images are too few for the attack scenarios and the benign clients")
        return scenarios, benign_count

    def run(self) -> list[Path]:
        args = self.args
        logging.getLogger("art").setLevel(logging.ERROR)  # ART warns about every estimator it wraps
        np.random.seed(args.seed)  # ART draws from NumPy's global generator
        args.out.mkdir(parents=True, exist_ok=True)
        started, clock = datetime.now(timezone.utc), time.perf_counter()
        attack_runs = sum(len(s.images) for s in self.scenarios) * len(self.endpoints)
        attack_runs += sum(len(block) for block in self.adaptive_blocks.values()) * len(self.endpoints)
        cost_slots = len(args.concurrency) * args.cost_rounds * len(self.endpoints) if args.cost_seconds > 0 else 0
        try:
            self.patterns.plan(self.prefix, self.roles)
            total = self.benign_count + self.patterns.steps + attack_runs + cost_slots
            with tqdm(total=total, unit="step", disable=None, file=sys.stderr) as progress:
                benign = self._benign(progress)
                self.patterns.run(self.endpoints, progress)
                runs = self._attacks(progress)
                adaptive_runs = self._adaptive(progress)
                cost = self._cost(progress)
        finally:
            for endpoint in self.endpoints.values():
                endpoint.close()
        alerts = self._match_alerts(runs) if args.alerts is not None else None
        report = {
            "setup": self._setup(started, time.perf_counter() - clock),
            "benign": self._benign_report(benign, alerts),
            "benign_patterns": self.patterns.report(alerts),
            "scenarios": [self._scenario_report(scenario, runs, alerts is not None) for scenario in self.scenarios],
            "runs": [run.summary() for run in runs],
            "adaptive": self._adaptive_report(adaptive_runs),
            "adaptive_runs": [{"endpoint": name, **run.summary()} for name, run in adaptive_runs],
            "cost": [level.summary() for level in cost],
            "alerts": self._alerts_report(alerts) if alerts is not None else None,
        }
        return write_report(report, args.out, runs, alerts, cost, self.roles)

    # -- phases --------------------------------------------------------------------------------

    def _benign(self, progress: tqdm) -> BenignResult:
        args = self.args
        progress.set_description("benign")
        ids = [f"{self.prefix}-benign-{k}" for k in range(args.benign_clients)]
        self.roles.update(dict.fromkeys(ids, "benign"))
        images, labels = self.dataset.images[: self.benign_count], self.dataset.labels[: self.benign_count]
        result = run_benign(
            self.endpoints["target"],
            images,
            labels,
            client_ids=ids,
            interval_s=args.benign_interval,
            retry_rate=args.retry_rate,
            seed=args.seed,
            on_query=lambda: progress.update(1),
        )
        if "baseline" in self.endpoints:
            checker = f"{self.prefix}-accuracy"
            self.roles[checker] = "benign"
            result.baseline_accuracy = accuracy(self.endpoints["baseline"], images, labels, checker)
        return result

    def _attacks(self, progress: tqdm) -> list[AttackRun]:
        args, runs = self.args, []
        for scenario in self.scenarios:
            progress.set_description(scenario.name)
            for index in scenario.images:
                for endpoint_name, endpoint in self.endpoints.items():
                    tag = f"{self.prefix}-{scenario.name}-{endpoint_name}-{index}"
                    ids = [tag] if scenario.clients == 1 else [f"{tag}-{k}" for k in range(scenario.clients)]
                    verifier = f"{self.prefix}-verify-{len(runs)}"
                    self.roles.update(dict.fromkeys(ids, "attack"))
                    self.roles[verifier] = "verify"
                    run = run_attack(
                        ATTACKS[scenario.attack],
                        endpoint,
                        endpoint_name,
                        image=self.dataset.images[index],
                        image_index=index,
                        label=int(self.dataset.labels[index]),
                        client_ids=ids,
                        verifier_id=verifier,
                        budget=args.queries,
                        nb_classes=args.classes,
                        max_l2=self.max_l2,
                    )
                    runs.append(run)
                    progress.update(1)
        return runs

    def _judge(self):
        path = self.args.judge_onnx
        if path is None:
            from models.runtime import bundled_model_path

            path = bundled_model_path(self.args.model)
        if not Path(path).is_file():
            raise EvaluationError(f"no ONNX model at {path} to judge the adaptive attacks (give --judge-onnx)")
        return adaptive.onnx_judge(path)

    def _adaptive(self, progress: tqdm) -> list[tuple[str, adaptive.AdaptiveRun]]:
        """Each adaptive attack on its own images, through each endpoint.

        Client ids: ``<prefix>-<attack>-<endpoint>-<image>-<k>``, k counting the ids the attacker took."""
        args, runs = self.args, []
        for name, block in self.adaptive_blocks.items():
            progress.set_description(name)
            for index in block:
                for endpoint_name, endpoint in self.endpoints.items():
                    prefix = f"{self.prefix}-{name}-{endpoint_name}-{index}"
                    run = adaptive.run_adaptive_attack(
                        name,
                        endpoint,
                        self.judge,
                        self.dataset.images[index],
                        index,
                        int(self.dataset.labels[index]),
                        max_l2=self.max_l2,
                        id_prefix=prefix,
                        query_budget=args.adaptive_queries,
                        id_budget=args.adaptive_ids,
                        seed=args.seed + index,
                    )
                    self.roles.update(dict.fromkeys({client for client, _ in run.trace}, "attack"))
                    runs.append((endpoint_name, run))
                    progress.update(1)
        return runs

    def _adaptive_report(self, runs: list[tuple[str, adaptive.AdaptiveRun]]) -> list[dict]:
        args = self.args
        entries = []
        for name, block in self.adaptive_blocks.items():
            entry = {"attack": name, "images": block, "query_budget": args.adaptive_queries}
            entry["id_budget"] = args.adaptive_ids
            for endpoint_name in self.endpoints:
                chosen = [run for where, run in runs if where == endpoint_name and run.attack == name]
                entry[endpoint_name] = adaptive.adaptive_summary(chosen)
            entries.append(entry)
        return entries

    def _cost(self, progress: tqdm) -> list[CostLevel]:
        args = self.args
        if args.cost_seconds <= 0:
            return []
        progress.set_description("cost")
        return measure_cost(
            self.endpoints,
            self.dataset.images[: self.benign_count],
            levels=args.concurrency,
            duration_s=args.cost_seconds,
            rounds=args.cost_rounds,
            prefix=f"{self.prefix}-cost",
            on_slot=lambda: progress.update(1),
        )

    # -- the alert log and the report ----------------------------------------------------------

    def _match_alerts(self, runs: list[AttackRun]) -> list[alert_log.Alert]:
        alerts = alert_log.read_alerts(self.args.alerts, self.prefix + "-")
        first = alert_log.first_alert_times(alerts)
        for run in runs:
            moments = [first[client] for client in run.client_ids if client in first]
            if moments:
                run.first_alert = alert_log.queries_before([moment for _, moment in run.sent], min(moments))
        return alerts

    def _role(self, client_id: str) -> str:
        return self.roles.get(client_id) or ("cost" if client_id.startswith(f"{self.prefix}-cost-") else "other")

    def _alerts_report(self, alerts: list[alert_log.Alert]) -> dict:
        by_rule: dict[str, dict[str, int]] = {}  # rule -> role -> findings
        for alert in alerts:
            roles = by_rule.setdefault(alert.rule, {})
            roles[self._role(alert.client_id)] = roles.get(self._role(alert.client_id), 0) + alert.count
        return {"lines": len(alerts), "by_rule": by_rule}

    def _benign_report(self, benign: BenignResult, alerts: list[alert_log.Alert] | None) -> dict:
        target = benign.summary()
        if alerts is not None:
            benign_ids = {traffic.client_id for traffic in benign.clients}
            alerted = {alert.client_id for alert in alerts if alert.client_id in benign_ids}
            target["alerted_clients"] = len(alerted)
            target["alerted_clients_share"] = len(alerted) / len(benign_ids)
        report = {"target": target}
        if benign.baseline_accuracy is not None:
            report["baseline"] = {"accuracy": benign.baseline_accuracy}
        return report

    def _scenario_report(self, scenario: Scenario, runs: list[AttackRun], alerts_read: bool) -> dict:
        entry = {
            "scenario": scenario.name,
            "attack": scenario.attack,
            "label_only": ATTACKS[scenario.attack].label_only,
            "client_ids": scenario.clients,
        }
        for endpoint_name in self.endpoints:
            chosen = [run for run in runs if run.endpoint == endpoint_name and run.image in scenario.images]
            entry[endpoint_name] = scenario_summary(chosen, alerts_read)
        return entry

    def _setup(self, started: datetime, wall_s: float) -> dict:
        args = self.args
        return {
            "target": args.target,
            "target_kind": self.endpoints["target"].kind,
            "baseline": args.baseline,
            "baseline_kind": self.endpoints["baseline"].kind if "baseline" in self.endpoints else None,
            "model": args.model,
            "data": str(args.data),
            "dataset": self.dataset.name,
            "benign_images": self.benign_count,
            "benign_clients": args.benign_clients,
            "benign_interval_s": args.benign_interval,
            "retry_rate": args.retry_rate,
            "benign_patterns": self.patterns.setup(),
            "attack_images": args.attack_images,
            "query_budget": args.queries,
            "max_l2": self.max_l2,
            "sybil_clients": args.sybil_clients,
            "cost": {"callers": args.concurrency, "seconds": args.cost_seconds, "rounds": args.cost_rounds},
            "alerts": str(args.alerts) if args.alerts else None,
            "run_id": self.run_id,
            "seed": args.seed,
            "started": started.isoformat(timespec="seconds"),
            "wall_s": wall_s,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        }


def _check_names(names: list[str], known: tuple[str, ...], option: str) -> None:
    for name in names:
        if name not in known:
            raise EvaluationError(f"{option}: unknown attack {name!r} (choose from {', '.join(known)})")
