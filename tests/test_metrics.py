"""Prometheus metrics scraped from the firewall's own port."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from firewall.protocol import pb, pb_grpc
from tests.conftest import address, make_settings, running_firewall
from tests.stages import Flagger, marked, with_stage


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def call(stub, images: np.ndarray, client_id: str, model: str = "mnist") -> grpc.StatusCode:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(images.shape))
    message = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[images.tobytes()])
    try:
        stub.ModelInfer(message, metadata=[("x-client-id", client_id)], timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_metrics_count_requests_decisions_findings_latency_and_state(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(throttle={"rate": 0.01, "burst": 3}, models={"mnist": {"policy": {"action": "ban"}}})
    # Two firewalls in one process: each has its own registry and port.
    with running_firewall(settings) as firewall, running_firewall(settings) as other:
        assert firewall.metrics_port != other.metrics_port
        with with_stage(firewall, Flagger()), grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert call(stub, images[:2], "good") == grpc.StatusCode.OK
            assert call(stub, marked(images[:1]), "bad") == grpc.StatusCode.PERMISSION_DENIED
            assert call(stub, images[:1], "bad") == grpc.StatusCode.PERMISSION_DENIED
            assert call(stub, images[:1], "good", model="nope") == grpc.StatusCode.NOT_FOUND
            assert call(stub, images[:2], "good") == grpc.StatusCode.RESOURCE_EXHAUSTED
            metrics = scrape(firewall.metrics_port)
        idle = scrape(other.metrics_port)

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("firewall_requests_total", model="mnist") == 4 and value("firewall_requests_total", model="") == 1
    assert value("firewall_decisions_total", model="mnist", outcome="answered") == 1
    assert value("firewall_decisions_total", model="mnist", outcome="banned") == 2
    assert value("firewall_decisions_total", model="mnist", outcome="throttled") == 1
    assert value("firewall_decisions_total", model="", outcome="invalid") == 1
    assert value("firewall_findings_total", model="mnist", rule="test.flagger") == 1
    for stage in ("sanitize", "flagger"):
        assert value("firewall_stage_seconds_count", model="mnist", stage=stage) == 2
    assert value("firewall_stage_seconds_count", model="mnist", stage="predict") == 1
    assert value("firewall_tracked_clients") == 3 and value("firewall_bans_active") == 1  # good, bad and the address's bucket
    assert value("firewall_stage_stat", model="mnist", stage="flagger", stat="flagged_images") == 1
    assert idle[("firewall_tracked_clients", ())] == 0
