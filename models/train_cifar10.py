"""Train the bundled CIFAR-10 classifier and export it to ONNX with its Dropout layers.

    python -m models.train_cifar10 --data ../shared/data/cifar10/cifar10-jpg.zip --out models/cifar10/model.onnx

A small VGG-style network (three double-conv blocks with BatchNorm) trained on the zip's ``train/``
JPEGs with random crops, flips and mild blur, SGD with a OneCycle schedule, sized to finish on two
CPU cores in well under an hour. Reports accuracy on the ``test/`` JPEGs, raw and 3x3-blurred,
measured on the exported ONNX file. Seeded and deterministic for a given thread count.
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
from models.data import load_cifar10
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

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # CIFAR-10 training-set RGB statistics
BATCH_SIZE = 128


def conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


def cifar10_cnn(width: int) -> nn.Sequential:
    w1, w2, w3 = width, 2 * width, 4 * width
    return nn.Sequential(
        Normalize(MEAN, STD),
        *conv_block(3, w1), *conv_block(w1, w1), nn.MaxPool2d(2),  # 16x16
        *conv_block(w1, w2), *conv_block(w2, w2), nn.MaxPool2d(2), nn.Dropout(0.25),  # 8x8
        *conv_block(w2, w3), *conv_block(w3, w3), nn.MaxPool2d(2), nn.Dropout(0.25),  # 4x4
        nn.Flatten(),
        nn.Linear(w3 * 4 * 4, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(256, 10),
    )  # fmt: skip


def as_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="cifar10-jpg.zip")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32, help="channels of the first block (then x2, x4)")
    parser.add_argument("--val-size", type=int, default=0, help="train images held back for validation")
    parser.add_argument("--lr", type=float, default=0.1, help="peak OneCycle learning rate (SGD, Nesterov)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("models/cifar10/model.onnx"))
    args = parser.parse_args(argv)

    generator = seed_everything(args.seed, args.threads)
    images, labels = as_tensors(*load_cifar10(args.data, "train"))
    shuffled = torch.randperm(len(images), generator=generator)  # the zip is sorted by class
    images, labels = images[shuffled], labels[shuffled]
    split = len(images) - args.val_size
    train_images, train_labels, val_images, val_labels = images[:split], labels[:split], images[split:], labels[split:]

    model = cifar10_cnn(args.width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * -(-len(train_images) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return random_gaussian_blur(random_translate(batch, 4, generator, flip=True), generator)

    clock = Stopwatch()
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(
            model, train_images, train_labels, batch_size=BATCH_SIZE, optimizer=optimizer, scheduler=scheduler,
            augment=augment, generator=generator, label_smoothing=0.1,
        )  # fmt: skip
        val = f" val {accuracy(model, val_images, val_labels):.4f}" if args.val_size else ""
        print(f"epoch {epoch}/{args.epochs} loss {loss:.4f}{val} [{clock}]", flush=True)

    export_onnx(model, (3, 32, 32), args.out)
    exported = OnnxClassifier(args.out, threads=args.threads)
    test_images, test_labels = load_cifar10(args.data, "test")
    raw = measure_accuracy(exported, test_images, test_labels)
    blurred = measure_accuracy(exported, test_images, test_labels, blur_sigma=0.7)
    print(f"exported {args.out}: test accuracy {raw:.4f} raw, {blurred:.4f} blurred (sigma 0.7) [{clock}]")


if __name__ == "__main__":
    main()
