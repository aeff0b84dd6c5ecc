"""Feature Squeezing's disagreement detector.

W. Xu, D. Evans, Y. Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018: an adversarial perturbation rarely survives squeezing the input, so the
model's prediction moves when it does. The score is the L1 distance between the softmax on the
sanitized input and on each squeezed copy, maximised over the squeezers (the paper's joint
detector); a score above the threshold flags the image, and the flags feed the client's CUSUM
test (``detectors.evidence``): a finding while the client's flagged share is significantly above
the benign rate. The paper's squeezers are bit-depth
reduction and a median filter: MNIST 1 bit and 2x2, CIFAR-10 5 bits and 2x2 (its threshold sits at
5 % benign false positives). The squeezed copies run through the model in one batched call; the
sanitized input's own output is the request's shared forward pass (``detectors.forward``).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from detectors.evidence import ClientRateConfig, ClientRateStage, client_rate_findings
from detectors.forward import novel_scores
from detectors.sanitizer import squeeze
from firewall.stage import Finding, RequestContext
from models.runtime import OnnxClassifier, softmax


class SqueezeConfig(BaseModel):
    """Feature squeezing: how far the answer moves when the image is squeezed; flags the client, as uncertainty does."""

    model_config = ConfigDict(extra="forbid")
    live_fields: ClassVar[frozenset[str]] = frozenset({"bit_depth", "median_size", "threshold"})  # read per call: a reload may change them

    kind: Literal["squeeze"] = Field("squeeze", description="selects this detector")
    bit_depth: int | None = Field(1, ge=1, le=8, description="bit-depth squeezer (MNIST 1, CIFAR-10 5)")
    median_size: int | None = Field(2, ge=2, le=7, description="median squeezer window (2 for 2x2)")
    threshold: float = Field(1.0, gt=0.0, le=2.0, description="L1 softmax distance (calibrate: 5% benign FP)")
    client: ClientRateConfig = Field(default_factory=ClientRateConfig, description="when flagged images flag the client")

    @model_validator(mode="after")
    def _one_squeezer(self) -> SqueezeConfig:
        if self.bit_depth is None and self.median_size is None:
            raise ValueError("configure at least one squeezer (bit_depth or median_size)")
        return self

    def build(self, model: OnnxClassifier) -> SqueezeStage:
        return SqueezeStage(self, model)


def squeeze_scores(
    model: OnnxClassifier,
    batch: np.ndarray,
    bit_depth: int | None,
    median_size: int | None,
    logits: np.ndarray | None = None,
) -> np.ndarray:
    """Max over squeezers of the L1 distance between softmax outputs, one score per image.

    ``logits``: the model's output on ``batch`` when already computed."""
    squeezed = [
        squeeze(batch, depth, size) for depth, size in ((bit_depth, None), (None, median_size)) if depth or size
    ]
    original = softmax(model.logits(batch) if logits is None else logits)
    others = np.split(model.probabilities(np.concatenate(squeezed)), len(squeezed))
    return np.max([np.abs(original - other).sum(axis=1) for other in others], axis=0)


class SqueezeStage(ClientRateStage):
    """Pipeline stage: flags squeeze-sensitive images; a finding while the client's flagged share is too high."""

    name = "squeeze"
    rules = ("squeeze",)

    def __init__(self, config: SqueezeConfig, model: OnnxClassifier):
        self.config = config
        self.model = model
        self.clients = config.client.build()

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.tensor is None or not len(ctx.tensor):
            return []
        config = self.config
        scores = novel_scores(
            ctx, self.model, lambda images, logits: squeeze_scores(self.model, images, config.bit_depth, config.median_size, logits)
        )
        return client_rate_findings("squeeze", self.clients, ctx, scores, self.config.threshold, {})
