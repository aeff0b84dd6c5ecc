"""deploy/monitoring: the Grafana dashboard and the PrometheusRule alerts.

Their PromQL may name only metrics (and labels, and outcome values) that a real firewall exports,
read from its /metrics endpoint; promtool (Debian's `prometheus` package, installed by .ci/run)
checks the syntax of every expression and runs unit tests of two alerts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as triton
import yaml
from prometheus_client.parser import text_string_to_metric_families

from firewall.metrics import OUTCOMES
from tests.conftest import address, uint8_input
from tests.stages import Flagger, marked, with_stage

MONITORING = Path(__file__).parents[1] / "deploy" / "monitoring"
DASHBOARD = json.loads((MONITORING / "firewall-dashboard.json").read_text())
RULES = yaml.safe_load((MONITORING / "firewall-rules.yaml").read_text())
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GRAFANA_VARIABLES = {"$model": ".*", "$__rate_interval": "5m"}


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in RULES["spec"]["groups"] for rule in group["rules"]]


def promql(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


@pytest.fixture(scope="module")
def exported(firewall, mnist_heldout) -> dict[str, set[str]]:
    """Sample name -> label names, scraped from a real firewall that has answered and flagged a request."""
    images, _ = mnist_heldout
    with with_stage(firewall, Flagger()), triton.InferenceServerClient(address(firewall)) as client:
        client.infer("mnist", [uint8_input(images[:1])])
        client.infer("mnist", [uint8_input(marked(images[:1]))])
        text = urllib.request.urlopen(f"http://127.0.0.1:{firewall.metrics_port}/metrics", timeout=10).read().decode()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def metric_names(expression: str) -> set[str]:
    """The metric names in an expression: identifiers outside strings, matchers, ranges and grouping clauses, not called."""
    bare = re.sub(r'"(?:\\.|[^"\\])*"', "", promql(expression))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = {match.group(1) for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", bare) if not match.group(2)}
    return {name for name in names if name not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?", name)}


@pytest.mark.parametrize("expression", dashboard_expressions() + rule_expressions())
def test_every_expression_names_exported_metrics_and_labels(expression, exported):
    names = metric_names(expression)
    assert names and names <= exported.keys(), names - exported.keys()
    labels = set().union(*(exported[name] for name in names))
    matchers = re.findall(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', promql(expression))
    grouping = [label.strip() for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expression) for label in clause.split(",")]
    assert {label for label, _ in matchers} | set(grouping) <= labels, ({label for label, _ in matchers} | set(grouping)) - labels
    for label, value in matchers:
        if label == "outcome":
            assert set(value.split("|")) <= set(OUTCOMES), value


def test_dashboard_structure():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert metric_names(variables["model"]["definition"].removeprefix("label_values(").split(",")[0]) == {"firewall_requests_total"}
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["type"] in ("timeseries", "stat") and panel["title"] and panel["description"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(target["refId"] and target["expr"] for target in panel["targets"])
    covered = {name for expression in dashboard_expressions() for name in metric_names(expression)}
    # what the issue asks for: requests and refusals by outcome, findings by rule, bans, stage latency,
    # upstream errors, tracked clients
    assert {"firewall_decisions_total", "firewall_requests_total", "firewall_findings_total", "firewall_bans_active",
            "firewall_stage_seconds_bucket", "firewall_tracked_clients"} <= covered
    assert any('outcome="unavailable"' in expression for expression in dashboard_expressions())


def test_prometheus_rule_structure():
    assert RULES["apiVersion"] == "monitoring.coreos.com/v1" and RULES["kind"] == "PrometheusRule"
    rules = [rule for group in RULES["spec"]["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return path


def test_promtool_checks_every_expression(promtool, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES["spec"]))
    recorded = [{"record": f"dashboard:panel_{index}", "expr": promql(e)} for index, e in enumerate(dashboard_expressions())]
    dashboard = tmp_path / "dashboard.yaml"
    dashboard.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = subprocess.run([promtool, "check", "rules", str(rules), str(dashboard)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def expected(alert: str, labels: dict[str, str]) -> dict:
    """An alert as promtool reports it: its labels, and its annotations with ``$labels`` filled in."""
    rule = next(rule for group in RULES["spec"]["groups"] for rule in group["rules"] if rule["alert"] == alert)
    annotations = {
        key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda match: labels[match.group(1)], text)
        for key, text in rule["annotations"].items()
    }
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def test_promtool_unit_tests_of_the_alerts(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(RULES["spec"]))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'firewall_requests_total{model="mnist"}', "values": "0+600x20"},
                    {"series": 'firewall_decisions_total{model="mnist",outcome="unavailable"}', "values": "0+120x20"},
                    {"series": 'firewall_findings_total{model="mnist",rule="probing.client"}', "values": "0 0 0 5 10 15"},
                    {"series": "firewall_tracked_clients", "values": "3x20"},
                    {"series": "firewall_bans_active", "values": "1x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "FirewallUpstreamUnavailable",
                        "exp_alerts": [expected("FirewallUpstreamUnavailable", {"model": "mnist"})],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "FirewallProbingAttack",
                        "exp_alerts": [expected("FirewallProbingAttack", {"model": "mnist", "rule": "probing.client"})],
                    },
                    {"eval_time": "15m", "alertname": "FirewallBansSurge", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "FirewallMetricsAbsent", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([promtool, "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
