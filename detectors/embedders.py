"""Embeddings for the probing detector: a sanitized batch in, one short vector per image out.

The default is a normalized low-resolution pixel embedding, the "pixel" encoder of Chen, Carlini &
Wagner, "Stateful Detection of Black-Box Adversarial Attacks" (2019) without training: each image
is averaged down to ``size`` x ``size`` cells (``INTER_AREA``), its mean is removed and it is scaled
to unit length. Averaging 3x3 to 4x4 pixel blocks cancels most of the per-pixel noise that
decision-based attacks add (and that an attacker adds on purpose to blind a hash-based detector),
while removing mean and scale makes the blends ``(1 - a) x + a noise`` of their binary searches
land next to ``x``. A near-constant image is scaled by a floor instead, so blank images sit
together near the origin rather than being blown up into random directions.

The option is any ONNX encoder that maps the model input [N, C, H, W] to [N, D] (for example the
similarity encoder that Chen et al. train with a contrastive loss), its output optionally
normalized the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Protocol, Union

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from models.runtime import InputSpec, default_providers, session_options

NORM_FLOOR_PER_DIM = 0.05  # a vector whose centred values have an RMS under this is "flat"


class Embedder(Protocol):
    dim: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Remove each row's mean and scale it to unit length (a floor keeps flat rows short)."""
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    floor = NORM_FLOOR_PER_DIM * np.sqrt(vectors.shape[1])
    return (centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), floor)).astype(np.float32)


def centred(image: np.ndarray) -> np.ndarray:
    """The image (H x W x C) shifted so that its centre of mass, the weight of each pixel being its
    distance from the median, lies at the centre: the same content shifted by a few pixels (camera
    jitter, or an attacker shifting each query to look new) then embeds to the same vector."""
    weights = np.abs(image - np.median(image)).sum(axis=2) if image.ndim == 3 else np.abs(image - np.median(image))
    total = float(weights.sum())
    if total <= 1e-6:
        return image
    height, width = weights.shape
    dy = (height - 1) / 2 - float(weights.sum(axis=1) @ np.arange(height)) / total
    dx = (width - 1) / 2 - float(weights.sum(axis=0) @ np.arange(width)) / total
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(image, shift, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return moved.reshape(image.shape)


class PixelEmbedder:
    """Normalized ``size`` x ``size`` thumbnail of each image; colour kept or averaged to grey;
    optionally centred on its centre of mass first."""

    def __init__(self, spec: InputSpec, size: int, grey: bool, centre: bool):
        self.size = min(size, spec.height, spec.width)
        self.grey = grey or spec.channels == 1
        self.centre = centre
        self.dim = self.size * self.size * (1 if self.grey else spec.channels)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        images = batch.mean(axis=1, keepdims=True) if self.grey else batch
        cells = []
        for image in images.astype(np.float32, copy=False):
            pixels = image.transpose(1, 2, 0)
            pixels = centred(pixels) if self.centre else pixels
            cells.append(cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_AREA).ravel())
        return normalize(np.stack(cells).reshape(len(batch), self.dim))


class OnnxEmbedder:
    """Any ONNX encoder taking the model input [N, C, H, W] to vectors [N, D]."""

    def __init__(self, path: Path, normalized: bool, threads: int = 1):
        proto = onnx.load(str(path))
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(threads), providers=default_providers()
        )
        self.input_name = self.session.get_inputs()[0].name
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        if len(dims) != 2 or dims[1].dim_value <= 0:
            raise ValueError(f"encoder {path} must output [N, D] with a fixed D")
        self.dim = dims[1].dim_value
        self.normalized = normalized

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        vectors = self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]
        vectors = vectors.reshape(len(batch), self.dim).astype(np.float32)
        return normalize(vectors) if self.normalized else vectors


class PixelEmbeddingConfig(BaseModel):
    """A shift-centred, normalized thumbnail of each query (Chen, Carlini & Wagner 2019)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pixels"] = Field("pixels", description="a normalized low-resolution thumbnail")
    size: int = Field(8, ge=2, le=64, description="side of the low-resolution grid, in cells")
    grey: bool = Field(True, description="average colour channels before embedding")
    centre: bool = Field(True, description="shift each image to its centre of mass first (shift-invariant)")

    def build(self, spec: InputSpec) -> Embedder:
        return PixelEmbedder(spec, self.size, self.grey, self.centre)


class OnnxEmbeddingConfig(BaseModel):
    """An ONNX encoder of your own (for example a similarity encoder trained for this model)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["onnx"] = Field(description="an ONNX encoder")
    path: Path = Field(description="ONNX encoder: model input [N, C, H, W] -> [N, D]")
    normalize: bool = Field(True, description="scale each embedding to unit length")

    def build(self, spec: InputSpec) -> Embedder:
        return OnnxEmbedder(self.path, self.normalize)


EmbeddingConfig = Annotated[Union[PixelEmbeddingConfig, OnnxEmbeddingConfig], Field(discriminator="kind")]
