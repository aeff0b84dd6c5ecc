"""Image decoding and the OpenCV sanitizing chain: the model only ever sees its output.

``read_header`` reads the dimensions, channels and bit depth from the file header (PNG, JPEG, BMP,
GIF, WebP) and refuses an image whose header announces more pixels or more decoded bytes than
allowed before OpenCV allocates anything for it, so a decompression bomb costs a few bytes of
parsing; ``decode_image`` then decodes to 8 bits (and large JPEGs at a reduced size).

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
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image's header announces, read before anything is decoded."""

    width: int
    height: int
    channels: int  # samples per pixel in the file (palette images count as the 3 they expand to)
    sample_bytes: int  # 1, or 2 for 16-bit (and 12-bit JPEG) samples
    grey: bool  # decoded as one channel
    reduction: int = 1  # JPEG only: decoded at 1/reduction of its size by libjpeg's DCT scaling

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """Bytes the decoder works through: pixels x channels x bytes per sample, at the decoded size."""
        return -(-self.width // self.reduction) * -(-self.height // self.reduction) * self.channels * self.sample_bytes


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # by colour type


def _png_header(data: bytes) -> ImageHeader:
    if data[12:16] != b"IHDR":
        raise InvalidImage()
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise InvalidImage()
    return ImageHeader(width, height, _PNG_CHANNELS[colour], 2 if depth == 16 else 1, grey=colour in (0, 4))


def _gif_header(data: bytes) -> ImageHeader:
    width, height = struct.unpack("<HH", data[6:10])
    return ImageHeader(width, height, 4, 1, grey=False)


def _bmp_header(data: bytes) -> ImageHeader:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # BITMAPCOREHEADER
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
    else:
        width, height, _, bits = struct.unpack("<iiHH", data[18:30])
    # negative height means top-down rows
    return ImageHeader(abs(width), abs(height), 4 if bits == 32 else 3, 1, grey=False)


_JPEG_START_OF_FRAME = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader:
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
            precision, height, width, components = struct.unpack(">BHHB", data[position + 4 : position + 10])
            if components not in (1, 3, 4):
                raise InvalidImage()
            return ImageHeader(width, height, components, 2 if precision > 8 else 1, grey=components == 1)
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        position += 2 + length
    raise InvalidImage()


def _webp_header(data: bytes) -> ImageHeader:
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
    return ImageHeader(width, height, 4, 1, grey=False)


def read_header(data: bytes, max_pixels: int, max_bytes: int | None = None, target_side: int | None = None) -> ImageHeader:
    """The header of an encoded image, checked against the limits; ``InvalidImage`` otherwise.

    An image announcing more than ``max_pixels`` pixels, or more than ``max_bytes`` decoded bytes
    (pixels x channels x bytes per sample: a 16-bit RGBA PNG counts 8 bytes a pixel), is refused
    here, before any decoder allocates anything. A JPEG at least 2, 4 or 8 times larger than
    ``4 * target_side`` on its short side is decoded at that fraction of its size (libjpeg scales in
    the DCT, so the full-size image never exists) and counted at the reduced size.
    """
    if len(data) < 32:
        raise InvalidImage()
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            header = _png_header(data)
        elif data.startswith(b"\xff\xd8"):
            header = _jpeg_header(data)
        elif data.startswith(b"BM"):
            header = _bmp_header(data)
        elif data.startswith((b"GIF87a", b"GIF89a")):
            header = _gif_header(data)
        elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            header = _webp_header(data)
        else:
            raise InvalidImage()
    except (struct.error, IndexError):
        raise InvalidImage() from None
    if header.width <= 0 or header.height <= 0 or header.pixels > max_pixels:
        raise InvalidImage()
    if target_side and data.startswith(b"\xff\xd8") and header.sample_bytes == 1 and header.channels != 4:
        short_side = min(header.width, header.height)
        reduction = next((f for f in (8, 4, 2) if short_side >= f * 4 * target_side), 1)
        header = replace(header, reduction=reduction)
    if max_bytes is not None and header.decoded_bytes > max_bytes:
        raise InvalidImage()
    return header


_REDUCED_FLAGS = {
    (False, 1): cv2.IMREAD_COLOR,
    (True, 1): cv2.IMREAD_GRAYSCALE,
    (False, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (False, 4): cv2.IMREAD_REDUCED_COLOR_4,
    (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def decode_image(data: bytes, max_pixels: int, header: ImageHeader | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode an encoded image to HxWxC uint8: grey 1 channel, colour 3 channels RGB (alpha dropped).

    The header is checked first (``read_header``), so a decompression bomb is refused from a few
    bytes of parsing. The decoder then writes 8-bit samples straight into the result (libpng
    strips 16-bit samples row by row: no 16-bit copy of the image ever exists), with the
    EXIF orientation ignored. Anything undecodable raises ``InvalidImage``.
    """
    if header is None:
        header = read_header(data, max_pixels, max_bytes)
    flags = _REDUCED_FLAGS[(header.grey, header.reduction)] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        raise InvalidImage() from None
    expected = (-(-header.height // header.reduction), -(-header.width // header.reduction))
    if image is None or image.dtype != np.uint8 or image.shape[:2] != expected:
        raise InvalidImage()
    if image.ndim == 2:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second full-size buffer


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
        if image.dtype == np.uint8 and image.ndim == 3 and min(image.shape[0] / self.spec.height, image.shape[1] / self.spec.width) > 4:
            # A large image is first shrunk in 8 bits (to twice the model's size), so no float copy
            # of it (4 bytes a sample) ever exists; smaller ones take the float path unchanged.
            shrunk = cv2.resize(image[:, :, :3], (2 * self.spec.width, 2 * self.spec.height), interpolation=cv2.INTER_AREA)
            image = shrunk if shrunk.ndim == 3 else shrunk[:, :, None]
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
