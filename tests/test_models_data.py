"""Readers of the shared data sets; skipped on a machine without ../shared/data."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import CIFAR10_CLASSES, load_cifar10, load_mnist

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR, CIFAR10_ZIP = SHARED_DATA / "mnist", SHARED_DATA / "cifar10" / "cifar10-jpg.zip"


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="needs ../shared/data/mnist")
def test_mnist_slice_matches_the_fixture():
    images, labels = load_mnist(MNIST_DIR, 8000, 9000)
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    with np.load(FIXTURES / "mnist_heldout.npz") as fixture:
        assert int(fixture["first_index"]) == 8000
        np.testing.assert_array_equal(images, fixture["images"])
        np.testing.assert_array_equal(labels, fixture["labels"])


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="needs ../shared/data/mnist")
def test_mnist_default_range_is_all_ten_thousand():
    images, labels = load_mnist(MNIST_DIR)
    assert images.shape == (10000, 28, 28) and set(labels.tolist()) == set(range(10))


@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason="needs ../shared/data/cifar10/cifar10-jpg.zip")
def test_cifar10_test_split_matches_the_fixture_jpegs():
    images, labels = load_cifar10(CIFAR10_ZIP, "test")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    for label, name in enumerate(CIFAR10_CLASSES):
        for path in sorted((FIXTURES / "cifar10_test" / name).glob("*.jpg"))[:2]:
            index = label * 1000 + int(path.stem)  # sorted by class folder, then file number
            assert labels[index] == label
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(images[index], rgb)


def test_cifar10_classes_are_the_fixture_folders_in_order():
    assert list(CIFAR10_CLASSES) == sorted(p.name for p in (FIXTURES / "cifar10_test").iterdir())


def test_cifar10_unknown_split_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path / "unused.zip", "validation")
