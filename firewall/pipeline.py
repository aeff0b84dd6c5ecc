"""One protected model's pipeline: sanitize, detect, predict.

The stages come from configuration (the sanitizer first, then each configured detector in
order), so adding a detector means one module in ``detectors/`` and one config entry. A stage with
state that outlives a request has a ``share(state, name)`` method: it gets the firewall's state
(``firewall.state``, as ``detectors.shared.SharedState``) and a name unique to the model and stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from firewall.backends import Predictor, build_predictor
from firewall.codec import Limits
from firewall.config import ProtectedModel, Settings
from firewall.stage import RequestContext, Stage
from firewall.state import ClientState
from models.runtime import OnnxClassifier


@dataclass
class ModelPipeline:
    name: str
    classifier: OnnxClassifier  # the local copy: input spec, and the model the detectors query
    predictor: Predictor
    limits: Limits
    stages: list[Stage]
    observe: Callable[[str, float], None] = lambda stage, seconds: None  # stage latency sink (metrics)

    def inspect(self, ctx: RequestContext) -> None:
        """Run every stage in order; findings accumulate on the context."""
        for stage in self.stages:
            started = time.perf_counter()
            ctx.findings.extend(stage(ctx))
            self.observe(stage.name, time.perf_counter() - started)

    def predict(self, ctx: RequestContext) -> None:
        started = time.perf_counter()
        ctx.labels = self.predictor.predict(ctx.tensor)
        self.observe("predict", time.perf_counter() - started)

    def close(self) -> None:
        for stage in self.stages:
            close = getattr(stage, "close", None)
            if close is not None:
                close()
        self.predictor.close()


def build_pipeline(name: str, model: ProtectedModel, settings: Settings, state: ClientState) -> ModelPipeline:
    classifier = OnnxClassifier(settings.onnx_path(name))
    stages: list[Stage] = [model.sanitizer.build(classifier)]
    for detector in model.detectors:
        if settings.snapshot_dir is not None and "snapshot_path" in type(detector).model_fields and detector.snapshot_path is None:
            path = settings.snapshot_dir / f"{name}.{detector.kind}.snapshot"
            detector = detector.model_copy(update={"snapshot_path": path})
        stages.append(detector.build(classifier))
    for stage in stages:
        share = getattr(stage, "share", None)
        if share is not None:
            share(state, f"{name}.{stage.name}")
    return ModelPipeline(
        name=name,
        classifier=classifier,
        predictor=build_predictor(model.backend, classifier, settings.max_message_bytes),
        limits=Limits(
            max_batch=model.limits.max_batch,
            max_pixels=model.limits.max_pixels,
            max_image_bytes=model.limits.max_image_bytes,
            max_request_bytes=model.limits.max_request_bytes,
            target_side=max(classifier.input.height, classifier.input.width),
        ),
        stages=stages,
    )


def build_pipelines(settings: Settings, state: ClientState) -> dict[str, ModelPipeline]:
    return {name: build_pipeline(name, model, settings, state) for name, model in settings.models.items()}
