"""Detector benchmark: per-stage latency, probing memory, detection of attacks, benign false positives.

    python benchmarks/detectors.py --data ../shared/data [--images 20] [--out reports/detectors.json]

Library level: every query goes through the sanitizer, the detector stages and the ONNX model in
this process (no gRPC), with the calibrated thresholds of ``models/<name>/thresholds.yaml``.
Attacks and benign traffic use only held-out images (MNIST 8,000-9,999, CIFAR-10 test/); nothing
here is timed inside a test. Sections:

- latency: median and p99 per stage, the probing stage with full client histories (W = 1,000 and
  10,000) beside a full global window of 100,000.
- memory: resident memory per tracked client at W = 1,000 and 10,000 for 1 to 10,000 clients
  (each sends W queries; ``max_vectors`` evicts beyond its budget), global window 100,000; RSS
  growth (meaningful for many clients) and the exact bytes of the history arrays.
- attacks: ART HopSkipJump, Boundary and Sign-OPT (label-only), plain, blinded with fresh uniform
  noise of +-0.05 on every query, spread round-robin over 20 ids (Sybil), and taking a new id
  after every refusal and sending the refused query again (as is, or blinded afresh); share
  flagged and queries to the first finding (and, for rotated ids, queries until each new id is
  refused).
- benign: distinct images from many clients, clients sending one class, byte-identical retries,
  camera bursts (an image and 5 one-pixel shifts); false positives per query and per client.
- uncertainty: ROC-AUC of MC-dropout variance (and of squeeze) against FGSM, PGD and
  Carlini-Wagner L2; MC dropout as configured (``dropout: last``, the head only) beside full MC
  dropout (``dropout: all``, every Dropout on, the network run 16 times) on the same images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.history import digest_key  # noqa: E402
from detectors.probing import ProbingStage  # noqa: E402
from detectors.registry import DetectorConfig  # noqa: E402
from detectors.sanitizer import Sanitizer, SanitizerConfig  # noqa: E402
from detectors.squeeze import SqueezeConfig, squeeze_scores  # noqa: E402
from detectors.uncertainty import UncertaintyStage  # noqa: E402
from firewall.stage import RequestContext  # noqa: E402
from models.data import MNIST_HELDOUT, load_cifar10, load_mnist  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path  # noqa: E402

QUERY_BUDGET = 300  # queries per attack run
BLIND = 0.05


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e3, 3)


def load_setup(name: str) -> tuple[OnnxClassifier, Sanitizer, dict[str, DetectorConfig]]:
    model = OnnxClassifier(bundled_model_path(name))
    document = yaml.safe_load(bundled_model_path(name).with_name("thresholds.yaml").read_text())
    from pydantic import TypeAdapter

    detectors = TypeAdapter(list[DetectorConfig]).validate_python(document["detectors"])
    return model, Sanitizer(SanitizerConfig(**document["sanitizer"]), model.input), {d.kind: d for d in detectors}


def heldout(name: str, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWxC held-out images and labels."""
    if name == "mnist":
        images, labels = load_mnist(data / "mnist", *MNIST_HELDOUT)
        return images[..., None], labels
    return load_cifar10(data / "cifar10" / "cifar10-jpg.zip", "test")


def context(images: list[np.ndarray], client: str, sanitizer: Sanitizer) -> RequestContext:
    ctx = RequestContext("r", "m", client, "peer", images, [hashlib.sha256(i.tobytes()).digest() for i in images])
    ctx.tensor = sanitizer(images)
    return ctx


# --- latency and memory ------------------------------------------------------------------------


def filler_vectors(stage: ProbingStage, sanitizer: Sanitizer, images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n realistic embeddings: the images' embeddings with small random perturbations."""
    base = stage.embedder(sanitizer(list(images[:1000])))  # the timed queries come from 1000 on
    rng = np.random.default_rng(seed)
    vectors = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, base.shape[1])).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def fill(history, vectors: np.ndarray, tag: str) -> None:
    for i, vector in enumerate(vectors):
        history._add(vector, digest_key(f"{tag}{i}".encode()), False, time.time())


def latency(name: str, data: Path, queries: int = 500) -> dict:
    model, sanitizer, detectors = load_setup(name)
    images, _ = heldout(name, data)
    probe_images = [images[i] for i in range(1000, 1000 + queries)]
    results: dict[str, dict] = {}

    def timed(label: str, call, contexts) -> None:
        samples = []
        for ctx in contexts:
            start = time.perf_counter()
            call(ctx)
            samples.append(time.perf_counter() - start)
        results[label] = {"p50_ms": percentile_ms(samples, 50), "p99_ms": percentile_ms(samples, 99)}

    contexts = [context([image], "bench", sanitizer) for image in probe_images]
    timed("sanitize (1 image)", lambda ctx: sanitizer(ctx.images), contexts)
    timed("predict (1 image)", lambda ctx: model.predict(ctx.tensor), contexts)
    timed("squeeze", detectors["squeeze"].build(model), contexts)
    timed("uncertainty (16 passes)", detectors["uncertainty"].build(model), contexts)
    for window in (1_000, 10_000):
        config = detectors["probing"].model_copy(update={"client_window": window, "global_window": 100_000})
        stage = config.build(model)
        fill(stage.clients.get("bench"), filler_vectors(stage, sanitizer, images, window, 0), "c")
        fill(stage.global_history, filler_vectors(stage, sanitizer, images, 100_000, 1), "g")
        timed(f"probing (W={window}, global 100k)", stage, [context([i], "bench", sanitizer) for i in probe_images])
        alone = config.model_copy(update={"global_index": False}).build(model)
        fill(alone.clients.get("bench"), filler_vectors(alone, sanitizer, images, window, 0), "c")
        timed(f"probing (W={window}, no global)", alone, [context([i], "bench", sanitizer) for i in probe_images])
    return results


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_one(name: str, data: Path, window: int, clients: int) -> dict:
    """Run in a child process: RSS growth for `clients` clients that each sent `window` queries."""
    model, sanitizer, detectors = load_setup(name)
    images, _ = heldout(name, data)
    config = detectors["probing"].model_copy(update={"client_window": window, "global_window": 100_000})
    stage = config.build(model)
    vectors = filler_vectors(stage, sanitizer, images, window, 0)
    global_vectors = filler_vectors(stage, sanitizer, images, 100_000, 1)
    kept = min(clients, config.max_clients, max(1, config.max_vectors // window))
    before = resident_bytes()
    fill(stage.global_history, global_vectors, "g")
    after_global = resident_bytes()
    for n in range(clients - kept, clients):  # earlier clients would be evicted by the budget anyway
        history = stage.clients.get(f"client{n}")
        rows = history.capacity
        fill(history, vectors, f"{n}-")
        stage.clients.account(f"client{n}", rows, history)
    after = resident_bytes()
    tracked = int(stage.stats()["tracked_clients"])
    arrays = sum(h.vectors.nbytes + h.times.nbytes + h.keys.nbytes + h.flagged.nbytes for _, h in stage.clients.items())
    return {
        "window": window,
        "clients": clients,
        "tracked_clients": tracked,
        "global_mib": round((after_global - before) / 2**20, 1),
        "clients_mib": round((after - after_global) / 2**20, 1),
        "rss_per_tracked_client_kib": round((after - after_global) / tracked / 1024, 1),
        "arrays_per_tracked_client_kib": round(arrays / tracked / 1024, 1),
    }


def memory(name: str, data: Path) -> list[dict]:
    rows = []
    for window in (1_000, 10_000):
        for clients in (1, 10, 100, 1_000, 10_000):
            command = [sys.executable, __file__, "--data", str(data), "--model", name]
            output = subprocess.run(
                [*command, "--memory-child", f"{window},{clients}"], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


# --- attacks -----------------------------------------------------------------------------------


class BudgetSpent(Exception):
    pass


class Attacker:
    """Sends every ART query through sanitizer + probing + model and records the findings."""

    def __init__(self, model, sanitizer, stage, ids: str, blind: bool, seed: int):
        self.model, self.sanitizer, self.stage = model, sanitizer, stage
        self.ids, self.blind = ids, blind
        self.rng = np.random.default_rng(seed)
        self.queries = 0
        self.first: dict[str, int] = {}
        self.identity = 0
        self.per_identity: list[int] = []  # rotating: queries each id sent before its first refusal
        self.sent_by_identity = 0

    def client(self) -> str:
        if self.ids == "sybil":
            return f"sybil{self.queries % 20}"
        return f"attacker{self.identity}"

    def send(self, image: np.ndarray) -> tuple[int, bool]:
        if self.blind:
            image = np.clip(image + self.rng.uniform(-BLIND, BLIND, image.shape), 0, 1).astype(np.float32)
        self.queries += 1
        self.sent_by_identity += 1
        ctx = context([image], self.client(), self.sanitizer)
        findings = self.stage(ctx)
        for finding in findings:
            self.first.setdefault(finding.rule, self.queries)
        return int(self.model.predict(ctx.tensor)[0]), bool(findings)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        labels = []
        for image in batch.astype(np.float32):
            label, refused = self.send(image)
            while refused and self.ids == "rotating":  # take a new id and send the query again
                self.per_identity.append(self.sent_by_identity)
                self.identity += 1
                self.sent_by_identity = 0
                if len(self.per_identity) >= 20:
                    raise BudgetSpent
                label, refused = self.send(image)
            labels.append(label)
            if self.queries >= QUERY_BUDGET:
                raise BudgetSpent
        return np.eye(10, dtype=np.float32)[labels]


def make_attack(kind: str, classifier):
    from art.attacks.evasion import BoundaryAttack, HopSkipJump, SignOPTAttack

    if kind == "HopSkipJump":
        return HopSkipJump(classifier, max_iter=50, max_eval=1000, init_eval=100, verbose=False)
    if kind == "Boundary":
        return BoundaryAttack(classifier, targeted=False, max_iter=1000, verbose=False)
    return SignOPTAttack(classifier, targeted=False, verbose=False)


def attacks(name: str, data: Path, count: int) -> dict:
    from art.estimators.classification import BlackBoxClassifier

    model, sanitizer, detectors = load_setup(name)
    images, _ = heldout(name, data)
    shape = images.shape[1:]
    results: dict[str, dict] = {}
    for kind in ("HopSkipJump", "Boundary", "SignOPT"):
        for mode in ("plain", "blinded", "sybil", "rotating", "rotating blinded"):
            firsts, client_firsts, global_firsts, per_identity, gave_up = [], [], [], [], 0
            for n in range(count):
                stage = detectors["probing"].build(model)
                attacker = Attacker(
                    model, sanitizer, stage, ids=mode.split()[0], blind=mode.endswith("blinded"), seed=n
                )
                classifier = BlackBoxClassifier(attacker.predict, shape, 10, clip_values=(0.0, 1.0))
                np.random.seed(n)
                try:
                    make_attack(kind, classifier).generate(images[n : n + 1].astype(np.float32) / 255.0)
                except BudgetSpent:
                    pass
                firsts.append(min(attacker.first.values(), default=None))
                gave_up += not attacker.first and attacker.queries < QUERY_BUDGET  # stopped by itself, unflagged
                client_firsts.append(attacker.first.get("probing.client"))
                global_firsts.append(attacker.first.get("probing.global"))
                per_identity += attacker.per_identity[1:]  # ids after the first one
            flagged = [f for f in firsts if f is not None]
            row = {
                "attacks": count,
                "flagged": len(flagged),
                "unflagged_gave_up_by_themselves": gave_up,
                "median_first_flag": float(np.median(flagged)) if flagged else None,
                "max_first_flag": max(flagged) if flagged else None,
                "median_first_client_flag": _median(client_firsts),
                "median_first_global_flag": _median(global_firsts),
            }
            if mode.startswith("rotating"):
                row["rotated_ids"] = len(per_identity)
                row["rotated_id_queries_to_flag_median"] = float(np.median(per_identity)) if per_identity else None
                row["rotated_id_queries_to_flag_max"] = max(per_identity) if per_identity else None
            results[f"{kind} {mode}"] = row
            print(kind, mode, row, flush=True)
    return results


def _median(values: list[int | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


# --- benign traffic ----------------------------------------------------------------------------


def benign(name: str, data: Path) -> dict:
    model, sanitizer, detectors = load_setup(name)
    images, labels = heldout(name, data)
    rng = np.random.default_rng(0)
    chosen = rng.permutation(len(images))[:2000]  # CIFAR-10's files are sorted by class
    images, labels = images[chosen], labels[chosen]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    patterns: dict[str, list[tuple[str, np.ndarray]]] = {
        "distinct images, 100 clients": [(f"c{i % 100}", images[i]) for i in range(len(images))],
        "one class per client": [(f"class{labels[i]}", images[i]) for i in range(len(images))],
        "byte-identical retries (1-3 sends)": [
            (f"c{i % 100}", images[i]) for i in range(len(images)) for _ in range(rng.integers(1, 4))
        ],
        "camera bursts (image + 5 one-pixel shifts)": [
            (f"c{i % 20}", np.roll(images[i], shift, axis=(0, 1)))
            for i in range(400)
            for shift in [(0, 0)] + [offsets[j] for j in rng.choice(8, 5, replace=False)]
        ],
    }
    results = {}
    for pattern, traffic in patterns.items():
        stage = detectors["probing"].build(model)
        flagged = {"probing.client": 0, "probing.global": 0}
        clients_flagged: set[str] = set()
        for client, image in traffic:
            for finding in stage(context([image], client, sanitizer)):
                flagged[finding.rule] += 1
                clients_flagged.add(client)
        clients = len({client for client, _ in traffic})
        results[pattern] = {
            "queries": len(traffic),
            "clients": clients,
            "client_fp_per_query": flagged["probing.client"] / len(traffic),
            "global_fp_per_query": flagged["probing.global"] / len(traffic),
            "clients_with_a_fp": f"{len(clients_flagged)}/{clients}",
        }
        print(pattern, results[pattern], flush=True)
    return results


# --- uncertainty -------------------------------------------------------------------------------


def uncertainty(name: str, data: Path, count: int) -> dict:
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent
    from sklearn.metrics import roc_auc_score

    from detectors.gradients import art_classifier

    model, sanitizer, detectors = load_setup(name)
    stage = detectors["uncertainty"].build(model)
    assert isinstance(stage, UncertaintyStage)
    full = detectors["uncertainty"].model_copy(update={"dropout": "all"}).build(model)
    squeeze = detectors["squeeze"]
    assert isinstance(squeeze, SqueezeConfig)
    images, labels = heldout(name, data)
    x = (images[:count].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    classifier = art_classifier(model.path, model.input_shape, 10)

    def scores(batch: np.ndarray, sanitize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        tensor = sanitizer(list(batch.transpose(0, 2, 3, 1))) if sanitize else batch
        return (
            stage.scores(tensor)["variance"],
            squeeze_scores(model, tensor, squeeze.bit_depth, squeeze.median_size),
            model.predict(tensor),
            full.scores(tensor)["variance"],
        )

    def auc(benign_scores: np.ndarray, attack_scores: np.ndarray) -> float | None:
        if not len(attack_scores):
            return None
        target = np.r_[np.zeros(len(benign_scores)), np.ones(len(attack_scores))]
        return round(float(roc_auc_score(target, np.r_[benign_scores, attack_scores])), 3)

    benign_u, benign_s, _, benign_full = scores(x)
    raw_benign_u, _, _, _ = scores(x, sanitize=False)
    crafted = {
        "FGSM eps 0.1": lambda: FastGradientMethod(classifier, eps=0.1).generate(x),
        "FGSM eps 0.2": lambda: FastGradientMethod(classifier, eps=0.2).generate(x),
        "PGD eps 0.05": lambda: ProjectedGradientDescent(
            classifier, eps=0.05, eps_step=0.0125, max_iter=10, verbose=False
        ).generate(x),
        "PGD eps 0.2": lambda: ProjectedGradientDescent(
            classifier, eps=0.2, eps_step=0.05, max_iter=10, verbose=False
        ).generate(x),
        "CW L2 (first 30)": lambda: CarliniL2Method(
            classifier, learning_rate=0.1, initial_const=1.0, binary_search_steps=3, max_iter=20, verbose=False
        ).generate(x[:30]),
    }
    results = {}
    for attack, generate in crafted.items():
        start = time.time()
        adversarial = generate()
        u, s, predicted, u_full = scores(adversarial)
        raw_u, _, raw_predicted, _ = scores(adversarial, sanitize=False)
        success = predicted != labels[: len(adversarial)]
        results[attack] = {
            "images": len(adversarial),
            "success_without_sanitizer": float(np.mean(raw_predicted != labels[: len(adversarial)])),
            "success_after_sanitizer": float(success.mean()),
            "mc_dropout_roc_auc": auc(benign_u, u),
            "mc_dropout_all_layers_roc_auc": auc(benign_full, u_full),
            "mc_dropout_roc_auc_successful_only": auc(benign_u, u[success]),
            "mc_dropout_roc_auc_without_sanitizer": auc(raw_benign_u, raw_u),
            "mc_dropout_flagged": float(np.mean(u > stage.config.threshold)),
            "squeeze_roc_auc": auc(benign_s, s),
            "squeeze_flagged": float(np.mean(s > squeeze.threshold)),
            "seconds": round(time.time() - start, 1),
        }
        print(attack, results[attack], flush=True)
    results["benign"] = {
        "mc_dropout_flagged": float(np.mean(benign_u > stage.config.threshold)),
        "squeeze_flagged": float(np.mean(benign_s > squeeze.threshold)),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding mnist/ and cifar10/")
    parser.add_argument("--model", default="mnist", help="bundled model: mnist or cifar10")
    parser.add_argument("--images", type=int, default=20, help="attacked images per attack and mode")
    parser.add_argument("--sections", default="latency,memory,attacks,benign,uncertainty")
    parser.add_argument("--uncertainty-images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        window, clients = map(int, args.memory_child.split(","))
        print(json.dumps(memory_one(args.model, args.data, window, clients)))
        return
    sections = {
        "latency": lambda: latency(args.model, args.data),
        "memory": lambda: memory(args.model, args.data),
        "attacks": lambda: attacks(args.model, args.data, args.images),
        "benign": lambda: benign(args.model, args.data),
        "uncertainty": lambda: uncertainty(args.model, args.data, args.uncertainty_images),
    }
    results = {"model": args.model, "images_per_attack": args.images}
    for section in args.sections.split(","):
        print(f"== {section}", flush=True)
        results[section] = sections[section]()
        print(json.dumps(results[section], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
