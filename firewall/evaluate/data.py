"""The evaluation images: held-out data only, read from the path the user gives.

Accepted ``--data`` paths:
- a folder holding the MNIST IDX files (``t10k-images-idx3-ubyte.gz``): test images 8,000-9,999;
- the CIFAR-10 archive ``cifar10-jpg.zip``, or a folder holding it: its 10,000 test images;
- an ``.npz`` file with ``images`` (uint8 [N,H,W] or [N,H,W,C]) and ``labels`` (like the test fixtures);
- a folder of class folders of images (``<class>/<file>.jpg``), labelled in alphabetical class order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from firewall.evaluate.errors import EvaluationError
from models.data import MNIST_HELDOUT, MNIST_IMAGES, load_cifar10, load_mnist

CIFAR10_ARCHIVE = "cifar10-jpg.zip"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Largest L2 distortion (pixels in [0, 1]) that still counts as an attack success, by the usual
# conventions of the decision-based attack papers: 2.0 on greyscale MNIST, 0.5 on colour CIFAR-10.
DEFAULT_MAX_L2 = {1: 2.0, 3: 0.5}


class DataError(EvaluationError):
    """The data path does not hold a usable data set."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def default_max_l2(self) -> float:
        return DEFAULT_MAX_L2.get(self.channels, 0.5)


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    try:
        if path.suffix == ".npz":
            return _from_npz(path)
        if path.suffix == ".zip":
            return _as_dataset("cifar10", *load_cifar10(path, "test"))
        if (path / MNIST_IMAGES).exists():
            return _as_dataset("mnist", *load_mnist(path, *MNIST_HELDOUT))
        if (path / CIFAR10_ARCHIVE).exists():
            return _as_dataset("cifar10", *load_cifar10(path / CIFAR10_ARCHIVE, "test"))
        if path.is_dir():
            return _from_class_folders(path)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    raise DataError(f"{path} is not a data set (expected an MNIST folder, {CIFAR10_ARCHIVE}, an .npz or class folders)")


def _as_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels) or not len(images):
        raise DataError(f"{name}: expected uint8 images [N,H,W] or [N,H,W,C] with one label each")
    if images.ndim == 3:
        images = images[..., None]
    return Dataset(name, np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64))


def _from_npz(path: Path) -> Dataset:
    with np.load(path) as data:
        return _as_dataset(path.stem, data["images"], data["labels"])


def _from_class_folders(root: Path) -> Dataset:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, folder in enumerate(classes):
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DataError(f"cannot decode {file}")
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            labels.append(label)
    if not images:
        raise DataError(f"{root} holds no class folders of images")
    if len({image.shape for image in images}) != 1:
        raise DataError(f"{root}: the images differ in size")
    return _as_dataset(root.name, np.stack(images), np.array(labels))
