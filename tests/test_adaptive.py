"""The adaptive (OARS-style) attackers through a real firewall: real gRPC, ONNX Runtime and detectors.

(a) With detection off the attacks succeed and make progress past their starting point, so a broken
attack fails here. (b) Against firewalls that refuse, the attacker takes a fresh client id after
every refusal, stays within its id budget, and never reads a refusal as a label.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest

from firewall.evaluate.adaptive import ADAPTIVE_ATTACKS, AdaptiveRun, onnx_judge, run_adaptive_attack
from firewall.evaluate.endpoint import Endpoint
from firewall.stage import Finding, RequestContext
from models.runtime import bundled_model_path
from tests.conftest import address, calibrated_settings, make_settings, running_firewall

MAX_L2 = 2.0  # the usual MNIST bound of the decision-based attack papers


@pytest.fixture(scope="module")
def judge():
    return onnx_judge(bundled_model_path("mnist"))


@pytest.fixture(scope="module")
def open_endpoint() -> Iterator[Endpoint]:
    """Detection off (and no throttling, to keep the test short): only the sanitizer and the model."""
    with running_firewall(make_settings(throttle={"enabled": False})) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        yield endpoint
        endpoint.close()


@contextmanager
def _closing(endpoint: Endpoint) -> Iterator[Endpoint]:
    try:
        yield endpoint
    finally:
        endpoint.close()


def _attack(name, endpoint, judge, mnist_heldout, index, **options) -> AdaptiveRun:
    images, labels = mnist_heldout
    image = images[index][..., None] if images.ndim == 3 else images[index]
    options.setdefault("max_l2", MAX_L2)
    options.setdefault("id_prefix", f"test-{name}-{index}")
    return run_adaptive_attack(name, endpoint, judge, image, index, int(labels[index]), **options)


@pytest.mark.parametrize("name", ADAPTIVE_ATTACKS)
def test_succeeds_without_detection(name, open_endpoint, judge, mnist_heldout):
    runs = [_attack(name, open_endpoint, judge, mnist_heldout, index, query_budget=500) for index in range(3)]
    assert sum(run.success for run in runs) >= 2, [run.summary() for run in runs]
    for run in runs:
        assert run.refused == 0 and run.ids_used == 1 and run.first_refusal is None
        assert run.queries <= 500
        if run.success:
            assert run.ended == "finished" and run.best_l2 <= MAX_L2
            assert judge(run.best) != run.label
        assert run.summary()["attack"] == name and "trace" not in run.summary()


@pytest.fixture(scope="module")
def default_endpoint() -> Iterator[Endpoint]:
    """The zero-configuration firewall: calibrated detectors, decoys (throttling off to keep it short)."""
    settings = calibrated_settings(throttle={"enabled": False})
    with running_firewall(settings) as firewall, _closing(Endpoint(address(firewall), "mnist")) as endpoint:
        yield endpoint


@pytest.mark.parametrize("name", ADAPTIVE_ATTACKS)
def test_fails_against_the_default_firewall(name, default_endpoint, judge, mnist_heldout):
    """The images and budget with which the attack wins at least 2 of 3 without detection."""
    runs = [_attack(name, default_endpoint, judge, mnist_heldout, index, query_budget=500) for index in range(3)]
    assert sum(run.success for run in runs) == 0, [run.summary() for run in runs]
    assert all(run.refused == 0 for run in runs)  # decoyed: no refusal to steer by


@pytest.mark.parametrize("name", ADAPTIVE_ATTACKS)
def test_reduces_the_distortion_past_its_start(name, open_endpoint, judge, mnist_heldout):
    """Same seed, so the same start: the attack proper (not just its noise start) shrinks the L2."""
    start = _attack(name, open_endpoint, judge, mnist_heldout, 0, max_l2=0.1, query_budget=15)
    longer = _attack(name, open_endpoint, judge, mnist_heldout, 0, max_l2=0.1, query_budget=600)
    assert start.best_l2 is not None and longer.ended == "budget"
    assert longer.best_l2 < 0.97 * start.best_l2, (start.best_l2, longer.best_l2)


class RefuseAllButFirst:
    """Flags every image except those byte-identical to the first one this firewall received."""

    name = "refuse-all"

    def __init__(self):
        self.first: bytes | None = None
        self.lock = threading.Lock()

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        with self.lock:
            findings = []
            for item, image in enumerate(ctx.images):
                data = np.ascontiguousarray(image).tobytes()
                self.first = self.first if self.first is not None else data
                if data != self.first:
                    findings.append(Finding("test.refuse-all", 1.0, 0.5, item=item))
            return findings


def test_refusals_are_never_labels(judge, mnist_heldout):
    """Everything after the clean image is refused: the attacker believes nothing adversarial,
    rotates through exactly its id budget, one id per refusal, and stops there."""
    with running_firewall(make_settings(models={"mnist": {"policy": {"action": "reject"}}})) as firewall:
        firewall.service.pipelines["mnist"].stages.append(RefuseAllButFirst())
        with _closing(Endpoint(address(firewall), "mnist")) as endpoint:
            run = _attack("adaptive-hsja", endpoint, judge, mnist_heldout, 0, query_budget=200, id_budget=12)
    assert run.ended == "ids"
    assert run.best is None and run.best_l2 is None and not run.success
    assert run.queries == 1 + run.refused and run.first_refusal == 2
    assert run.ids_used == 12 and run.refused == 12
    _assert_fresh_id_after_each_refusal(run)


def test_rotates_ids_against_the_default_detectors(judge, mnist_heldout):
    # the calibrated detectors of the bundled model
    settings = calibrated_settings(throttle={"enabled": False}, models={"mnist": {"policy": {"action": "reject"}}})
    with running_firewall(settings) as firewall, _closing(Endpoint(address(firewall), "mnist")) as endpoint:
        run = _attack("adaptive-hsja", endpoint, judge, mnist_heldout, 1, query_budget=250, id_budget=400)
    assert run.refused > 0 and run.first_refusal is not None
    assert run.ids_used == run.refused + 1
    _assert_fresh_id_after_each_refusal(run)


def _assert_fresh_id_after_each_refusal(run: AdaptiveRun) -> None:
    assert len(run.trace) == run.queries
    assert sum(label is None for _, label in run.trace) == run.refused
    ids = [client for client, _ in run.trace]
    for k, (client, label) in enumerate(run.trace[:-1]):
        following = ids[k + 1]
        if label is None:
            assert following != client and following not in ids[: k + 1]  # a new id, never used before
        else:
            assert following == client  # no rotation without a refusal
