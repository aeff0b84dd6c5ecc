"""Monte-Carlo dropout uncertainty.

R. Feinman, R. Curtin, S. Shintre, A. Gardner, "Detecting Adversarial Samples from Artifacts"
(arXiv 1703.00410, 2017): adversarial examples sit where a dropout network's stochastic passes
disagree. The MC-dropout copy of the model (``models.mc_dropout``: Dropout kept on) runs ``passes``
times (default 16; Feinman et al. use 50) in one batched ONNX Runtime call. With ``dropout: last``
(the default) only the model's last Dropout is on: the network runs once per request, shared with
the answer and the other stages (``detectors.forward``), and only the head after that Dropout runs
``passes`` times; ``dropout: all`` runs the whole network ``passes`` times with every Dropout on, as
the paper does. Each mode has its own calibrated threshold. Each image is scored by

- predictive variance, Feinman's "Bayesian uncertainty": mean_t |p_t|^2 - |mean_t p_t|^2, and
- mutual information (BALD; Houlsby et al. 2011, Gal's thesis 2016): H(mean_t p_t) - mean_t H(p_t),

where p_t is the softmax of pass t. A score above the threshold (calibrated at 5 % benign false
positives) flags the image. One flagged image is no verdict (one benign image in twenty is
flagged): the flags feed the client's CUSUM test (``detectors.evidence``), and the stage raises a
finding while the client's flagged share is significantly above the benign rate. The stage holds its own copy of the model file, so it also works when
predictions come from an upstream server.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from detectors.evidence import ClientRateConfig, ClientRateStage, client_rate_findings
from detectors.forward import novel_items, shared_forward
from firewall.stage import Finding, RequestContext
from models.mc_dropout import McDropoutClassifier, McDropoutHead
from models.runtime import Forward, OnnxClassifier

Score = Literal["variance", "mutual_information"]


class UncertaintyConfig(BaseModel):
    """Monte-Carlo dropout uncertainty of each image; a client whose images are too often uncertain is flagged."""

    model_config = ConfigDict(extra="forbid")
    live_fields: ClassVar[frozenset[str]] = frozenset({"passes", "score", "threshold"})  # read per call: a reload may change them

    kind: Literal["uncertainty"] = Field("uncertainty", description="selects this detector")
    passes: int = Field(16, ge=2, le=256, description="MC-dropout passes, run as one batch")
    dropout: Literal["last", "all"] = Field("last", description="last: the network once, its head N times; all: the network N times")
    score: Score = Field("variance", description="which score the threshold applies to")
    threshold: float = Field(0.1, ge=0.0, description="calibrate: 5% benign false positives")
    model_path: Path | None = Field(None, description="model with Dropout; default: the protected model's file")
    threads: int = Field(1, ge=1, description="ONNX Runtime threads for the MC-dropout session")
    client: ClientRateConfig = Field(default_factory=ClientRateConfig, description="when flagged images flag the client")

    def build(self, model: OnnxClassifier) -> UncertaintyStage:
        if self.dropout == "all":
            return UncertaintyStage(self, model, McDropoutClassifier(self.model_path or model.path, threads=self.threads))
        own = model if self.model_path is None else OnnxClassifier(self.model_path, threads=self.threads)
        return UncertaintyStage(self, own, McDropoutHead(own.path))


def uncertainty_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Scores from MC-dropout logits [passes, B, K]: predictive variance and mutual information."""
    shifted = np.exp(logits - logits.max(axis=2, keepdims=True))
    probabilities = shifted / shifted.sum(axis=2, keepdims=True)
    mean = probabilities.mean(axis=0)
    variance = (probabilities**2).sum(axis=2).mean(axis=0) - (mean**2).sum(axis=1)
    entropy_of_mean = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(axis=1)
    mean_entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=2).mean(axis=0)
    return {"variance": variance, "mutual_information": np.maximum(entropy_of_mean - mean_entropy, 0.0)}


class UncertaintyStage(ClientRateStage):
    """Pipeline stage: flags uncertain images; a finding while the client's flagged share is too high."""

    name = "uncertainty"
    rules = ("uncertainty",)

    def __init__(self, config: UncertaintyConfig, model: OnnxClassifier, sampler: McDropoutHead | McDropoutClassifier):
        self.config = config
        self.model = model  # runs the network once (dropout: last)
        self.sampler = sampler
        self.clients = config.client.build()

    def sample_logits(self, batch: np.ndarray, forward: Forward | None = None) -> np.ndarray:
        """[passes, B, K]; ``forward``: the model's pass on ``batch`` when already run."""
        if isinstance(self.sampler, McDropoutClassifier):
            return self.sampler.sample_logits(batch, self.config.passes)
        features = (forward or self.model.forward(batch)).features
        assert features is not None  # the head was cut at the last Dropout, so the model has one
        return self.sampler.sample_logits(features, self.config.passes)

    def scores(self, batch: np.ndarray, forward: Forward | None = None) -> dict[str, np.ndarray]:
        return uncertainty_scores(self.sample_logits(batch, forward))

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.tensor is None or not len(ctx.tensor):
            return []
        novel = novel_items(ctx)
        chosen = np.zeros(len(ctx.tensor))  # re-sent content is no new observation: not scored, not flagged
        if len(novel):
            shared = None
            if not isinstance(self.sampler, McDropoutClassifier):
                whole = shared_forward(ctx, self.model)
                assert whole.features is not None
                shared = Forward(whole.logits[novel], whole.features[novel])
            chosen[novel] = self.scores(ctx.tensor[novel], shared)[self.config.score]
        details = {"score": self.config.score, "passes": self.config.passes}
        return client_rate_findings("uncertainty", self.clients, ctx, chosen, self.config.threshold, details)
