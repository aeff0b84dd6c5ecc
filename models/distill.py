"""Defensive distillation of a bundled classifier: `firewall distill TEACHER.onnx --data PATH --out OUT.onnx`.

Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to Adversarial Perturbations
against Deep Neural Networks", IEEE S&P 2016: (1) a network F is trained at temperature T, (2) its
softmax at T labels the training set, (3) a student of the same architecture is trained at T on
those soft labels, (4) the student is deployed at T = 1. Its deployed logits are then about T times
what the soft labels call for, the softmax saturates and its gradients vanish. T = 20 by default
(the paper's range is 1-100; it reports MNIST's adversarial success under 1 % from T = 20 on, and
95 % falling to under 0.5 % on a studied network).

Step 1 is the given teacher, an ONNX file run with ONNX Runtime and trained at T = 1 like the
bundled models. A network trained at T learns logits z whose z / T is what a T = 1 network learns,
so F's softmax at T is the T = 1 teacher's plain softmax: the soft labels are softmax(teacher
logits). (Dividing the T = 1 teacher's logits by T instead only teaches the student the teacher's
own logits: measured, the deployed logit gap came out as the teacher's, 8.6 against 9.2, no defence.)

The teacher's input shape picks the recipe, one code path for both bundled data sets: a 1 x 28 x 28
teacher gets ``models.train_mnist.mnist_cnn`` trained on MNIST images 0-7,999 (accuracy measured on
8,000-9,999), a 3 x 32 x 32 one ``models.train_cifar10.cifar10_cnn`` (width 32) trained on the
CIFAR-10 zip's ``train/`` JPEGs (accuracy measured on ``test/``), each with its bundled model's
augmentation, batch size and learning rate. The teacher labels every augmented batch as the student
sees it. Dropout is kept, so MC dropout still works; the exported graph is the student's logits as
they are (T = 1). Accuracy on the evaluation split is measured on the exported file.

The loss is T² times the KL divergence from the soft labels to the student's softmax at T (0 at a
perfect match; T² keeps the gradients the size they have at T = 1, Hinton, Vinyals & Dean 2015).

What it does not buy: the gradients are masked, not the adversarial examples removed. An attack on
the logits instead of the saturated softmax (Carlini & Wagner, 2016/2017) or examples crafted on
another model and transferred still succeed (``benchmarks/distillation.py`` measures both).
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: threads that spin while waiting crawl on cores shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from torch import nn

from models import train_cifar10, train_mnist
from models.accuracy import evaluation_split, measure_accuracy
from models.data import MNIST_TRAIN, load_cifar10, load_mnist
from models.runtime import OnnxClassifier
from models.training import (
    Stopwatch,
    export_onnx,
    random_gaussian_blur,
    random_translate,
    seed_everything,
    train_epoch,
)


@dataclass(frozen=True)
class Recipe:
    """How a bundled model of one input shape is trained; the student is trained the same way."""

    dataset: str  # names the evaluation split (models.accuracy.evaluation_split)
    network: Callable[[], nn.Module]
    batch_size: int
    lr: float  # peak OneCycle learning rate
    max_shift: int  # random translation, pixels
    flip: bool  # random horizontal mirror
    training_images: Callable[[Path], torch.Tensor]  # uint8 [N, C, H, W]


RECIPES: dict[tuple[int, int, int], Recipe] = {
    (1, 28, 28): Recipe(
        "mnist", train_mnist.mnist_cnn, train_mnist.BATCH_SIZE, lr=0.01, max_shift=2, flip=False,
        training_images=lambda data: train_mnist.as_tensors(*load_mnist(data, *MNIST_TRAIN))[0],
    ),
    (3, 32, 32): Recipe(
        "cifar10", lambda: train_cifar10.cifar10_cnn(32), train_cifar10.BATCH_SIZE, lr=0.1, max_shift=4, flip=True,
        training_images=lambda data: train_cifar10.as_tensors(*load_cifar10(data, "train"))[0],
    ),
}  # fmt: skip


def recipe_for(teacher: OnnxClassifier) -> Recipe:
    if teacher.input_shape not in RECIPES:
        shapes = " or ".join(str(shape) for shape in RECIPES)
        raise ValueError(f"the teacher takes {teacher.input_shape}; distill handles models taking {shapes}")
    return RECIPES[teacher.input_shape]


def soft_labels(teacher: OnnxClassifier, batch: torch.Tensor) -> torch.Tensor:
    """F's softmax at T on a float batch in [0, 1]: the T = 1 teacher's plain softmax (module docstring)."""
    return F.softmax(torch.from_numpy(teacher.logits(batch.contiguous().numpy())), dim=1)


def distill(
    teacher: OnnxClassifier,
    images: torch.Tensor,
    *,
    temperature: float,
    epochs: int,
    lr: float,
    generator: torch.Generator,
    log: Callable[[str], None] = print,
) -> torch.nn.Module:
    """Trains a student of the teacher's recipe on uint8 ``images`` [N, C, H, W] against its soft labels."""
    recipe = recipe_for(teacher)
    student = recipe.network().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * -(-len(images) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return random_gaussian_blur(random_translate(batch, recipe.max_shift, generator, flip=recipe.flip), generator)

    def loss_fn(logits: torch.Tensor, batch: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        target = soft_labels(teacher, batch)
        tempered = F.log_softmax(logits / temperature, dim=1)
        return temperature**2 * F.kl_div(tempered, target, reduction="batchmean")

    unused_labels = torch.zeros(len(images), dtype=torch.int64)  # the teacher labels every batch
    clock = Stopwatch()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(
            student, images, unused_labels, batch_size=recipe.batch_size, optimizer=optimizer, scheduler=scheduler,
            augment=augment, generator=generator, loss_fn=loss_fn,
        )  # fmt: skip
        log(f"epoch {epoch}/{epochs} loss {loss:.4f} [{clock}]")
    return student


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "teacher", type=Path, metavar="TEACHER.onnx", help="the classifier to distil (MNIST or CIFAR-10 input)"
    )
    parser.add_argument("--data", type=Path, required=True, help="MNIST folder (t10k IDX .gz files) or CIFAR-10 zip")
    parser.add_argument("--temperature", type=float, default=20.0, metavar="T", help="default: %(default)s")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.onnx", help="where the student goes")
    parser.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=None, help="peak OneCycle learning rate (default: MNIST 0.01, CIFAR-10 0.1)")
    parser.add_argument("--limit", type=int, default=None, help="train on a seeded random N of the training images")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    invalid_limit = args.limit is not None and args.limit < 1
    if args.temperature <= 0 or (args.lr is not None and args.lr <= 0) or args.epochs < 1 or invalid_limit:
        print("firewall distill: --temperature and --lr must be positive, --epochs and --limit at least 1", file=sys.stderr)
        return 2
    try:
        teacher = OnnxClassifier(args.teacher, threads=args.threads)
        recipe = recipe_for(teacher)
        images = recipe.training_images(args.data)
        heldout_images, heldout_labels = evaluation_split(recipe.dataset, args.data)
    except DecodeError:
        print(f"firewall distill: {args.teacher} is not an ONNX model", file=sys.stderr)
        return 2
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        print(f"firewall distill: {error}", file=sys.stderr)
        return 2
    if args.limit is not None:  # a random subset: the CIFAR-10 zip is sorted by class
        subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
        images = images[subset.sort().values]
    generator = seed_everything(args.seed, args.threads)
    student = distill(
        teacher, images, temperature=args.temperature, epochs=args.epochs, lr=args.lr or recipe.lr,
        generator=generator, log=lambda line: print(line, flush=True),
    )  # fmt: skip
    export_onnx(student, teacher.input_shape, args.out)
    exported = OnnxClassifier(args.out, threads=args.threads)
    for name, model in (("teacher", teacher), ("distilled", exported)):
        raw = measure_accuracy(model, heldout_images, heldout_labels)
        blurred = measure_accuracy(model, heldout_images, heldout_labels, blur_sigma=0.7)
        print(f"{name}: {recipe.dataset} evaluation split accuracy {raw:.4f} raw, {blurred:.4f} blurred (sigma 0.7)")
    return 0
