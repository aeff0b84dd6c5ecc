"""Decoding with a header pixel limit, and the OpenCV sanitizing chain, on the real fixture images."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from detectors.sanitizer import (
    InvalidImage,
    Sanitizer,
    SanitizerConfig,
    SanitizeStage,
    decode_image,
    median_filter,
    read_header,
    reduce_bit_depth,
    squeeze,
)
from firewall.stage import RequestContext
from models.runtime import InputSpec, OnnxClassifier
from tests.conftest import pixel_bomb

FIXTURES = Path(__file__).parent / "fixtures"
CIFAR_JPEG = FIXTURES / "cifar10_test" / "cat" / "0134.jpg"
MNIST = InputSpec("input", 1, 28, 28)
CIFAR = InputSpec("input", 3, 32, 32)


@pytest.fixture(scope="module")
def cifar_rgb() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(CIFAR_JPEG)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def mnist_digits() -> np.ndarray:
    return np.load(FIXTURES / "mnist_heldout.npz")["images"][:8]


def encode(image_rgb: np.ndarray, ext: str) -> bytes:
    bgr = image_rgb if image_rgb.shape[2] == 1 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(ext, bgr)
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp", ".gif"])
def test_lossless_formats_round_trip_in_rgb_order(cifar_rgb: np.ndarray, ext: str) -> None:
    decoded = decode_image(encode(cifar_rgb, ext), max_pixels=32 * 32)
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    if ext != ".gif":  # GIF quantizes to a palette
        np.testing.assert_array_equal(decoded, cifar_rgb)


def test_jpeg_fixture_decodes_in_rgb_order(cifar_rgb: np.ndarray) -> None:
    decoded = decode_image(CIFAR_JPEG.read_bytes(), max_pixels=1024)
    np.testing.assert_array_equal(decoded, cifar_rgb)


def test_grey_stays_one_channel_and_alpha_is_dropped_at_decode(mnist_digits: np.ndarray, cifar_rgb: np.ndarray) -> None:
    grey = decode_image(encode(mnist_digits[0][:, :, None], ".png"), max_pixels=784)
    assert grey.shape == (28, 28, 1)
    np.testing.assert_array_equal(grey[:, :, 0], mnist_digits[0])
    rgba = np.dstack([cifar_rgb, np.full((32, 32), 200, np.uint8)])
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    decoded = decode_image(buffer.tobytes(), max_pixels=1024)
    np.testing.assert_array_equal(decoded, cifar_rgb)  # the sanitizer drops alpha anyway; the decoder never stores it


def test_sixteen_bit_png_is_brought_to_eight_bits() -> None:
    ok, buffer = cv2.imencode(".png", np.full((4, 8), 0xABCD, np.uint16))
    decoded = decode_image(buffer.tobytes(), max_pixels=100)
    assert decoded.dtype == np.uint8 and np.all(decoded == 0xAB)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".gif"])
def test_image_over_the_pixel_limit_is_refused(cifar_rgb: np.ndarray, ext: str) -> None:
    data = encode(cifar_rgb, ext)
    assert decode_image(data, max_pixels=1024).shape[:2] == (32, 32)
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=1023)


HEADER_CASES = {  # (extension, channels given to OpenCV, dtype, encoder flags) -> (channels, sample bytes) read
    (".png", 1, np.uint8, ()): (1, 1),
    (".png", 3, np.uint8, ()): (3, 1),
    (".png", 4, np.uint8, ()): (4, 1),
    (".png", 3, np.uint16, ()): (3, 2),
    (".jpg", 1, np.uint8, ()): (1, 1),
    (".jpg", 3, np.uint8, ()): (3, 1),
    (".jpg", 3, np.uint8, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)): (3, 1),
    (".bmp", 3, np.uint8, ()): (3, 1),
    (".bmp", 4, np.uint8, ()): (4, 1),
    (".webp", 3, np.uint8, (cv2.IMWRITE_WEBP_QUALITY, 80)): (4, 1),  # lossy (VP8)
    (".webp", 3, np.uint8, (cv2.IMWRITE_WEBP_QUALITY, 101)): (4, 1),  # lossless (VP8L)
    (".webp", 4, np.uint8, (cv2.IMWRITE_WEBP_QUALITY, 80)): (4, 1),  # alpha (VP8X)
    (".gif", 3, np.uint8, ()): (4, 1),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES, key=str), ids=str)
def test_header_announces_what_opencv_decodes(case) -> None:
    ext, channels, dtype, flags = case
    width, height = 263, 259  # odd, and past one byte: every byte of a multi-byte field counts
    pixels = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (height, width, channels), dtype=dtype)
    ok, buffer = cv2.imencode(ext, pixels, list(flags))
    assert ok
    data = buffer.tobytes()
    header = read_header(data, max_pixels=width * height, max_bytes=width * height * 8)
    expected_channels, sample_bytes = HEADER_CASES[case]
    assert (header.width, header.height, header.channels, header.sample_bytes) == (width, height, expected_channels, sample_bytes)
    assert header.grey == (channels == 1) and header.reduction == 1
    assert cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED).shape[:2] == (height, width)
    assert decode_image(data, max_pixels=width * height).shape[:2] == (height, width)
    with pytest.raises(InvalidImage):  # one pixel too many, or one decoded byte too many
        read_header(data, max_pixels=width * height - 1)
    assert read_header(data, max_pixels=width * height, max_bytes=header.decoded_bytes) == header
    with pytest.raises(InvalidImage):
        read_header(data, max_pixels=width * height, max_bytes=header.decoded_bytes - 1)


def test_large_jpeg_is_decoded_at_a_reduced_size() -> None:
    data = encode(np.zeros((40 * 28, 33 * 28, 3), np.uint8), ".jpg")
    header = read_header(data, max_pixels=4096 * 4096, target_side=28)
    assert header.reduction == 8 and header.decoded_bytes == 140 * 116 * 3  # ceil(1120 / 8), ceil(924 / 8)
    assert read_header(data, max_pixels=4096 * 4096, target_side=56).reduction == 4
    assert read_header(data, max_pixels=4096 * 4096, target_side=300).reduction == 1
    assert decode_image(data, max_pixels=4096 * 4096, header=header).shape == (140, 116, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_pixel_bomb_is_refused_from_its_header_though_opencv_would_decode_it(ext: str) -> None:
    bomb = pixel_bomb(ext)
    assert len(bomb) < 1_000_000
    assert cv2.imdecode(np.frombuffer(bomb, np.uint8), cv2.IMREAD_GRAYSCALE).shape == (5000, 5000)
    assert read_header(bomb, max_pixels=5000 * 5000).pixels == 5000 * 5000
    with pytest.raises(InvalidImage) as caught:
        decode_image(bomb, max_pixels=4096 * 4096)
    assert str(caught.value) == "invalid or unsupported image"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all, just some text bytes", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\xff" * 30],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=10_000)


def test_truncated_image_is_refused(cifar_rgb: np.ndarray) -> None:
    with pytest.raises(InvalidImage):
        decode_image(encode(cifar_rgb, ".png")[:60], max_pixels=1024)


def test_unsupported_format_is_refused(cifar_rgb: np.ndarray) -> None:
    with pytest.raises(InvalidImage):
        decode_image(encode(cifar_rgb, ".tiff"), max_pixels=1024)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"RIFF\0\0\0\0WEBP"])
)
def test_random_bytes_either_decode_or_raise_invalid_image(data: bytes, prefix: bytes) -> None:
    try:
        image = decode_image(prefix + data, max_pixels=10_000)
    except InvalidImage:
        return
    assert image.dtype == np.uint8 and image.ndim == 3


def test_colour_input_becomes_the_mnist_tensor(cifar_rgb: np.ndarray) -> None:
    batch = Sanitizer(SanitizerConfig(), MNIST)(
        [cifar_rgb, cifar_rgb[:, :, :1], np.dstack([cifar_rgb, cifar_rgb[:, :, 0]])]
    )
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    np.testing.assert_allclose(batch[0], batch[2])  # alpha dropped


def test_grey_input_becomes_the_cifar_tensor(mnist_digits: np.ndarray) -> None:
    batch = Sanitizer(SanitizerConfig(blur_sigma=0.5), CIFAR)([mnist_digits[0]])
    assert batch.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(batch[0, 0], batch[0, 2])


def test_uint8_and_float_inputs_agree(cifar_rgb: np.ndarray) -> None:
    sanitizer = Sanitizer(SanitizerConfig(), CIFAR)
    as_float = cifar_rgb.astype(np.float32) / 255.0
    np.testing.assert_allclose(sanitizer([cifar_rgb]), sanitizer([as_float]), atol=1e-6)


def test_large_input_is_resized_with_area_interpolation(mnist_digits: np.ndarray) -> None:
    large = cv2.resize(mnist_digits[1], (280, 280), interpolation=cv2.INTER_NEAREST)[:, :, None]
    no_blur = Sanitizer(SanitizerConfig(blur_kernel=0), MNIST)
    np.testing.assert_allclose(no_blur([large]), no_blur([mnist_digits[1][:, :, None]]), atol=1e-6)


def test_blur_is_mild_and_configurable(mnist_digits: np.ndarray) -> None:
    images = [digit[:, :, None] for digit in mnist_digits]
    plain = Sanitizer(SanitizerConfig(blur_kernel=0), MNIST)(images)
    mild = Sanitizer(SanitizerConfig(), MNIST)(images)
    strong = Sanitizer(SanitizerConfig(blur_kernel=7, blur_sigma=2.0), MNIST)(images)
    assert 0 < np.abs(mild - plain).mean() < np.abs(strong - plain).mean()


def test_out_of_range_floats_are_clipped() -> None:
    image = np.full((28, 28, 1), 7.0, np.float32)
    image[0, 0, 0] = np.nan
    batch = Sanitizer(SanitizerConfig(), MNIST)([image])
    assert np.all((batch >= 0) & (batch <= 1))


def test_bad_shapes_and_dtypes_are_value_errors() -> None:
    sanitizer = Sanitizer(SanitizerConfig(), MNIST)
    for bad in (np.zeros((28, 28, 2), np.uint8), np.zeros((0, 28, 1), np.uint8), np.zeros((28, 28, 1), np.int32)):
        with pytest.raises(ValueError):
            sanitizer([bad])


def test_bit_depth_reduction_keeps_the_given_levels() -> None:
    values = np.linspace(0, 1, 101, dtype=np.float32)
    assert set(np.unique(reduce_bit_depth(values, 1))) == {0.0, 1.0}
    assert len(np.unique(reduce_bit_depth(values, 5))) == 32


@pytest.mark.parametrize("size", [2, 3])
def test_median_filter_matches_scipy(size: int) -> None:
    image = np.random.default_rng(0).random((9, 11, 3)).astype(np.float32)
    expected = ndimage.median_filter(image, size=(size, size, 1), mode="reflect")
    np.testing.assert_array_equal(median_filter(image, size), expected)


def test_squeezers_apply_after_the_blur(mnist_digits: np.ndarray) -> None:
    config = SanitizerConfig(bit_depth=1, median_size=2)
    batch = Sanitizer(config, MNIST)([digit[:, :, None] for digit in mnist_digits])
    assert set(np.unique(batch)) <= {0.0, 1.0}


def test_even_blur_kernel_is_rejected() -> None:
    with pytest.raises(ValueError):
        SanitizerConfig(blur_kernel=4)


def test_stage_sets_the_context_tensor(mnist_digits: np.ndarray) -> None:
    ctx = RequestContext("r", "mnist", "c", "peer", [d[:, :, None] for d in mnist_digits[:2]], [b"a", b"b"])
    assert SanitizeStage(Sanitizer(SanitizerConfig(), MNIST))(ctx) == []
    assert ctx.tensor is not None and ctx.tensor.shape == (2, 1, 28, 28)


def test_float_pixels_are_made_finite_and_clipped_exactly() -> None:
    image = np.array([np.nan, np.inf, -np.inf, -0.5, 1.5, 0.25, 0.0, 1.0] * 98, np.float32).reshape(28, 28, 1)
    batch = Sanitizer(SanitizerConfig(blur_kernel=0), MNIST)([image])
    np.testing.assert_array_equal(batch[0, 0].ravel()[:8], [0.0, 1.0, 0.0, 0.0, 1.0, 0.25, 0.0, 1.0])


def test_blur_is_opencv_gaussian_with_the_configured_kernel_sigma_and_reflected_border(mnist_digits: np.ndarray) -> None:
    pixels = mnist_digits[0].astype(np.float32) / 255.0
    for kernel, sigma in ((3, 0.7), (5, 1.5)):
        blurred = Sanitizer(SanitizerConfig(blur_kernel=kernel, blur_sigma=sigma), MNIST)([mnist_digits[0][:, :, None]])
        expected = cv2.GaussianBlur(pixels, (kernel, kernel), sigma, borderType=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(blurred[0, 0], expected, atol=1e-6)
    unblurred = Sanitizer(SanitizerConfig(blur_kernel=1), MNIST)([mnist_digits[0][:, :, None]])
    np.testing.assert_allclose(unblurred[0, 0], pixels, atol=1e-6)


# Crafted headers: only the bytes the header parser reads, for cases OpenCV does not write.


def png(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + bytes(12)  # CRC and padding


def jpeg(*segments: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(segments) + bytes(32)


def sof(width: int, height: int, components: int = 1, precision: int = 8, marker: int = 0xC0) -> bytes:
    body = struct.pack(">BHHB", precision, height, width, components) + bytes(3 * components)
    return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(body)) + body


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(payload)) + payload


def bmp(width: int, height: int, bits: int, core: bool = False) -> bytes:
    if core:  # BITMAPCOREHEADER: unsigned 16-bit sizes
        return b"BM" + bytes(12) + struct.pack("<IHHHH", 12, width, height, 1, bits) + bytes(16)
    return b"BM" + bytes(12) + struct.pack("<IiiHH", 40, width, height, 1, bits) + bytes(16)


def gif(version: bytes, width: int, height: int) -> bytes:
    return b"GIF" + version + struct.pack("<HH", width, height) + bytes(22)  # 32 bytes: the shortest accepted


CRAFTED = {  # name -> (data, (width, height, channels, sample bytes, grey), or None: refused)
    "png 1-bit grey": (png(5, 7, depth=1), (5, 7, 1, 1, True)),
    "png 2-bit grey": (png(5, 7, depth=2), (5, 7, 1, 1, True)),
    "png 4-bit palette": (png(5, 7, depth=4, colour=3), (5, 7, 3, 1, False)),
    "png grey and alpha": (png(5, 7, colour=4), (5, 7, 2, 1, True)),
    "png 16-bit rgba": (png(5, 7, depth=16, colour=6), (5, 7, 4, 2, False)),
    "png 1 x 1": (png(1, 1), (1, 1, 1, 1, True)),
    "png depth 3": (png(5, 7, depth=3), None),
    "png colour type 5": (png(5, 7, colour=5), None),
    "png no width": (png(0, 7), None),
    "png no height": (png(5, 0), None),
    "gif87a, wider than a signed short": (gif(b"87a", 40000, 3), (40000, 3, 4, 1, False)),
    "gif89a": (gif(b"89a", 5, 7), (5, 7, 4, 1, False)),
    "31 bytes": (gif(b"89a", 5, 7)[:31], None),
    "bmp core header": (bmp(40000, 3, 24, core=True), (40000, 3, 3, 1, False)),
    "bmp top-down rows": (bmp(5, -7, 32), (5, 7, 4, 1, False)),
    "jpeg 12-bit": (jpeg(sof(5, 7, 3, precision=12)), (5, 7, 3, 2, False)),
    "jpeg lossless 9-bit": (jpeg(sof(5, 7, precision=9, marker=0xC3)), (5, 7, 1, 2, True)),
    "jpeg cmyk": (jpeg(sof(5, 7, 4)), (5, 7, 4, 1, False)),
    "jpeg 5 components": (jpeg(sof(5, 7, 5)), None),
    "jpeg wider than a signed short": (jpeg(sof(40000, 3)), (40000, 3, 1, 1, True)),
    "jpeg fill byte": (jpeg(b"\xff", sof(5, 7)), (5, 7, 1, 1, True)),
    "jpeg markers without a length": (jpeg(b"\xff\x01\xff\xd0\xff\xd7", sof(5, 7)), (5, 7, 1, 1, True)),
    "jpeg empty comment": (jpeg(segment(0xFE, b""), sof(5, 7)), (5, 7, 1, 1, True)),
    "jpeg 40 KB profile": (jpeg(segment(0xE2, bytes(40000)), sof(5, 7)), (5, 7, 1, 1, True)),
    "jpeg scan before the frame": (jpeg(segment(0xDA, bytes(6)), sof(5, 7)), None),
    "jpeg segment length 0": (jpeg(b"\xff\xe0\x00\x00", sof(5, 7)), None),
}


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_headers(name: str) -> None:
    data, expected = CRAFTED[name]
    if expected is None:
        with pytest.raises(InvalidImage):
            read_header(data, max_pixels=10**6)
        return
    header = read_header(data, max_pixels=10**6)
    assert (header.width, header.height, header.channels, header.sample_bytes, header.grey) == expected


def test_riff_that_is_not_webp_is_refused(cifar_rgb: np.ndarray) -> None:
    webp = encode(cifar_rgb, ".webp")
    assert read_header(webp, max_pixels=1024).width == 32
    with pytest.raises(InvalidImage):
        read_header(b"RIFX" + webp[4:], max_pixels=1024)


def test_jpeg_reduction_thresholds_from_the_header() -> None:
    def reduction(width: int, height: int, components: int = 3, target: int = 28) -> int:
        return read_header(jpeg(sof(width, height, components)), max_pixels=10**8, target_side=target).reduction

    assert reduction(1000, 896) == 8 and reduction(1000, 895) == 4  # short side at least 8 x 4 x 28
    assert reduction(924, 1000, target=100) == 2 and reduction(924, 1000, target=116) == 1
    assert reduction(4000, 4000, components=4) == 1  # CMYK is never decoded reduced


def test_reduced_decoding_rounds_odd_sizes_up() -> None:
    data = encode(np.zeros((1121, 924, 3), np.uint8), ".jpg")
    header = read_header(data, max_pixels=4096 * 4096, target_side=28)
    assert header.reduction == 8 and decode_image(data, max_pixels=4096 * 4096, header=header).shape == (141, 116, 3)


def test_decoding_checks_the_byte_limit_and_the_size_the_header_announced(cifar_rgb: np.ndarray) -> None:
    data = encode(cifar_rgb, ".png")
    assert decode_image(data, max_pixels=1024, max_bytes=32 * 32 * 3).shape == (32, 32, 3)
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=1024, max_bytes=32 * 32 * 3 - 1)
    other = read_header(encode(cifar_rgb[:16], ".png"), max_pixels=1024)
    with pytest.raises(InvalidImage):  # decoded to another size than the header it was admitted by
        decode_image(data, max_pixels=1024, header=other)


def test_the_config_builds_a_stage_for_the_models_input(mnist_model: OnnxClassifier, mnist_digits: np.ndarray) -> None:
    config = SanitizerConfig(blur_kernel=5)
    stage = config.build(mnist_model)
    assert stage.sanitizer.config is config and stage.sanitizer.spec == mnist_model.input
    ctx = RequestContext("r", "mnist", "c", "peer", [mnist_digits[0][:, :, None]], [b"a"])
    stage(ctx)
    np.testing.assert_array_equal(ctx.tensor, Sanitizer(config, MNIST)([mnist_digits[0][:, :, None]]))


def test_bit_depth_reduction_gives_evenly_spaced_levels_in_the_unit_interval() -> None:
    reduced = np.unique(reduce_bit_depth(np.linspace(0, 1, 101, dtype=np.float32), 5))
    np.testing.assert_allclose(reduced * 31, np.arange(32), atol=1e-5)


def test_shape_and_dtype_errors_say_what_is_expected() -> None:
    sanitizer = Sanitizer(SanitizerConfig(), MNIST)
    for bad in (np.zeros((28, 0, 1), np.uint8), np.zeros((28, 28, 2), np.uint8)):
        with pytest.raises(ValueError) as caught:
            sanitizer([bad])
        assert str(caught.value) == "image must be HxWxC with 1, 3 or 4 channels"
    with pytest.raises(ValueError) as caught:
        sanitizer([np.zeros((28, 28, 1), np.int32)])
    assert str(caught.value) == "image must be uint8 or float in [0, 1]"
    assert sanitizer([np.zeros((28, 1, 1), np.uint8)]).shape == (1, 1, 28, 28)  # one pixel wide is an image


def test_out_of_range_floats_are_clipped_before_the_blur() -> None:
    values = np.array([np.nan, np.inf, -np.inf, -0.5, 1.5, 2.5, 0.25, 1.0], np.float32)
    image = np.random.default_rng(1).choice(values, (28, 28, 1))
    clipped = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    sanitizer = Sanitizer(SanitizerConfig(), MNIST)
    np.testing.assert_array_equal(sanitizer([image]), sanitizer([clipped]))


def noise(height: int, width: int, channels: int) -> np.ndarray:
    return np.random.default_rng(height * width + channels).integers(0, 256, (height, width, channels), np.uint8)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_large_image_is_first_shrunk_in_eight_bits_to_twice_the_models_size(channels: int) -> None:
    sanitizer = Sanitizer(SanitizerConfig(), MNIST)
    large = noise(126, 130, channels)  # more than 4 times the model's side both ways
    shrunk = cv2.resize(large[:, :, :3], (56, 56), interpolation=cv2.INTER_AREA).reshape(56, 56, -1)
    np.testing.assert_array_equal(sanitizer([large]), sanitizer([shrunk]))
    assert not np.array_equal(sanitizer([large]), sanitizer([large.astype(np.float32) / 255.0]))  # the 8-bit step shows


@pytest.mark.parametrize("size", [(112, 112), (56, 140), (140, 56)])
def test_an_image_not_over_four_times_the_model_both_ways_takes_the_float_path(size: tuple[int, int]) -> None:
    sanitizer = Sanitizer(SanitizerConfig(), MNIST)
    image = noise(*size, 1)
    np.testing.assert_array_equal(sanitizer([image]), sanitizer([image.astype(np.float32) / 255.0]))


def test_resizing_averages_areas_at_any_factor() -> None:
    image = noise(70, 70, 1).astype(np.float32) / 255.0
    resized = Sanitizer(SanitizerConfig(blur_kernel=0), MNIST)([image])
    np.testing.assert_allclose(resized[0, 0], cv2.resize(image, (28, 28), interpolation=cv2.INTER_AREA), atol=1e-6)


def test_blur_reflects_the_border_on_an_image_with_a_border() -> None:
    image = noise(28, 28, 1).astype(np.float32) / 255.0
    blurred = Sanitizer(SanitizerConfig(), MNIST)([image])
    expected = cv2.GaussianBlur(image, (3, 3), 0.7, borderType=cv2.BORDER_REFLECT)
    np.testing.assert_allclose(blurred[0, 0], expected, atol=1e-6)


def test_an_empty_batch_is_an_empty_tensor_of_the_models_shape() -> None:
    empty = Sanitizer(SanitizerConfig(), CIFAR)([])
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == np.float32


def test_the_median_squeezer_alone(mnist_digits: np.ndarray) -> None:
    images = [digit[:, :, None] for digit in mnist_digits]
    plain = Sanitizer(SanitizerConfig(), MNIST)(images)
    np.testing.assert_array_equal(Sanitizer(SanitizerConfig(median_size=2), MNIST)(images), squeeze(plain, None, 2))


def test_rounding_never_takes_a_pixel_past_one() -> None:
    white = np.full((39, 39, 3), 255, np.uint8)  # grey conversion and resizing round a white image to 1.0000002
    assert Sanitizer(SanitizerConfig(), MNIST)([white]).max() == 1.0
