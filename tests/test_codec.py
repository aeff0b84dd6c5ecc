"""The tensor codec: exact decoding of valid tensors, and only InvalidInput for anything else."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firewall import codec
from firewall.errors import InvalidInput
from firewall.protocol import pb
from models.runtime import OnnxClassifier

LIMITS = codec.Limits(max_batch=8, max_pixels=64 * 64)


def request(datatype: str, shape, raw: bytes | None = None, contents=None, name: str = "image"):
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if contents is not None:
        tensor.contents.CopyFrom(contents)
    return pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[raw] if raw is not None else [])


def test_uint8_raw_round_trip():
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    decoded = codec.decode_request(request("UINT8", pixels.shape, pixels.tobytes()), LIMITS)
    assert [image.shape for image in decoded.images] == [(3, 4, 1), (3, 4, 1)]
    assert np.array_equal(decoded.images[1][:, :, 0], pixels[1])
    assert decoded.digests[0] != decoded.digests[1]


def test_fp32_typed_contents():
    pixels = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 2, 2, 3)
    contents = pb.InferTensorContents(fp32_contents=pixels.ravel().tolist())
    decoded = codec.decode_request(request("FP32", pixels.shape, contents=contents), LIMITS)
    assert np.allclose(decoded.images[0], pixels[0])


def test_bytes_raw_and_typed_agree_and_retries_share_a_digest():
    png = cv2.imencode(".png", np.full((5, 7), 200, np.uint8))[1].tobytes()
    raw = b"".join(len(item).to_bytes(4, "little") + item for item in (png, png))
    from_raw = codec.decode_request(request("BYTES", [2], raw), LIMITS)
    from_typed = codec.decode_request(request("BYTES", [2], contents=pb.InferTensorContents(bytes_contents=[png, png])), LIMITS)
    assert from_raw.digests == from_typed.digests and from_raw.digests[0] == from_raw.digests[1]
    assert from_raw.images[0].shape == (5, 7, 1) and int(from_raw.images[0].max()) == 200


def test_response_is_one_int64_label_tensor():
    response = codec.encode_response(pb.ModelInferRequest(id="42"), "m", np.array([3, 1]))
    assert response.id == "42" and [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("label", "INT64", [2])]
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [3, 1]


@pytest.mark.parametrize(
    "bad",
    [
        request("UINT8", [1, 2, 2], bytes(4), name="input"),
        request("UINT8", [1, 2, 2], bytes(3)),
        request("UINT8", [1, 2, 2], bytes(4), contents=pb.InferTensorContents(uint_contents=[1, 2, 3, 4])),
        request("UINT8", [1, 2, 2], contents=pb.InferTensorContents(uint_contents=[1, 2, 3, 999])),
        request("FP32", [1, 1, 1], np.array([1.5], "<f4").tobytes()),
        request("FP32", [1, 1, 1], np.array([-0.1], "<f4").tobytes()),
        request("UINT8", [9, 1, 1], bytes(9)),
        request("UINT8", [1, 65, 65], bytes(65 * 65)),
        request("BYTES", [1, 1], b""),
        request("BYTES", [2], (3).to_bytes(4, "little") + b"abc"),
        request("FP64", [1, 1, 1], bytes(8)),
        request("UINT8", [], b""),
    ],
)
def test_invalid_tensors_are_rejected(bad):
    with pytest.raises(InvalidInput):
        codec.decode_request(bad, LIMITS)


def test_unknown_requested_output_is_rejected():
    bad = request("UINT8", [1, 1, 1], bytes(1))
    bad.outputs.add(name="logits")
    with pytest.raises(InvalidInput):
        codec.decode_request(bad, LIMITS)


datatypes = st.sampled_from(["UINT8", "FP32", "BYTES", "INT8", "FP16", ""])
shapes = st.lists(st.integers(min_value=-2, max_value=70), min_size=0, max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datatype=datatypes, shape=shapes, raw=st.one_of(st.none(), st.binary(max_size=600)))
def test_fuzzed_requests_decode_or_raise_invalid_input(datatype, shape, raw):
    try:
        decoded = codec.decode_request(request(datatype, shape, raw), LIMITS)
    except InvalidInput as error:
        assert str(error) and "Traceback" not in str(error)
        return
    assert 1 <= len(decoded.images) <= LIMITS.max_batch
    for image in decoded.images:
        assert image.ndim == 3 and image.shape[2] in codec.CHANNELS
        assert image.shape[0] * image.shape[1] <= LIMITS.max_pixels


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=0, max_size=300), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"BM", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]))
def test_fuzzed_image_bytes_decode_or_raise_invalid_input(payload, prefix):
    item = prefix + payload
    raw = len(item).to_bytes(4, "little") + item
    try:
        decoded = codec.decode_request(request("BYTES", [1], raw), LIMITS)
    except InvalidInput:
        return
    assert decoded.images[0].shape[0] * decoded.images[0].shape[1] <= LIMITS.max_pixels


BOUNDS = codec.Limits(max_batch=4, max_pixels=30, max_image_bytes=90, max_request_bytes=180)


def admits(shape: list[int], datatype: str = "UINT8", limits: codec.Limits = BOUNDS, raw: bytes | None = None) -> bool:
    itemsize = 4 if datatype == "FP32" else 1
    payload = bytes(int(np.prod(shape)) * itemsize) if raw is None else raw
    try:
        codec.plan_request(request(datatype, shape, payload), limits)
    except InvalidInput:
        return False
    return True


def test_every_limit_admits_its_value_and_refuses_beyond_it():
    assert admits([4, 1, 1]) and not admits([5, 1, 1])  # max_batch 4
    assert admits([1, 6, 5]) and not admits([1, 31, 1]) and not admits([1, 10, 4])  # max_pixels 30 (H x W)
    assert admits([1, 6, 5, 3]) and not admits([1, 6, 5, 4])  # max_image_bytes 90
    assert admits([1, 6, 5, 1]) and not admits([1, 6, 5, 1], "FP32")  # 4 bytes a float sample
    assert admits([2, 6, 5, 3]) and not admits([3, 6, 5, 3])  # max_request_bytes 180
    assert all(admits([1, 2, 2, channels]) for channels in (1, 3, 4))
    assert not any(admits(shape) for shape in ([], [0, 1, 1], [1, 0, 1], [1, 2], [1, 2, 2, 2], [1, 2, 2, 5], [1, 2, 2, 1, 1]))
    assert not admits([1, 2, 2], raw=bytes(3)) and not admits([1, 2, 2], raw=bytes(5))
    assert not admits([2, 1, 1], "BYTES") and not admits([1, 1, 1], "INT8")


def test_fp32_pixels_must_lie_in_the_unit_interval():
    def fp32(values: list[float]) -> bool:
        return admits([1, 1, len(values)], "FP32", raw=np.array(values, "<f4").tobytes())

    assert fp32([0.0, 1.0, 0.5])
    assert not fp32([0.0, np.nextafter(np.float32(1), np.float32(2))]) and not fp32([np.float32(-1e-7), 0.5])
    assert not fp32([np.nan, 0.5]) and not fp32([np.inf, 0.5])


def test_typed_uint8_contents_must_fit_a_byte_and_the_shape():
    def typed(values: list[int]) -> bool:
        contents = pb.InferTensorContents(uint_contents=values)
        try:
            codec.plan_request(request("UINT8", [1, 1, 2], contents=contents), BOUNDS)
        except InvalidInput:
            return False
        return True

    assert typed([0, 255]) and not typed([0, 256]) and not typed([0]) and not typed([0, 1, 2])


OWN = codec.Signature(input_name="input", channels=3, height=2, width=2, output_name="logits", classes=4)


def test_the_models_own_nchw_input_is_read_as_its_pixels():
    nchw = np.linspace(0, 1, 2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    plan = codec.plan_request(request("FP32", nchw.shape, nchw.tobytes(), name="input"), LIMITS, OWN)
    decoded = codec.decode_plan(plan, LIMITS)
    assert plan.outputs == ("logits",) and plan.batch == 2
    assert np.array_equal(decoded.images[1], nchw[1].transpose(1, 2, 0))  # H x W x C of the same pixels


@pytest.mark.parametrize(
    ("shape", "datatype"), [([1, 2, 2, 3], "FP32"), ([1, 3, 4, 4], "FP32"), ([1, 3, 2, 2], "UINT8"), ([1, 3, 2], "FP32")]
)
def test_the_models_own_input_takes_only_its_own_type_and_layout(shape, datatype):
    size = int(np.prod(shape)) * (4 if datatype == "FP32" else 1)
    with pytest.raises(InvalidInput, match="must be FP32"):
        codec.plan_request(request(datatype, shape, bytes(size), name="input"), LIMITS, OWN)


def test_outputs_are_the_label_or_a_one_hot_under_the_models_name():
    asked = request("UINT8", [2, 2, 2], bytes(8))
    asked.outputs.add(name="logits")
    asked.outputs.add(name="label")
    plan = codec.plan_request(asked, LIMITS, OWN)
    assert plan.outputs == ("logits", "label")
    response = codec.encode_response(asked, "m", np.array([3, 1]), plan.outputs, OWN)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("logits", "FP32", [2, 4]), ("label", "INT64", [2])]
    one_hot = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 4)
    assert one_hot.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    asked.outputs.add(name="scores")
    with pytest.raises(InvalidInput, match="unknown output"):
        codec.plan_request(asked, LIMITS, OWN)
    with pytest.raises(InvalidInput, match="expected exactly one input named 'image'"):
        codec.plan_request(request("FP32", [1, 3, 2, 2], bytes(48), name="input"), LIMITS)  # no signature: `image` only


def png(height: int, width: int, value: int = 0) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), value, np.uint8))[1].tobytes()


def prefixed(*items: bytes) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def with_outputs(message: pb.ModelInferRequest, *names: str) -> pb.ModelInferRequest:
    for name in names:
        message.outputs.add(name=name)
    return message


def two_raw_entries() -> pb.ModelInferRequest:
    message = request("UINT8", [1, 1, 1], bytes(1))
    message.raw_input_contents.append(bytes(1))
    return message


MESSAGES = [  # (request, signature, what the client is told): shown as is, so each must say what is expected
    (request("UINT8", [1, 1, 1], bytes(1), name="input"), None, "expected exactly one input named 'image'"),
    (request("UINT8", [1, 1, 1], bytes(1), name="x"), OWN, "expected exactly one input named 'image' or 'input'"),
    (two_raw_entries(), None, "raw_input_contents must hold one entry per input"),
    (
        request("UINT8", [1, 1, 1], bytes(1), contents=pb.InferTensorContents(uint_contents=[1])),
        None,
        "give the tensor either as raw_input_contents or as contents, not both",
    ),
    (with_outputs(request("UINT8", [1, 1, 1], bytes(1)), "scores"), OWN, "unknown output; the outputs are 'label' and 'logits'"),
    (request("UINT8", [], b""), None, "tensor shape must be non-empty with positive dimensions"),
    (request("UINT8", [9, 1, 1], bytes(9)), None, "batch too large"),
    (request("FP64", [1, 1, 1], bytes(8)), None, "input 'image' must be BYTES, UINT8 or FP32"),
    (request("FP32", [1, 3, 4, 4], bytes(192), name="input"), OWN, "input 'input' must be FP32 [B, 3, 2, 2]"),
    (request("BYTES", [1, 1], prefixed(b"x")), None, "BYTES input must have shape [B]"),
    (request("BYTES", [2], prefixed(png(2, 2))), None, "number of BYTES elements does not match the shape"),
    (request("BYTES", [1], prefixed(b"not an image" * 4)), None, "could not decode image"),
    (request("BYTES", [1], prefixed(png(2, 2)) + b"\0\0"), None, "malformed BYTES tensor"),  # a cut length prefix
    (request("BYTES", [1], (100).to_bytes(4, "little") + png(2, 2)), None, "malformed BYTES tensor"),  # past the end
    (request("BYTES", [1], (2**32 - 5).to_bytes(4, "little") + png(2, 2)), None, "malformed BYTES tensor"),  # unsigned
    (request("BYTES", [2], prefixed(png(2, 2), b"")), None, "could not decode image"),  # an empty last item is an item
    (request("BYTES", [1], prefixed(png(32, 32)[:60])), None, "could not decode image"),  # its header passes, not its pixels
    (request("UINT8", [1, 2], bytes(2)), None, "pixel input must have shape [B, H, W] or [B, H, W, C]"),
    (request("UINT8", [1, 1, 1, 2], bytes(2)), None, "pixel input must have 1, 3 or 4 channels"),
    (request("UINT8", [1, 65, 65], bytes(65 * 65)), None, "image too large"),
    (request("UINT8", [1, 1, 1], bytes(2)), None, "raw input size does not match shape and datatype"),
    (request("FP32", [1, 1, 1], np.array([1.5], "<f4").tobytes()), None, "FP32 pixels must be finite and in [0, 1]"),
    (request("UINT8", [1, 1, 2], contents=pb.InferTensorContents(uint_contents=[1])), None, "number of tensor contents does not match shape"),
    (request("UINT8", [1, 1, 1], contents=pb.InferTensorContents(uint_contents=[256])), None, "UINT8 contents out of range"),
]


@pytest.mark.parametrize(("bad", "own", "message"), MESSAGES, ids=[message for _, _, message in MESSAGES])
def test_each_refusal_tells_the_client_what_is_expected(bad, own, message):
    with pytest.raises(InvalidInput) as caught:
        codec.decode_request(bad, LIMITS, own)
    assert str(caught.value) == caught.value.public_message == message


def test_the_byte_limits_tell_the_client_the_request_or_image_is_too_large():
    for shape, message in (([1, 6, 5, 4], "image too large"), ([3, 6, 5, 3], "request too large")):
        with pytest.raises(InvalidInput, match=f"^{message}$"):
            codec.plan_request(request("UINT8", shape, bytes(int(np.prod(shape)))), BOUNDS)


def test_the_signature_is_read_from_the_model(mnist_model: OnnxClassifier):
    assert codec.signature(mnist_model) == codec.Signature(mnist_model.input.name, 1, 28, 28, mnist_model.output_name, 10)


def test_decode_request_takes_the_models_own_input():
    nchw = np.zeros((1, 3, 2, 2), np.float32)
    decoded = codec.decode_request(request("FP32", nchw.shape, nchw.tobytes(), name="input"), LIMITS, OWN)
    assert decoded.images[0].shape == (2, 2, 3)


def test_a_large_jpeg_is_planned_and_decoded_at_the_reduced_size():
    jpeg = cv2.imencode(".jpg", np.zeros((40 * 28, 33 * 28, 3), np.uint8))[1].tobytes()
    limits = codec.Limits(max_batch=1, max_pixels=4096 * 4096, target_side=28)
    plan = codec.plan_request(request("BYTES", [1], prefixed(jpeg)), limits)
    assert plan.decoded_bytes == 140 * 116 * 3
    assert codec.decode_plan(plan, limits).images[0].shape == (140, 116, 3)


def test_encoded_images_are_counted_in_decoded_bytes():
    items = (png(5, 7, 10), png(4, 3, 20))  # of different lengths
    plan = codec.plan_request(request("BYTES", [2], prefixed(*items)), LIMITS)
    assert plan.decoded_bytes == (5 * 7 + 4 * 3) * 3
    assert [image.shape for image in codec.decode_plan(plan, LIMITS).images] == [(5, 7, 3), (4, 3, 3)]
    one = codec.Limits(max_batch=1, max_pixels=64 * 64, max_image_bytes=5 * 7 * 3 - 1)
    with pytest.raises(InvalidInput):
        codec.plan_request(request("BYTES", [1], prefixed(items[0])), one)
    pixels = codec.plan_request(request("FP32", [2, 3, 4], bytes(2 * 3 * 4 * 4)), LIMITS)
    assert pixels.decoded_bytes == 2 * 3 * 4 * 4


def test_typed_contents_decode_to_the_pixel_dtypes():
    uint8 = codec.decode_request(request("UINT8", [1, 1, 2], contents=pb.InferTensorContents(uint_contents=[7, 255])), LIMITS)
    assert uint8.images[0].dtype == np.uint8 and uint8.images[0].ravel().tolist() == [7, 255]
    fp32 = codec.decode_request(request("FP32", [1, 1, 2], contents=pb.InferTensorContents(fp32_contents=[0.25, 1.0])), LIMITS)
    assert fp32.images[0].dtype == np.float32 and fp32.images[0].ravel().tolist() == [0.25, 1.0]


def test_the_response_names_the_model_and_holds_int64_whatever_the_labels_dtype():
    response = codec.encode_response(pb.ModelInferRequest(), "mnist", np.array([3, 1], np.int32))
    assert response.model_name == "mnist"
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [3, 1]
