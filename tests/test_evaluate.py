"""`firewall evaluate` end to end: a reduced run against a firewall and a bare MLServer the test starts.

The firewall here carries a deliberately small probing detector (below) in place of the real
detectors, so the run exercises refusals, Sybil id rotation and the alert log without depending on
their thresholds; what is asserted is the report's structure and numbers that must hold for any
model: the firewall's refusals and the alerts it logs agree query for query, benign traffic is
never refused, and the bare model server never refuses anything. The alert log `evaluate --alerts`
reads is the firewall's own: its structlog output (the service's configuration) written to a file.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from firewall.cli import main
from firewall.logs import logging_config
from firewall.stage import Finding, RequestContext
from models.runtime import bundled_model_path
from tests.conftest import FIXTURES, address, make_settings, running_firewall
from tests.upstream import mlserver

MNIST = bundled_model_path("mnist")
DATA = FIXTURES / "mnist_heldout.npz"
RADIUS = 1.5  # L2 over pixels in [0, 1]; distinct MNIST digits lie much farther apart
ATTACKS = ("hopskipjump", "boundary", "signopt", "geoda")


class NearDuplicateProbe:
    """Flags a query within RADIUS of one of the same client's earlier queries (byte-identical
    retries excepted)."""

    name = "test-probe"

    def __init__(self):
        self.history: dict[str, list[np.ndarray]] = defaultdict(list)
        self.digests: dict[str, set[bytes]] = defaultdict(set)
        self.lock = threading.Lock()

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        findings = []
        with self.lock:
            for item, (image, digest) in enumerate(zip(ctx.images, ctx.digests)):
                if digest in self.digests[ctx.client_id]:
                    continue
                self.digests[ctx.client_id].add(digest)
                pixels = image.astype(np.float32).ravel() / (255.0 if image.dtype == np.uint8 else 1.0)
                history = self.history[ctx.client_id]
                nearest = min((float(np.linalg.norm(pixels - past)) for past in history), default=np.inf)
                history.append(pixels)
                if nearest < RADIUS:
                    findings.append(Finding(self.name, score=RADIUS - nearest, threshold=0.0, item=item))
        return findings


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    alert_log = tmp_path_factory.mktemp("alerts") / "firewall.jsonl"
    settings = make_settings(models={"mnist": {"policy": {"action": "ban"}}}, throttle={"address_refusals": 10_000})
    with alert_log.open("w", buffering=1) as stream:
        stream.write("not json\n")  # a stray line, as log shippers leave them
        structlog.configure(**logging_config("INFO", stream))  # the firewall's stdout, to a file
        try:
            with mlserver("mnist", MNIST) as baseline, running_firewall(settings) as firewall:
                firewall.service.pipelines["mnist"].stages.append(NearDuplicateProbe())
                yield address(firewall), baseline, alert_log
        finally:
            structlog.reset_defaults()


def evaluate(*arguments: str) -> int:
    return main(["evaluate", *arguments])


@pytest.fixture(scope="module")
def report(endpoints, tmp_path_factory) -> tuple[dict, Path]:
    target, baseline, alert_log = endpoints
    out = tmp_path_factory.mktemp("report")
    code = evaluate(
        "--target", target, "--baseline", baseline, "--model", "mnist", "--data", str(DATA), "--out", str(out),
        "--alerts", str(alert_log), "--queries", "120", "--attack-images", "1", "--sybil-clients", "4",
        "--benign-images", "60", "--benign-clients", "6", "--benign-interval", "0.005", "--retry-rate", "0.2",
        "--cost-seconds", "0.3", "--cost-rounds", "2", "--run-id", "test", "--benign-patterns", "none",
        "--adaptive-images", "1", "--adaptive-queries", "40", "--adaptive-ids", "10",
    )  # fmt: skip
    assert code == 0
    return json.loads((out / "report.json").read_text()), out


def test_report_files_and_setup(report):
    data, out = report
    assert data["setup"]["target_kind"] == "firewall" and data["setup"]["baseline_kind"] == "model"
    assert data["setup"]["dataset"] == "mnist_heldout" and data["setup"]["max_l2"] == 2.0
    assert set(data["plots"]) == {"queries_to_detection.png", "scores.png", "latency_cdf.png"}
    for name in data["plots"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    markdown = (out / "report.md").read_text()
    for heading in ("## Attacks", "## Benign traffic", "## Cost", "## Alert log"):
        assert heading in markdown


def test_benign_traffic_is_never_refused(report):
    benign = report[0]["benign"]
    target = benign["target"]
    assert target["clients"] == 6 and target["queries"] == 60 + target["retries"] > 60
    assert target["refused_queries"] == 0 and target["false_positives_per_query"] == 0.0
    assert target["false_positives_per_client"] == 0.0 and target["alerted_clients"] == 0
    assert target["accuracy"] >= 0.9 and benign["baseline"]["accuracy"] >= 0.9


def test_attacks_are_refused_by_the_target_only(report):
    data = report[0]
    scenarios = {scenario["scenario"]: scenario for scenario in data["scenarios"]}
    assert set(scenarios) == {*ATTACKS, "simba", "sybil-hopskipjump"}
    for name, scenario in scenarios.items():
        target, baseline = scenario["target"], scenario["baseline"]
        assert target["runs"] == baseline["runs"] == 1
        assert target["refused_rate"] == 1.0 and target["median_queries_to_refusal"] <= 10, name
        assert target["median_queries"] < 120, name  # stopped by the refusal, long before the budget
        assert baseline["refused_rate"] == 0.0 and baseline["alerted_rate"] == 0.0, name
        assert baseline["median_queries"] <= 120, name
    for run in data["runs"]:
        assert run["ended"] in (("refused",) if run["endpoint"] == "target" else ("budget", "finished"))
    sybil = next(run for run in data["runs"] if len(run["client_ids"]) == 4 and run["endpoint"] == "target")
    assert sybil["refused_ids"] == 4


def test_adaptive_attacker_in_the_report(report):
    data, out = report
    entries = {entry["attack"]: entry for entry in data["adaptive"]}
    assert set(entries) == {"adaptive-hsja", "adaptive-boundary"}
    blocks = [entry["images"] for entry in entries.values()]
    scenario_images = {run["image"] for run in data["runs"]}
    assert len({*blocks[0], *blocks[1]}) == 2 and not scenario_images & {*blocks[0], *blocks[1]}
    for entry in entries.values():
        assert entry["query_budget"] == 40 and entry["id_budget"] == 10
        assert entry["target"]["runs"] + entry["target"]["skipped"] == 1
        assert entry["baseline"]["median_refused"] in (0, None)  # a bare model server never refuses
    for run in data["adaptive_runs"]:
        assert run["queries"] <= 40 and run["ids_used"] <= 10
        if run["endpoint"] == "target" and run["ended"] != "skipped":
            assert run["refused"] > 0 and run["ids_used"] == min(10, run["refused"] + 1)
    assert "## Adaptive attacker" in (out / "report.md").read_text()


def test_alert_log_agrees_with_the_client_view(report):
    data = report[0]
    for run in data["runs"]:
        if run["endpoint"] == "target":
            assert run["first_alert"] == run["first_refusal"] is not None
        else:
            assert run["first_alert"] is None
    assert set(data["alerts"]["by_rule"]) == {"test-probe"}
    assert set(data["alerts"]["by_rule"]["test-probe"]) == {"attack"}
    target_runs = [run for run in data["runs"] if run["endpoint"] == "target"]
    assert data["alerts"]["by_rule"]["test-probe"]["attack"] >= len(target_runs)  # every run's ids were alerted


def test_cost_levels(report):
    cost = report[0]["cost"]
    assert [level["callers"] for level in cost] == [1, 16, 64]
    for level in cost:
        for endpoint in ("target", "baseline"):
            numbers = level[endpoint]
            assert numbers["answered"] > 0  # refusals are possible: a firewall may throttle one fast caller
            assert 0 < numbers["p50_ms"] <= numbers["p99_ms"] and numbers["requests_per_s"] > 0
        assert level["throughput_ratio"] > 0


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_unreachable_target(capsys, tmp_path):
    code = evaluate("--target", "127.0.0.1:1", "--data", str(DATA), "--out", str(tmp_path))
    assert code == 2
    assert _error_line(capsys).startswith("firewall evaluate: error: cannot reach 127.0.0.1:1")


def test_unknown_model(endpoints, capsys, tmp_path):
    code = evaluate("--target", endpoints[0], "--model", "nope", "--data", str(DATA), "--out", str(tmp_path))
    assert code == 2
    assert "does not serve a model named 'nope'" in _error_line(capsys)


@pytest.mark.parametrize("data", ["/nonexistent/mnist", str(FIXTURES)])
def test_wrong_data_path(endpoints, capsys, tmp_path, data):
    code = evaluate("--target", endpoints[0], "--data", data, "--out", str(tmp_path))
    assert code == 2
    assert _error_line(capsys).startswith("firewall evaluate: error: ")


def test_missing_alert_log(endpoints, capsys, tmp_path):
    code = evaluate("--target", endpoints[0], "--data", str(DATA), "--alerts", str(tmp_path / "none.jsonl"))
    assert code == 2
    assert "alert log" in _error_line(capsys)


def test_data_sets_from_files_and_class_folders():
    from firewall.evaluate.data import load_dataset

    mnist = load_dataset(DATA)
    assert mnist.images.shape == (1000, 28, 28, 1) and mnist.default_max_l2 == 2.0
    cifar = load_dataset(FIXTURES / "cifar10_test")
    assert cifar.images.shape == (100, 32, 32, 3) and cifar.images.dtype == np.uint8
    assert np.bincount(cifar.labels).tolist() == [10] * 10 and cifar.default_max_l2 == 0.5
