"""The trained adversarial-example detector: `firewall train-detector`, the `adversarial` stage, and
the bundled detector behind a real firewall (crafted examples from a surrogate alerted, benign not)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.metrics import roc_auc_score

from detectors.adversarial import (
    AdversarialConfig,
    AdversarialDetector,
    AdversarialStage,
    detector_beside,
)
from detectors.sanitizer import Sanitizer, SanitizerConfig
from firewall.cli import main as firewall_main
from firewall.config import Settings
from firewall.evaluate.endpoint import Endpoint
from firewall.stage import RequestContext
from models.data import MNIST_IMAGES, MNIST_LABELS
from models.runtime import OnnxClassifier, bundled_model_path
from tests.conftest import address, make_settings, running_firewall
from tests.test_transfer import crafted

MNIST = bundled_model_path("mnist")
TRAIN = 400  # fixture digits the CLI test's detector is trained on; the next 200 measure it


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The two MNIST IDX files `load_mnist` reads (magic 0x0803 / 0x0801, big-endian sizes)."""
    folder.mkdir()
    header = np.array([0x0803, len(images), *images.shape[1:]], ">u4").tobytes()
    (folder / MNIST_IMAGES).write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()))
    header = np.array([0x0801, len(labels)], ">u4").tobytes()
    (folder / MNIST_LABELS).write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))


def sanitized(model: OnnxClassifier, pixels: np.ndarray) -> np.ndarray:
    """Float [N, 1, 28, 28] pixels as the firewall hands them to the detectors."""
    return Sanitizer(SanitizerConfig(), model.input)(list(pixels.transpose(0, 2, 3, 1)))


def fgsm(model: OnnxClassifier, pixels: np.ndarray, eps: float) -> np.ndarray:
    from art.attacks.evasion import FastGradientMethod

    from detectors.gradients import art_classifier

    return FastGradientMethod(art_classifier(model.path, (1, 28, 28), 10), eps=eps).generate(pixels)


def test_the_cli_trains_a_detector_that_separates_fgsm_from_clean(tmp_path: Path, mnist_heldout, mnist_model):
    images, labels = mnist_heldout
    write_idx(tmp_path / "mnist", images[:TRAIN], labels[:TRAIN])
    out = tmp_path / "detector.onnx"
    argv = ["train-detector", str(MNIST), "--data", str(tmp_path / "mnist"), "--out", str(out)]
    assert firewall_main([*argv, "--attacks", "fgsm", "--epochs", "4", "--threads", "1"]) == 0
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["image", "logits"]

    detector = AdversarialDetector(out, mnist_model)
    pixels = images[TRAIN : TRAIN + 200, None].astype(np.float32) / 255
    clean, attacked = sanitized(mnist_model, pixels), sanitized(mnist_model, fgsm(mnist_model, pixels, 0.2))
    scores = [detector.scores(batch, mnist_model.logits(batch)) for batch in (clean, attacked)]
    auc = roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.concatenate(scores))
    assert auc > 0.75, auc  # chance is 0.5


@pytest.mark.parametrize(("extra", "message"), [(["--attacks", "deepfool"], "--attacks from"), (["--limit", "3"], "--limit")])
def test_the_cli_refuses_bad_arguments_with_exit_2(tmp_path: Path, capsys, extra: list[str], message: str):
    argv = ["train-detector", str(MNIST), "--data", str(tmp_path), "--out", str(tmp_path / "out.onnx"), *extra]
    assert firewall_main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()


def test_a_detector_for_another_input_is_refused(mnist_model):
    with pytest.raises(ValueError, match="no adversarial detector"):
        AdversarialDetector(detector_beside(bundled_model_path("cifar10")), mnist_model)


def test_the_stage_flags_the_worst_image_and_feeds_the_client_test(mnist_heldout, mnist_model):
    images, _ = mnist_heldout
    batch = sanitized(mnist_model, images[:6, None].astype(np.float32) / 255)
    ctx = RequestContext("r", "mnist", "c", "peer", list(images[:6, :, :, None]), [b""] * 6, tensor=batch)
    scores = AdversarialDetector(detector_beside(MNIST), mnist_model).scores(batch, mnist_model.logits(batch))
    (finding,) = AdversarialConfig(threshold=0.0).build(mnist_model)(ctx)  # six flagged images in a row
    assert finding.rule == "adversarial" and finding.item == int(scores.argmax()) and finding.details["flagged_items"] == 6
    assert AdversarialConfig(threshold=1.0).build(mnist_model)(ctx) == []
    ctx.scratch["novel"] = [True, False, False, False, False, False]  # copies of one image: one observation
    assert isinstance(stage := AdversarialConfig(threshold=0.0).build(mnist_model), AdversarialStage) and stage(ctx) == []


def default_settings() -> Settings:
    """The zero-configuration firewall (calibrated detectors), on free loopback ports."""
    listeners = make_settings().model_dump(include={"listen", "http_listen", "metrics_listen", "admin"})
    return Settings(**listeners, models={"mnist": {}})


def adversarial_findings(firewall) -> float:
    firewall.service.pipelines["mnist"].settle()  # monitor-only stages run after the answer
    registry = firewall.service.metrics.registry
    return registry.get_sample_value("firewall_findings_total", {"model": "mnist", "rule": "adversarial"}) or 0.0


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_the_bundled_detector_alerts_a_client_sending_transferred_examples(attack, mnist_heldout):
    images, _ = mnist_heldout
    settings = default_settings()
    assert "adversarial" in [d.kind for d in settings.models["mnist"].detectors]  # on by default, calibrated
    adversarial = np.round(crafted(attack, images[600:620, None].astype(np.float32) / 255) * 255).astype(np.uint8)
    with running_firewall(settings) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            alerted_at = None
            for k, image in enumerate(adversarial.transpose(0, 2, 3, 1), start=1):
                endpoint.send(endpoint.request(image[None]), f"crafted-{attack}")
                if adversarial_findings(firewall) > 0:
                    alerted_at = k
                    break
        finally:
            endpoint.close()
    assert alerted_at is not None and alerted_at <= 20, alerted_at


def test_the_bundled_detector_leaves_benign_clients_alone(mnist_heldout):
    images, _ = mnist_heldout
    with running_firewall(default_settings()) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            for k in range(0, 300, 10):  # ten clients of 30 distinct held-out digits, ten at a time
                endpoint.send(endpoint.request(images[k : k + 10, :, :, None]), f"benign-{k // 10 % 10}")
        finally:
            endpoint.close()
        assert adversarial_findings(firewall) == 0

