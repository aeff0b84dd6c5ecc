"""Benign traffic as it really is: seeded generators of per-client query streams (issue 11, item 5).

Every pattern is a pure function of (images, labels, client, seed): the same arguments give the
same queries, byte for byte, and one client's stream can be made without the others' (except in
``distinct_ids``, whose ids share one seeded sequence of images). A query is
either encoded bytes (PNG or JPEG, sent to a firewall as a ``BYTES`` tensor) or uint8 pixels
[H, W, C] (sent as ``UINT8``); ``Query.pixels()`` decodes it exactly as the firewall does, so a
calibration script can feed the same streams to the detectors in process, and ``firewall evaluate``
sends them through a live endpoint (``firewall.evaluate.benign.run_pattern``).

Patterns (``images`` is the pattern's own slice of held-out images; ``n`` images per client):

- ``distinct``: client k sends its own n images, ``images[k*n:(k+1)*n]``, as raw pixels.
- ``one-class``: client k sends n images of one class only (class ``k mod classes``, or the class
  with most images left when that one runs short; each client its own images; fewer when all do).
- ``retries``: like ``distinct``, and a share (``retry_share``, at least one per client) of the
  requests is sent twice, byte-identical; each client sends pixels or PNG bytes.
- ``camera-bursts``: for each of its n images, a burst of ``burst`` frames, each shifted by up to
  ``max_shift`` pixels (edges replicated), at +-``exposure`` brightness (gain), with Gaussian sensor
  noise of sigma ``noise`` (in [0, 1] units: 2/255), rounded to uint8 pixels.
- ``popular``: every client sends the same ``popular`` images (default 50, the first of the
  slice), each client re-encoding them its own way: PNG, or JPEG at a quality in 50-95, at its own
  size (28/40/56 px for 28 px images, 32/48/64 px for 32 px images, else 1x, 1.5x, 2x).
- ``thumbnail-and-full``: each image as a thumbnail (its native size) and then at full size
  (``full_scale`` x, bilinear), both in the client's own encoding (PNG or a JPEG quality).
- ``jpeg-qualities``: each image as JPEG at three qualities (``qualities``), one after the other.

``distinct_ids`` is the large run: many ids (20,000 by default), each sending 1 or 2 images.
Held-out sets are smaller than that (2,000 MNIST images), so images are reused across ids: each id
draws its images from a seeded permutation of the slice, and every query is lightly augmented (an
exposure change of at most +-5 %, sensor noise sigma 2/255) and encoded its own way (pixels, PNG, or
JPEG quality 70-95), so no two ids send byte-identical content; the same picture does reach the
firewall from many ids, as a popular image would. ``Query.copy`` counts the earlier uses of the
source image, so the ids of the first pass (every query ``copy == 0``: truly distinct images) can be
told apart from those sending a re-used picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import cv2
import numpy as np

from detectors.sanitizer import decode_image

PATTERNS = (
    "distinct",
    "one-class",
    "retries",
    "camera-bursts",
    "popular",
    "thumbnail-and-full",
    "jpeg-qualities",
)
DISTINCT_IDS = "distinct-ids"
_DECODE_LIMIT = 1 << 26  # pixels; the generators never make anything near it


@dataclass(frozen=True)
class PatternOptions:
    retry_share: float = 0.3  # retries: share of requests sent twice
    burst: int = 5  # camera-bursts: frames per image
    max_shift: int = 2  # camera-bursts: pixels, per axis
    exposure: float = 0.10  # camera-bursts: gain in [1 - exposure, 1 + exposure]
    noise: float = 2 / 255  # camera-bursts: sensor noise sigma, pixels in [0, 1]
    popular: int = 50  # popular: images every client sends
    jpeg_qualities: tuple[int, int] = (50, 95)  # popular, thumbnail-and-full: range of client qualities
    png_share: float = 1 / 3  # popular, thumbnail-and-full: share of clients encoding PNG
    full_scale: int = 2  # thumbnail-and-full: the full-size image is this many times the thumbnail
    qualities: tuple[int, ...] = (50, 75, 95)  # jpeg-qualities


@dataclass(frozen=True)
class Query:
    """One image as a client sends it."""

    payload: bytes | np.ndarray  # encoded image (PNG/JPEG), or uint8 pixels [H, W, C]
    label: int  # the true class of the source image
    source: int  # index of the source image in the images the pattern was given
    fmt: str = "pixels"  # pixels | png | jpeg
    quality: int | None = None  # JPEG quality
    size: tuple[int, int] | None = None  # (height, width) sent; None: the source's own size
    shift: tuple[int, int] = (0, 0)  # camera-bursts: (dy, dx) in pixels
    gain: float = 1.0  # camera-bursts, distinct-ids: exposure change
    follows: bool = False  # sent right after the previous query (a retry, the next frame or encoding)
    retry: bool = False  # byte-identical to the previous query
    copy: int = 0  # distinct-ids: how many earlier queries used the same source image

    @property
    def encoded(self) -> bool:
        return isinstance(self.payload, bytes)

    def content(self) -> bytes:
        """The bytes that go on the wire for this image (for byte-identity checks)."""
        return self.payload if isinstance(self.payload, bytes) else np.ascontiguousarray(self.payload).tobytes()

    def pixels(self) -> np.ndarray:
        """uint8 [H, W, C], as the firewall decodes it."""
        if isinstance(self.payload, bytes):
            return decode_image(self.payload, _DECODE_LIMIT)
        return self.payload


@dataclass(frozen=True)
class ClientStream:
    pattern: str
    client: int
    queries: tuple[Query, ...]


# -- image helpers -----------------------------------------------------------------------------


def encode(pixels: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3, RGB) to PNG or JPEG bytes; deterministic."""
    image = pixels[:, :, 0] if pixels.shape[2] == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    elif fmt == "jpeg":
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality or 95)])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not ok:
        raise ValueError(f"cannot encode a {pixels.shape} image as {fmt}")
    return buffer.tobytes()


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area interpolation to shrink, bilinear to enlarge; keeps the channel axis."""
    if pixels.shape[:2] == (height, width):
        return pixels
    shrink = height * width < pixels.shape[0] * pixels.shape[1]
    out = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out.reshape(height, width, pixels.shape[2])


def shift_image(pixels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (dy, dx) pixels; the uncovered edge repeats the border (a camera moved)."""
    height, width = pixels.shape[:2]
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return pixels.copy()
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[pad - dy : pad - dy + height, pad - dx : pad - dx + width].copy()


def expose(pixels: np.ndarray, gain: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Exposure change (gain) and Gaussian sensor noise (sigma in [0, 1] units), back to uint8."""
    values = pixels.astype(np.float32) * gain
    if noise > 0:
        values += rng.normal(0.0, noise * 255.0, size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def client_sizes(side: int) -> tuple[int, int, int]:
    """The sizes clients re-encode an image of ``side`` pixels at (issue 11: 28/40/56, 32/48/64)."""
    return {28: (28, 40, 56), 32: (32, 48, 64)}.get(side, (side, round(1.5 * side), 2 * side))


def _client_encoding(rng: np.random.Generator, options: PatternOptions) -> tuple[str, int | None]:
    if rng.random() < options.png_share:
        return "png", None
    low, high = options.jpeg_qualities
    return "jpeg", int(rng.integers(low, high + 1))


def _encoded_query(pixels, label, source, fmt, quality, follows=False, **fields) -> Query:
    payload = pixels if fmt == "pixels" else encode(pixels, fmt, quality)
    size = None if fmt == "pixels" else tuple(pixels.shape[:2])
    return Query(payload, int(label), int(source), fmt, quality, size, follows=follows, **fields)


# -- the patterns --------------------------------------------------------------------------------


def images_needed(
    pattern: str, clients: int, images_per_client: int, options: PatternOptions = PatternOptions()
) -> int:
    """Size of the slice of held-out images a pattern uses."""
    if pattern == "popular":
        return options.popular
    if pattern == "one-class":
        return 2 * clients * images_per_client  # a margin: classes are not exactly balanced
    if pattern in PATTERNS:
        return clients * images_per_client
    raise ValueError(f"unknown benign pattern {pattern!r} (choose from {', '.join(PATTERNS)})")


def _own_images(count: int, client: int, n: int) -> range:
    start = client * n
    return range(start, min(start + n, count))


def _distinct(images, labels, client, n, rng, options) -> list[Query]:
    return [Query(images[i], int(labels[i]), i) for i in _own_images(len(images), client, n)]


def one_class_plan(labels: np.ndarray, clients: int, n: int) -> list[tuple[int, list[int]]]:
    """(class, image indices) for each client: each client its own images of one class, class
    ``k mod classes`` while that class has n images left, else the class with most left."""
    classes = sorted(int(c) for c in np.unique(labels))
    left = {c: [int(i) for i in np.flatnonzero(labels == c)] for c in classes}
    plan = []
    for client in range(clients):
        label = classes[client % len(classes)]
        if len(left[label]) < n:
            label = max(classes, key=lambda c: (len(left[c]), -c))
        plan.append((label, left[label][:n]))
        left[label] = left[label][n:]
    return plan


def _one_class(images, labels, client, n, rng, options) -> list[Query]:
    _, indices = one_class_plan(np.asarray(labels), client + 1, n)[client]
    return [Query(images[i], int(labels[i]), i) for i in indices]


def _retries(images, labels, client, n, rng, options) -> list[Query]:
    fmt = "pixels" if client % 2 == 0 else "png"
    own = list(_own_images(len(images), client, n))
    retried = rng.random(len(own)) < options.retry_share
    if own and not retried.any():
        retried[rng.integers(len(own))] = True
    queries = []
    for i, again in zip(own, retried):
        query = _encoded_query(images[i], labels[i], i, fmt, None)
        queries.append(query)
        if again:
            queries.append(Query(query.payload, query.label, i, fmt, None, query.size, follows=True, retry=True))
    return queries


def _camera_bursts(images, labels, client, n, rng, options) -> list[Query]:
    queries = []
    for i in _own_images(len(images), client, n):
        for frame in range(options.burst):
            dy, dx = (int(v) for v in rng.integers(-options.max_shift, options.max_shift + 1, size=2))
            gain = float(rng.uniform(1 - options.exposure, 1 + options.exposure))
            pixels = expose(shift_image(images[i], dy, dx), gain, options.noise, rng)
            queries.append(Query(pixels, int(labels[i]), i, shift=(dy, dx), gain=gain, follows=frame > 0))
    return queries


def _popular(images, labels, client, n, rng, options) -> list[Query]:
    height = client_sizes(images.shape[1])[client % 3]
    width = round(height * images.shape[2] / images.shape[1])  # the aspect ratio kept
    fmt, quality = _client_encoding(rng, options)
    order = rng.permutation(min(options.popular, len(images)))
    return [_encoded_query(resize(images[i], height, width), labels[i], i, fmt, quality) for i in order]


def _thumbnail_and_full(images, labels, client, n, rng, options) -> list[Query]:
    fmt, quality = _client_encoding(rng, options)
    queries = []
    for i in _own_images(len(images), client, n):
        height, width = images.shape[1:3]
        queries.append(_encoded_query(images[i], labels[i], i, fmt, quality))
        full = resize(images[i], options.full_scale * height, options.full_scale * width)
        queries.append(_encoded_query(full, labels[i], i, fmt, quality, follows=True))
    return queries


def _jpeg_qualities(images, labels, client, n, rng, options) -> list[Query]:
    return [
        _encoded_query(images[i], labels[i], i, "jpeg", quality, follows=k > 0)
        for i in _own_images(len(images), client, n)
        for k, quality in enumerate(options.qualities)
    ]


_GENERATORS: dict[str, Callable[..., list[Query]]] = {
    "distinct": _distinct,
    "one-class": _one_class,
    "retries": _retries,
    "camera-bursts": _camera_bursts,
    "popular": _popular,
    "thumbnail-and-full": _thumbnail_and_full,
    "jpeg-qualities": _jpeg_qualities,
}


def client_stream(
    pattern: str,
    images: np.ndarray,
    labels: np.ndarray,
    client: int,
    *,
    images_per_client: int = 10,
    seed: int = 0,
    options: PatternOptions = PatternOptions(),
) -> ClientStream:
    """Client ``client``'s queries in ``pattern``; ``images`` uint8 [N, H, W, C], the pattern's own slice."""
    if pattern not in _GENERATORS:
        raise ValueError(f"unknown benign pattern {pattern!r} (choose from {', '.join(PATTERNS)})")
    images = _as_nhwc(images)
    rng = np.random.default_rng([seed, PATTERNS.index(pattern), client])
    queries = _GENERATORS[pattern](images, np.asarray(labels), client, images_per_client, rng, options)
    return ClientStream(pattern, client, tuple(queries))


def generate(
    pattern: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    clients: int = 20,
    images_per_client: int = 10,
    seed: int = 0,
    options: PatternOptions = PatternOptions(),
) -> list[ClientStream]:
    """Every client's stream in ``pattern``. Give it ``images_needed(...)`` images of its own."""
    return [
        client_stream(pattern, images, labels, k, images_per_client=images_per_client, seed=seed, options=options)
        for k in range(clients)
    ]


def distinct_ids(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    ids: int = 20_000,
    seed: int = 0,
    max_images: int = 2,
    exposure: float = 0.05,
    noise: float = 2 / 255,
) -> Iterator[ClientStream]:
    """Lazily, ``ids`` one-off clients each sending 1 to ``max_images`` images (see the module doc).

    The images come from a seeded permutation of ``images`` cycled as often as needed, so they are
    spread evenly over the ids; each query is lightly augmented and encoded its own way."""
    images = _as_nhwc(images)
    labels = np.asarray(labels)
    order_rng = np.random.default_rng([seed, len(PATTERNS)])
    order: list[int] = []
    uses = np.zeros(len(images), dtype=np.int64)
    for client in range(ids):
        rng = np.random.default_rng([seed, len(PATTERNS), client])
        count = int(rng.integers(1, max_images + 1))
        queries = []
        for k in range(count):
            if not order:
                order = [int(i) for i in order_rng.permutation(len(images))]
            i = order.pop()
            gain = float(rng.uniform(1 - exposure, 1 + exposure))
            pixels = expose(images[i], gain, noise, rng)
            fmt = ("pixels", "png", "jpeg")[int(rng.integers(3))]
            quality = int(rng.integers(70, 96)) if fmt == "jpeg" else None
            queries.append(_encoded_query(pixels, labels[i], i, fmt, quality, gain=gain, copy=int(uses[i])))
            uses[i] += 1
        yield ClientStream(DISTINCT_IDS, client, tuple(queries))


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError("images must be uint8 [N, H, W] or [N, H, W, C]")
    return images[..., None] if images.ndim == 3 else images
