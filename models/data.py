"""Readers for the shared data sets, straight from the files in ``../shared/data`` (nothing extracted).

- MNIST: the IDX files ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``; images 0-7,999
  are for training and calibration, 8,000-9,999 are held out for evaluation.
- CIFAR-10: ``cifar10-jpg.zip`` holding ``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``;
  labels follow the alphabetical order of the class folders.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
MNIST_TRAIN = (0, 8000)
MNIST_HELDOUT = (8000, 10000)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_SPLITS = ("train", "test")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array: magic (0, 0, dtype code, ndim), ndim big-endian uint32 sizes, then the data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:  # 0x08: unsigned bytes, the only type MNIST uses
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(data_dir: str | Path, start: int = 0, stop: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images ``start:stop`` as uint8 [N, 28, 28] and their labels as int64 [N]."""
    data_dir = Path(data_dir)
    images = _read_idx(data_dir / MNIST_IMAGES)
    labels = _read_idx(data_dir / MNIST_LABELS)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{data_dir}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images[start:stop].copy(), labels[start:stop].astype(np.int64)


def _decode_rgb(encoded: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("undecodable image in the archive")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_cifar10(zip_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split (``train`` or ``test``) as uint8 RGB [N, 32, 32, 3] and int64 labels, sorted by path."""
    if split not in CIFAR10_SPLITS:
        raise ValueError(f"split must be one of {CIFAR10_SPLITS}, got {split!r}")
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
        labels = np.array([class_index[n.split("/")[1]] for n in names], dtype=np.int64)
        encoded = [archive.read(n) for n in names]  # one reader: ZipFile serialises access anyway
    # cv2 releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = np.stack(list(pool.map(_decode_rgb, encoded, chunksize=256)))
    return images, labels
