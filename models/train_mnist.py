"""Train the bundled MNIST classifier and export it to ONNX with its Dropout layers.

    python -m models.train_mnist --data ../shared/data/mnist --out models/mnist/model.onnx

Trains on MNIST images 0-7,999 (the last ``--val-size`` of them held back for validation, 0 for the
final model) and reports accuracy on the held-out images 8,000-9,999, raw and 3x3-blurred, measured
on the exported ONNX file. Seeded and deterministic for a given thread count.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Before torch loads OpenMP: threads that spin while waiting crawl on cores shared with other work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from models.accuracy import measure_accuracy
from models.data import MNIST_HELDOUT, MNIST_TRAIN, load_mnist
from models.runtime import OnnxClassifier
from models.training import (
    Normalize,
    Stopwatch,
    accuracy,
    export_onnx,
    random_gaussian_blur,
    random_translate,
    seed_everything,
    train_epoch,
)

MEAN, STD = [0.1307], [0.3081]  # MNIST pixel statistics
BATCH_SIZE = 64


def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


def mnist_cnn() -> nn.Sequential:
    return nn.Sequential(
        Normalize(MEAN, STD),
        *conv_block(1, 32), *conv_block(32, 32), nn.MaxPool2d(2), nn.Dropout(0.25),  # 14x14
        *conv_block(32, 64), *conv_block(64, 64), nn.MaxPool2d(2), nn.Dropout(0.25),  # 7x7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )  # fmt: skip


def as_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the MNIST t10k IDX .gz files")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=0, help="train images held back for validation")
    parser.add_argument("--lr", type=float, default=0.01, help="peak OneCycle learning rate (SGD, Nesterov)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("models/mnist/model.onnx"))
    args = parser.parse_args(argv)

    generator = seed_everything(args.seed, args.threads)
    images, labels = as_tensors(*load_mnist(args.data, *MNIST_TRAIN))
    split = len(images) - args.val_size
    train_images, train_labels, val_images, val_labels = images[:split], labels[:split], images[split:], labels[split:]

    model = mnist_cnn().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * -(-len(train_images) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return random_gaussian_blur(random_translate(batch, 2, generator, flip=False), generator)

    clock = Stopwatch()
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(
            model, train_images, train_labels, batch_size=BATCH_SIZE, optimizer=optimizer, scheduler=scheduler,
            augment=augment, generator=generator,
        )  # fmt: skip
        val = f" val {accuracy(model, val_images, val_labels):.4f}" if args.val_size else ""
        print(f"epoch {epoch}/{args.epochs} loss {loss:.4f}{val} [{clock}]", flush=True)

    export_onnx(model, (1, 28, 28), args.out)
    exported = OnnxClassifier(args.out, threads=args.threads)
    heldout_images, heldout_labels = load_mnist(args.data, *MNIST_HELDOUT)
    raw = measure_accuracy(exported, heldout_images, heldout_labels)
    blurred = measure_accuracy(exported, heldout_images, heldout_labels, blur_sigma=0.7)
    print(f"exported {args.out}: held-out 8000-9999 accuracy {raw:.4f} raw, {blurred:.4f} blurred (sigma 0.7) [{clock}]")


if __name__ == "__main__":
    main()
