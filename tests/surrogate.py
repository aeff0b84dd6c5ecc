"""A small MNIST classifier of its own architecture: the attacker's surrogate for transfer attacks.

    python -m tests.surrogate --data ../shared/data/mnist --out tests/fixtures/mnist_surrogate.pt

A transfer attacker crafts white-box examples (FGSM, PGD, Carlini-Wagner) against a model it owns and
sends them to the protected one (Papernot et al., "Practical Black-Box Attacks against Machine
Learning", AsiaCCS 2017). The surrogate is trained on MNIST images 0-7,999 only, with a different
architecture from the bundled model, and its weights (about 100 KB) are a test fixture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIXTURE = Path(__file__).parent / "fixtures" / "mnist_surrogate.pt"


def surrogate() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def load_surrogate(path: Path = FIXTURE) -> nn.Module:
    model = surrogate()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def art_surrogate(path: Path = FIXTURE):
    """The surrogate as an ART classifier over pixels in [0, 1], shape [N, 1, 28, 28]."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        load_surrogate(path), loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0)
    )


def main() -> None:
    from models.data import MNIST_HELDOUT, MNIST_TRAIN, load_mnist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the MNIST folder")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = load_mnist(args.data, *MNIST_TRAIN)
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    y = torch.from_numpy(labels.astype(np.int64))
    model = surrogate()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    held_images, held_labels = load_mnist(args.data, *MNIST_HELDOUT)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(held_images[:, None].astype(np.float32) / 255)).argmax(1)
    print(f"held-out accuracy {(predicted.numpy() == held_labels).mean():.4f}")
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
