"""The global query history of the probing detector (``detectors.probing``).

``QueryHistory`` keeps the last ``window`` queries of all clients in one ring allocated once:
per query its embedding, time, digest key, the label the model gave it, the answer the client got,
and whether it is *evidence* (it lies next to an earlier query the model labelled otherwise). It
is searched exactly until enough queries arrived to train an IVF index, then through that index;
a byte-identical repeat is found by its digest key in O(1). ``save_snapshot`` / ``load_snapshot``
write and read all of it as one ``.npz`` file (no pickle).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

faiss.omp_set_num_threads(1)  # beside ONNX Runtime, more FAISS threads oversubscribe the cores

DIGEST_BYTES = 32
SNAPSHOT_FORMAT = "firewall-probing-3"
TRAIN_POINTS_PER_LIST = 16  # the IVF index is trained once this many queries per list arrived
COLUMNS = ("vectors", "times", "keys", "labels", "answers", "evidence")


def digest_key(digest: bytes) -> int:
    """A query's 64-bit key: the first 8 bytes of its sha256 digest (any other digest is hashed first).

    0 marks an empty slot, so a key of 0 becomes 1; a collision needs about 2**32 queries in one
    window.
    """
    digest = digest if len(digest) == DIGEST_BYTES else hashlib.sha256(digest).digest()
    return int.from_bytes(digest[:8], "little") or 1


@dataclass(frozen=True)
class Neighbours:
    """The stored queries near one query, nearest first."""

    slots: np.ndarray
    distances: np.ndarray
    oldest: int  # slot of the one that arrived first (-1: none)


class QueryHistory:
    """The last ``window`` queries, in a ring allocated once: slot = sequence number % window."""

    def __init__(self, dim: int, window: int, lists: int, probes: int):
        self.dim, self.window, self.lists, self.probes = dim, window, lists, probes
        self.vectors = np.zeros((window, dim), np.float32)
        self.times = np.zeros(window, np.float64)
        self.keys = np.zeros(window, np.uint64)
        self.labels = np.zeros(window, np.int64)  # what the model says
        self.answers = np.zeros(window, np.int64)  # what the client got
        self.evidence = np.zeros(window, bool)
        self.total = 0  # queries ever added: the next one's sequence number
        self.slot_by_key: dict[int, int] = {}
        self.train_size = min(window, TRAIN_POINTS_PER_LIST * lists)
        self.index: faiss.IndexIVFFlat | None = None
        self.removed_below = 0  # sequence numbers below this are out of the IVF index
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return min(self.total, self.window)

    @property
    def oldest(self) -> int:
        return self.total - len(self)

    def repeat_of(self, key: int) -> int | None:
        """The slot of a byte-identical earlier query still in the window, if any."""
        return self.slot_by_key.get(key)

    def sequence(self, slots: np.ndarray) -> np.ndarray:
        """Sequence numbers of live slots (the ring's newest query sits at slot (total - 1) % window)."""
        newest = self.total - 1
        return newest - (newest - slots) % self.window

    def near(self, query: np.ndarray, radius: float, k: int) -> Neighbours:
        """The (at most ``k``) nearest stored queries within ``radius``."""
        found, squared = np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(self) and self.index is None:
            squared, found = faiss.knn(query[None, :], self.vectors[: len(self)], min(k, len(self)))
            squared, found = squared[0], found[0]
        elif len(self):
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(self.oldest, self.total), nprobe=self.probes)
            squared, found = self.index.search(query[None, :], k, params=params)
            squared, found = squared[0], np.where(found[0] >= 0, found[0] % self.window, -1)
        distances = np.sqrt(np.maximum(squared, 0.0))
        keep = (found >= 0) & (distances <= radius)
        slots, distances = found[keep].astype(np.int64), distances[keep]
        oldest = int(slots[np.argmin(self.sequence(slots))]) if len(slots) else -1
        return Neighbours(slots, distances, oldest)

    def add(self, vector: np.ndarray, key: int, label: int, answer: int, evidence: bool, now: float) -> None:
        slot = self.total % self.window
        if self.total >= self.window and self.slot_by_key.get(int(self.keys[slot])) == slot:
            del self.slot_by_key[int(self.keys[slot])]
        self.vectors[slot], self.times[slot], self.keys[slot] = vector, now, key
        self.labels[slot], self.answers[slot], self.evidence[slot] = label, answer, evidence
        self.slot_by_key[key] = slot
        self.total += 1
        if self.index is not None:
            self.index.add_with_ids(vector[None, :], np.array([self.total - 1], np.int64))
            if self.oldest - self.removed_below >= max(1, self.window // 20):
                self.index.remove_ids(faiss.IDSelectorRange(0, self.oldest))
                self.removed_below = self.oldest
        elif len(self) >= self.train_size:
            self.reindex()

    def reindex(self) -> None:
        """(Re)build the IVF index from the ring, once it holds enough queries to train it."""
        self.index = None
        if len(self) < self.train_size:
            return
        sequence = np.arange(self.oldest, self.total, dtype=np.int64)
        stored = self.vectors[sequence % self.window]
        quantizer = faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.lists)
        index.cp.min_points_per_centroid = TRAIN_POINTS_PER_LIST
        index.train(stored)
        index.nprobe = self.probes
        index.add_with_ids(stored, sequence)
        self.index, self.quantizer, self.removed_below = index, quantizer, self.oldest

    @property
    def evidence_count(self) -> int:
        return int(self.evidence[: len(self)].sum())


class EvidenceHistory:
    """The last ``window`` evidence queries (embedding and the answer they got), searched exactly:
    in benign traffic evidence is rare; under attack the window keeps the attack's latest."""

    def __init__(self, dim: int, window: int):
        self.window = window
        self.vectors = np.zeros((window, dim), np.float32)
        self.answers = np.zeros(window, np.int64)
        self.total = 0

    def __len__(self) -> int:
        return min(self.total, self.window)

    def nearest(self, query: np.ndarray, radius: float) -> int | None:
        """The answer of the nearest evidence within ``radius``, if any."""
        if not len(self):
            return None
        squared, found = faiss.knn(query[None, :], self.vectors[: len(self)], 1)
        return int(self.answers[found[0, 0]]) if squared[0, 0] <= radius * radius else None

    def add(self, vector: np.ndarray, answer: int) -> None:
        slot = self.total % self.window
        self.vectors[slot], self.answers[slot] = vector, answer
        self.total += 1


def save_snapshot(path: Path, history: QueryHistory) -> None:
    with history.lock:
        slots = np.arange(history.oldest, history.total, dtype=np.int64) % history.window
        arrays = {name: getattr(history, name)[slots] for name in COLUMNS}
    arrays.update(format=np.array(SNAPSHOT_FORMAT), dim=np.array(history.dim))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(path)  # atomic: a crash mid-write leaves the previous snapshot


def load_snapshot(path: Path, history: QueryHistory) -> None:
    """Refill an empty history, oldest first; raises ValueError on a snapshot that does not fit."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != SNAPSHOT_FORMAT or int(data["dim"]) != history.dim:
            raise ValueError("snapshot format or embedding size differs")
        columns = [data[name] for name in COLUMNS]
    vectors = columns[0]
    if vectors.ndim != 2 or vectors.shape[1] != history.dim or any(len(c) != len(vectors) for c in columns):
        raise ValueError("snapshot arrays do not match the embedding")
    start = max(0, len(vectors) - history.window)  # a smaller window keeps the newest
    for vector, when, key, label, answer, evidence in zip(*(c[start:] for c in columns)):
        history.add(vector.astype(np.float32), int(key), int(label), int(answer), bool(evidence), float(when))
