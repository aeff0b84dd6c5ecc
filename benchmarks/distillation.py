"""What defensive distillation buys against gradient attacks: teacher beside distilled model, same images, one run.

    python benchmarks/distillation.py --data ../shared/data [--model mnist|cifar10] [--images 200] [--cw-images 50]

Library level, white-box: ART's attacks on a torch view of each ONNX file (``detectors.gradients``),
success judged by ONNX Runtime on the file itself. Images: the first ``--images`` held-out images
(MNIST 8,000-9,999, CIFAR-10 test/, seeded order) that both models classify correctly; the success
rate is the share of them the attacked model then misclassifies. No sanitizer in the loop: this
measures the models, not the firewall.

- FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018; 20 steps of eps/4, no random start) on
  the cross-entropy of the softmax, at L-inf eps 0.1/0.2/0.3 (MNIST) or 8/255 (CIFAR-10): what
  Papernot et al. (IEEE S&P 2016) measured distillation against.
- The same PGD on the distilled model's logits divided by T (Carlini & Wagner, "Defensive
  Distillation is Not Robust to Adversarial Examples", 2016): undoes the saturation, so the
  gradients come back.
- Carlini-Wagner L2 (Carlini & Wagner, S&P 2017; on the logits; the first ``--cw-images``): success
  and the median L2 of the successful examples.
- Transfer: the teacher's adversarial examples sent to the distilled model.

Label-only attacks through the endpoint are measured by ``firewall evaluate`` (README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.detectors import heldout  # noqa: E402
from detectors.gradients import OnnxTorchModule  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path  # noqa: E402

EPSILONS = {"mnist": (0.1, 0.2, 0.3), "cifar10": (8 / 255,)}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Tempered(torch.nn.Module):
    """The model's logits divided by T: the softmax the distilled network was trained with."""

    def __init__(self, module: torch.nn.Module, temperature: float):
        super().__init__()
        self.module, self.temperature = module, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) / self.temperature


def art_view(path: Path, input_shape: tuple[int, int, int], temperature: float = 1.0):
    from art.estimators.classification import PyTorchClassifier

    module = Tempered(OnnxTorchModule(path), temperature).eval()
    loss = torch.nn.CrossEntropyLoss()
    return PyTorchClassifier(module, loss=loss, input_shape=input_shape, nb_classes=10, clip_values=(0.0, 1.0))


def attacks(eps_list: tuple[float, ...], cw_images: int) -> dict[str, Callable]:
    """Name to ``craft(classifier, x)``, each returning adversarial float NCHW images."""
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent

    crafts: dict[str, Callable] = {}
    for eps in eps_list:
        crafts[f"FGSM eps {eps:.3g}"] = lambda c, x, eps=eps: FastGradientMethod(c, eps=eps).generate(x)
        crafts[f"PGD eps {eps:.3g}"] = lambda c, x, eps=eps: ProjectedGradientDescent(
            c, eps=eps, eps_step=eps / 4, max_iter=20, verbose=False
        ).generate(x)
    crafts["CW L2"] = lambda c, x: CarliniL2Method(
        c, learning_rate=0.1, initial_const=1.0, binary_search_steps=3, max_iter=20, batch_size=50, verbose=False
    ).generate(x[:cw_images])
    return crafts


def outcome(model: OnnxClassifier, clean: np.ndarray, adversarial: np.ndarray, labels: np.ndarray) -> dict:
    fooled = model.predict(adversarial.astype(np.float32)) != labels[: len(adversarial)]
    l2 = np.linalg.norm((adversarial - clean[: len(adversarial)]).reshape(len(adversarial), -1), axis=1)
    return {
        "images": len(adversarial),
        "success": round(float(fooled.mean()), 3),
        "median_l2_of_successes": round(float(np.median(l2[fooled])), 3) if fooled.any() else None,
    }


def measure(name: str, data: Path, count: int, cw_images: int, temperature: float) -> dict:
    teacher_path = bundled_model_path(name)
    distilled_path = teacher_path.with_name("distilled.onnx")
    teacher, distilled = OnnxClassifier(teacher_path, threads=2), OnnxClassifier(distilled_path, threads=2)
    images, labels = heldout(name, data)
    x = np.ascontiguousarray((images[: 4 * count].astype(np.float32) / 255.0).transpose(0, 3, 1, 2))
    labels = labels[: 4 * count]
    both_right = (teacher.predict(x) == labels) & (distilled.predict(x) == labels)
    x, labels = x[both_right][:count], labels[both_right][:count]
    shape = teacher.input_shape
    views = {
        "teacher": (teacher, art_view(teacher_path, shape)),
        "distilled": (distilled, art_view(distilled_path, shape)),
        f"distilled, logits / {temperature:g}": (distilled, art_view(distilled_path, shape, temperature)),
    }
    results: dict = {"model": name, "images": len(x), "temperature": temperature, "white_box": {}, "transfer": {}}
    for attack, craft in attacks(EPSILONS[name], cw_images).items():
        row = {}
        for view, (judge, classifier) in views.items():
            started = time.perf_counter()
            adversarial = craft(classifier, x)
            row[view] = outcome(judge, x, adversarial, labels) | {"seconds": round(time.perf_counter() - started)}
            if view == "teacher":
                results["transfer"][attack] = outcome(distilled, x, adversarial, labels)
        results["white_box"][attack] = row
        progress(f"{attack}: {row} transfer {results['transfer'][attack]}")
    return results


def table(results: dict) -> str:
    views = list(next(iter(results["white_box"].values())))
    lines = [
        "| attack | " + " | ".join(views) + " | teacher's examples on distilled (transfer) |",
        "| --- |" + " --- |" * (len(views) + 1),
    ]

    def cell(o: dict) -> str:
        l2 = f" (L2 {o['median_l2_of_successes']})" if o["median_l2_of_successes"] is not None else ""
        return f"{o['success']:.1%}{l2}" if o["images"] else "-"

    for attack, row in results["white_box"].items():
        cells = [cell(row[v]) for v in views] + [cell(results["transfer"][attack])]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding mnist/ and cifar10/")
    parser.add_argument("--model", default="mnist", choices=["mnist", "cifar10"], help="bundled model")
    parser.add_argument("--images", type=int, default=200, help="held-out images both models get right")
    parser.add_argument("--cw-images", type=int, default=50, help="the first N of them for Carlini-Wagner")
    parser.add_argument("--temperature", type=float, default=20.0, help="the distillation temperature")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.model, args.data, args.images, args.cw_images, args.temperature)
    print(json.dumps(results, indent=1))
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
