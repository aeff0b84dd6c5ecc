"""The trained adversarial-example detector's ROC-AUC per attack family, on held-out images.

    python benchmarks/adversarial_detector.py --data ../shared/data [--model cifar10] [--out reports/adversarial_detector.json]

Library level: the bundled model, its sanitizer and its detector (``models/<name>/adversarial_detector.onnx``,
``firewall train-detector``), no gRPC. Held-out images only (MNIST 8,000-9,999, CIFAR-10
``test/``; a seeded sample of ``--images``). Every attack is crafted with ART against the
protected model itself (white box through ``detectors.gradients``; black box for the decision and
score attacks), on the raw pixels, untargeted, then sanitized as the firewall does; the detector
scores the sanitized image with the model's logits on it. Families:

- trained on (the bundled detectors: ``--attacks fgsm,pgd``): FGSM and PGD (10 steps of eps/4, a
  random start) at each training budget (MNIST eps 0.1, 0.2, 0.3; CIFAR-10 2, 4, 8, 16 /255);
- held out: Carlini-Wagner L2 (confidence 0, 3 x 20 iterations), HopSkipJump's final points
  (Chen, Jordan & Wainwright 2020; label-only, L2, ``--hsj-images`` images, 10 iterations of at
  most 500 evaluations), Square (Andriushchenko et al. 2020; score-based, L-inf at the middle
  training budget, 200 iterations), and FGSM at half the smallest training budget.

Benign re-encodings of the same held-out images (``detectors.calibration.benign_reencodings``:
as they are, JPEG at quality 50 and 75, twice the size, camera noise of sigma 2/255) are scored
too: the share flagged at the calibrated threshold, which the per-client CUSUM expects near 5 %.

Each family's ROC-AUC pits its crafted images against the same held-out images clean; also the
share of crafted images the model gets wrong (the attack's success), and the share flagged at the
calibrated threshold (``thresholds.yaml``; the per-client CUSUM alerts on a flagged share well
above the benign 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors.adversarial import AdversarialDetector, detector_beside  # noqa: E402
from detectors.calibration import benign_reencodings  # noqa: E402
from detectors.gradients import art_classifier  # noqa: E402
from detectors.sanitizer import Sanitizer, SanitizerConfig  # noqa: E402
from models.data import MNIST_HELDOUT, load_cifar10, load_mnist  # noqa: E402
from models.runtime import OnnxClassifier, bundled_calibration, bundled_model_path  # noqa: E402
from models.train_detector import EPSILONS, craft  # noqa: E402

BATCH = 256


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def heldout(name: str, data: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, C] held-out images and labels."""
    if name == "mnist":
        images, labels = load_mnist(data / "mnist", *MNIST_HELDOUT)
        images = images[..., None]
    else:
        images, labels = load_cifar10(data / "cifar10" / "cifar10-jpg.zip", "test")
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False))
    return images[chosen], labels[chosen]


def black_box(classifier, pixels: np.ndarray, family: str, eps: float) -> np.ndarray:
    from art.attacks import evasion

    if family == "hopskipjump":
        method = evasion.HopSkipJump(classifier, norm=2, max_iter=10, max_eval=500, init_eval=50, batch_size=BATCH, verbose=False)
    else:
        method = evasion.SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=200, batch_size=BATCH, verbose=False)
    return method.generate(pixels).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="../shared/data")
    parser.add_argument("--model", default="mnist", choices=("mnist", "cifar10"))
    parser.add_argument("--images", type=int, default=500, help="held-out images per family (default: %(default)s)")
    parser.add_argument("--cw-images", type=int, default=200, help="of them, for Carlini-Wagner (default: %(default)s)")
    parser.add_argument("--hsj-images", type=int, default=40, help="of them, for HopSkipJump (default: %(default)s)")
    parser.add_argument("--families", default="fgsm,pgd,cw,hopskipjump,square", help="attack families to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    path = bundled_model_path(args.model)
    model = OnnxClassifier(path, threads=args.threads, max_rows=BATCH)
    calibration = bundled_calibration(args.model)
    sanitizer = Sanitizer(SanitizerConfig(**calibration.get("sanitizer", {})), model.input)
    detector = AdversarialDetector(detector_beside(path), model, args.threads)
    threshold = next((d["threshold"] for d in calibration.get("detectors", []) if d["kind"] == "adversarial"), None)
    classifier = art_classifier(path, model.input_shape, 10)
    images, labels = heldout(args.model, args.data, args.images, args.seed)
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255

    def score(batch_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector scores and the model's labels on the sanitized batch."""
        batch = sanitizer(list(batch_pixels.transpose(0, 2, 3, 1)))
        logits = np.concatenate([model.logits(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)])
        return detector.scores(batch, logits), logits.argmax(1)

    benign, _ = score(pixels)
    variants = {}
    for name, encoded in benign_reencodings(list(images), args.seed).items():
        batch = sanitizer(encoded)
        variant = detector.scores(batch, np.concatenate([model.logits(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)]))
        variants[name] = None if threshold is None else float(np.mean(variant > threshold))
    progress(f"benign variants flagged: {variants}")
    epsilons = EPSILONS[model.input.channels]
    middle = epsilons[len(epsilons) // 2]
    families: list[tuple[str, str, str, float | None, int]] = [
        *((f"fgsm eps={e:.3g}", "trained", "fgsm", e, len(pixels)) for e in epsilons),
        *((f"pgd eps={e:.3g}", "trained", "pgd", e, len(pixels)) for e in epsilons),
        ("cw-l2", "held out", "cw", None, args.cw_images),
        ("hopskipjump", "held out", "hopskipjump", None, args.hsj_images),
        (f"square eps={middle:.3g}", "held out", "square", middle, len(pixels)),
        (f"fgsm eps={epsilons[0] / 2:.3g}", "held out", "fgsm", epsilons[0] / 2, len(pixels)),
    ]
    rows = []
    for name, split, family, eps, count in (f for f in families if f[2] in args.families.split(",")):
        started = time.perf_counter()
        if family in ("hopskipjump", "square"):
            crafted = black_box(classifier, pixels[:count], family, eps or 0.0)
        else:
            crafted = craft(classifier, pixels[:count], family, eps)
        scores, predicted = score(crafted)
        y = np.r_[np.zeros(len(benign)), np.ones(count)]
        row = {
            "family": name,
            "split": split,
            "images": count,
            "attack_success": float(np.mean(predicted != labels[:count])),
            "roc_auc": float(roc_auc_score(y, np.r_[benign, scores])),
            "flagged": None if threshold is None else float(np.mean(scores > threshold)),
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        progress(json.dumps(row))
    report = {
        "model": args.model,
        "heldout_images": len(pixels),
        "threshold": threshold,
        "benign_variants_flagged": variants,
        "families": rows,
    }
    print(f"| {args.model} family | split | images | attack success | ROC-AUC | flagged at threshold |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        flagged = "-" if row["flagged"] is None else f"{row['flagged']:.1%}"
        print(f"| {row['family']} | {row['split']} | {row['images']} | {row['attack_success']:.1%} | {row['roc_auc']:.3f} | {flagged} |")
    if threshold is not None:
        print(f"benign held-out images flagged at the calibrated threshold {threshold:.4g}: " + ", ".join(f"{name} {share:.1%}" for name, share in variants.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
