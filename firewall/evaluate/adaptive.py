"""Adaptive decision-based attackers, in the manner of OARS, run through a live endpoint.

Two label-only L2 attacks, written here in NumPy (no ART) from their papers:

- HopSkipJump: Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based
  Attack", IEEE S&P 2020. Untargeted, L2: start from uniform noise that is misclassified, binary
  search to the boundary (threshold theta = gamma / d^1.5, gamma = 1, floored here at 1e-3 of the
  segment), Monte-Carlo estimate of the gradient direction at the boundary from n_t = 100 * sqrt(t)
  probes (at most 1,000) at radius delta_t = sqrt(d) * theta * dist_{t-1} (0.1 at t = 1), with the
  mean-baseline of the paper, then the geometric step search xi_t = dist / sqrt(t), halved until
  the step lands adversarial; at most 64 iterations.
- Boundary: Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks
  Against Black-Box Machine Learning Models", ICLR 2018. Start from misclassified uniform noise,
  brought to the boundary by a binary search (as ART does); each proposal is an orthogonal
  (spherical) step of relative size delta = 0.01 on the sphere around the original, then a step of
  relative size epsilon = 0.01 toward the original; both are adapted to the success rate of the
  last 10 proposals (step_adapt = 0.667: above 50 % they grow, below 20 % they shrink), as in the
  paper and ART (num_trial is 10 here, one query each).

Made adaptive as OARS does: Feng, Hooda, Mangaokar, Fawaz, Jha & Prakash, "Stateful Defenses for
Machine Learning Models Are Not Yet Secure Against Black-box Attacks", ACM CCS 2023. The attacker
sees only what a client sees, and every refusal (PERMISSION_DENIED, or RESOURCE_EXHAUSTED that
persists past a short patience) is a signal:

1. after every refusal it takes a fresh ``x-client-id``, within an id budget (default 400);
2. it grows the radius of its random probes (HSJA's gradient probes, Boundary's spherical step)
   multiplicatively (x1.5) whenever more than 5 % of the last 20 probes were refused, and shrinks
   it again (x0.9, never below the attack's own value) after 20 probes without a refusal;
3. it drops refused probes and draws new ones: the gradient estimate uses answered probes only;
4. it retries a refused step (HSJA's geometric step, Boundary's proposal) with half the step;
   a binary search whose probe is refused tries a random point of its interval, and after three
   refusals keeps the adversarial end it has.

A refused query is never read as a label: the oracle answers None for it and no caller treats None
as adversarial or not. The query budget (default 5,000 per image) counts refused queries; tries
throttled and retried within the patience are not queries (no detector saw them), as in attacks.py.
The attacker stops once its best candidate (the closest input it has seen answered with another
label) is within ``max_l2``: that is its goal. It then spends the slack: the perturbation is scaled
up to 0.99 * max_l2 and, when the endpoint confirms that input adversarial, it is the final
candidate (deeper past the endpoint's boundary, which the firewall's sanitizer shifts away from
the bare model's). Success is judged on the bare model, never through
the firewall, because a firewall may answer with decoys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np

from firewall.evaluate.endpoint import Endpoint, Refusal

ADAPTIVE_ATTACKS = ("adaptive-hsja", "adaptive-boundary")
THROTTLE_PATIENCE_S = 5.0  # RESOURCE_EXHAUSTED for longer than this is a refusal
REFUSED_TARGET = 0.05  # OARS: grow the probe radius until at most this share of probes is refused
GROW, SHRINK, WINDOW = 1.5, 0.9, 20
SEARCH_REFUSALS = 3  # refusals a binary search tolerates before it keeps what it has
FINAL_SLACK = 0.99  # the final candidate's L2, as a share of max_l2


@dataclass
class AdaptiveRun:
    attack: str  # "adaptive-hsja" | "adaptive-boundary"
    image: int  # index in the data set
    label: int
    queries: int = 0  # queries sent (refused ones included)
    refused: int = 0  # queries refused
    ids_used: int = 0  # client ids used
    ended: str = "skipped"  # "finished" | "budget" | "ids" | "skipped" (clean image misclassified by the endpoint)
    best_l2: float | None = None  # L2 of the best candidate the attacker believes adversarial
    success: bool = False  # judged on the bare model: judge(best) != label and best_l2 <= max_l2
    first_refusal: int | None = None  # 1-based index of the first refused query
    # (client id, label or None when refused) per query, in order; not in the summary
    trace: list[tuple[str, int | None]] = field(default_factory=list, repr=False)
    best: np.ndarray | None = field(default=None, repr=False)  # float32 [H, W, C] in [0, 1]

    def summary(self) -> dict:
        return {name: value for name, value in vars(self).items() if name not in ("trace", "best")}


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "budget" | "ids" | "finished"


class _Oracle:
    """The attacker's only view of the endpoint: True (another label), False (the label) or None (refused)."""

    def __init__(self, endpoint: Endpoint, original: np.ndarray, label: int, run: AdaptiveRun, *,
                 id_prefix: str, query_budget: int, id_budget: int, max_l2: float):
        self.endpoint = endpoint
        self.original = original
        self.label = label
        self.run = run
        self.id_prefix = id_prefix
        self.query_budget = query_budget
        self.id_budget = id_budget
        self.max_l2 = max_l2
        self.client_id = self._new_id()
        self.best_l2 = math.inf

    def _new_id(self) -> str:
        self.run.ids_used += 1
        return f"{self.id_prefix}-{self.run.ids_used - 1}"

    def ask(self, x: np.ndarray) -> bool | None:
        """One query; x is float32 [H, W, C] in [0, 1]."""
        if self.run.queries >= self.query_budget:
            raise _Stop("budget")
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
        self.run.queries += 1
        try:
            answer, _ = self.endpoint.send_patiently(
                self.endpoint.request(x[None]), self.client_id, patience_s=THROTTLE_PATIENCE_S
            )
        except Refusal:
            self.run.refused += 1
            self.run.trace.append((self.client_id, None))
            if self.run.first_refusal is None:
                self.run.first_refusal = self.run.queries
            if self.run.ids_used >= self.id_budget:
                raise _Stop("ids")
            self.client_id = self._new_id()
            return None
        predicted = int(answer.labels[0])
        self.run.trace.append((self.client_id, predicted))
        adversarial = predicted != self.label
        if adversarial:
            distance = float(np.linalg.norm(x - self.original))
            if distance < self.best_l2:
                self.best_l2, self.run.best = distance, x.copy()
        return adversarial

    def done(self) -> None:
        """Stop once the goal is met, after spending the slack: the closest adversarial input seen is
        scaled away from the original up to ``max_l2`` and confirmed by one more query, so the final
        candidate lies deeper than the endpoint's boundary (which a sanitizer may shift)."""
        if self.best_l2 > self.max_l2 or self.run.best is None:
            return
        closest = self.run.best
        for _ in range(SEARCH_REFUSALS):
            deeper = self.original + (closest - self.original) * np.float32(FINAL_SLACK * self.max_l2 / self.best_l2)
            deeper = np.clip(deeper, 0.0, 1.0).astype(np.float32)
            answer = self.ask(deeper)  # may raise _Stop("budget" | "ids"): the closest is kept then
            if answer is not None:
                if answer:
                    self.best_l2, self.run.best = float(np.linalg.norm(deeper - self.original)), deeper
                break
        raise _Stop("finished")


class _Radius:
    """OARS' adaptive proposal: a multiplier on an attack's probe radius, driven by refusals."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.window: list[bool] = []

    def record(self, refused: bool) -> None:
        """Decides once per WINDOW probes: grow when more than 5 % were refused, shrink when none was."""
        self.window.append(refused)
        if len(self.window) < WINDOW:
            return
        share = sum(self.window) / len(self.window)
        if share > REFUSED_TARGET:
            self.scale *= GROW
        elif share == 0:
            self.scale = max(1.0, self.scale * SHRINK)
        self.window = []


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    u = rng.standard_normal(shape).astype(np.float32)
    return u / np.linalg.norm(u)


def _start(oracle: _Oracle, rng: np.random.Generator, tries: int = 200) -> np.ndarray | None:
    """A misclassified starting point: uniform noise, as both papers start (each draw far from every
    other, so rarely refused; refused draws are redrawn); every other draw is darkened by a random
    factor or made salt-and-pepper, for the images that plain uniform noise never leaves."""
    shape = oracle.original.shape
    for k in range(tries):
        candidate = rng.uniform(0.0, 1.0, shape)
        if k % 4 == 1:
            candidate *= rng.uniform(0.05, 0.6)
        elif k % 4 == 3:
            candidate = (candidate < rng.uniform(0.05, 0.5)).astype(np.float64)
        candidate = candidate.astype(np.float32)
        if oracle.ask(candidate):
            return candidate
    return None


def _boundary(oracle: _Oracle, rng: np.random.Generator, adversarial: np.ndarray, tolerance: float) -> np.ndarray:
    """Binary search on the segment original -> adversarial; returns the adversarial end."""
    x0 = oracle.original
    low, high, refusals, midpoint = 0.0, 1.0, 0, True
    while high - low > tolerance:
        alpha = (low + high) / 2 if midpoint else rng.uniform(low, high)
        answer = oracle.ask((1 - alpha) * x0 + alpha * adversarial)
        if answer is None:
            refusals += 1
            midpoint = False
            if refusals >= SEARCH_REFUSALS:
                break
            continue
        midpoint = True
        if answer:
            high = alpha
        else:
            low = alpha
    return ((1 - high) * x0 + high * adversarial).astype(np.float32)


def _hsja(oracle: _Oracle, rng: np.random.Generator, max_iter: int = 64, init_evals: int = 100,
          max_evals: int = 1000) -> None:
    x0 = oracle.original
    d = x0.size
    theta = 1.0 / (d * math.sqrt(d))
    tolerance = max(theta, 1e-3)
    start = _start(oracle, rng)
    if start is None:
        return
    x = _boundary(oracle, rng, start, tolerance)
    radius = _Radius()
    for t in range(1, max_iter + 1):
        oracle.done()
        dist = float(np.linalg.norm(x - x0))
        base = 0.1 if t == 1 else math.sqrt(d) * theta * dist
        wanted = min(int(init_evals * math.sqrt(t)), max_evals)
        directions, signs = [], []
        draws = 0
        while len(signs) < wanted and draws < 2 * wanted + 20:
            delta = base * radius.scale
            probe = np.clip(x + delta * _unit(rng, x0.shape), 0.0, 1.0)
            draws += 1
            answer = oracle.ask(probe)
            radius.record(answer is None)
            if answer is None:  # dropped; a new probe is drawn, with a grown radius if refusals are frequent
                continue
            directions.append((probe - x) / delta)
            signs.append(1.0 if answer else -1.0)
        if not signs:
            continue
        values = np.array(signs, dtype=np.float32)
        if abs(values.mean()) < 1.0:
            values = values - values.mean()
        gradient = np.tensordot(values, np.stack(directions), axes=1) / len(values)
        norm = float(np.linalg.norm(gradient))
        if norm == 0.0:
            continue
        gradient /= norm
        step = dist / math.sqrt(t)
        candidate = None
        while step > 1e-4:
            proposal = np.clip(x + step * gradient, 0.0, 1.0)
            answer = oracle.ask(proposal)
            if answer:
                candidate = proposal
                break
            step /= 2  # not adversarial, or refused: retry smaller
        if candidate is not None:
            found = _boundary(oracle, rng, candidate, tolerance)
            if float(np.linalg.norm(found - x0)) < dist:  # a search cut short by refusals may end farther
                x = found
    oracle.done()
    raise _Stop("finished")


def _boundary_attack(oracle: _Oracle, rng: np.random.Generator, max_proposals: int = 100_000,
                     delta: float = 0.01, epsilon: float = 0.01, step_adapt: float = 0.667,
                     trials: int = 10) -> None:
    x0 = oracle.original
    start = _start(oracle, rng)
    if start is None:
        return
    x = _boundary(oracle, rng, start, 1e-3)
    radius = _Radius()
    outcomes: list[bool] = []
    for _ in range(max_proposals):
        oracle.done()
        dist = float(np.linalg.norm(x - x0))
        if dist == 0.0:
            break
        spherical = delta * radius.scale
        step = epsilon
        for _retry in range(4):
            eta = rng.standard_normal(x0.shape).astype(np.float32)
            eta *= spherical * dist / np.linalg.norm(eta)
            moved = x + eta
            proposal = x0 + (moved - x0) * (dist / np.linalg.norm(moved - x0))  # back on the sphere
            proposal = np.clip(proposal + step * (x0 - proposal), 0.0, 1.0)
            answer = oracle.ask(proposal)
            radius.record(answer is None)
            if answer is not None:
                break
            step /= 2  # a refused step is retried smaller (with a fresh orthogonal draw)
            spherical = delta * radius.scale
        if answer is None:
            continue
        outcomes.append(answer)
        if answer:
            x = proposal.astype(np.float32)
        if len(outcomes) >= trials:
            rate = sum(outcomes) / len(outcomes)
            if rate > 0.5:
                epsilon, delta = min(epsilon / step_adapt, 0.5), min(delta / SHRINK, 1.0)
            elif rate < 0.2:
                epsilon, delta = max(epsilon * step_adapt, 1e-5), max(delta * SHRINK, 1e-3)
            outcomes = []
    raise _Stop("finished")


_ATTACKS = {"adaptive-hsja": _hsja, "adaptive-boundary": _boundary_attack}


def run_adaptive_attack(
    name: str,
    endpoint: Endpoint,
    judge: Callable[[np.ndarray], int],
    image: np.ndarray,
    image_index: int,
    label: int,
    *,
    max_l2: float,
    id_prefix: str,
    query_budget: int = 5000,
    id_budget: int = 400,
    seed: int = 0,
) -> AdaptiveRun:
    """One adaptive attack on one image (uint8 [H, W, C]) through ``endpoint``.

    ``judge`` maps a float32 [H, W, C] image in [0, 1] to the bare model's top label; client ids are
    ``<id_prefix>-0``, ``<id_prefix>-1``, ..."""
    if name not in _ATTACKS:
        raise ValueError(f"unknown adaptive attack {name!r} (choose from {', '.join(ADAPTIVE_ATTACKS)})")
    original = image.astype(np.float32) / 255.0
    run = AdaptiveRun(name, image_index, label)
    oracle = _Oracle(endpoint, original, label, run, id_prefix=id_prefix, query_budget=query_budget,
                     id_budget=id_budget, max_l2=max_l2)
    rng = np.random.default_rng(seed)
    try:
        clean = None
        while clean is None:  # the attacker first checks the clean image's label
            clean = oracle.ask(original)
        if clean:
            run.ended = "skipped"
        else:
            run.ended = "finished"
            _ATTACKS[name](oracle, rng)
    except _Stop as stop:
        run.ended = stop.reason
    if run.ended == "skipped":
        run.best = None
    if run.best is not None:
        run.best_l2 = oracle.best_l2
        run.success = judge(run.best) != label and run.best_l2 <= max_l2
    return run


def onnx_judge(path: str | Path) -> Callable[[np.ndarray], int]:
    """The bare model's top label for a float32 [H, W, C] image in [0, 1], from an ONNX file."""
    from models.runtime import OnnxClassifier

    classifier = OnnxClassifier(path)

    def judge(image: np.ndarray) -> int:
        batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        return int(classifier.predict(batch)[0])

    return judge


def adaptive_summary(runs: list[AdaptiveRun]) -> dict:
    """Per attack, over the images not skipped: success rate and medians (for the report)."""
    attempted = [run for run in runs if run.ended != "skipped"]
    distortions = [run.best_l2 for run in attempted if run.best_l2 is not None]

    def middle(values):
        values = list(values)
        return median(values) if values else None

    return {
        "runs": len(attempted),
        "skipped": len(runs) - len(attempted),
        "success_rate": sum(run.success for run in attempted) / len(attempted) if attempted else None,
        "median_queries": middle(run.queries for run in attempted),
        "median_refused": middle(run.refused for run in attempted),
        "median_ids_used": middle(run.ids_used for run in attempted),
        "median_best_l2": middle(distortions),
        "ended": {reason: sum(run.ended == reason for run in runs) for reason in sorted({r.ended for r in runs})},
    }


def adaptive_markdown(entries: list[dict], max_l2: float) -> list[str]:
    """The report's Markdown section for the adaptive attacker (``entries``: report["adaptive"])."""
    if not entries:
        return []
    first = entries[0]
    lines = [
        "",
        "## Adaptive attacker",
        "",
        f"OARS-style (a fresh client id after every refusal, probe radius grown until <= 5 % of probes are "
        f"refused, refused probes redrawn, refused steps retried smaller); {first['query_budget']} queries and "
        f"{first['id_budget']} client ids per image; success = the bare model misclassifies the attacker's best "
        f"candidate and its L2 <= {max_l2}.",
        "",
        "| attack | endpoint | runs | success | median queries | median refused | median ids used | median best L2 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in entries:
        for endpoint in ("target", "baseline"):
            if endpoint not in entry:
                continue
            s = entry[endpoint]
            success = "-" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"
            cells = [s["median_queries"], s["median_refused"], s["median_ids_used"]]
            cells = ["-" if value is None else f"{value:g}" for value in cells]
            l2 = "-" if s["median_best_l2"] is None else f"{s['median_best_l2']:.2f}"
            lines.append(f"| {entry['attack']} | {endpoint} | {s['runs']} | {success} | {' | '.join(cells)} | {l2} |")
    return lines
