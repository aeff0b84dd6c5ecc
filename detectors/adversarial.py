"""A trained adversarial-example detector.

K. Grosse et al., "On the (Statistical) Detection of Adversarial Examples" (2017), and J. H. Metzen
et al., "On Detecting Adversarial Perturbations" (ICLR 2017): a binary network trained on
adversarial examples crafted against the protected model recognises examples of those families.
``firewall train-detector`` (``models.train_detector``, where the attacks and their parameters are
documented) trains it and exports it to ONNX; the bundled models ship theirs as
``models/<name>/adversarial_detector.onnx``. It scores each new image from what the firewall
already has: the sanitized tensor and the model's logits on it (the request's shared forward pass,
``detectors.forward``), one ONNX Runtime call for the batch. A score above the threshold
(calibrated at 5 % of benign images, as Feature Squeezing's) flags the image, and the flags feed
the client's CUSUM test (``detectors.evidence``): a finding while the client's flagged share is
significantly above the benign rate.

What it does not buy (Metzen et al. saw it too): families and budgets it was not trained on are
recognised less, or not at all; ``benchmarks/adversarial_detector.py`` measures how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from detectors.evidence import ClientRateConfig, ClientRateStage, client_rate_findings
from detectors.forward import novel_scores
from firewall.stage import Finding, RequestContext
from models.runtime import OnnxClassifier, default_providers, session_options

DETECTOR_FILE = "adversarial_detector.onnx"


def detector_beside(model_path: Path) -> Path:
    """The detector trained for a model file: ``adversarial_detector.onnx`` in its folder."""
    return model_path.with_name(DETECTOR_FILE)


class AdversarialDetector:
    """The exported detector: sanitized images [N, C, H, W] and the model's logits [N, K] in, scores [N] in [0, 1] out."""

    def __init__(self, path: Path, model: OnnxClassifier, threads: int = 1):
        self.path = path
        if not path.is_file():
            raise ValueError(f"{path}: no such detector (train one with `firewall train-detector`)")
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=default_providers())
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if set(shapes) != {"image", "logits"} or tuple(shapes["image"][1:]) != model.input_shape:
            raise ValueError(f"{path} is no adversarial detector for a model taking {model.input_shape}")

    def scores(self, images: np.ndarray, logits: np.ndarray) -> np.ndarray:
        feeds = {"image": images.astype(np.float32, copy=False), "logits": logits.astype(np.float32, copy=False)}
        return self.session.run(["score"], feeds)[0]


class AdversarialConfig(BaseModel):
    """A network trained to recognise adversarial examples (`firewall train-detector`); flags the client, as uncertainty does."""

    model_config = ConfigDict(extra="forbid")
    live_fields: ClassVar[frozenset[str]] = frozenset({"threshold"})  # read per call: a reload may change it

    kind: Literal["adversarial"] = Field("adversarial", description="selects this detector")
    detector: Path | None = Field(None, description=f"the detector's ONNX file; default: {DETECTOR_FILE} beside the model file")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="score that flags an image (calibrate: 5% benign FP)")
    threads: int = Field(1, ge=1, description="ONNX Runtime threads for the detector's session")
    client: ClientRateConfig = Field(default_factory=ClientRateConfig, description="when flagged images flag the client")

    def build(self, model: OnnxClassifier) -> AdversarialStage:
        return AdversarialStage(self, model, AdversarialDetector(self.detector or detector_beside(model.path), model, self.threads))


class AdversarialStage(ClientRateStage):
    """Pipeline stage: flags images the detector takes for adversarial; a finding while the client's flagged share is too high."""

    name = "adversarial"
    rules = ("adversarial",)

    def __init__(self, config: AdversarialConfig, model: OnnxClassifier, detector: AdversarialDetector):
        self.config = config
        self.model = model
        self.detector = detector
        self.clients = config.client.build()

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.tensor is None or not len(ctx.tensor):
            return []
        scores = novel_scores(ctx, self.model, self.detector.scores)
        return client_rate_findings("adversarial", self.clients, ctx, scores, self.config.threshold, {})
