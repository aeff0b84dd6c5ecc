"""A trained adversarial-example detector: `firewall train-detector MODEL.onnx --data DATA --out OUT.onnx`.

K. Grosse, P. Manoharan, N. Papernot, M. Backes, P. McDaniel, "On the (Statistical) Detection of
Adversarial Examples" (arXiv 1702.06280, 2017), and J. H. Metzen, T. Genewein, V. Fischer,
B. Bischoff, "On Detecting Adversarial Perturbations", ICLR 2017: adversarial examples crafted
against a fixed classifier are learnable as a class of their own. Grosse et al. add that class to
the classifier's outputs; Metzen et al. train a separate binary detector network on the
classifier's inputs or activations, labelled clean/adversarial, with examples from FGSM, the
iterative method and DeepFool at several budgets, and find that it recognises the families and
budgets it was trained on and generalises poorly to others. Here, as in Metzen et al., the
protected model stays as it is and a separate small binary network is trained:

- its inputs are what the firewall already has for every image: the sanitized tensor (the
  model's input) and the model's logits on it (the shared forward pass), the logits sorted so
  that they say how confident the model is, not which class it chose;
- adversarial examples are crafted with ART against the protected ONNX model itself through its
  torch view (``detectors.gradients``), untargeted, on the raw pixels, then sanitized as the
  firewall would: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018; 10 steps of eps/4,
  a random start) at L-inf budgets eps of 0.1, 0.2, 0.3 for grey (MNIST) and 2, 4, 8, 16 /255 for
  colour (CIFAR-10) models, and, with ``--attacks cw``, Carlini-Wagner L2 (confidence 0, 3 binary
  search steps of 20 iterations, learning rate 0.1);
- each training image appears once clean and once crafted (the families and budgets assigned in
  turn); the clean copies vary as benign clients' images do (``benign_variant``: half sent at
  1.25-3 times the size, half with camera noise of sigma up to 3/255, 60 % re-encoded as JPEG of
  quality 30-95, each independently), so resampling, noise and compression artefacts are not what
  the detector learns (trained on plain clean copies, it flagged 48 % of MNIST digits sent as
  JPEG at quality 50 at its calibrated 5 % threshold);
- training images come from the data's training split only: MNIST images 0-7,999, CIFAR-10
  ``train/`` (a seeded sample of ``--limit`` images); a tenth of them is held back to report a
  validation ROC-AUC. The held-out images (MNIST 8,000-9,999, CIFAR-10 ``test/``) are for
  ``benchmarks/adversarial_detector.py`` only.

The detector is a 4-layer CNN (16-32 channels, global average pooling) joined with the sorted
logits in a 2-layer head, trained with Adam (lr 1e-3, batch 128) on the binary cross-entropy; the
exported ONNX graph takes ``image`` [N, C, H, W] and ``logits`` [N, K] and gives ``score`` [N],
the probability that the image is adversarial. The firewall stage (``detectors.adversarial``)
thresholds it at the calibrated benign rate.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Before torch loads OpenMP: threads that spin while waiting crawl on cores shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from sklearn.metrics import roc_auc_score
from torch import nn

from detectors.gradients import art_classifier
from detectors.sanitizer import Sanitizer, SanitizerConfig
from models.data import MNIST_IMAGES, MNIST_TRAIN, load_cifar10, load_mnist
from models.runtime import OnnxClassifier
from models.training import Stopwatch, seed_everything

ATTACKS = ("fgsm", "pgd", "cw")
EPSILONS = {1: (0.1, 0.2, 0.3), 3: (2 / 255, 4 / 255, 8 / 255, 16 / 255)}  # by the model's channels
JPEG_QUALITIES = (30, 95)
SCALES = (1.25, 1.5, 2.0, 3.0)
INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)
MAX_NOISE = 3.0  # sigma, in 8-bit levels
BATCH_SIZE = 128
VALIDATION_SHARE = 0.1


class DetectorNet(nn.Module):
    """Binary detector: (sanitized image, the model's logits) -> probability the image is adversarial."""

    def __init__(self, channels: int, classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.confidence = nn.BatchNorm1d(classes)  # logits' scale differs from model to model
        self.head = nn.Sequential(nn.Linear(2 * width + classes, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ranked = torch.sort(logits, dim=1, descending=True).values
        ranked = self.confidence(ranked - ranked[:, :1])  # gaps to the top class: class-agnostic confidence
        joined = torch.cat([self.features(image - 0.5), ranked], dim=1)
        return self.head(joined).squeeze(1)  # a logit; the export applies the sigmoid


def load_training_images(data: Path, channels: int, limit: int, seed: int) -> np.ndarray:
    """uint8 [N, H, W, C] from the training split only: MNIST images 0-7,999 or CIFAR-10 ``train/``."""
    if data.is_dir() and (data / MNIST_IMAGES).exists():
        images = load_mnist(data, *MNIST_TRAIN)[0][..., None]
    elif data.suffix == ".zip":
        images = load_cifar10(data, "train")[0]
    else:
        raise ValueError(f"{data}: expected the MNIST folder or the CIFAR-10 zip")
    if images.shape[-1] != channels:
        raise ValueError(f"{data} has {images.shape[-1]}-channel images; the model takes {channels}")
    if len(images) > limit:
        images = images[np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))]
    return images


def craft(classifier, pixels: np.ndarray, attack: str, eps: float | None) -> np.ndarray:
    """Untargeted examples from float [N, C, H, W] in [0, 1] against the model's own predictions."""
    from art.attacks import evasion

    if attack == "fgsm":
        method = evasion.FastGradientMethod(classifier, eps=eps, batch_size=BATCH_SIZE)
    elif attack == "pgd":
        method = evasion.ProjectedGradientDescent(
            classifier, eps=eps, eps_step=eps / 4, max_iter=10, num_random_init=1, batch_size=BATCH_SIZE, verbose=False
        )
    else:
        method = evasion.CarliniL2Method(
            classifier, confidence=0.0, learning_rate=0.1, binary_search_steps=3, max_iter=20,
            batch_size=BATCH_SIZE, verbose=False,
        )  # fmt: skip
    return method.generate(pixels.astype(np.float32)).astype(np.float32)


def benign_variant(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An HxWxC uint8 image as a benign client may send it: larger, noisier, JPEG-compressed, or as it is."""
    if rng.random() < 0.5:
        scale, interpolation = float(rng.choice(SCALES)), int(rng.choice(INTERPOLATIONS))
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation).reshape(
            round(scale * image.shape[0]), round(scale * image.shape[1]), image.shape[2]
        )
    if rng.random() < 0.5:
        image = np.clip(image + rng.normal(0.0, rng.uniform(0.0, MAX_NOISE), image.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.6:
        quality = int(rng.integers(*JPEG_QUALITIES, endpoint=True))
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
        image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED).reshape(image.shape)
    return image


def assignments(count: int, attacks: Sequence[str], epsilons: Sequence[float], rng: np.random.Generator) -> list[tuple[str, float | None]]:
    """The (family, budget) each training image is crafted with: families in turn, budgets at random."""
    return [(attacks[i % len(attacks)], None if attacks[i % len(attacks)] == "cw" else float(rng.choice(epsilons))) for i in range(count)]


def build_dataset(
    model: OnnxClassifier,
    sanitizer: Sanitizer,
    images: np.ndarray,
    attacks: Sequence[str],
    epsilons: Sequence[float],
    rng: np.random.Generator,
    log: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sanitized inputs, the model's logits on them and labels (1: adversarial), clean first."""
    classifier = art_classifier(model.path, model.input_shape, model.logits(np.zeros((1, *model.input_shape), np.float32)).shape[1])
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    crafted = np.empty_like(pixels)
    plan = assignments(len(images), attacks, epsilons, rng)
    clock = Stopwatch()
    for setting in sorted(set(plan), key=str):
        chosen = [i for i, assigned in enumerate(plan) if assigned == setting]
        crafted[chosen] = craft(classifier, pixels[chosen], *setting)
        log(f"crafted {len(chosen)} {setting[0]} eps={setting[1]} [{clock}]")
    clean = [benign_variant(image, rng) for image in images]
    inputs = np.concatenate([sanitizer(clean), sanitizer(list(crafted.transpose(0, 2, 3, 1)))])
    logits = np.concatenate([model.logits(inputs[i : i + BATCH_SIZE]) for i in range(0, len(inputs), BATCH_SIZE)])
    labels = np.r_[np.zeros(len(images)), np.ones(len(images))].astype(np.float32)
    return inputs, logits, labels


def train(
    inputs: np.ndarray, logits: np.ndarray, labels: np.ndarray, *, epochs: int, generator: torch.Generator,
    log: Callable[[str], None] = print,
) -> DetectorNet:  # fmt: skip
    net = DetectorNet(inputs.shape[1], logits.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, z, y = torch.from_numpy(inputs), torch.from_numpy(logits), torch.from_numpy(labels)
    clock = Stopwatch()
    for epoch in range(1, epochs + 1):
        net.train()
        total = 0.0
        for index in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
            loss = F.binary_cross_entropy_with_logits(net(x[index], z[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        log(f"epoch {epoch}/{epochs} loss {total / len(x):.4f} [{clock}]")
    return net.eval()


@torch.no_grad()
def scores(net: DetectorNet, inputs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    return torch.sigmoid(net.eval()(torch.from_numpy(inputs), torch.from_numpy(logits))).numpy()


class _Probability(nn.Module):
    def __init__(self, net: DetectorNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image, logits))


def export(net: DetectorNet, input_shape: tuple[int, int, int], classes: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _Probability(net.eval()),
        (torch.zeros(2, *input_shape), torch.zeros(2, classes)),
        str(path),
        input_names=["image", "logits"],
        output_names=["score"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "score": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="the protected classifier")
    parser.add_argument("--data", type=Path, required=True, help="the MNIST folder or the CIFAR-10 zip (training split used)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.onnx", help="e.g. models/mnist/adversarial_detector.onnx")
    parser.add_argument("--attacks", default="fgsm,pgd", help=f"comma-separated, of {', '.join(ATTACKS)} (default: %(default)s)")
    parser.add_argument("--eps", default=None, help="comma-separated L-inf budgets (default: 0.1,0.2,0.3 grey; 2,4,8,16/255 colour)")
    parser.add_argument("--limit", type=int, default=8000, help="training images (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--blur-sigma", type=float, default=0.7, help="the sanitizer's Gaussian sigma (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    attacks = [a for a in args.attacks.split(",") if a]
    if not attacks or any(a not in ATTACKS for a in attacks) or args.limit < 10 or args.epochs < 1:
        print(f"firewall train-detector: --attacks from {', '.join(ATTACKS)}; --limit at least 10; --epochs at least 1", file=sys.stderr)
        return 2
    try:
        model = OnnxClassifier(args.model, threads=args.threads, max_rows=BATCH_SIZE)
        epsilons = [float(e) for e in args.eps.split(",")] if args.eps else EPSILONS[model.input.channels]
        images = load_training_images(args.data, model.input.channels, args.limit, args.seed)
    except DecodeError:
        print(f"firewall train-detector: {args.model} is not an ONNX model", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
        print(f"firewall train-detector: {error}", file=sys.stderr)
        return 2
    clock = Stopwatch()
    generator = seed_everything(args.seed, args.threads)
    rng = np.random.default_rng(args.seed)
    sanitizer = Sanitizer(SanitizerConfig(blur_sigma=args.blur_sigma), model.input)
    log = lambda line: print(line, flush=True)
    inputs, logits, labels = build_dataset(model, sanitizer, images, attacks, epsilons, rng, log)
    held = np.zeros(len(images), bool)
    held[rng.choice(len(images), max(1, int(VALIDATION_SHARE * len(images))), replace=False)] = True
    held = np.r_[held, held]  # an image's clean and crafted copies stay on one side
    net = train(inputs[~held], logits[~held], labels[~held], epochs=args.epochs, generator=generator, log=log)
    auc = roc_auc_score(labels[held], scores(net, inputs[held], logits[held]))
    export(net, model.input_shape, logits.shape[1], args.out)
    print(f"wrote {args.out}: validation ROC-AUC {auc:.4f} ({', '.join(attacks)}; {held.sum()} images) [{clock}]")
    return 0
