"""What the firewall does with a request once the stages have inspected it.

A request without findings is predicted and answered. With findings, the model's policy decides
(the most severe action among its findings' rules wins, in the order monitor < decoy < reject < ban):

- ``reject``: PERMISSION_DENIED for this request.
- ``ban``: PERMISSION_DENIED, and every request of the client (and, with ``by_peer``, of its
  address) is refused for a cool-down: ``first_s``, times ``factor`` per repeat offence, at most
  ``max_s``; offences ``forget_s`` apart start over.
- ``decoy``: the flagged images get a plausible label that carries no signal. A finding about the
  client as a whole (no item: ``probing.client``) gives every image of the request the first
  label the client was answered, genuine or decoy (a fixed per-client label before it has one), so
  an attack's binary searches see a constant. The first: an attack checks its clean image first,
  so the constant is what the attacker takes for "not adversarial", everywhere. The latest
  genuine answer is often an adversarial one, and a constant "adversarial" walks the attack
  straight to its clean image along a path that, on a fragile image, can still end genuinely
  misclassified within budget (measured: adaptive Boundary then won 15 of 16 MNIST images). A finding about one image gives that image the answer
  the finding carries (near probing evidence: what the first query there got, the same for every
  client), else the same per-client constant. The model still runs, so a
  decoy takes as long as a genuine answer. An explicit refusal is itself an oracle that adaptive
  attacks exploit (Feng, Hooda, Mangaokar, Fawaz, Jha & Prakash, "Stateful Defenses for Machine
  Learning Models Are Not Yet Secure Against Black-box Attacks", CCS 2023); a decoy keeps the
  attacker unaware while the alerts go on.
- ``noise``: the flagged images are answered with the model's label for the image plus Gaussian
  noise of ``noise_sigma``, drawn anew for every query: the Random Noise Defense of Qin, Fan, Zha
  & Wu ("Random Noise Defense Against Query-Based Black-Box Attacks", NeurIPS 2021; sigma 0.02 on
  [0, 1] images there). Near the boundary the answers are coin flips, so an attack's comparisons
  and gradient estimates drown in noise; far from it the answer stays right. Measured against
  ``decoy`` in the README (Detection), which chose the default.
- ``monitor``: the genuine answer; alerts only.

Every finding becomes an alert. Refusals all carry the same generic message. After a refused
finding (reject, or the end of a ban) the client draws from the tighter suspect bucket.
"""

from __future__ import annotations

import hashlib

import numpy as np

from firewall.alerts import Alert, AlertAggregator
from firewall.bans import BanLog, peer_key
from firewall.config import BanConfig, Settings
from firewall.errors import Banned, Refused
from firewall.pipeline import ModelPipeline
from firewall.stage import Finding, RequestContext
from firewall.state import ClientState

SEVERITY = ("monitor", "noise", "decoy", "reject", "ban")


class ResponsePolicy:
    def __init__(self, settings: Settings, state: ClientState, alerts: AlertAggregator, bans: BanLog):
        self.settings = settings  # replaced whole on reload
        self.state = state
        self.alerts = alerts
        self.bans = bans
        self.rng = np.random.default_rng()  # unseeded: a client must not replay the noise

    def decide(self, ctx: RequestContext, pipeline: ModelPipeline) -> str:
        """Set ``ctx.labels`` to the answer and return the outcome, or raise the rejection the client gets."""
        if not ctx.findings:
            pipeline.predict(ctx)
            self._remember(ctx, ctx.labels)
            return "answered"
        policy = self.settings.models[ctx.model].policy
        action = max((policy.rules.get(f.rule, policy.action) for f in ctx.findings), key=SEVERITY.index)
        self.alert(ctx, ctx.findings, action)
        if action == "ban":
            self._ban(ctx, policy.ban, sorted({f.rule for f in ctx.findings}))
            raise Banned(f"{len(ctx.findings)} finding(s), ban")
        if action == "reject":
            self.state.suspect(ctx.client_id, self.settings.throttle.suspect_s)
            raise Refused(f"{len(ctx.findings)} finding(s), reject")
        pipeline.predict(ctx)
        if action == "monitor":
            self._remember(ctx, ctx.labels)
            return "monitored"
        if action == "noise":
            self._noisy(ctx, pipeline, policy.noise_sigma)
            self._remember(ctx, ctx.labels)
            return "noised"
        decoyed = [f for f in ctx.findings if policy.rules.get(f.rule, policy.action) != "monitor"]
        fallback = self._decoy_label(ctx, pipeline)
        if any(finding.item is None for finding in decoyed):  # about the client: one constant for all
            decoys = np.full(ctx.batch_size, fallback, np.int64)
        else:
            decoys = np.full(ctx.batch_size, -1, np.int64)
            for finding in decoyed:  # an item's own decoy (the probing stage's) first
                if finding.answer is not None:
                    decoys[finding.item] = finding.answer
            items = [finding.item for finding in decoyed]
            decoys[items] = np.where(decoys[items] < 0, fallback, decoys[items])
        ctx.labels = np.where(decoys >= 0, decoys, ctx.labels).astype(np.int64)
        self._remember(ctx, ctx.labels)
        return "decoyed"

    def _noisy(self, ctx: RequestContext, pipeline: ModelPipeline, sigma: float) -> None:
        """Answer the flagged images (every image, for a finding about the client) from noisy copies."""
        items = list(range(ctx.batch_size))
        if all(finding.item is not None for finding in ctx.findings):
            items = sorted({finding.item for finding in ctx.findings})
        images = ctx.tensor[items]
        noisy = images + self.rng.normal(0.0, sigma, images.shape).astype(np.float32)
        labels = ctx.labels.copy()
        labels[items] = pipeline.classifier.predict(np.clip(noisy, 0.0, 1.0))
        ctx.labels = labels

    def alert(self, ctx: RequestContext, findings: list[Finding], action: str) -> None:
        """Every finding becomes an alert; also for the findings of stages run after the answer (monitor)."""
        for finding in findings:
            alert = Alert(
                finding.rule,
                action,
                ctx.model,
                ctx.client_id if finding.about == "client" else "",  # an address alert accuses no client
                ctx.peer,
                ctx.request_id,
                finding.score,
                finding.threshold,
                finding.severity,
            )
            self.alerts.record(alert)

    def _ban(self, ctx: RequestContext, config: BanConfig, rules: list[str]) -> None:
        keys = [ctx.client_id, peer_key(ctx.peer)] if config.by_peer else [ctx.client_id]
        for key in keys:
            duration = self.state.ban(key, config, self.settings.throttle.suspect_s)
            if duration is not None:
                self.bans.started(key, duration, ", ".join(rules))

    def _remember(self, ctx: RequestContext, answered: np.ndarray) -> None:
        self.state.remember(ctx.client_id, ctx.model, int(answered[0]))

    def _decoy_label(self, ctx: RequestContext, pipeline: ModelPipeline) -> int:
        label = self.state.first_label(ctx.client_id, ctx.model)
        if label is not None:
            return label
        # The state's secret: outsiders cannot compute the label, and every replica gives the same one.
        digest = hashlib.sha256(self.state.secret + f"{ctx.model}\0{ctx.client_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % class_count(pipeline)


def class_count(pipeline: ModelPipeline) -> int:
    classes = pipeline.classifier.session.get_outputs()[0].shape[-1]
    return classes if isinstance(classes, int) and classes > 0 else 1
