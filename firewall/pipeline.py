"""One protected model's pipeline: sanitize, detect, predict.

The stages come from configuration (the sanitizer first, then each configured detector in
order), so adding a detector means one module in ``detectors/`` and one config entry.

Cost: the network runs once per request (``detectors.forward``): the embedded answer, the probing
label, feature squeezing's reference output and MC dropout's features all come from that run.
Stages whose every rule the policy only monitors (by default uncertainty and squeeze; a stage names
its rules in ``rules``) run after the answer, on the bounded ``firewall.deferred`` queue; their
findings reach the alerts and metrics through ``report``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from detectors.forward import shared_forward
from firewall.backends import Predictor, build_predictor
from firewall.codec import Limits
from firewall.config import PolicyConfig, ProtectedModel, Settings
from firewall.deferred import DeferredQueue
from firewall.stage import Finding, RequestContext, Stage
from models.runtime import OnnxClassifier

# Requests whose monitoring waits; beyond it monitoring is dropped and counted. Each holds its
# sanitized tensor only (not the decoded images): at most 64 model inputs, 200 KB for MNIST.
DEFERRED_CAPACITY = 128


@dataclass
class ModelPipeline:
    name: str
    classifier: OnnxClassifier  # the local copy: input spec, and the model the detectors query
    predictor: Predictor
    limits: Limits
    chain: list[Stage]  # the sanitizer, then each detector in configured order
    stages: list[Stage] = field(default_factory=list)  # before the answer, in order (``arrange``)
    monitors: list[Stage] = field(default_factory=list)  # after the answer: every rule they raise is only monitored
    deferred: DeferredQueue | None = None
    policy: PolicyConfig | None = None  # the one the chain was last arranged by
    observe: Callable[[str, float], None] = lambda stage, seconds: None  # stage latency sink (metrics)
    report: Callable[[RequestContext, list[Finding]], None] = lambda ctx, findings: None  # deferred findings

    def arrange(self, policy: PolicyConfig) -> None:
        """Split the chain by the policy: stages whose every rule is only monitored run after the answer
        (at build, and again when a reload changes the policy)."""
        monitors = [stage for stage in self.chain if only_monitored(stage, policy)]
        if monitors and self.deferred is None:
            self.deferred = DeferredQueue(self.name, DEFERRED_CAPACITY)
        self.stages, self.monitors = [stage for stage in self.chain if stage not in monitors], monitors
        self.policy = policy

    def inspect(self, ctx: RequestContext) -> None:
        """Run the stages in order (findings accumulate on the context); queue the monitors.

        The answer is submitted as soon as the tensor exists: an upstream answers while the stages run."""
        for stage in self.stages:
            self._timed(stage, ctx, ctx.findings)
            if ctx.tensor is not None and "answer" not in ctx.scratch:
                ctx.scratch["answer"] = self.predictor.submit(ctx)
        if self.monitors and self.deferred is not None and ctx.tensor is not None and len(ctx.tensor):
            shared_forward(ctx, self.classifier)  # before the hand-off: the answer and the monitors share it
            light = replace(ctx, images=[], digests=[], findings=[], scratch=dict(ctx.scratch))  # decoded images freed now
            self.deferred.submit(lambda: self._monitor(light))

    def predict(self, ctx: RequestContext) -> None:
        started = time.perf_counter()
        answer = ctx.scratch.get("answer") or self.predictor.submit(ctx)
        ctx.labels = answer()
        self.observe("predict", time.perf_counter() - started)

    def settle(self) -> None:
        """Wait until the monitoring queued so far has run (its findings are counted asynchronously)."""
        if self.deferred is not None:
            self.deferred.join()

    def _timed(self, stage: Stage, ctx: RequestContext, findings: list[Finding]) -> None:
        started = time.perf_counter()
        findings.extend(stage(ctx))
        self.observe(stage.name, time.perf_counter() - started)

    def _monitor(self, ctx: RequestContext) -> None:
        findings: list[Finding] = []
        for stage in self.monitors:
            self._timed(stage, ctx, findings)
        if findings:
            self.report(ctx, findings)

    def close(self) -> None:
        if self.deferred is not None:
            self.deferred.close()  # finish queued monitoring before the stages persist their state
        for stage in self.chain:
            close = getattr(stage, "close", None)
            if close is not None:
                close()
        self.predictor.close()


def build_pipeline(name: str, model: ProtectedModel, settings: Settings) -> ModelPipeline:
    classifier = OnnxClassifier(settings.onnx_path(name))
    stages: list[Stage] = [model.sanitizer.build(classifier)]
    for detector in model.detectors:
        if settings.snapshot_dir is not None and "snapshot_path" in type(detector).model_fields and detector.snapshot_path is None:
            path = settings.snapshot_dir / f"{name}.{detector.kind}.snapshot"
            detector = detector.model_copy(update={"snapshot_path": path})
        stages.append(detector.build(classifier))
    pipeline = ModelPipeline(
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
        chain=stages,
    )
    pipeline.arrange(model.policy)
    return pipeline


def only_monitored(stage: Stage, policy: PolicyConfig) -> bool:
    """Whether every rule the stage can raise is only monitored, so the answer need not wait for it."""
    rules = getattr(stage, "rules", ())
    return bool(rules) and all(policy.rules.get(rule, policy.action) == "monitor" for rule in rules)


def build_pipelines(settings: Settings) -> dict[str, ModelPipeline]:
    return {name: build_pipeline(name, model, settings) for name, model in settings.models.items()}
