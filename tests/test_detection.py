"""Detection end to end: the bundled MNIST model behind a firewall with its calibrated detectors
(the zero-configuration default), attacked with ART through a real gRPC client."""

from __future__ import annotations

import pytest

from firewall.config import Settings
from firewall.evaluate.attacks import ATTACKS, run_attack
from firewall.evaluate.benign import run_benign
from firewall.evaluate.endpoint import Endpoint
from tests.conftest import address, running_firewall

MAX_L2 = 2.0


def calibrated_settings() -> Settings:
    """The bundled defaults (calibrated detectors, ban on probing) on loopback ports."""
    return Settings(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", models={"mnist": {}})


def findings(firewall, rule: str) -> float:
    value = firewall.service.metrics.registry.get_sample_value("firewall_findings_total", {"model": "mnist", "rule": rule})
    return value or 0.0


@pytest.fixture
def endpoint_and_firewall():
    with running_firewall(calibrated_settings()) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            yield endpoint, firewall
        finally:
            endpoint.close()


def attack(endpoint: Endpoint, images, labels, index: int, client_ids: list[str]):
    return run_attack(
        ATTACKS["hopskipjump"],
        endpoint,
        "target",
        images[index][:, :, None],
        index,
        int(labels[index]),
        client_ids,
        verifier_id=f"verifier-{index}",
        budget=300,
        nb_classes=10,
        max_l2=MAX_L2,
    )


def test_hopskipjump_is_refused_within_50_queries(endpoint_and_firewall, mnist_heldout):
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    run = attack(endpoint, images, labels, 3, ["hsja-attacker"])
    assert run.ended == "refused" and run.first_refusal is not None and run.first_refusal <= 50
    assert not run.success
    assert findings(firewall, "probing.client") >= 1


def test_hopskipjump_spread_over_20_ids_is_caught_by_the_global_index(endpoint_and_firewall, mnist_heldout):
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    run = attack(endpoint, images, labels, 5, [f"sybil-{n}" for n in range(20)])
    assert run.first_refusal is not None and run.first_refusal <= 50
    assert findings(firewall, "probing.global") >= 1
    assert not run.success


def test_1000_distinct_benign_images_from_10_clients_raise_no_probing_finding(endpoint_and_firewall, mnist_heldout):
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    result = run_benign(endpoint, images[:, :, :, None], labels, [f"benign-{n}" for n in range(10)], 0.0, 0.0, seed=0)
    traffic = result.clients
    assert sum(t.queries for t in traffic) == 1000
    assert sum(t.refused for t in traffic) == 0
    assert findings(firewall, "probing.client") == 0 and findings(firewall, "probing.global") == 0
    assert sum(t.correct for t in traffic) / 1000 >= 0.98
