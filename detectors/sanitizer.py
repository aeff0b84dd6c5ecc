"""Image decoding and the OpenCV sanitizing chain: the model only ever sees its output.

``decode_image`` reads the dimensions from the file header (PNG, JPEG, BMP, GIF, WebP) and refuses
an image whose header announces more pixels than allowed before OpenCV allocates anything for it,
so a decompression bomb costs a few bytes of parsing.

``Sanitizer`` brings any HxWxC input (1, 3 or 4 channels, uint8 or float32 in [0, 1]) to the model's
input: drop alpha, colour to greyscale for a one-channel model (grey to three channels for a colour
one), resize with ``INTER_AREA``, Gaussian blur, then optionally the squeezers of Feature Squeezing
(W. Xu, D. Evans, Y. Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018): bit-depth reduction (MNIST 1 bit, CIFAR-10 5 bits) and a median filter
(2x2 for both). Blur and squeezing wash out the small high-frequency perturbations that
gradient attacks rely on; the bundled models are trained with mild blur so the default costs them
no accuracy.
"""

from __future__ import annotations

import struct
from typing import Sequence

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from firewall.stage import Finding, RequestContext
from models.runtime import InputSpec, OnnxClassifier


class InvalidImage(ValueError):
    """The bytes are not an image this firewall accepts. The message is safe to show a client."""

    def __init__(self) -> None:
        super().__init__("invalid or unsupported image")


# ---------------------------------------------------------------------------------------------
# Decoding


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise InvalidImage()
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gif_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack("<HH", data[6:10])
    return width, height


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height means top-down rows


_JPEG_START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise InvalidImage()
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_START_OF_FRAME:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        position += 2 + length
    raise InvalidImage()


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise InvalidImage()
        (bits,) = struct.unpack("<I", data[21:25])
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise InvalidImage()
        width, height = struct.unpack("<HH", data[26:30])
        width, height = width & 0x3FFF, height & 0x3FFF
    else:
        raise InvalidImage()
    return width, height


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) announced by the file header; InvalidImage for any other format."""
    if len(data) < 32:
        raise InvalidImage()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM"):
        return _bmp_size(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return _gif_size(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_size(data)
    raise InvalidImage()


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an encoded image to HxWxC uint8: grey 1 channel, colour RGB, alpha kept as a 4th channel.

    The header is checked first: an image announcing more than ``max_pixels`` pixels (or none) is
    refused before it is decoded. Anything undecodable raises ``InvalidImage``.
    """
    try:
        width, height = _header_size(data)
    except (struct.error, IndexError):
        raise InvalidImage() from None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise InvalidImage()
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        raise InvalidImage() from None
    if image is None or image.size == 0 or image.shape[0] * image.shape[1] > max_pixels:
        raise InvalidImage()
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InvalidImage()
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    raise InvalidImage()


# ---------------------------------------------------------------------------------------------
# Sanitizing


class SanitizerConfig(BaseModel):
    """The per-model OpenCV chain. Blur is on by default; the squeezers are opt-in."""

    model_config = ConfigDict(extra="forbid")

    blur_kernel: int = Field(3, ge=0, description="Gaussian kernel size (odd); 0 or 1 disables the blur")
    blur_sigma: float = Field(0.7, ge=0.0, description="Gaussian sigma; 0 lets OpenCV derive it from the kernel")
    bit_depth: int | None = Field(None, ge=1, le=8, description="bits kept per channel (Feature Squeezing)")
    median_size: int | None = Field(None, ge=2, le=7, description="median filter window, e.g. 2 for 2x2")

    @model_validator(mode="after")
    def _odd_kernel(self) -> SanitizerConfig:
        if self.blur_kernel > 1 and self.blur_kernel % 2 == 0:
            raise ValueError("blur_kernel must be odd")
        return self

    def build(self, model: OnnxClassifier) -> SanitizeStage:
        return SanitizeStage(Sanitizer(self, model.input))


def reduce_bit_depth(images: np.ndarray, bits: int) -> np.ndarray:
    """Quantize values in [0, 1] to 2**bits levels (Feature Squeezing's colour-depth squeezer)."""
    levels = 2**bits - 1
    return np.round(images * levels) / levels


def median_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Median over a size x size window of an HxWxC image, edges mirrored.

    Even windows are anchored like scipy.ndimage.median_filter (the 2x2 filter of Feature
    Squeezing takes the upper median of each pixel, its left, upper and upper-left neighbours).
    """
    before, after = size // 2, size - 1 - size // 2
    padded = np.pad(image, ((before, after), (before, after), (0, 0)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(0, 1))
    flat = windows.reshape(*image.shape, size * size)
    rank = (size * size) // 2
    return np.partition(flat, rank, axis=-1)[..., rank]


def squeeze(images: np.ndarray, bit_depth: int | None, median_size: int | None) -> np.ndarray:
    """Apply the Feature Squeezing squeezers to a float32 [B, C, H, W] batch in [0, 1]."""
    squeezed = images
    if bit_depth is not None:
        squeezed = reduce_bit_depth(squeezed, bit_depth)
    if median_size is not None:
        squeezed = np.stack(
            [median_filter(image.transpose(1, 2, 0), median_size).transpose(2, 0, 1) for image in squeezed]
        )
    return squeezed.astype(np.float32, copy=False)


class Sanitizer:
    """Turns a list of HxWxC images into the model's float32 [B, C, H, W] batch in [0, 1]."""

    def __init__(self, config: SanitizerConfig, spec: InputSpec):
        self.config = config
        self.spec = spec

    def _to_float(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError("image must be HxWxC with 1, 3 or 4 channels")
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        if np.issubdtype(image.dtype, np.floating):
            return np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
        raise ValueError("image must be uint8 or float in [0, 1]")

    def _one(self, image: np.ndarray) -> np.ndarray:
        pixels = self._to_float(image)[:, :, :3]  # alpha dropped
        if self.spec.channels == 1 and pixels.shape[2] == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        elif self.spec.channels == 3 and pixels.shape[2] == 1:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
        if pixels.shape[:2] != (self.spec.height, self.spec.width):
            pixels = cv2.resize(pixels, (self.spec.width, self.spec.height), interpolation=cv2.INTER_AREA)
        if self.config.blur_kernel > 1:
            kernel = (self.config.blur_kernel, self.config.blur_kernel)
            pixels = cv2.GaussianBlur(pixels, kernel, self.config.blur_sigma, borderType=cv2.BORDER_REFLECT)
        if pixels.ndim == 2:  # OpenCV drops a single channel axis
            pixels = pixels[:, :, None]
        return pixels.transpose(2, 0, 1)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, *self._shape()), np.float32)
        batch = np.stack([self._one(image) for image in images]).astype(np.float32, copy=False)
        batch = squeeze(batch, self.config.bit_depth, self.config.median_size)
        return np.clip(batch, 0.0, 1.0, out=batch)

    def _shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.height, self.spec.width)


class SanitizeStage:
    """Pipeline stage: fills ``ctx.tensor`` with the sanitized batch. Raises no finding."""

    name = "sanitize"

    def __init__(self, sanitizer: Sanitizer):
        self.sanitizer = sanitizer

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        ctx.tensor = self.sanitizer(ctx.images)
        return []
