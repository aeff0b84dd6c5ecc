"""Per-image evidence end to end: a client sending examples crafted on its own surrogate model
(transfer attacks, Papernot et al. 2017) is alerted within 20 images by the default firewall, while
one image flagged now and then is no alert (the benign patterns test checks that side)."""

from __future__ import annotations

import numpy as np
import pytest

from firewall.config import Settings
from firewall.evaluate.endpoint import Endpoint
from tests.conftest import address, running_firewall
from tests.surrogate import art_surrogate

IMAGES = 20
PER_IMAGE_RULES = ("squeeze", "uncertainty")


def crafted(attack: str, images: np.ndarray) -> np.ndarray:
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    surrogate = art_surrogate()
    if attack == "fgsm":
        return FastGradientMethod(surrogate, eps=0.2).generate(images)
    return ProjectedGradientDescent(surrogate, eps=0.2, eps_step=0.02, max_iter=20, verbose=False).generate(images)


def warnings(firewall) -> float:
    firewall.service.pipelines["mnist"].settle()  # uncertainty and squeeze run after the answer
    registry = firewall.service.metrics.registry
    samples = (registry.get_sample_value("firewall_findings_total", {"model": "mnist", "rule": r}) for r in PER_IMAGE_RULES)
    return sum(value or 0.0 for value in samples)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_transferred_examples_are_alerted_within_twenty_images(attack, mnist_heldout):
    images, labels = mnist_heldout
    pixels = images[500 : 500 + IMAGES, None].astype(np.float32) / 255
    adversarial = np.round(crafted(attack, pixels) * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    settings = Settings(listen="127.0.0.1:0", http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", models={"mnist": {}})
    with running_firewall(settings) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            alerted_at, fooled = None, 0
            for k, image in enumerate(adversarial, start=1):
                answer = endpoint.send(endpoint.request(image[None]), f"transfer-{attack}")
                fooled += int(answer.labels[0] != labels[500 + k - 1])
                if alerted_at is None and warnings(firewall) > 0:
                    alerted_at = k
        finally:
            endpoint.close()
    assert fooled >= IMAGES // 2, "the surrogate's examples should transfer"
    assert alerted_at is not None and alerted_at <= IMAGES, alerted_at
