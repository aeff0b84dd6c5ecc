"""Detector benchmark: stage latency at full state, probing memory, per-image evidence.

    python benchmarks/detectors.py --data ../shared/data [--model cifar10] [--out reports/detectors.json]

Library level: the sanitizer, the detector stages and the ONNX model in this process (no gRPC), with
the calibrated thresholds of ``models/<name>/thresholds.yaml``; held-out images only (MNIST
8,000-9,999, CIFAR-10 test/). Label-only attacks and benign traffic patterns are measured through the
real endpoint by ``firewall evaluate`` instead. Sections:

- latency: p50 and p99 per stage for one image, each stage on top of the request's one network pass
  (``predict``, which the stages share); the probing stage with its history full (100,000 queries)
  and 10,000 clients tracked (the detection issue's target: p50 <= 0.5 ms).
- memory: resident memory the probing stage holds with a full history, a full evidence history
  and ``max_clients`` tracked clients and addresses.
- evidence: how fast the per-client CUSUM (``detectors.evidence``) alerts a client that sends
  crafted images, and how often it alerts benign clients. Crafted: FGSM, PGD and Carlini-Wagner L2
  made on an attacker's own surrogate and transferred (MNIST: ``tests/surrogate.py``'s fixture;
  CIFAR-10: white-box on the protected model, as no surrogate is bundled), each client sending 20
  in random order; images until the first ``uncertainty``, ``squeeze`` or ``adversarial`` (when
  calibrated) finding. Benign: the held-out images dealt to clients of ``--client-images``
  distinct images, dealt again in a new order for each round (a fresh firewall state per round),
  through probing (which marks new content) and the per-image detectors; clients with any
  warning-level finding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from pydantic import TypeAdapter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.forward import shared_forward  # noqa: E402
from detectors.history import digest_key  # noqa: E402
from detectors.registry import DetectorConfig  # noqa: E402
from detectors.sanitizer import Sanitizer, SanitizerConfig  # noqa: E402
from firewall.stage import RequestContext  # noqa: E402
from models.data import MNIST_HELDOUT, load_cifar10, load_mnist  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path  # noqa: E402

WINDOW = 100_000
TRACKED_CLIENTS = 10_000
ATTACK_IMAGES = 20


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile_ms(samples: list[float], q: float) -> float:
    return round(float(np.percentile(samples, q)) * 1e3, 3)


def load_setup(name: str) -> tuple[OnnxClassifier, Sanitizer, dict[str, DetectorConfig]]:
    model = OnnxClassifier(bundled_model_path(name))
    document = yaml.safe_load(bundled_model_path(name).with_name("thresholds.yaml").read_text())
    detectors = TypeAdapter(list[DetectorConfig]).validate_python(document["detectors"])
    return model, Sanitizer(SanitizerConfig(**document["sanitizer"]), model.input), {d.kind: d for d in detectors}


def heldout(name: str, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWxC held-out images and labels, in a seeded random order (CIFAR-10's are by class)."""
    if name == "mnist":
        images, labels = load_mnist(data / "mnist", *MNIST_HELDOUT)
        images = images[..., None]
    else:
        images, labels = load_cifar10(data / "cifar10" / "cifar10-jpg.zip", "test")
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], labels[order]


def context(images: list[np.ndarray], client: str, sanitizer: Sanitizer) -> RequestContext:
    ctx = RequestContext("r", "m", client, "peer", images, [hashlib.sha256(i.tobytes()).digest() for i in images])
    ctx.tensor = sanitizer(images)
    return ctx


# --- latency and memory ------------------------------------------------------------------------


def full_probing_stage(model: OnnxClassifier, sanitizer: Sanitizer, config, images: np.ndarray):
    """A probing stage whose history holds ``WINDOW`` queries (the first 1,000 held-out images'
    embeddings, perturbed, with their model labels) and ``TRACKED_CLIENTS`` clients and addresses."""
    stage = config.build(model)
    tensor = sanitizer(list(images[:1000]))
    base, labels = stage.embedder(tensor), model.predict(tensor)
    rng = np.random.default_rng(1)
    pick = rng.integers(0, len(base), WINDOW)
    vectors = base[pick] + rng.normal(0, 0.02, (WINDOW, base.shape[1])).astype(np.float32)
    now = time.time()
    for i, (vector, label) in enumerate(zip(vectors.astype(np.float32), labels[pick])):
        stage.history.add(vector, digest_key(f"filler{i}".encode()), int(label), int(label), False, now)
    for i in range(TRACKED_CLIENTS):
        stage.clients.add(f"client{i}", 0.0, now)
        stage.addresses.add(f"10.0.{i // 256}.{i % 256}", 0.0, now)
    return stage


def latency(name: str, data: Path, queries: int = 500) -> dict:
    model, sanitizer, detectors = load_setup(name)
    images, _ = heldout(name, data)
    probe_images = [images[i] for i in range(1000, 1000 + queries)]
    results: dict[str, dict] = {}

    def timed(label: str, call) -> None:
        samples = []
        for k, image in enumerate(probe_images):
            ctx = context([image], f"client{k % TRACKED_CLIENTS}", sanitizer)
            if label != "predict":  # the request's one network pass, shared by the stages, is "predict"
                shared_forward(ctx, model)
            start = time.perf_counter()
            call(ctx)
            samples.append(time.perf_counter() - start)
        results[label] = {"p50_ms": percentile_ms(samples, 50), "p99_ms": percentile_ms(samples, 99)}
        progress(f"latency {label}: {results[label]}")

    timed("sanitize", lambda ctx: sanitizer(ctx.images))
    timed("predict", lambda ctx: shared_forward(ctx, model))
    timed("squeeze", detectors["squeeze"].build(model))
    timed(f"uncertainty ({detectors['uncertainty'].passes} passes)", detectors["uncertainty"].build(model))
    if "adversarial" in detectors:
        timed("adversarial", detectors["adversarial"].build(model))
    progress(f"filling a probing history with {WINDOW:,} queries")
    stage = full_probing_stage(model, sanitizer, detectors["probing"], images)
    timed(f"probing ({WINDOW:,} queries, {TRACKED_CLIENTS:,} clients)", stage)
    return results


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(name: str, data: Path) -> dict:
    model, sanitizer, detectors = load_setup(name)
    images, _ = heldout(name, data)
    config = detectors["probing"]
    before = resident_bytes()
    stage = full_probing_stage(model, sanitizer, config, images)
    now = time.time()
    for i in range(config.max_clients):  # every counter slot in use
        stage.clients.add(f"client{i}", 1.0, now)
        stage.addresses.add(f"address{i}", 1.0, now)
    rng = np.random.default_rng(2)
    for _ in range(config.evidence_window):
        vector = rng.normal(size=stage.embedder.dim).astype(np.float32)
        stage.evidence.add(vector / np.linalg.norm(vector), 0)
    result = {
        "history_queries": len(stage.history),
        "evidence_queries": config.evidence_window,
        "tracked_clients": len(stage.clients),
        "tracked_addresses": len(stage.addresses),
        "rss_mib": round((resident_bytes() - before) / 2**20, 1),
    }
    progress(f"memory: {result}")
    return result


# --- per-image evidence ------------------------------------------------------------------------


def crafted_sets(name: str, model: OnnxClassifier, x: np.ndarray) -> dict[str, np.ndarray]:
    """Crafted images (float NCHW in [0, 1]) from the attacker's surrogate (white-box on CIFAR-10)."""
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent

    if name == "mnist":
        from tests.surrogate import art_surrogate

        classifier, eps = art_surrogate(), 0.2
    else:
        from detectors.gradients import art_classifier

        classifier, eps = art_classifier(model.path, model.input_shape, 10), 8 / 255
    return {
        f"FGSM eps {eps:.3g}": FastGradientMethod(classifier, eps=eps).generate(x),
        f"PGD eps {eps:.3g}": ProjectedGradientDescent(
            classifier, eps=eps, eps_step=eps / 10, max_iter=20, verbose=False
        ).generate(x),
        "CW L2": CarliniL2Method(classifier, confidence=5.0, max_iter=20, batch_size=50, verbose=False).generate(x),
    }


PER_IMAGE_RULES = ("uncertainty", "squeeze", "adversarial")


def per_image_stages(model: OnnxClassifier, detectors: dict[str, DetectorConfig]) -> list:
    return [detectors[kind].build(model) for kind in ("probing", *PER_IMAGE_RULES) if kind in detectors]


def warned(stages: list, ctx: RequestContext) -> bool:
    findings = [finding for stage in stages for finding in stage(ctx)]
    return any(finding.rule in PER_IMAGE_RULES for finding in findings)


def evidence(name: str, data: Path, attack_images: int, rounds: int, client_images: int) -> dict:
    model, sanitizer, detectors = load_setup(name)
    images, labels = heldout(name, data)
    results: dict[str, dict] = {}
    rng = np.random.default_rng(3)
    x = (images[:attack_images].astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    for attack, adversarial in crafted_sets(name, model, x).items():
        pixels = np.round(adversarial * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        fooled = model.predict(sanitizer(list(pixels))) != labels[:attack_images]
        alerted_at = []
        for client in range(ATTACK_IMAGES):  # each client sends 20 of them in its own order
            stages = per_image_stages(model, detectors)
            order = rng.choice(len(pixels), ATTACK_IMAGES, replace=False)
            first = next(
                (k + 1 for k, i in enumerate(order) if warned(stages, context([pixels[i]], "attacker", sanitizer))),
                None,
            )
            alerted_at.append(first)
        hits = [a for a in alerted_at if a is not None]
        results[attack] = {
            "fooled_share": round(float(fooled.mean()), 3),
            "clients": len(alerted_at),
            "alerted_within_20": len(hits),
            "median_images_to_alert": float(np.median(hits)) if hits else None,
        }
        progress(f"evidence {attack}: {results[attack]}")
    usable = len(images) // client_images * client_images
    alerted = clients = 0
    for round_ in tqdm(range(rounds), desc="benign rounds", disable=None, file=sys.stderr):  # quiet off a terminal
        stages = per_image_stages(model, detectors)
        order = rng.permutation(len(images))[:usable].reshape(-1, client_images)
        for client, picks in enumerate(order):
            flags = [warned(stages, context([images[i]], f"r{round_}c{client}", sanitizer)) for i in picks]
            alerted += any(flags)
            clients += 1
    progress(f"evidence benign: {alerted} of {clients} clients alerted")
    results["benign"] = {"clients": clients, "images_per_client": client_images, "alerted_clients": alerted}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding mnist/ and cifar10/")
    parser.add_argument("--model", default="mnist", choices=["mnist", "cifar10"], help="bundled model")
    parser.add_argument("--sections", default="latency,memory,evidence", help="comma-separated sections to run")
    parser.add_argument("--attack-images", type=int, default=100, help="crafted images per attack")
    parser.add_argument("--rounds", type=int, default=10, help="benign rounds over the held-out images")
    parser.add_argument("--client-images", type=int, default=20, help="distinct images per benign client")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    sections = {
        "latency": lambda: latency(args.model, args.data),
        "memory": lambda: memory(args.model, args.data),
        "evidence": lambda: evidence(args.model, args.data, args.attack_images, args.rounds, args.client_images),
    }
    results: dict = {"model": args.model}
    for section in args.sections.split(","):
        progress(f"section {section}")
        results[section] = sections[section]()
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
