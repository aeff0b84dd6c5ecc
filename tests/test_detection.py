"""Detection end to end: the bundled MNIST model behind a firewall with its calibrated detectors
(the zero-configuration default), attacked with ART through a real gRPC client."""

from __future__ import annotations

import numpy as np
import pytest

from firewall.evaluate.attacks import ATTACKS, run_attack
from firewall.evaluate.benign import run_benign
from firewall.evaluate.endpoint import Endpoint
from tests.conftest import address, calibrated_settings, running_firewall

MAX_L2 = 3.0


def findings(firewall, rule: str) -> float:
    firewall.service.pipelines["mnist"].settle()  # uncertainty and squeeze run after the answer
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


def attack(endpoint: Endpoint, images, labels, index: int, client_ids: list[str], budget: int, name: str = "hopskipjump"):
    return run_attack(
        ATTACKS[name],
        endpoint,
        "target",
        images[index][:, :, None],
        index,
        int(labels[index]),
        client_ids,
        verifier_id=f"verifier-{index}",
        budget=budget,
        nb_classes=10,
        max_l2=MAX_L2,
    )


def decoyed(firewall) -> float:
    value = firewall.service.metrics.registry.get_sample_value(
        "firewall_decisions_total", {"model": "mnist", "outcome": "decoyed"}
    )
    return value or 0.0


@pytest.mark.parametrize("ids", [1, 20])
def test_hopskipjump_is_decoyed_within_10_queries_and_fails(endpoint_and_firewall, mnist_heldout, ids):
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    first = attack(endpoint, images, labels, 3, [f"hsja-{n}" for n in range(ids)], budget=10)
    assert first.queries == 10 and findings(firewall, "probing.region") >= 1 and decoyed(firewall) >= 1
    run = attack(endpoint, images, labels, 5, [f"hsja-long-{n}" for n in range(ids)], budget=300)
    assert run.ended == "budget" and run.first_refusal is None  # decoys, never a refusal to steer by
    assert not run.success  # nothing misclassified within L2 3.0, from one id or spread over 20


@pytest.mark.parametrize("name", ["hopskipjump-blinded", "hopskipjump-shifted"])
def test_disguised_hopskipjump_is_decoyed_and_fails(endpoint_and_firewall, mnist_heldout, name):
    """Blinding noise (+-0.1) or shifts of up to 2 px on every query hide nothing from the probing detector."""
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    run = attack(endpoint, images, labels, 5, [f"{name}-0"], budget=300, name=name)
    assert run.ended == "budget" and run.first_refusal is None
    assert findings(firewall, "probing.region") >= 1 and decoyed(firewall) >= 1
    assert not run.success


def test_disguises_stay_close_to_the_attack_point(mnist_heldout):
    images, _ = mnist_heldout
    x = images[0][None].astype(np.float32) / 255
    rng = np.random.default_rng(0)
    noisy = ATTACKS["hopskipjump-blinded"].disguise(x, rng)
    assert noisy.shape == x.shape and 0 < np.abs(noisy - x).max() <= 0.1 + 1e-6
    moves = [ATTACKS["hopskipjump-shifted"].disguise(x, rng) for _ in range(20)]
    assert all(move.shape == x.shape for move in moves) and any(not np.array_equal(move, x) for move in moves)
    assert all(any(np.array_equal(move[:, 2:-2, 2:-2], x[:, 2 - dy : 26 - dy, 2 - dx : 26 - dx])
                   for dy in range(-2, 3) for dx in range(-2, 3)) for move in moves)


def test_1000_distinct_benign_images_from_10_clients_raise_no_probing_finding(endpoint_and_firewall, mnist_heldout):
    endpoint, firewall = endpoint_and_firewall
    images, labels = mnist_heldout
    result = run_benign(endpoint, images[:, :, :, None], labels, [f"benign-{n}" for n in range(10)], 0.0, 0.0, seed=0)
    traffic = result.clients
    assert sum(t.queries for t in traffic) == 1000
    assert sum(t.refused for t in traffic) == 0
    assert all(findings(firewall, rule) == 0 for rule in ("probing.region", "probing.client", "probing.address"))
    assert sum(t.correct for t in traffic) / 1000 >= 0.98
