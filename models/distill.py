"""Defensive distillation of an MNIST classifier: `firewall distill TEACHER.onnx --data PATH --out OUT.onnx`.

Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to Adversarial Perturbations
against Deep Neural Networks", IEEE S&P 2016: (1) a network F is trained at temperature T, (2) its
softmax at T labels the training set, (3) a student of the same architecture is trained at T on
those soft labels, (4) the student is deployed at T = 1. Its deployed logits are then about T times
what the soft labels call for, the softmax saturates and its gradients vanish. T = 20 by default
(the paper's range is 1-100; it reports MNIST's adversarial success under 1 % from T = 20 on).

Step 1 is the given teacher, an ONNX file run with ONNX Runtime and trained at T = 1 like the
bundled model. A network trained at T learns logits z whose z / T is what a T = 1 network learns,
so F's softmax at T is the T = 1 teacher's plain softmax: the soft labels are softmax(teacher
logits). (Dividing the T = 1 teacher's logits by T instead only teaches the student the teacher's
own logits: measured, the deployed logit gap came out as the teacher's, 8.6 against 9.2, no defence.)
The student is ``models.train_mnist.mnist_cnn`` with its Dropout kept, so MC dropout still works,
trained on MNIST images 0-7,999 with the bundled model's augmentation; the exported graph is its
logits as they are (T = 1). Accuracy on the held-out images 8,000-9,999 is measured on the file.

The loss is T² times the KL divergence from the soft labels to the student's softmax at T (0 at a
perfect match; T² keeps the gradients the size they have at T = 1, Hinton, Vinyals & Dean 2015).

What it does not buy: the gradients are masked, not the adversarial examples removed. An attack on
the logits instead of the saturated softmax (Carlini & Wagner, 2016/2017) or examples crafted on
another model and transferred still succeed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Before torch loads OpenMP: threads that spin while waiting crawl on cores shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError

from models.accuracy import measure_accuracy
from models.data import MNIST_HELDOUT, MNIST_TRAIN, load_mnist
from models.runtime import OnnxClassifier
from models.train_mnist import BATCH_SIZE, as_tensors, mnist_cnn
from models.training import (
    Stopwatch,
    export_onnx,
    random_gaussian_blur,
    random_translate,
    seed_everything,
    train_epoch,
)

INPUT_SHAPE = (1, 28, 28)


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
    """Trains the student on uint8 ``images`` [N, 1, 28, 28] against the teacher's soft labels."""
    student = mnist_cnn().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * -(-len(images) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return random_gaussian_blur(random_translate(batch, 2, generator, flip=False), generator)

    def loss_fn(logits: torch.Tensor, batch: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        target = soft_labels(teacher, batch)
        tempered = F.log_softmax(logits / temperature, dim=1)
        return temperature**2 * F.kl_div(tempered, target, reduction="batchmean")

    unused_labels = torch.zeros(len(images), dtype=torch.int64)  # the teacher labels every batch
    clock = Stopwatch()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(
            student, images, unused_labels, batch_size=BATCH_SIZE, optimizer=optimizer, scheduler=scheduler,
            augment=augment, generator=generator, loss_fn=loss_fn,
        )  # fmt: skip
        log(f"epoch {epoch}/{epochs} loss {loss:.4f} [{clock}]")
    return student


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", type=Path, metavar="TEACHER.onnx", help="the MNIST classifier to distil")
    parser.add_argument("--data", type=Path, required=True, help="folder with the MNIST t10k IDX .gz files")
    parser.add_argument("--temperature", type=float, default=20.0, metavar="T", help="default: %(default)s")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.onnx", help="where the student goes")
    parser.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=0.01, help="peak OneCycle learning rate (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N of images 0-7,999 only")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    if args.temperature <= 0 or args.epochs < 1 or (args.limit is not None and args.limit < 1):
        print("firewall distill: --temperature must be positive, --epochs and --limit at least 1", file=sys.stderr)
        return 2
    start, stop = MNIST_TRAIN
    try:
        teacher = OnnxClassifier(args.teacher, threads=1, max_rows=BATCH_SIZE)
        if teacher.input_shape != INPUT_SHAPE:
            raise ValueError(f"the teacher takes {teacher.input_shape}; distill handles MNIST models {INPUT_SHAPE}")
        images, _ = as_tensors(*load_mnist(args.data, start, min(stop, start + (args.limit or stop))))
        heldout_images, heldout_labels = load_mnist(args.data, *MNIST_HELDOUT)
    except DecodeError:
        print(f"firewall distill: {args.teacher} is not an ONNX model", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"firewall distill: {error}", file=sys.stderr)
        return 2
    generator = seed_everything(args.seed, args.threads)
    student = distill(
        teacher, images, temperature=args.temperature, epochs=args.epochs, lr=args.lr, generator=generator,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    export_onnx(student, INPUT_SHAPE, args.out)
    exported = OnnxClassifier(args.out, threads=args.threads)
    for name, model in (("teacher", teacher), ("distilled", exported)):
        raw = measure_accuracy(model, heldout_images, heldout_labels)
        blurred = measure_accuracy(model, heldout_images, heldout_labels, blur_sigma=0.7)
        print(f"{name}: held-out 8000-9999 accuracy {raw:.4f} raw, {blurred:.4f} blurred (sigma 0.7)")
    return 0
