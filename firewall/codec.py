"""Tensor codec: the public `image` input in, the public `label` output out.

Accepted input, one tensor named ``image``:
  - BYTES  [B]                      encoded images (PNG, JPEG, ...), raw form length-prefixed
  - UINT8  [B, H, W] or [B, H, W, C] pixels
  - FP32   [B, H, W] or [B, H, W, C] pixels in [0, 1]
given as ``raw_input_contents`` or as typed ``contents``. Everything a client sends is checked
before any buffer is trusted: dtype, shape, byte length against shape, finite values, batch and
pixel limits. The output is exactly one tensor ``label``, INT64 [B], always as raw contents.

Checking and decoding are two steps. ``plan_request`` is cheap (shapes, byte counts, image headers,
no pixel decoded) and tells how many bytes decoding will produce (``Plan.decoded_bytes``), so the
service can refuse or budget the work before it is queued; ``decode_plan`` does the decoding.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np

from detectors.sanitizer import ImageHeader, InvalidImage, decode_image, read_header
from firewall.errors import InvalidInput
from firewall.protocol import pb

INPUT_NAME = "image"
OUTPUT_NAME = "label"
CHANNELS = (1, 3, 4)
_PIXEL_DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_pixels: int  # per image, height * width
    max_image_bytes: int | None = None  # per image, decoded: pixels x channels x bytes per sample
    max_request_bytes: int | None = None  # all images of a request together, decoded
    target_side: int | None = None  # the model's larger input side: large JPEGs decode at a reduced size


@dataclass(frozen=True)
class Plan:
    """A request that passed every check that needs no decoding."""

    datatype: str
    items: list[bytes] | None  # BYTES: the encoded images
    headers: list[ImageHeader] | None
    array: np.ndarray | None  # UINT8 / FP32: the pixels, [B, H, W, C]
    decoded_bytes: int  # what decoding produces (for pixel tensors: their size)


@dataclass(frozen=True)
class DecodedInput:
    images: list[np.ndarray]  # each H x W x C, uint8 or float32 in [0, 1]
    digests: list[bytes]  # sha256 of each item exactly as received


def decode_request(request: pb.ModelInferRequest, limits: Limits) -> DecodedInput:
    return decode_plan(plan_request(request, limits), limits)


def plan_request(request: pb.ModelInferRequest, limits: Limits) -> Plan:
    """Every check that needs no decoding; raises ``InvalidInput``."""
    tensor, raw = _single_image_input(request)
    for output in request.outputs:
        if output.name != OUTPUT_NAME:
            raise InvalidInput(f"the only output is {OUTPUT_NAME!r}")
    shape = tuple(tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidInput("tensor shape must be non-empty with positive dimensions")
    if shape[0] > limits.max_batch:
        raise InvalidInput("batch too large")
    if tensor.datatype == "BYTES":
        plan = _plan_encoded(tensor, raw, shape, limits)
    elif tensor.datatype in _PIXEL_DTYPES:
        plan = _plan_pixels(tensor, raw, shape, limits)
    else:
        raise InvalidInput(f"input {INPUT_NAME!r} must be BYTES, UINT8 or FP32")
    if limits.max_request_bytes is not None and plan.decoded_bytes > limits.max_request_bytes:
        raise InvalidInput("request too large")
    return plan


def decode_plan(plan: Plan, limits: Limits) -> DecodedInput:
    if plan.items is not None:
        try:
            images = [decode_image(item, limits.max_pixels, header) for item, header in zip(plan.items, plan.headers)]
        except InvalidImage:
            raise InvalidInput("could not decode image") from None
        return DecodedInput(images, [hashlib.sha256(item).digest() for item in plan.items])
    images = [np.ascontiguousarray(item) for item in plan.array]
    return DecodedInput(images, [hashlib.sha256(item.tobytes()).digest() for item in images])


def encode_response(request: pb.ModelInferRequest, model: str, labels: np.ndarray) -> pb.ModelInferResponse:
    labels = np.asarray(labels, dtype="<i8")
    return pb.ModelInferResponse(
        model_name=model,
        id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype="INT64", shape=[len(labels)])],
        raw_output_contents=[labels.tobytes()],
    )


def _single_image_input(request: pb.ModelInferRequest) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        raise InvalidInput(f"expected exactly one input named {INPUT_NAME!r}")
    if len(request.raw_input_contents) > 1:
        raise InvalidInput("raw_input_contents must hold one entry per input")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and request.inputs[0].HasField("contents"):
        raise InvalidInput("give the tensor either as raw_input_contents or as contents, not both")
    return request.inputs[0], raw


def _plan_encoded(tensor, raw: bytes | None, shape: tuple[int, ...], limits: Limits) -> Plan:
    if len(shape) != 1:
        raise InvalidInput("BYTES input must have shape [B]")
    items = _split_length_prefixed(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(items) != shape[0]:
        raise InvalidInput("number of BYTES elements does not match the shape")
    try:
        headers = [read_header(item, limits.max_pixels, limits.max_image_bytes, limits.target_side) for item in items]
    except InvalidImage:
        raise InvalidInput("could not decode image") from None
    return Plan("BYTES", items, headers, None, sum(header.decoded_bytes for header in headers))


def _split_length_prefixed(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput("malformed BYTES tensor")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput("malformed BYTES tensor")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _plan_pixels(tensor, raw: bytes | None, shape: tuple[int, ...], limits: Limits) -> Plan:
    if len(shape) not in (3, 4):
        raise InvalidInput("pixel input must have shape [B, H, W] or [B, H, W, C]")
    if len(shape) == 4 and shape[3] not in CHANNELS:
        raise InvalidInput("pixel input must have 1, 3 or 4 channels")
    if shape[1] * shape[2] > limits.max_pixels:
        raise InvalidInput("image too large")
    dtype = _PIXEL_DTYPES[tensor.datatype]
    count = math.prod(shape)
    if limits.max_image_bytes is not None and count // shape[0] * dtype.itemsize > limits.max_image_bytes:
        raise InvalidInput("image too large")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput("raw input size does not match shape and datatype")
        array = np.frombuffer(raw, dtype=dtype)
    else:
        array = _typed_contents(tensor, dtype, count)
    if dtype == np.float32 and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise InvalidInput("FP32 pixels must be finite and in [0, 1]")
    array = array.reshape(shape if len(shape) == 4 else (*shape, 1))
    return Plan(tensor.datatype, None, None, array, count * dtype.itemsize)


def _typed_contents(tensor, dtype: np.dtype, count: int) -> np.ndarray:
    # The protocol carries UINT8 in uint_contents and FP32 in fp32_contents.
    values = tensor.contents.uint_contents if dtype == np.uint8 else tensor.contents.fp32_contents
    if len(values) != count:
        raise InvalidInput("number of tensor contents does not match shape")
    if dtype == np.uint8:
        array = np.fromiter(values, dtype=np.uint64, count=count)
        if count and array.max() > 255:
            raise InvalidInput("UINT8 contents out of range")
        return array.astype(np.uint8)
    return np.fromiter(values, dtype=np.float32, count=count)
