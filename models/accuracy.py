"""Re-measure a model file's accuracy on the evaluation split: `firewall accuracy MODEL.onnx --data PATH`.

The evaluation split is MNIST images 8,000-9,999 or the 10,000 CIFAR-10 ``test/`` JPEGs, never
used in training. ``--data`` takes the shared data (the MNIST folder, the CIFAR-10 zip) or the
committed fixtures (``tests/fixtures/mnist_heldout.npz``, ``tests/fixtures/cifar10_test/``).
``--blur-sigma`` first blurs each image with a 3x3 Gaussian, as the firewall's sanitiser does.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from google.protobuf.message import DecodeError

from models.data import CIFAR10_CLASSES, MNIST_HELDOUT, load_cifar10, load_mnist
from models.runtime import OnnxClassifier

DATASETS = ("mnist", "cifar10")


def evaluation_split(dataset: str, data: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ([N,28,28] or [N,32,32,3] RGB) and int64 labels of the evaluation split."""
    data = Path(data)
    if dataset == "mnist":
        if data.suffix == ".npz":
            with np.load(data) as fixture:
                return fixture["images"], fixture["labels"].astype(np.int64)
        return load_mnist(data, *MNIST_HELDOUT)
    if dataset == "cifar10":
        if data.is_dir():
            return _read_jpeg_folders(data)
        return load_cifar10(data, "test")
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _read_jpeg_folders(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        for path in sorted((root / name).glob("*.jpg")):
            images.append(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
            labels.append(label)
    if not images:
        raise ValueError(f"{root} holds no <class>/*.jpg images")
    return np.stack(images), np.array(labels, dtype=np.int64)


def to_model_input(images: np.ndarray, blur_sigma: float | None = None) -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] to float32 [N,C,H,W] in [0, 1], optionally 3x3-Gaussian blurred."""
    batch = images.astype(np.float32) / 255.0
    if blur_sigma:
        batch = np.stack([cv2.GaussianBlur(image, (3, 3), blur_sigma) for image in batch])
    if batch.ndim == 3:
        batch = batch[..., np.newaxis]
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def measure_accuracy(
    model: OnnxClassifier, images: np.ndarray, labels: np.ndarray, *, blur_sigma: float | None = None,
    batch_size: int = 500,
) -> float:  # fmt: skip
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], blur_sigma)
        correct += int((model.predict(batch) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX classifier to measure")
    parser.add_argument(
        "--data", type=Path, required=True,
        help="MNIST folder or mnist_heldout.npz; CIFAR-10 zip or a <class>/*.jpg folder",
    )  # fmt: skip
    parser.add_argument("--dataset", choices=DATASETS, help="default: mnist for 1-channel models, else cifar10")
    parser.add_argument("--blur-sigma", type=float, default=None, metavar="S", help="3x3 Gaussian blur first")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: %(default)s)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        model = OnnxClassifier(args.model, threads=args.threads)
        dataset = args.dataset or ("mnist" if model.input.channels == 1 else "cifar10")
        images, labels = evaluation_split(dataset, args.data)
        expected = (model.input.height, model.input.width)
        if images.shape[1:3] != expected:
            raise ValueError(f"{dataset} images are {images.shape[1:3]} but the model takes {expected}")
        score = measure_accuracy(model, images, labels, blur_sigma=args.blur_sigma)
    except DecodeError:
        print(f"firewall accuracy: {args.model} is not an ONNX model", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
        print(f"firewall accuracy: {error}", file=sys.stderr)
        return 2
    report = {
        "model": str(args.model),
        "dataset": dataset,
        "data": str(args.data),
        "images": len(images),
        "blur_sigma": args.blur_sigma,
        "accuracy": round(score, 4),
    }
    print(json.dumps(report))
    return 0
