"""Tensor codec: the public `image` input or the model's own input in, the top label out.

Accepted input, one tensor, either named ``image``:
  - BYTES  [B]                      encoded images (PNG, JPEG, ...), raw form length-prefixed
  - UINT8  [B, H, W] or [B, H, W, C] pixels
  - FP32   [B, H, W] or [B, H, W, C] pixels in [0, 1]
or named as the protected model's own input (``Signature``), in its own datatype and layout:
  - FP32   [B, C, H, W] pixels in [0, 1], with exactly the model's C, H and W
given as ``raw_input_contents`` or as typed ``contents``. Everything a client sends is checked
before any buffer is trusted: dtype, shape, byte length against shape, finite values, batch and
pixel limits.

Outputs, always as raw contents: ``label``, INT64 [B], the top class; and under the model's own
output name (``logits`` for the bundled models) FP32 [B, K] holding the one-hot of the top class,
so a client's argmax keeps working and no score leaks. A request naming no output gets ``label``
when it sent ``image`` and the model's own output when it sent the model's own input.

Checking and decoding are two steps. ``plan_request`` is cheap (shapes, byte counts, image headers,
no pixel decoded) and tells how many bytes decoding will produce (``Plan.decoded_bytes``), so the
service can refuse or budget the work before it is queued; ``decode_plan`` does the decoding.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from detectors.sanitizer import ImageHeader, InvalidImage, decode_image, read_header
from firewall.errors import InvalidInput
from firewall.protocol import pb

if TYPE_CHECKING:
    from models.runtime import OnnxClassifier

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
class Signature:
    """The protected model's own tensors: FP32 [B, C, H, W] in, [B, classes] out."""

    input_name: str
    channels: int
    height: int
    width: int
    output_name: str
    classes: int


def signature(classifier: OnnxClassifier) -> Signature:
    spec = classifier.input
    probe = np.zeros((1, spec.channels, spec.height, spec.width), np.float32)
    classes = int(classifier.logits(probe).shape[1])  # the output's class count, whatever its declared shape
    return Signature(spec.name, spec.channels, spec.height, spec.width, classifier.output_name, classes)


@dataclass(frozen=True)
class Plan:
    """A request that passed every check that needs no decoding."""

    datatype: str
    items: list[bytes] | None  # BYTES: the encoded images
    headers: list[ImageHeader] | None
    array: np.ndarray | None  # UINT8 / FP32: the pixels, [B, H, W, C]
    decoded_bytes: int  # what decoding produces (for pixel tensors: their size)
    outputs: tuple[str, ...] = (OUTPUT_NAME,)  # what the response holds, in this order

    @property
    def batch(self) -> int:
        return len(self.items) if self.items is not None else len(self.array)


@dataclass(frozen=True)
class DecodedInput:
    images: list[np.ndarray]  # each H x W x C, uint8 or float32 in [0, 1]
    digests: list[bytes]  # sha256 of each item exactly as received


def decode_request(request: pb.ModelInferRequest, limits: Limits, signature: Signature | None = None) -> DecodedInput:
    return decode_plan(plan_request(request, limits, signature), limits)


def plan_request(request: pb.ModelInferRequest, limits: Limits, signature: Signature | None = None) -> Plan:
    """Every check that needs no decoding; raises ``InvalidInput``."""
    tensor, raw = _single_input(request, signature)
    native = tensor.name != INPUT_NAME
    outputs = _outputs(request, signature, native)
    shape = tuple(tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidInput("tensor shape must be non-empty with positive dimensions")
    if shape[0] > limits.max_batch:
        raise InvalidInput("batch too large")
    if native:
        plan = _plan_native(tensor, raw, shape, limits, signature)
    elif tensor.datatype == "BYTES":
        plan = _plan_encoded(tensor, raw, shape, limits)
    elif tensor.datatype in _PIXEL_DTYPES:
        plan = _plan_pixels(tensor, raw, shape, limits)
    else:
        raise InvalidInput(f"input {INPUT_NAME!r} must be BYTES, UINT8 or FP32")
    if limits.max_request_bytes is not None and plan.decoded_bytes > limits.max_request_bytes:
        raise InvalidInput("request too large")
    return replace(plan, outputs=outputs)


def decode_plan(plan: Plan, limits: Limits) -> DecodedInput:
    if plan.items is not None:
        try:
            images = [decode_image(item, limits.max_pixels, header) for item, header in zip(plan.items, plan.headers)]
        except InvalidImage:
            raise InvalidInput("could not decode image") from None
        return DecodedInput(images, [hashlib.sha256(item).digest() for item in plan.items])
    images = [np.ascontiguousarray(item) for item in plan.array]
    return DecodedInput(images, [hashlib.sha256(item.tobytes()).digest() for item in images])


def encode_response(
    request: pb.ModelInferRequest,
    model: str,
    labels: np.ndarray,
    outputs: tuple[str, ...] = (OUTPUT_NAME,),
    signature: Signature | None = None,
) -> pb.ModelInferResponse:
    labels = np.asarray(labels, dtype="<i8")
    response = pb.ModelInferResponse(model_name=model, id=request.id)
    for name in outputs:
        if name == OUTPUT_NAME:
            shape, datatype, data = [len(labels)], "INT64", labels.tobytes()
        else:  # the model's own output: a hard label, one-hot of the top class
            one_hot = np.zeros((len(labels), signature.classes), dtype="<f4")
            one_hot[np.arange(len(labels)), labels] = 1.0
            shape, datatype, data = list(one_hot.shape), "FP32", one_hot.tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(data)
    return response


def _single_input(
    request: pb.ModelInferRequest, signature: Signature | None
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    names = (INPUT_NAME,) if signature is None else (INPUT_NAME, signature.input_name)
    if len(request.inputs) != 1 or request.inputs[0].name not in names:
        raise InvalidInput(f"expected exactly one input named {' or '.join(map(repr, names))}")
    if len(request.raw_input_contents) > 1:
        raise InvalidInput("raw_input_contents must hold one entry per input")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and request.inputs[0].HasField("contents"):
        raise InvalidInput("give the tensor either as raw_input_contents or as contents, not both")
    return request.inputs[0], raw


def _outputs(request: pb.ModelInferRequest, signature: Signature | None, native: bool) -> tuple[str, ...]:
    if not request.outputs:
        return (signature.output_name,) if native else (OUTPUT_NAME,)
    known = (OUTPUT_NAME,) if signature is None else (OUTPUT_NAME, signature.output_name)
    names = tuple(dict.fromkeys(output.name for output in request.outputs))
    for name in names:
        if name not in known:
            raise InvalidInput(f"unknown output; the outputs are {' and '.join(map(repr, known))}")
    return names


def _plan_native(tensor, raw: bytes | None, shape: tuple[int, ...], limits: Limits, signature: Signature) -> Plan:
    expected = (signature.channels, signature.height, signature.width)
    if tensor.datatype != "FP32" or len(shape) != 4 or shape[1:] != expected:
        layout = ", ".join(map(str, ("B", *expected)))
        raise InvalidInput(f"input {signature.input_name!r} must be FP32 [{layout}]")
    plan = _plan_pixels(tensor, raw, (shape[0], *shape[2:], shape[1]), limits)
    # The buffer is NCHW; _plan_pixels read it as NHWC of the same size, so reorder it here.
    array = plan.array.reshape(shape).transpose(0, 2, 3, 1)
    return replace(plan, array=array)


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
