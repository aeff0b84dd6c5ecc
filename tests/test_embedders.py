"""Embeddings for the probing detector: the normalized pixel thumbnail and an ONNX encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import TypeAdapter

from detectors.embedders import EmbeddingConfig, OnnxEmbedder, PixelEmbedder, normalize
from models.runtime import InputSpec

FIXTURES = Path(__file__).parent / "fixtures"
MNIST = InputSpec("input", 1, 28, 28)
CIFAR = InputSpec("input", 3, 32, 32)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.load(FIXTURES / "mnist_heldout.npz")["images"][:50, None].astype(np.float32) / 255.0


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1)


def test_pixel_embedding_is_a_unit_thumbnail(digits: np.ndarray) -> None:
    vectors = PixelEmbedder(MNIST, size=8, grey=True, centre=False)(digits)
    assert vectors.shape == (50, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors.mean(axis=1), 0.0, atol=1e-6)


def test_brightness_and_contrast_do_not_move_the_embedding(digits: np.ndarray) -> None:
    embed = PixelEmbedder(MNIST, size=8, grey=True, centre=False)
    np.testing.assert_allclose(embed(digits), embed(0.6 * digits + 0.3), atol=1e-5)


def test_blinding_noise_moves_it_far_less_than_another_digit(digits: np.ndarray) -> None:
    embed = PixelEmbedder(MNIST, size=8, grey=True, centre=False)
    noisy = np.clip(digits + np.random.default_rng(0).uniform(-0.05, 0.05, digits.shape), 0, 1).astype(np.float32)
    assert distance(embed(digits), embed(noisy)).max() < 0.1
    assert distance(embed(digits), embed(np.roll(digits, 1, axis=0))).min() > 0.2


def test_flat_images_stay_near_the_origin() -> None:
    flat = np.full((2, 1, 28, 28), 0.5, np.float32)
    flat[1] += np.random.default_rng(0).uniform(-0.01, 0.01, (1, 28, 28)).astype(np.float32)
    vectors = PixelEmbedder(MNIST, size=8, grey=True, centre=False)(flat)
    assert np.linalg.norm(vectors, axis=1).max() < 0.1


def test_colour_is_kept_or_averaged() -> None:
    batch = np.random.default_rng(0).random((3, 3, 32, 32)).astype(np.float32)
    assert PixelEmbedder(CIFAR, size=8, grey=False, centre=False)(batch).shape == (3, 192)
    assert PixelEmbedder(CIFAR, size=8, grey=True, centre=False)(batch).shape == (3, 64)
    assert PixelEmbedder(MNIST, size=64, grey=False, centre=False).dim == 28 * 28  # never finer than the input


def linear_encoder(path: Path, weights: np.ndarray, output_dims: list) -> Path:
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weights"], ["vector"]),
        ],
        "encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("vector", TensorProto.FLOAT, output_dims)],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_onnx_encoder_runs_in_onnx_runtime(tmp_path: Path, digits: np.ndarray) -> None:
    weights = np.random.default_rng(0).normal(size=(784, 16)).astype(np.float32)
    path = linear_encoder(tmp_path / "encoder.onnx", weights, ["N", 16])
    raw = OnnxEmbedder(path, normalized=False)
    assert raw.dim == 16
    np.testing.assert_allclose(raw(digits), digits.reshape(50, -1) @ weights, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        OnnxEmbedder(path, normalized=True)(digits), normalize(digits.reshape(50, -1) @ weights), atol=1e-5
    )


def test_onnx_encoder_must_output_fixed_size_vectors(tmp_path: Path) -> None:
    path = linear_encoder(tmp_path / "encoder.onnx", np.zeros((784, 4), np.float32), ["N", "D"])
    with pytest.raises(ValueError):
        OnnxEmbedder(path, normalized=True)


def test_embedding_config_picks_the_kind(tmp_path: Path) -> None:
    adapter = TypeAdapter(EmbeddingConfig)
    assert adapter.validate_python({"kind": "pixels", "size": 6}).build(MNIST).dim == 36
    path = linear_encoder(tmp_path / "encoder.onnx", np.zeros((784, 4), np.float32), ["N", 4])
    assert adapter.validate_python({"kind": "onnx", "path": str(path)}).build(MNIST).dim == 4
    with pytest.raises(ValueError):
        adapter.validate_python({"kind": "hash"})


def test_centring_makes_small_shifts_near_duplicates(digits: np.ndarray) -> None:
    border = np.ones((28, 28), bool)
    border[3:-3, 3:-3] = False
    inside = digits[digits[:, 0, border].sum(axis=1) == 0]
    shifted = np.roll(inside, (2, -2), axis=(2, 3))  # nothing wraps around
    centred = PixelEmbedder(MNIST, size=8, grey=True, centre=True)
    plain = PixelEmbedder(MNIST, size=8, grey=True, centre=False)
    assert len(inside) >= 10
    assert distance(centred(inside), centred(shifted)).max() < 0.05
    assert distance(plain(inside), plain(shifted)).min() > 3 * distance(centred(inside), centred(shifted)).max()
