"""Probing detector: real FAISS histories, real ONNX model, real ART attack, real fixture digits."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detectors.embedders import PixelEmbeddingConfig
from detectors.history import ClientHistories, IndexedHistory, RingHistory, Rule, digest_key
from detectors.probing import ProbingConfig, ProbingStage
from detectors.sanitizer import Sanitizer, SanitizerConfig
from firewall.stage import RequestContext
from models.runtime import InputSpec, OnnxClassifier, bundled_model_path

FIXTURES = Path(__file__).parent / "fixtures"
MNIST_SPEC = InputSpec("input", 1, 28, 28)
MNIST_THRESHOLDS = Path(bundled_model_path("mnist")).with_name("thresholds.yaml")


def digest(image: np.ndarray) -> bytes:
    return hashlib.sha256(image.tobytes()).digest()


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
    return Sanitizer(SanitizerConfig(), MNIST_SPEC)


@pytest.fixture(scope="module")
def model(mnist_model: OnnxClassifier) -> OnnxClassifier:
    return mnist_model


def request(images: list[np.ndarray], client: str, sanitizer: Sanitizer) -> RequestContext:
    images = [image if image.ndim == 3 else image[:, :, None] for image in images]
    ctx = RequestContext("r", "mnist", client, "peer", images, [digest(image) for image in images])
    ctx.tensor = sanitizer(ctx.images)
    return ctx


def stage_for(config: ProbingConfig) -> ProbingStage:
    return ProbingStage(config, config.embedding.build(MNIST_SPEC))


# --- histories ---------------------------------------------------------------------------------


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_ring_history_search_is_exact_and_keeps_the_last_window() -> None:
    vectors = unit_vectors(300, 16)
    history = RingHistory(16, window=100)
    for i, vector in enumerate(vectors):
        history._add(vector, i + 1, False, 0.0)
    assert len(history) == 100 and history.capacity == 100
    queries = unit_vectors(5, 16, seed=1)
    expected = np.sort(np.linalg.norm(queries[:, None] - vectors[None, 200:], axis=2), axis=1)[:, :3]
    np.testing.assert_allclose(history.search(queries, 3), expected, rtol=1e-4, atol=1e-5)
    assert history.repeat_of(300) is not None and history.repeat_of(200) is None  # keys left with their slots


def test_ring_history_forgets_queries_older_than_its_time_window() -> None:
    history = RingHistory(4, window=100, seconds=10.0)
    vectors = unit_vectors(3, 4)
    for when, vector in zip((0.0, 5.0, 12.0), vectors):
        history.check_and_add(vector[None], [int(when) + 1], when, Rule(1, 0.0))
    history.expire(14.0)
    assert len(history) == 2
    history.expire(30.0)
    assert len(history) == 0 and history.repeat_of(13) is None


def test_indexed_history_matches_exact_search_after_training() -> None:
    vectors = unit_vectors(3000, 16)
    indexed = IndexedHistory(16, window=2000, lists=8, probes=8)
    ring = RingHistory(16, window=2000)
    for i, vector in enumerate(vectors):
        key = i + 1
        indexed._add(vector, key, False, 0.0)
        ring._add(vector, key, False, 0.0)
    assert indexed.index is not None and indexed.index.ntotal <= 2000 + 2000 // 20
    queries = vectors[-50:] + 0.01  # near-duplicates of recent vectors
    np.testing.assert_allclose(indexed.search(queries, 2), ring.search(queries, 2), rtol=1e-4, atol=1e-5)
    expired = vectors[:5] + 0.001  # their originals left the window
    assert np.all(indexed.search(expired, 1) > 0.1)


def test_client_histories_evict_least_recently_seen_clients() -> None:
    clients = ClientHistories(dim=4, window=1000, seconds=None, max_clients=3, max_vectors=10_000)
    for name in ("a", "b", "c"):
        clients.get(name)
    clients.get("a")  # a is now the most recent
    clients.get("d")
    assert [name for name, _ in clients.items()] == ["c", "a", "d"]


def test_client_histories_bound_the_stored_vectors() -> None:
    clients = ClientHistories(dim=4, window=1000, seconds=None, max_clients=100, max_vectors=300)
    vectors = unit_vectors(200, 4)
    for name in ("a", "b", "c"):
        history = clients.get(name)
        before = history.capacity
        for i, vector in enumerate(vectors):
            history._add(vector, digest_key(f"{name}{i}".encode()), False, 0.0)
        clients.account(name, before, history)
    assert clients.rows <= 300
    assert [name for name, _ in clients.items()] == ["c"]


# --- detection rules ---------------------------------------------------------------------------


def test_byte_identical_retries_are_counted_but_never_flagged(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.05, global_threshold=0.05))
    for _ in range(20):
        assert stage(request([digits[0]], "client", sanitizer)) == []
    assert stage.stats()["client_retries"] == 19 and stage.stats()["client_vectors"] == 1


def test_near_duplicate_blinded_with_noise_is_flagged(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    rng = np.random.default_rng(0)
    stage = stage_for(ProbingConfig(threshold=0.05, global_index=False))
    base = digits[1].astype(np.float32) / 255.0
    blinded = [np.clip(base + rng.uniform(-0.05, 0.05, base.shape), 0, 1).astype(np.float32) for _ in range(3)]
    assert stage(request([blinded[0]], "attacker", sanitizer)) == []
    (finding,) = stage(request([blinded[1]], "attacker", sanitizer))
    assert finding.rule == "probing.client" and finding.score < finding.threshold == 0.05
    assert finding.details["k"] == 1 and finding.details["kth_distance"] == finding.score


def test_binary_search_blends_are_flagged_by_the_line_rule(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.05, line_threshold=0.03, global_threshold=0.05))
    original = digits[6].astype(np.float32) / 255.0
    noise = np.random.default_rng(0).uniform(0, 1, original.shape).astype(np.float32)
    assert stage(request([original], "attacker", sanitizer)) == []
    assert stage(request([noise], "attacker", sanitizer)) == []
    blend = 0.5 * original + 0.5 * noise
    (finding,) = stage(request([blend], "attacker", sanitizer))  # far from both, on their line
    assert finding.rule == "probing.client" and finding.details["matched"] == "line"
    assert finding.details["kth_distance"] > 0.05
    assert finding.score == finding.details["line_distance"] < finding.threshold == 0.03
    (resent,) = stage(request([blend], "new-id", sanitizer))  # the refused query from a fresh id
    assert resent.rule == "probing.global" and resent.details["matched"] == "retry"


def test_retry_of_a_flagged_query_stays_flagged(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.05, global_threshold=0.05))
    base = digits[2].astype(np.float32) / 255.0
    probe = np.clip(base + 0.02, 0, 1).astype(np.float32)
    stage(request([base], "attacker", sanitizer))
    assert stage(request([probe], "attacker", sanitizer))
    findings = stage(request([probe], "new-id", sanitizer))  # the same bytes from another id
    assert [f.rule for f in findings] == ["probing.global"] and findings[0].details["matched"] == "retry"


def test_near_duplicates_within_one_request_are_flagged(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.05, global_index=False))
    base = digits[3].astype(np.float32) / 255.0
    batch = [base, np.clip(base * 0.9 + 0.05, 0, 1).astype(np.float32), digits[4]]
    (finding,) = stage(request(batch, "attacker", sanitizer))
    assert finding.item == 1 and finding.details["flagged_items"] == 1


def test_camera_burst_of_shifted_frames_is_not_flagged(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(calibrated_probing())
    shifts = [(0, 0), (0, 1), (1, 0), (1, 1), (-1, 0), (0, -1)]
    for n, image in enumerate(digits[:100]):
        burst = [np.roll(image, shift, axis=(0, 1)) for shift in shifts]
        for frame in burst:
            assert stage(request([frame], f"camera{n % 10}", sanitizer)) == []


def test_benign_heldout_images_from_ten_clients_raise_nothing(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(calibrated_probing())
    findings = []
    for i in range(0, 1000, 4):  # requests of 4 images, clients interleaved
        findings += stage(request(list(digits[i : i + 4]), f"client{(i // 4) % 10}", sanitizer))
    assert findings == []
    assert stage.stats()["tracked_clients"] == 10 and stage.stats()["global_vectors"] == 1000


def test_concurrent_requests_are_all_recorded(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.0))
    contexts = [request([digits[i]], f"client{i % 4}", sanitizer) for i in range(200)]

    def send(part: list[RequestContext]) -> None:
        for ctx in part:
            stage(ctx)

    threads = [threading.Thread(target=send, args=(contexts[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stage.stats()["client_vectors"] == 200 and stage.stats()["global_vectors"] == 200


# --- snapshot ----------------------------------------------------------------------------------


def test_history_survives_a_restart_through_the_snapshot(
    tmp_path: Path, digits: np.ndarray, sanitizer: Sanitizer
) -> None:
    config = ProbingConfig(threshold=0.05, global_threshold=0.05, snapshot_path=tmp_path / "probing.npz")
    stage = stage_for(config)
    base = digits[5].astype(np.float32) / 255.0
    stage(request([base], "attacker", sanitizer))
    stage(request(list(digits[10:20]), "someone", sanitizer))
    stage.close()
    restarted = stage_for(config)
    assert restarted.stats()["tracked_clients"] == 2 and restarted.stats()["global_vectors"] == 11
    findings = restarted(request([np.clip(base + 0.01, 0, 1).astype(np.float32)], "attacker", sanitizer))
    assert {f.rule for f in findings} == {"probing.client", "probing.global"}


@pytest.mark.parametrize("content", [None, b"", b"not a snapshot", b"PK\x03\x04 truncated zip"])
def test_missing_or_corrupt_snapshot_is_ignored(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "probing.npz"
    if content is not None:
        path.write_bytes(content)
    stage = stage_for(ProbingConfig(snapshot_path=path))
    assert stage.stats()["tracked_clients"] == 0


def test_snapshot_of_another_embedding_is_ignored(tmp_path: Path, digits: np.ndarray, sanitizer: Sanitizer) -> None:
    path = tmp_path / "probing.npz"
    stage = stage_for(ProbingConfig(snapshot_path=path))
    stage(request([digits[0]], "a", sanitizer))
    stage.close()
    other = stage_for(ProbingConfig(snapshot_path=path, embedding=PixelEmbeddingConfig(size=6)))
    assert other.stats()["tracked_clients"] == 0


# --- a real decision-based attack --------------------------------------------------------------


class QueryBudgetSpent(Exception):
    pass


def run_hopskipjump(
    model: OnnxClassifier, sanitizer: Sanitizer, stage: ProbingStage, client_ids: list[str], budget: int
) -> list[tuple[int, str]]:
    """ART HopSkipJump whose every query goes through the sanitizer, the probing stage and the model.

    Returns (query number, rule) for each finding, stopping after ``budget`` queries.
    """
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    findings: list[tuple[int, str]] = []
    queries = 0

    def predict(batch: np.ndarray) -> np.ndarray:
        nonlocal queries
        labels = []
        for image in batch.reshape(-1, 28, 28, 1).astype(np.float32):
            client = client_ids[queries % len(client_ids)]
            queries += 1
            ctx = request([image], client, sanitizer)
            findings.extend((queries, f.rule) for f in stage(ctx))
            labels.append(model.predict(ctx.tensor)[0])
            if queries >= budget:
                raise QueryBudgetSpent
        return np.eye(10, dtype=np.float32)[labels]

    classifier = BlackBoxClassifier(predict, (28, 28, 1), 10, clip_values=(0.0, 1.0))
    digits = np.load(FIXTURES / "mnist_heldout.npz")["images"]
    attack = HopSkipJump(classifier, max_iter=10, max_eval=200, init_eval=20, verbose=False)
    np.random.seed(0)
    try:
        attack.generate(digits[7:8, :, :, None].astype(np.float32) / 255.0)
    except QueryBudgetSpent:
        pass
    return findings


def test_hopskipjump_is_flagged_within_fifty_queries(model: OnnxClassifier, sanitizer: Sanitizer) -> None:
    stage = stage_for(calibrated_probing())
    findings = run_hopskipjump(model, sanitizer, stage, ["attacker"], budget=50)
    assert any(rule == "probing.client" for _, rule in findings)


def test_hopskipjump_spread_over_twenty_ids_is_flagged_by_the_global_index(
    model: OnnxClassifier, sanitizer: Sanitizer
) -> None:
    stage = stage_for(calibrated_probing())
    findings = run_hopskipjump(model, sanitizer, stage, [f"sybil{n}" for n in range(20)], budget=50)
    first = {rule: min(n for n, r in findings if r == rule) for _, rule in findings}
    assert first["probing.global"] < first.get("probing.client", 51)  # before any id sent a second query


def test_missing_digests_fall_back_to_the_sanitized_pixels(digits: np.ndarray, sanitizer: Sanitizer) -> None:
    stage = stage_for(ProbingConfig(threshold=0.05, global_threshold=0.05))
    for _ in range(3):
        ctx = request([digits[0]], "client", sanitizer)
        ctx.digests = []
        assert stage(ctx) == []
    assert stage.stats()["client_retries"] == 2


def test_cifar_fixture_images_from_ten_clients_raise_nothing() -> None:
    path = bundled_model_path("cifar10")
    document = yaml.safe_load(path.with_name("thresholds.yaml").read_text())
    config = ProbingConfig.model_validate(next(d for d in document["detectors"] if d["kind"] == "probing"))
    spec = InputSpec("input", 3, 32, 32)
    stage = ProbingStage(config, config.embedding.build(spec))
    sanitizer = Sanitizer(SanitizerConfig(**document["sanitizer"]), spec)
    files = sorted((FIXTURES / "cifar10_test").rglob("*.jpg"))
    findings = []
    for n, file in enumerate(files):
        image = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        findings += stage(request([image], f"client{n % 10}", sanitizer))
    assert len(files) == 100 and findings == []
