"""MC dropout on the last Dropout (the default) beside MC dropout on all of them: ROC-AUC, same images, one run.

    python benchmarks/mc_dropout.py --data ../shared/data [--model cifar10] [--images 200] [--no-cw] [--out FILE]

Library level, calibrated thresholds (``models/<name>/thresholds.yaml``), held-out images only
(MNIST 8,000-9,999, CIFAR-10 test/). White-box FGSM (eps 0.1, 0.2), PGD (eps 0.05, 0.2) and
Carlini-Wagner L2 (the first 30 images) from ART on the protected model; per attack the ROC-AUC of
the predictive variance of ``dropout: last`` (the network once, its head 16 times) and of
``dropout: all`` (the network 16 times, every Dropout on) against the same benign images, the
squeeze score's ROC-AUC, and the share flagged at the calibrated thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.detectors import heldout, load_setup  # noqa: E402
from detectors.squeeze import SqueezeConfig, squeeze_scores  # noqa: E402
from detectors.uncertainty import UncertaintyStage  # noqa: E402


def roc(name: str, data: Path, count: int, carlini_wagner: bool) -> dict:
    from art.attacks.evasion import (
        CarliniL2Method,
        FastGradientMethod,
        ProjectedGradientDescent,
    )
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
    }
    if carlini_wagner:
        crafted["CW L2 (first 30)"] = lambda: CarliniL2Method(
            classifier, learning_rate=0.1, initial_const=1.0, binary_search_steps=3, max_iter=20, verbose=False
        ).generate(x[:30])
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
    parser.add_argument("--images", type=int, default=200, help="held-out images attacked")
    parser.add_argument("--no-cw", action="store_true", help="skip Carlini-Wagner (the slowest)")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    results = roc(args.model, args.data, args.images, not args.no_cw)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
