"""The probing detector: label disagreement among near-duplicates, across all clients."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from detectors.history import EvidenceHistory, QueryHistory
from detectors.probing import ProbingConfig, ProbingStage
from detectors.sanitizer import Sanitizer, SanitizerConfig, decode_image
from firewall.stage import RequestContext
from models.runtime import InputSpec, OnnxClassifier, bundled_model_path
from tests.conftest import make_settings, running_firewall

FIXTURES = Path(__file__).parent / "fixtures"
MNIST_SPEC = InputSpec("input", 1, 28, 28)
MNIST_THRESHOLDS = Path(bundled_model_path("mnist")).with_name("thresholds.yaml")


def calibrated_probing(**overrides) -> ProbingConfig:
    """The probing configuration shipped for the bundled MNIST model."""
    document = yaml.safe_load(MNIST_THRESHOLDS.read_text())
    probing = next(d for d in document["detectors"] if d["kind"] == "probing")
    return ProbingConfig.model_validate(probing | overrides)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.load(FIXTURES / "mnist_heldout.npz")["images"]


@pytest.fixture(scope="module")
def sanitizer() -> Sanitizer:
    document = yaml.safe_load(MNIST_THRESHOLDS.read_text())
    return Sanitizer(SanitizerConfig(**document["sanitizer"]), MNIST_SPEC)


@pytest.fixture
def stage(mnist_model: OnnxClassifier) -> ProbingStage:
    return calibrated_probing().build(mnist_model)


def request(images: list[np.ndarray], client: str, sanitizer: Sanitizer, peer: str = "peer") -> RequestContext:
    images = [image if image.ndim == 3 else image[:, :, None] for image in images]
    digests = [hashlib.sha256(image.tobytes()).digest() for image in images]
    ctx = RequestContext("r", "mnist", client, peer, images, digests)
    ctx.tensor = sanitizer(ctx.images)
    return ctx


def rules(findings) -> list[str]:
    return [finding.rule for finding in findings]


def noise_blend(image: np.ndarray, model: OnnxClassifier, sanitizer: Sanitizer, seed: int = 0) -> np.ndarray:
    """The first blend of the image with uniform noise that the model labels otherwise (an attack's first step)."""
    original = image.astype(np.float32) / 255.0
    noise = np.random.default_rng(seed).uniform(0, 1, original.shape).astype(np.float32)
    label = model.predict(sanitizer([original[:, :, None]]))[0]
    for share in np.arange(0.02, 0.5, 0.02):
        blend = ((1 - share) * original + share * noise)[:, :, None]
        if model.predict(sanitizer([blend]))[0] != label:
            return blend
    raise AssertionError("no blend changes the label")


# --- histories ---------------------------------------------------------------------------------


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_history_finds_neighbours_within_the_radius_and_keeps_the_last_window() -> None:
    history = QueryHistory(dim=8, window=5, lists=4, probes=4)
    vectors = unit_vectors(7, 8)
    for n, vector in enumerate(vectors):
        history.add(vector, key=n + 1, label=n, answer=n, evidence=False, now=float(n))
    assert len(history) == 5 and history.repeat_of(1) is None and history.repeat_of(7) is not None
    near = history.near(vectors[6] + 0.01, radius=0.1, k=4)
    assert list(history.labels[near.slots]) == [6]
    everything = history.near(vectors[6], radius=10.0, k=5)
    assert sorted(history.labels[everything.slots]) == [2, 3, 4, 5, 6]
    assert history.labels[everything.oldest] == 2  # the oldest still in the window


def test_indexed_history_matches_exact_search_after_training() -> None:
    vectors = unit_vectors(3000, 16)
    exact = QueryHistory(dim=16, window=3000, lists=1, probes=1)
    indexed = QueryHistory(dim=16, window=3000, lists=8, probes=8)
    for n, vector in enumerate(vectors):
        exact.add(vector, n + 1, n, n, False, 0.0)
        indexed.add(vector, n + 1, n, n, False, 0.0)
    assert indexed.index is not None
    for query in unit_vectors(20, 16, seed=1):
        a, b = exact.near(query, 1.3, 5), indexed.near(query, 1.3, 5)
        assert list(exact.labels[a.slots]) == list(indexed.labels[b.slots])
        assert exact.labels[a.oldest] == indexed.labels[b.oldest] if len(a.slots) else b.oldest == -1


def test_evidence_history_answers_the_nearest_evidence_within_the_radius() -> None:
    evidence = EvidenceHistory(dim=8, window=2)
    vectors = unit_vectors(3, 8)
    assert evidence.nearest(vectors[0], 1.0) is None
    evidence.add(vectors[0], 4)
    evidence.add(vectors[1], 7)
    assert evidence.nearest(vectors[0] + 0.01, 0.1) == 4
    assert evidence.nearest(vectors[2], 0.01) is None
    evidence.add(vectors[2], 9)  # the window drops the oldest
    assert evidence.nearest(vectors[0], 0.01) is None


# --- benign traffic: re-sent content carries no evidence -----------------------------------------


def encoded(image: np.ndarray, extension: str, size: int = 28, quality: int = 90) -> np.ndarray:
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) if size != 28 else image
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension == ".jpg" else []
    return decode_image(cv2.imencode(extension, resized, params)[1].tobytes(), 4096 * 4096)


def test_the_same_image_reencoded_by_many_clients_raises_nothing(stage, digits, sanitizer) -> None:
    for n, image in enumerate(digits[:30]):
        copies = [image, encoded(image, ".png"), encoded(image, ".jpg", quality=50), encoded(image, ".png", 56)]
        copies += [encoded(image, ".jpg", 40, 75), image]  # the last one byte-identical
        for k, copy in enumerate(copies):
            assert stage(request([copy], f"client-{n}-{k}", sanitizer)) == []


def test_camera_bursts_raise_no_warning_and_keep_one_answer_per_burst(stage, digits, sanitizer) -> None:
    """A burst of a digit the model finds ambiguous may flip its label between frames: such frames
    are observations (info) answered like the burst's first frame, never a warning."""
    rng = np.random.default_rng(0)
    observed = 0
    for n, image in enumerate(digits[:200]):
        first = None
        for _ in range(5):
            dx, dy = rng.integers(-2, 3, 2)
            frame = cv2.warpAffine(image.astype(np.float32), np.float32([[1, 0, dx], [0, 1, dy]]), (28, 28))
            frame = np.clip(frame * rng.uniform(0.9, 1.1) + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
            ctx = request([frame], f"camera-{n}", sanitizer)
            findings = stage(ctx)
            first = stage.history.labels[(stage.history.total - 1) % stage.history.window] if first is None else first
            assert all(f.severity == "info" and f.answer == first for f in findings)
            observed += len(findings)
    assert observed <= 10  # of 1,000 frames


def test_benign_heldout_images_from_ten_clients_raise_nothing(stage, digits, sanitizer) -> None:
    findings = []
    for n, image in enumerate(digits):
        findings += stage(request([image], f"client{n % 10}", sanitizer))
    assert len(digits) == 1000 and findings == []


def test_cifar_fixture_images_from_ten_clients_raise_nothing() -> None:
    path = bundled_model_path("cifar10")
    document = yaml.safe_load(path.with_name("thresholds.yaml").read_text())
    config = ProbingConfig.model_validate(next(d for d in document["detectors"] if d["kind"] == "probing"))
    stage = config.build(OnnxClassifier(path))
    sanitizer = Sanitizer(SanitizerConfig(**document["sanitizer"]), InputSpec("input", 3, 32, 32))
    files = sorted((FIXTURES / "cifar10_test").rglob("*.jpg"))
    findings = []
    for n, file in enumerate(files):
        image = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        findings += stage(request([image], f"client{n % 10}", sanitizer))
    assert len(files) == 100 and findings == []


# --- probing: near-duplicates the model labels otherwise ------------------------------------------


def test_a_near_duplicate_labelled_otherwise_gets_the_first_answer_from_any_id(
    stage, digits, sanitizer, mnist_model
) -> None:
    image = digits[3]
    label = int(mnist_model.predict(sanitizer([image[:, :, None]]))[0])
    assert stage(request([image], "first", sanitizer)) == []
    blend = noise_blend(image, mnist_model, sanitizer)
    findings = stage(request([blend], "prober", sanitizer))
    assert rules(findings) == ["probing.region"]
    assert findings[0].answer == label and findings[0].severity == "info"
    other = noise_blend(image, mnist_model, sanitizer, seed=1)  # another id, next to the evidence
    again = stage(request([other], "fresh-id", sanitizer))
    assert rules(again) == ["probing.region"] and again[0].answer == label


def test_a_byte_identical_retry_of_a_probed_query_gets_the_same_answer(stage, digits, sanitizer, mnist_model) -> None:
    image = digits[5]
    stage(request([image], "first", sanitizer))
    blend = noise_blend(image, mnist_model, sanitizer)
    answer = stage(request([blend], "prober", sanitizer))[0].answer
    queries = len(stage.history)
    retry = stage(request([blend], "someone-else", sanitizer))
    assert [f.answer for f in retry] == [answer] and len(stage.history) == queries


def test_evidence_flags_the_client_and_the_address(digits, sanitizer, mnist_model) -> None:
    stage = calibrated_probing(client_threshold=2.5, address_threshold=4.5).build(mnist_model)
    seen: list[list[str]] = []
    targets = [image for image in digits[10:40] if mnist_model.predict(sanitizer([image[:, :, None]]))[0] != 8]
    for n, image in enumerate(targets[:6]):  # uniform noise pushes MNIST digits towards 8
        stage(request([image], f"owner-{n}", sanitizer, peer="10.0.0.1"))
        blend = noise_blend(image, mnist_model, sanitizer)
        seen.append(rules(stage(request([blend], "prober", sanitizer, peer="10.0.0.2"))))
    assert seen[1] == ["probing.region"]  # one id's evidence below its threshold: an observation only
    assert "probing.client" in seen[2] and "probing.address" not in seen[3] and "probing.address" in seen[4]
    clean = stage(request([digits[100]], "prober", sanitizer, peer="10.0.0.2"))
    assert rules(clean) == ["probing.client", "probing.address"] and clean[0].item is None
    assert stage(request([digits[101]], "bystander", sanitizer, peer="10.0.0.3")) == []


def test_near_duplicates_within_one_request_are_compared(stage, digits, sanitizer, mnist_model) -> None:
    blend = noise_blend(digits[20], mnist_model, sanitizer)
    findings = stage(request([digits[20], blend], "batch", sanitizer))
    assert rules(findings) == ["probing.region"] and findings[0].item == 1


def test_concurrent_requests_are_all_recorded(stage, digits, sanitizer) -> None:
    def send(worker: int) -> None:
        for image in digits[worker * 50 : (worker + 1) * 50]:
            stage(request([image], f"worker{worker}", sanitizer))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stage.history) == 200


def test_missing_digests_fall_back_to_the_sanitized_pixels(stage, digits, sanitizer) -> None:
    for _ in range(3):
        ctx = request([digits[0]], "client", sanitizer)
        ctx.digests = []
        assert stage(ctx) == []
    assert len(stage.history) == 1  # the repeats were recognised


# --- snapshots ---------------------------------------------------------------------------------


def test_history_and_evidence_survive_a_restart_through_the_snapshot(
    tmp_path: Path, digits, sanitizer, mnist_model
) -> None:
    config = calibrated_probing(snapshot_path=tmp_path / "probing.snapshot")
    stage = config.build(mnist_model)
    stage(request([digits[3]], "first", sanitizer))
    blend = noise_blend(digits[3], mnist_model, sanitizer)
    answer = stage(request([blend], "prober", sanitizer))[0].answer
    stage.close()
    restarted = config.build(mnist_model)
    assert len(restarted.history) == 2
    other = noise_blend(digits[3], mnist_model, sanitizer, seed=1)
    assert [f.answer for f in restarted(request([other], "fresh-id", sanitizer))] == [answer]


@pytest.mark.parametrize("content", [None, b"not a snapshot"])
def test_missing_or_corrupt_snapshot_is_ignored(tmp_path: Path, content: bytes | None, mnist_model) -> None:
    path = tmp_path / "probing.snapshot"
    if content is not None:
        path.write_bytes(content)
    stage = calibrated_probing(snapshot_path=path).build(mnist_model)
    assert len(stage.history) == 0


def test_snapshot_of_another_embedding_is_ignored(tmp_path: Path, digits, sanitizer, mnist_model) -> None:
    path = tmp_path / "probing.snapshot"
    stage = calibrated_probing(snapshot_path=path).build(mnist_model)
    stage(request([digits[0]], "client", sanitizer))
    stage.close()
    other = calibrated_probing(snapshot_path=path, embedding={"kind": "pixels", "size": 4}).build(mnist_model)
    assert len(other.history) == 0


# --- a real decision-based attack, answered as the decoy policy answers -------------------------


class QueryBudgetSpent(Exception):
    pass


def run_hopskipjump(
    model: OnnxClassifier, sanitizer: Sanitizer, stage: ProbingStage, client_ids: list[str], budget: int
) -> tuple[int | None, float]:
    """ART HopSkipJump whose every query goes through the sanitizer, the probing stage and the model,
    answered with the probed answer when there is one (the decoy policy).

    Returns the first probed query's number and the L2 distortion of the closest input the attacker
    saw misclassified that the bare model also misclassifies (inf: none).
    """
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    digits = np.load(FIXTURES / "mnist_heldout.npz")["images"]
    original = digits[7:8, :, :, None].astype(np.float32) / 255.0
    label = int(model.predict(sanitizer([original[0]]))[0])
    first_probed, best = None, np.inf
    queries = 0

    def predict(batch: np.ndarray) -> np.ndarray:
        nonlocal queries, first_probed, best
        answers = []
        for image in batch.reshape(-1, 28, 28, 1).astype(np.float32):
            client = client_ids[queries % len(client_ids)]
            queries += 1
            ctx = request([image], client, sanitizer)
            probed = [f.answer for f in stage(ctx) if f.rule == "probing.region"]
            if probed and first_probed is None:
                first_probed = queries
            answer = probed[0] if probed else int(model.predict(ctx.tensor)[0])
            bare = int(model.predict(image.transpose(2, 0, 1)[None])[0])
            if answer != label and bare != label:
                best = min(best, float(np.linalg.norm(image - original[0])))
            answers.append(answer)
            if queries >= budget:
                raise QueryBudgetSpent
        return np.eye(10, dtype=np.float32)[answers]

    classifier = BlackBoxClassifier(predict, (28, 28, 1), 10, clip_values=(0.0, 1.0))
    attack = HopSkipJump(classifier, max_iter=20, max_eval=200, init_eval=20, verbose=False)
    np.random.seed(0)
    try:
        predict(original)  # the attacker first checks the clean image's label
        attack.generate(original)
    except QueryBudgetSpent:
        pass
    return first_probed, best


@pytest.mark.parametrize("ids", [1, 20])
def test_hopskipjump_is_probed_within_ten_queries_and_finds_nothing_within_l2_3(
    ids: int, mnist_model: OnnxClassifier, sanitizer: Sanitizer
) -> None:
    stage = calibrated_probing().build(mnist_model)
    first_probed, best = run_hopskipjump(mnist_model, sanitizer, stage, [f"attacker{n}" for n in range(ids)], 600)
    assert first_probed is not None and first_probed <= 10
    assert best > 3.0


def test_history_survives_a_server_restart_through_snapshot_dir(tmp_path: Path, digits, sanitizer, mnist_model) -> None:
    """Through the real server: the history the probing stage built before a restart still decides
    the answer after it. Without it the last blend is new content, answered with the model's label."""
    document = yaml.safe_load(MNIST_THRESHOLDS.read_text())
    probing = next(d for d in document["detectors"] if d["kind"] == "probing")
    model = {"sanitizer": document["sanitizer"], "detectors": [probing], "policy": {"action": "decoy"}}
    settings = make_settings(snapshot_dir=str(tmp_path), throttle={"enabled": False}, models={"mnist": model})
    image = digits[3]
    label = int(mnist_model.predict(sanitizer([image[:, :, None]]))[0])
    before, after = (noise_blend(image, mnist_model, sanitizer, seed) for seed in (0, 1))
    assert int(mnist_model.predict(sanitizer([after]))[0]) != label  # the model alone labels it otherwise

    def answer(firewall, pixels: np.ndarray, client_id: str) -> int:
        pixels = pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        tensor = triton.InferInput("image", [1, *pixels.shape], "UINT8" if pixels.dtype == np.uint8 else "FP32")
        tensor.set_data_from_numpy(pixels[None])
        with triton.InferenceServerClient(f"127.0.0.1:{firewall.port}") as client:
            return int(client.infer("mnist", [tensor], headers={"x-client-id": client_id}).as_numpy("label")[0])

    with running_firewall(settings) as firewall:
        assert answer(firewall, image, "first") == label
        assert answer(firewall, before, "prober") == label  # decoyed: evidence next to the first query
    assert (tmp_path / "mnist.probing.snapshot").is_file()
    with running_firewall(settings) as firewall:
        assert answer(firewall, after, "fresh-id") == label
