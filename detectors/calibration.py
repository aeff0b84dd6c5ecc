"""`firewall calibrate`: detector thresholds for a target false-positive rate on benign images.

Benign images (a folder of image files, the MNIST IDX folder - images 0-7,999 only - or the
CIFAR-10 zip - its ``train/`` split only) are sanitized and run through every detector; each
threshold is set so that at most the target share of them would raise a finding:

- probing: its radius, so that at most 0.1 % of distinct benign images (the operating point of
  Chen, Carlini & Wagner 2019) lie within it of an earlier image the model labels otherwise.
  Re-sent content has one label, so it needs no pattern of its own; camera bursts (an image
  followed by one-pixel shifts of it) are reported.
- uncertainty, squeeze and adversarial: 5 % of images (the operating point of Feature Squeezing,
  NDSS 2018). The adversarial detector is calibrated when the model has one
  (``adversarial_detector.onnx`` beside it, from `firewall train-detector`), at 5 % of the images
  in each of the ways benign clients send them (``benign_reencodings``: as they are, JPEG at
  quality 50 and 75, twice the size, camera noise), the highest of those thresholds: its scores
  are learnt, and calibrated on plain images alone it flagged 45 % of MNIST digits sent as JPEG
  at quality 50 (the per-client CUSUM expects about 5 % of a benign client's images flagged).

The result is a YAML file with the sanitizer and the calibrated detector list, which the service
configuration includes for that model; the report is printed as YAML too. Progress bars go to
stderr, on a terminal only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from detectors.adversarial import AdversarialConfig, detector_beside
from detectors.probing import ProbingConfig
from detectors.registry import DetectorConfig
from detectors.sanitizer import InvalidImage, Sanitizer, SanitizerConfig, decode_image
from detectors.squeeze import SqueezeConfig, squeeze_scores
from detectors.uncertainty import UncertaintyConfig, UncertaintyStage
from models.data import MNIST_IMAGES, MNIST_TRAIN, load_cifar10, load_mnist
from models.runtime import OnnxClassifier, bundled_model_path

PROBING_FALSE_POSITIVES = 0.001
SCORE_FALSE_POSITIVES = 0.05
BURSTS = 4000  # images turned into camera bursts
BURST_SHIFTS = 5  # one-pixel shifts following each of them
BATCH = 256
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_RADIUS = 0.2  # beyond it an attack's blends are covered anyway, and chance neighbours only add cost
# What a calibrated threshold depends on, and so what the written file pins; operational settings
# (windows, caps, snapshot path) stay with the service configuration.
CALIBRATED_FIELDS = {
    "probing": {"kind", "embedding", "radius", "neighbours", "spread"},
    "uncertainty": {"kind", "dropout", "passes", "score", "threshold"},
    "squeeze": {"kind", "bit_depth", "median_size", "threshold"},
    "adversarial": {"kind", "detector", "threshold"},
}


def load_benign_images(path: Path, limit: int, seed: int = 0) -> list[np.ndarray]:
    """HxWxC uint8 benign images from a folder of files, the MNIST folder or the CIFAR-10 zip."""
    if path.is_dir() and (path / MNIST_IMAGES).exists():
        images = list(load_mnist(path, *MNIST_TRAIN)[0][..., None])
    elif path.suffix == ".zip":
        images = list(load_cifar10(path, "train")[0])
    elif path.is_dir():
        images = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                images.append(decode_image(file.read_bytes(), MAX_IMAGE_PIXELS))
            except InvalidImage:
                print(f"skipped {file}: not a supported image", file=sys.stderr)
    else:
        raise ValueError(f"{path}: expected a folder of images, the MNIST folder or the CIFAR-10 zip")
    if len(images) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
        images = [images[i] for i in keep]
    return images


def _batches(count: int, what: str) -> tqdm:
    """Batch starts over ``count`` items, with a progress bar on a terminal."""
    return tqdm(range(0, count, BATCH), desc=what, unit="batch", disable=None, leave=False, file=sys.stderr)


def _sanitize(sanitizer: Sanitizer, images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([sanitizer(images[i : i + BATCH]) for i in _batches(len(images), "sanitize")])


def _nearest_disagreeing(vectors: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query, the distance to the nearest earlier query the model labelled otherwise (inf: none)."""
    distances = np.full(len(vectors), np.inf)
    for start in range(0, len(vectors), chunk):
        rows = slice(start, min(start + chunk, len(vectors)))
        block, seen = vectors[rows], vectors[: rows.stop]
        squared = (block**2).sum(axis=1)[:, None] + (seen**2).sum(axis=1)[None, :] - 2.0 * block @ seen.T
        earlier = np.arange(rows.stop)[None, :] < np.arange(rows.start, rows.stop)[:, None]
        disagree = labels[None, : rows.stop] != labels[rows, None]
        squared[~(earlier & disagree)] = np.inf
        distances[rows] = np.sqrt(np.maximum(squared.min(axis=1), 0.0))
    return distances


def _lower_threshold(distances: np.ndarray, rate: float) -> float:
    """Largest threshold with at most ``rate`` of the finite distances strictly below it."""
    finite = np.sort(distances[np.isfinite(distances)])
    return float(finite[int(rate * len(finite))]) if len(finite) else float("inf")


def _upper_threshold(scores: np.ndarray, rate: float) -> float:
    """Smallest threshold with at most ``rate`` of the scores strictly above it."""
    ordered = np.sort(scores)
    return float(ordered[len(ordered) - int(rate * len(ordered)) - 1])


def _bursts(images: list[np.ndarray], seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    chosen = rng.choice(len(images), min(BURSTS, len(images)), replace=False)
    bursts = []
    for i in chosen:
        shifts = [offsets[j] for j in rng.choice(len(offsets), BURST_SHIFTS, replace=False)]
        bursts.append([images[i]] + [np.roll(images[i], shift, axis=(0, 1)) for shift in shifts])
    return bursts


def calibrate_probing(
    config: ProbingConfig, model: OnnxClassifier, sanitizer: Sanitizer, images: list[np.ndarray], seed: int = 0
) -> tuple[ProbingConfig, dict]:
    """The largest radius (at most ``MAX_RADIUS``) at which at most 0.1 % of distinct benign images
    are evidence by chance (probed, so answered like their nearest evidence: a decoy costs a benign
    client at most that image's label, never a refusal). Camera bursts are reported,
    not calibrated on: where the model labels two frames of one scene otherwise, no radius helps
    (those frames are probed and answered alike, which costs a benign client nothing)."""
    embedder = config.embedding.build(model.input)

    def embed_and_label(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [(embedder(batch[i : i + BATCH]), model.predict(batch[i : i + BATCH])) for i in _batches(len(batch), "probing")]
        return np.concatenate([v for v, _ in parts]), np.concatenate([lab for _, lab in parts])

    vectors, labels = embed_and_label(_sanitize(sanitizer, images))
    burst_images = [frame for burst in _bursts(images, seed) for frame in burst]
    burst_vectors, burst_labels = embed_and_label(_sanitize(sanitizer, burst_images))
    statistics = {
        "distinct_in_order": _nearest_disagreeing(vectors, labels),
        "camera_bursts": _nearest_disagreeing(burst_vectors, burst_labels),
    }
    radius = min(MAX_RADIUS, _lower_threshold(statistics["distinct_in_order"], PROBING_FALSE_POSITIVES))
    report = {
        "radius": radius,
        "evidence_rate": {pattern: float(np.mean(d <= radius)) for pattern, d in statistics.items()},
    }
    return config.model_copy(update={"radius": radius}), report


def _scorer(config: UncertaintyConfig | SqueezeConfig | AdversarialConfig, model: OnnxClassifier) -> Callable[[np.ndarray], np.ndarray]:
    """The per-image score the detector's threshold applies to, as a function of a sanitized batch."""
    if isinstance(config, SqueezeConfig):
        return lambda batch: squeeze_scores(model, batch, config.bit_depth, config.median_size)
    stage = config.build(model)
    if isinstance(stage, UncertaintyStage):
        return lambda batch: stage.scores(batch)[config.score]
    return lambda batch: stage.detector.scores(batch, model.logits(batch))


def benign_reencodings(images: list[np.ndarray], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """The same HxWxC uint8 images as benign clients send them; the sanitizer brings each to the model."""

    def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
        return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED).reshape(image.shape)

    def doubled(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC).reshape(2 * image.shape[0], 2 * image.shape[1], -1)

    rng = np.random.default_rng(seed)
    return {
        "as sent": images,
        "jpeg q50": [jpeg(image, 50) for image in images],
        "jpeg q75": [jpeg(image, 75) for image in images],
        "twice the size": [doubled(image) for image in images],
        "camera noise 2/255": [np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8) for image in images],
    }


def calibrate_adversarial(
    config: AdversarialConfig, model: OnnxClassifier, sanitizer: Sanitizer, images: list[np.ndarray]
) -> tuple[AdversarialConfig, dict]:
    """The highest of the thresholds that flag 5 % of the images in each benign re-encoding."""
    scorer = _scorer(config, model)
    scores = {}
    for name, encoded in benign_reencodings(images).items():
        batch = _sanitize(sanitizer, encoded)
        scores[name] = np.concatenate([scorer(batch[i : i + BATCH]) for i in _batches(len(batch), f"adversarial, {name}")])
    threshold = max(_upper_threshold(s, SCORE_FALSE_POSITIVES) for s in scores.values())
    report = {
        "threshold": threshold,
        "false_positive_rate": {name: float(np.mean(s > threshold)) for name, s in scores.items()},
        "median_score": float(np.median(scores["as sent"])),
    }
    return config.model_copy(update={"threshold": threshold}), report


def calibrate_scores(
    config: UncertaintyConfig | SqueezeConfig, model: OnnxClassifier, sanitizer: Sanitizer, images: list[np.ndarray]
) -> tuple[UncertaintyConfig | SqueezeConfig, dict]:
    batch, scorer = _sanitize(sanitizer, images), _scorer(config, model)
    scores = np.concatenate([scorer(batch[i : i + BATCH]) for i in _batches(len(batch), config.kind)])
    threshold = _upper_threshold(scores, SCORE_FALSE_POSITIVES)
    report = {
        "threshold": threshold,
        "false_positive_rate": float(np.mean(scores > threshold)),
        "median_score": float(np.median(scores)),
    }
    return config.model_copy(update={"threshold": threshold}), report


def default_detectors(model: OnnxClassifier, dropout: str = "last") -> list[DetectorConfig]:
    """The detectors a bundled model ships with; squeezers as in Feature Squeezing for grey or colour; the
    adversarial detector when one was trained for the model."""
    squeezers = {"bit_depth": 1, "median_size": 2} if model.input.channels == 1 else {"bit_depth": 5, "median_size": 2}
    detectors: list[DetectorConfig] = [ProbingConfig(), UncertaintyConfig(dropout=dropout), SqueezeConfig(**squeezers)]
    if detector_beside(model.path).is_file():
        detectors.append(AdversarialConfig())
    return detectors


def calibrate(
    model: OnnxClassifier, sanitizer_config: SanitizerConfig, detectors: list[DetectorConfig], images: list[np.ndarray]
) -> tuple[list[DetectorConfig], dict]:
    sanitizer = Sanitizer(sanitizer_config, model.input)
    calibrated: list[DetectorConfig] = []
    report: dict[str, dict] = {}
    for config in detectors:
        if isinstance(config, ProbingConfig):
            result, report[config.kind] = calibrate_probing(config, model, sanitizer, images)
        elif isinstance(config, AdversarialConfig):
            result, report[config.kind] = calibrate_adversarial(config, model, sanitizer, images)
        else:
            result, report[config.kind] = calibrate_scores(config, model, sanitizer, images)
        calibrated.append(result)
    return calibrated, report


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist", help="bundled model name or path of an ONNX file (default: %(default)s)")
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of benign images, MNIST folder or CIFAR-10 zip"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="YAML file to write (e.g. models/mnist/thresholds.yaml)"
    )
    parser.add_argument("--limit", type=int, default=10_000, help="most benign images used (default: %(default)s)")
    parser.add_argument("--blur-sigma", type=float, default=None, help="sanitizer Gaussian sigma (default 0.7)")
    parser.add_argument(
        "--dropout", choices=("last", "all"), default="last",
        help="MC dropout on the last Dropout only (the network once) or on all (the network 16 times) (default: %(default)s)",
    )  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    model_path = Path(args.model) if args.model.endswith(".onnx") else bundled_model_path(args.model)
    try:
        model = OnnxClassifier(model_path)
        images = load_benign_images(args.data, args.limit)
    except (OSError, ValueError) as error:
        print(f"firewall calibrate: {error}", file=sys.stderr)
        return 2
    if not images:
        print("firewall calibrate: no benign images found", file=sys.stderr)
        return 2
    sanitizer = SanitizerConfig() if args.blur_sigma is None else SanitizerConfig(blur_sigma=args.blur_sigma)
    try:
        detectors, report = calibrate(model, sanitizer, default_detectors(model, args.dropout), images)
    except ValueError as error:  # no Dropout, or none that cuts the graph (try --dropout all)
        print(f"firewall calibrate: {error}", file=sys.stderr)
        return 2
    document = {
        "sanitizer": sanitizer.model_dump(mode="json"),
        "detectors": [d.model_dump(mode="json", include=CALIBRATED_FIELDS[d.kind]) for d in detectors],
        "calibration": {
            "date": date.today().isoformat(),
            "model": str(args.model),
            "data": args.data.name,
            "images": len(images),
            "targets": {d.kind: PROBING_FALSE_POSITIVES if d.kind == "probing" else SCORE_FALSE_POSITIVES for d in detectors},
            "report": report,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# written by: firewall calibrate --model {args.model} --data {args.data.name} --limit {args.limit}\n"
    args.out.write_text(header + yaml.safe_dump(document, sort_keys=False))
    sys.stdout.write(yaml.safe_dump({"report": report}, sort_keys=False))
    print(f"wrote {args.out}")
    return 0
