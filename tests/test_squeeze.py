"""Feature Squeezing disagreement on the bundled MNIST model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detectors.sanitizer import Sanitizer, SanitizerConfig, squeeze
from detectors.squeeze import SqueezeConfig, SqueezeStage, squeeze_scores
from firewall.stage import RequestContext
from models.runtime import OnnxClassifier, bundled_model_path

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def model(mnist_model: OnnxClassifier) -> OnnxClassifier:
    return mnist_model


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.load(FIXTURES / "mnist_heldout.npz")["images"][:100, None].astype(np.float32) / 255.0


def sanitized(model: OnnxClassifier, batch: np.ndarray) -> np.ndarray:
    return Sanitizer(SanitizerConfig(), model.input)([image.transpose(1, 2, 0) for image in batch])


def test_a_squeezer_is_required() -> None:
    with pytest.raises(ValueError):
        SqueezeConfig(bit_depth=None, median_size=None)


def test_scores_are_l1_distances_between_distributions(model: OnnxClassifier, digits: np.ndarray) -> None:
    batch = sanitized(model, digits)
    scores = squeeze_scores(model, batch, 1, 2)
    original = model.probabilities(batch)
    distances = [np.abs(original - model.probabilities(squeeze(batch, bits, size))).sum(axis=1) for bits, size in ((1, None), (None, 2))]
    np.testing.assert_allclose(scores, np.maximum(*distances), atol=1e-6)
    assert scores.shape == (100,) and np.all((scores >= 0) & (scores <= 2))
    assert np.median(scores) < 0.05  # squeezing barely moves the model on clean digits


def test_each_squeezer_alone_works(model: OnnxClassifier, digits: np.ndarray) -> None:
    batch = sanitized(model, digits[:10])
    both = squeeze_scores(model, batch, 1, 2)
    bits, median = squeeze_scores(model, batch, 1, None), squeeze_scores(model, batch, None, 2)
    np.testing.assert_allclose(both, np.maximum(bits, median), atol=1e-6)


def test_stage_flags_the_worst_image(model: OnnxClassifier, digits: np.ndarray) -> None:
    batch = sanitized(model, digits[:6])
    ctx = RequestContext("r", "mnist", "c", "peer", [d.transpose(1, 2, 0) for d in digits[:6]], [b""] * 6, tensor=batch)
    scores = squeeze_scores(model, batch, 1, 2)
    (finding,) = SqueezeStage(SqueezeConfig(threshold=1e-9), model)(ctx)  # six flagged images in a row (h = log 1e6)
    assert finding.rule == "squeeze" and finding.item == int(scores.argmax()) and finding.details["flagged_items"] == 6
    assert SqueezeStage(SqueezeConfig(threshold=2.0), model)(ctx) == []


def test_fgsm_examples_disagree_more_than_benign(model: OnnxClassifier, digits: np.ndarray) -> None:
    from art.attacks.evasion import FastGradientMethod

    from detectors.gradients import art_classifier

    crafted = FastGradientMethod(art_classifier(model.path, (1, 28, 28), 10), eps=0.2).generate(digits)
    benign = squeeze_scores(model, sanitized(model, digits), 1, 2)
    adversarial = squeeze_scores(model, sanitized(model, crafted), 1, 2)
    labels = np.r_[np.zeros(len(benign)), np.ones(len(adversarial))]
    assert roc_auc_score(labels, np.r_[benign, adversarial]) > 0.9  # measured 0.97 on these digits


def test_cifar_squeezers_leave_clean_photos_mostly_alone() -> None:
    import cv2

    path = bundled_model_path("cifar10")
    model = OnnxClassifier(path)
    files = sorted((FIXTURES / "cifar10_test").rglob("*.jpg"))
    images = [cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB) for file in files]
    batch = Sanitizer(SanitizerConfig(blur_sigma=0.5), model.input)(images)
    scores = squeeze_scores(model, batch, 5, 2)
    assert scores.shape == (100,) and np.median(scores) < 0.5


def test_a_resent_image_is_one_observation(model: OnnxClassifier, digits: np.ndarray) -> None:
    batch = sanitized(model, digits[:6])
    ctx = RequestContext("r", "mnist", "c", "peer", [d.transpose(1, 2, 0) for d in digits[:6]], [b""] * 6, tensor=batch)
    ctx.scratch["novel"] = [True, False, False, False, False]  # as the probing stage marks copies of one image
    assert SqueezeStage(SqueezeConfig(threshold=1e-9), model)(ctx) == []
