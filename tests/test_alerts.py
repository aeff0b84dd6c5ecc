"""Alerts: JSON lines with ECS fields, aggregated per episode, and counts that add up exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from firewall.alerts import Alert, AlertAggregator
from firewall.config import AlertConfig
from firewall.protocol import pb, pb_grpc
from tests.conftest import FakeClock, address, drive_clock, make_settings, running_firewall
from tests.stages import Flagger, marked, with_stage

ECS_ROOTS = {"@timestamp", "message", "log", "ecs", "event", "error", "user", "source", "rule", "file", "firewall"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")



def alert(client_id: str = "c1", rule: str = "probing.client", score: float = 0.5) -> Alert:
    return Alert(rule, "ban", "mnist", client_id, "10.0.0.1", "r1", score, 0.1)


def test_aggregation_first_at_once_then_per_interval_then_end(log_lines):
    clock = FakeClock(0.0)
    aggregator = AlertAggregator(AlertConfig(interval_s=10, idle_s=30, max_episodes=100), clock)
    for step in range(100):  # 100 findings over 50 s
        clock.now = step * 0.5
        aggregator.record(alert(score=step))
        aggregator.flush()
    clock.now = 49.5 + 30
    aggregator.flush()
    lines = log_lines()
    assert [line["firewall.count"] for line in lines] == [1, 20, 20, 20, 20, 19]
    assert [line["firewall.episode"] for line in lines] == ["start"] + ["ongoing"] * 4 + ["end"]
    assert all(line["event.type"] == ["denied"] for line in lines)
    assert lines[1]["firewall.score"] == 20.0  # the strongest finding of the interval
    assert len({line["event.start"] for line in lines}) == 1 and "event.end" in lines[-1]
    assert len(aggregator) == 0


def test_an_observation_is_logged_at_info_and_a_verdict_at_warning(log_lines):
    aggregator = AlertAggregator(AlertConfig(interval_s=60, idle_s=60, max_episodes=10), FakeClock(0.0))
    aggregator.record(Alert("probing.region", "decoy", "mnist", "c1", "10.0.0.1", "r1", 1.0, 1.0, "info"))
    aggregator.record(alert())
    aggregator.close()
    levels = {(line["rule.name"], line["firewall.episode"]): line["log.level"] for line in log_lines()}
    assert levels == {
        ("probing.region", "start"): "info",
        ("probing.region", "end"): "info",
        ("probing.client", "start"): "warning",
        ("probing.client", "end"): "warning",
    }


def test_eviction_and_shutdown_end_episodes_without_losing_counts(log_lines):
    aggregator = AlertAggregator(AlertConfig(interval_s=60, idle_s=60, max_episodes=3), FakeClock(0.0))
    for client in range(10):
        for _ in range(5):
            aggregator.record(alert(client_id=f"c{client}"))
    assert len(aggregator) == 3
    aggregator.close()
    lines = log_lines()
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["user.id"]] = counts.get(line["user.id"], 0) + line["firewall.count"]
    assert counts == {f"c{client}": 5 for client in range(10)}
    assert len(lines) == 20  # a start and an end line per episode


def stream_requests(images: np.ndarray, client_id: str):
    for image in images:
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
        yield pb.ModelInferRequest(model_name="mnist", id=client_id, inputs=[tensor], raw_input_contents=[image.tobytes()])


def test_thousand_query_attack_gives_a_line_per_interval_whose_counts_add_up(log_lines, mnist_heldout):
    images, _ = mnist_heldout
    attack = marked(images[np.arange(1000) % len(images)])
    settings = make_settings(
        throttle={"enabled": False},
        alerts={"interval_s": 0.5, "idle_s": 60},
        models={"mnist": {"policy": {"action": "monitor"}}},
    )
    clock = FakeClock()
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger()):
        drive_clock(firewall, clock)
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for chunk in np.split(attack, 4):  # 250 queries, then the interval passes
                answers = list(stub.ModelStreamInfer(stream_requests(chunk, "attacker"), metadata=[("x-client-id", "attacker")]))
                assert all(not answer.error_message for answer in answers) and len(answers) == 250
                clock.advance(0.5)
                firewall.alerts.flush()  # the periodic flush may run first: either way one line per interval
            stub.ModelInfer(next(stream_requests(marked(images[:1]), "other")), metadata=[("x-client-id", "other")])
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(pb.ModelInferRequest(model_name="mnist"), metadata=[("x-client-id", "clumsy")])
    lines = log_lines()  # after shutdown, which ends the open episodes

    alerts = [line for line in lines if line.get("event.kind") == "alert"]
    by_client = {client: [a for a in alerts if a["user.id"] == client] for client in ("attacker", "other")}
    assert [a["firewall.count"] for a in by_client["attacker"]] == [1, 249, 250, 250, 250, 0]  # start, per interval, end
    assert [a["firewall.count"] for a in by_client["other"]] == [1, 0]
    for line in alerts:
        assert line["event.category"] == ["intrusion_detection"] and line["event.action"] == "monitor"
        assert line["rule.name"] == "test.flagger" and line["rule.id"] == "mnist/test.flagger"
        assert line["source.ip"] == "127.0.0.1" and line["firewall.model"] == "mnist"
        assert line["firewall.score"] == 0.9 and line["firewall.threshold"] == 0.5
        assert re.fullmatch(r"[0-9a-f]{32}", line["firewall.request_id"])
        assert ISO_UTC.match(line["@timestamp"]) and line["log.level"] == "warning" and line["message"] == "alert"
        assert "event" not in line  # structlog's own key is renamed, so ECS's event.* expands cleanly
    assert by_client["attacker"][0]["firewall.episode"] == "start" and by_client["attacker"][-1]["firewall.episode"] == "end"
    assert all(line["event.type"] == ["allowed"] for line in alerts)

    # Lines logged while serving a request carry that request's fields (bound per call).
    refused = next(line for line in lines if line["message"] == "request.refused")
    assert refused["user.id"] == "clumsy" and refused["error.code"] == "INVALID_ARGUMENT" and "firewall.request_id" in refused
    assert refused["event.type"] == ["denied"] and refused["event.outcome"] == "failure" and refused["event.reason"]
    assert {"server.started", "server.stopped"} <= {line["message"] for line in lines}
    assert [line["message"] for line in lines if line["message"].startswith("server.") and "ready" in line["message"]] == ["server.ready"]  # once per change
    for line in lines:  # every line is ECS: its fields are ECS's or under the firewall's own namespace
        assert line["event.kind"] in ("event", "alert") and line["event.action"] and line["ecs.version"], line
        assert all(key.split(".")[0] in ECS_ROOTS for key in line), line


def test_configure_logging_writes_json_to_stdout():
    code = (
        "import structlog; from firewall.logs import configure_logging; configure_logging();"
        "structlog.contextvars.bind_contextvars(**{'user.id': 'u'});"
        "log = structlog.get_logger()\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('boom')"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    line = json.loads(output.stdout)
    assert line["message"] == "boom" and line["user.id"] == "u" and line["log.level"] == "error"
    assert line["error.type"] == "ZeroDivisionError" and line["error.message"] == "division by zero"
    assert "ZeroDivisionError" in line["error.stack_trace"] and line["event.action"] == "boom"


def test_several_rules_at_once_keep_an_episode_each_per_client(log_lines, mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(
        throttle={"enabled": False}, alerts={"interval_s": 0.5, "idle_s": 60}, models={"mnist": {"policy": {"action": "monitor"}}}
    )
    clock = FakeClock()
    flagged = marked(images[:1])
    first, second, late = Flagger("a", "test.a", score=0.9), Flagger("b", "test.b", score=0.7), Flagger("c", "test.c", score=0.6)
    with running_firewall(settings) as firewall, with_stage(firewall, first), with_stage(firewall, second):
        drive_clock(firewall, clock)
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def send(client_id: str, times: int) -> None:
                for _ in range(times):
                    stub.ModelInfer(next(stream_requests(flagged, client_id)), metadata=[("x-client-id", client_id)])

            send("multi", 10)
            with with_stage(firewall, late):
                send("multi", 5)
            send("other", 2)
            clock.advance(0.5)
            firewall.alerts.flush()
    alerts = [line for line in log_lines() if line.get("event.kind") == "alert"]
    episodes: dict[tuple[str, str], list[tuple[str, int, float]]] = {}
    for line in alerts:
        key = (line["user.id"], line["rule.name"])
        episodes.setdefault(key, []).append((line["firewall.episode"], line["firewall.count"], line["firewall.score"]))
    assert episodes == {
        ("multi", "test.a"): [("start", 1, 0.9), ("ongoing", 14, 0.9), ("end", 0, 0.9)],
        ("multi", "test.b"): [("start", 1, 0.7), ("ongoing", 14, 0.7), ("end", 0, 0.7)],
        ("multi", "test.c"): [("start", 1, 0.6), ("ongoing", 4, 0.6), ("end", 0, 0.6)],
        ("other", "test.a"): [("start", 1, 0.9), ("ongoing", 1, 0.9), ("end", 0, 0.9)],
        ("other", "test.b"): [("start", 1, 0.7), ("ongoing", 1, 0.7), ("end", 0, 0.7)],
    }


def test_an_alert_about_an_address_is_one_episode_of_the_address_naming_no_client(log_lines, mnist_heldout):
    """Many ids behind one address (a NAT): the address is accused, none of its clients."""
    images, _ = mnist_heldout
    settings = make_settings(throttle={"enabled": False}, models={"mnist": {"policy": {"action": "monitor"}}})
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger("nat", "test.address", about="address")):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for n in range(6):
                client_id = f"behind-nat-{n}"
                stub.ModelInfer(next(stream_requests(marked(images[:1]), client_id)), metadata=[("x-client-id", client_id)])
    alerts = [line for line in log_lines() if line.get("event.kind") == "alert"]
    assert alerts and all("user.id" not in line for line in alerts), alerts
    assert {line["source.ip"] for line in alerts} == {"127.0.0.1"}
    assert [line["firewall.episode"] for line in alerts][0] == "start" and alerts[-1]["firewall.episode"] == "end"
    assert len({line["event.start"] for line in alerts}) == 1 and sum(line["firewall.count"] for line in alerts) == 6
