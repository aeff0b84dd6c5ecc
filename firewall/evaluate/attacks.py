"""Black-box evasion attacks from ART, run through a live endpoint one query at a time.

Label-only (decision-based) attacks, the threat the firewall is built for:
- HopSkipJump: Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based
  Attack", IEEE S&P 2020 (L2, untargeted, ART defaults: init_eval=100, max_eval=10,000).
- Boundary: Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks", ICLR 2018 (untargeted,
  delta = epsilon = 0.01).
- SignOPT: Cheng et al., "Sign-OPT: A Query-Efficient Hard-label Adversarial Attack", ICLR 2020
  (untargeted, k=200, query_limit = the budget).
- GeoDA: Rahmati et al., "GeoDA: a geometric framework for black-box adversarial attacks", CVPR 2020
  (L2, DCT sub-space of 10x10, max_iter = the budget, at least 500).
Disguised, to show that hiding queries from a stateful detector does not help: HopSkipJump whose
every query is blinded with uniform noise in [-0.1, 0.1] (``hopskipjump-blinded``; the query
blinding of Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks", 2019)
or shifted by up to 2 pixels each way (``hopskipjump-shifted``). The attack reasons about its
own points; the endpoint sees the disguised ones.
Score-based, to show that label-only answers starve it:
- SimBA: Guo et al., "Simple Black-box Adversarial Attacks", ICML 2019 (DCT basis, epsilon=0.2).
  A bare model returns scores, so SimBA climbs them; through the firewall it sees one-hot labels,
  whose true-class probability stays 1 until the label flips, so no step ever looks like progress.

ART's predict function cannot fail, so the oracle ends an attack by raising a private exception
that ``run_attack`` catches around ``generate``: at the query budget, or when the endpoint has
refused every client id the attacker holds. A Sybil attacker holds several ids and spreads its
queries round-robin over them; a refused id is dropped and the query is retried with the next.
Throttled tries are waited out and retried (see ``Endpoint.send_patiently``); they are counted
apart and are not queries: no detector saw them.

Success is judged the way an attacker would use the result: the smallest-distortion input the
attack saw misclassified (it keeps that even if stopped early) is sent once more by a fresh client
id; the attack succeeds when that answer is wrong and the L2 distortion is within ``max_l2``.
So decoy answers, which make the attacker believe in adversarial examples that are not, count as
failures, and a candidate the firewall refuses when it is used counts as a failure too.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from art.attacks.evasion import BoundaryAttack, GeoDA, HopSkipJump, SignOPTAttack, SimBA
from art.estimators.classification import BlackBoxClassifierNeuralNetwork

from firewall.evaluate.endpoint import Endpoint, Refusal


class _GeoDA(GeoDA):
    """ART's GeoDA with two fixes: its DCT basis is built without ``np.mat`` (gone in NumPy 2), and
    it runs in a scratch directory because it caches that basis as a file in the working directory."""

    @staticmethod
    def _generate_2d_dct_basis(sub_dim: int, res: int) -> np.ndarray:
        size = max(res, sub_dim)
        frequency = np.arange(sub_dim)
        alpha = np.where(frequency == 0, math.sqrt(1.0 / size), math.sqrt(2.0 / size))
        position = np.arange(res)
        cosines = alpha[:, None] * np.cos((2 * position[None, :] + 1) * frequency[:, None] * math.pi / (2 * size))
        # basis[u, v][y, x] = cos_u(x) * cos_v(y), flattened to [res * res, sub_dim ** 2] as ART expects
        return np.einsum("ux,vy->uvyx", cosines, cosines).reshape(sub_dim * sub_dim, res * res).T

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs) -> np.ndarray:
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            return super().generate(x, y, **kwargs)


Disguise = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # [C, H, W] in [0, 1] -> what is sent


def blinded(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.uniform(-0.1, 0.1, x.shape), 0.0, 1.0).astype(np.float32)


def shifted(x: np.ndarray, rng: np.random.Generator, most: int = 2) -> np.ndarray:
    dy, dx = (int(v) for v in rng.integers(-most, most + 1, size=2))
    padded = np.pad(x, ((0, 0), (most, most), (most, most)), mode="edge")
    height, width = x.shape[1:]
    return np.ascontiguousarray(padded[:, most - dy : most - dy + height, most - dx : most - dx + width])


@dataclass(frozen=True)
class AttackSpec:
    name: str
    label_only: bool
    build: Callable[[BlackBoxClassifierNeuralNetwork, int], object]  # (classifier, query budget) -> ART attack
    disguise: Disguise | None = None  # applied to every query before it is sent


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("hopskipjump", True, lambda c, budget: HopSkipJump(c, targeted=False, norm=2, verbose=False)),
        AttackSpec(
            "hopskipjump-blinded", True, lambda c, budget: HopSkipJump(c, targeted=False, norm=2, verbose=False), blinded
        ),
        AttackSpec(
            "hopskipjump-shifted", True, lambda c, budget: HopSkipJump(c, targeted=False, norm=2, verbose=False), shifted
        ),
        AttackSpec("boundary", True, lambda c, budget: BoundaryAttack(c, targeted=False, verbose=False)),
        AttackSpec(
            "signopt", True, lambda c, budget: SignOPTAttack(c, targeted=False, query_limit=budget, verbose=False)
        ),
        # GeoDA plans its iterations from max_iter and cannot plan fewer than about 500 queries.
        AttackSpec("geoda", True, lambda c, budget: _GeoDA(c, norm=2, max_iter=max(budget, 500), verbose=False)),
        AttackSpec(
            "simba", False, lambda c, budget: SimBA(c, attack="dct", max_iter=budget, epsilon=0.2, verbose=False)
        ),
    )
}
LABEL_ONLY_ATTACKS = tuple(name for name, spec in ATTACKS.items() if spec.label_only)
SCORE_ATTACKS = tuple(name for name, spec in ATTACKS.items() if not spec.label_only)


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "budget" or "refused"


class Oracle:
    """ART's predict function: every input is one query to the endpoint, from the attacker's ids."""

    def __init__(
        self,
        endpoint: Endpoint,
        client_ids: list[str],
        budget: int,
        original: np.ndarray,
        label: int,
        nb_classes: int,
        scores: bool,
        max_l2: float,
        disguise: Disguise | None = None,
        seed: int = 0,
    ):
        self.endpoint = endpoint
        self.disguise = disguise
        self.rng = np.random.default_rng(seed)
        self.live_ids = list(client_ids)
        self.budget = budget
        self.original = original  # float32 [C, H, W] in [0, 1]
        self.label = label
        self.nb_classes = nb_classes
        self.scores = scores
        self.max_l2 = max_l2
        self.turn = 0
        self.sent: list[tuple[str, float]] = []  # (client id, wall-clock time) per query, for the alert log
        self.first_refusal: int | None = None
        self.refused_ids: list[str] = []
        self.throttled = 0  # tries answered RESOURCE_EXHAUSTED and retried after a pause
        self.best: np.ndarray | None = None
        self.best_l2 = math.inf
        self.queries_to_success: int | None = None  # first query misclassified within max_l2, attacker's view

    @property
    def queries(self) -> int:
        return len(self.sent)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # ART may step outside the valid range by rounding; the endpoint must get valid pixels.
        return np.stack([self._query(np.clip(item, 0.0, 1.0).astype(np.float32)) for item in batch])

    def _query(self, x: np.ndarray) -> np.ndarray:
        while True:
            if self.queries >= self.budget:
                raise _Stop("budget")
            if not self.live_ids:
                raise _Stop("refused")
            client_id = self.live_ids[self.turn % len(self.live_ids)]
            self.turn += 1
            self.sent.append((client_id, time.time()))
            sent = x if self.disguise is None else self.disguise(x, self.rng)
            request = self.endpoint.request(sent.transpose(1, 2, 0)[None])
            try:
                answer, throttled = self.endpoint.send_patiently(request, client_id)
            except Refusal:
                self.first_refusal = self.first_refusal or self.queries
                self.live_ids.remove(client_id)
                self.refused_ids.append(client_id)
                continue
            self.throttled += throttled
            label = int(answer.labels[0])
            self._keep_best(x, label)
            if self.scores and answer.probabilities is not None:
                return answer.probabilities[0].astype(np.float32)
            return np.eye(self.nb_classes, dtype=np.float32)[label]

    def _keep_best(self, x: np.ndarray, label: int) -> None:
        if label == self.label:
            return
        distance = float(np.linalg.norm(x - self.original))
        if distance < self.best_l2:
            self.best, self.best_l2 = x.copy(), distance
        if distance <= self.max_l2 and self.queries_to_success is None:
            self.queries_to_success = self.queries


@dataclass
class AttackRun:
    attack: str
    endpoint: str  # "target" or "baseline"
    image: int  # index in the data set
    label: int
    client_ids: list[str]
    queries: int = 0
    ended: str = "skipped"  # finished | budget | refused | skipped (the endpoint misclassifies the clean image)
    first_refusal: int | None = None  # client view: index of the first refused query
    refused_ids: int = 0
    throttled: int = 0
    first_alert: int | None = None  # alert-log view: queries sent up to the first alert for these ids
    best_l2: float | None = None
    queries_to_success: int | None = None
    verdict: str = "none"  # the fresh client's answer on the best candidate: misclassified | correct | refused | none
    success: bool = False
    sent: list[tuple[str, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {name: value for name, value in vars(self).items() if name != "sent"}


def run_attack(
    spec: AttackSpec,
    endpoint: Endpoint,
    endpoint_name: str,
    image: np.ndarray,
    image_index: int,
    label: int,
    client_ids: list[str],
    verifier_id: str,
    budget: int,
    nb_classes: int,
    max_l2: float,
) -> AttackRun:
    """One attack on one image (uint8 [H, W, C]) through ``endpoint``, from ``client_ids``."""
    original = image.transpose(2, 0, 1).astype(np.float32) / 255.0
    oracle = Oracle(
        endpoint, client_ids, budget, original, label, nb_classes, not spec.label_only, max_l2, spec.disguise, image_index
    )
    run = AttackRun(spec.name, endpoint_name, image_index, label, list(client_ids))
    try:
        clean = oracle(original[None])[0]  # the attacker first checks the clean image's label
        if int(clean.argmax()) == label:
            classifier = BlackBoxClassifierNeuralNetwork(
                oracle, original.shape, nb_classes, channels_first=True, clip_values=(0.0, 1.0)
            )
            spec.build(classifier, budget).generate(original[None], y=np.eye(nb_classes)[[label]])
            run.ended = "finished"
    except _Stop as stop:
        run.ended = stop.reason
    run.queries, run.sent = oracle.queries, oracle.sent
    run.first_refusal, run.refused_ids, run.throttled = oracle.first_refusal, len(oracle.refused_ids), oracle.throttled
    run.queries_to_success = oracle.queries_to_success
    if oracle.best is not None and run.ended != "skipped":
        run.best_l2 = oracle.best_l2
        run.verdict = verify(endpoint, oracle.best, label, verifier_id)
        run.success = run.verdict == "misclassified" and oracle.best_l2 <= max_l2
    return run


def verify(endpoint: Endpoint, candidate: np.ndarray, label: int, client_id: str) -> str:
    """Send the attack's result once, as a user of the adversarial example would."""
    try:
        answer, _ = endpoint.send_patiently(endpoint.request(candidate.transpose(1, 2, 0)[None]), client_id)
    except Refusal:
        return "refused"
    return "misclassified" if int(answer.labels[0]) != label else "correct"
