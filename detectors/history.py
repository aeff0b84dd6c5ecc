"""Query histories of the probing detector (``detectors.probing``) and the rules that search them.

- ``RingHistory``: one client's last ``window`` queries (and, optionally, only those of the last
  ``seconds``) in a ring buffer: the oldest leaves in O(1); exact k-NN search with ``faiss.knn``.
- ``IndexedHistory``: the same ring, searched through an IVF index once enough queries arrived to
  train it (for the global history of 100,000 queries); expired ids are removed in one pass every
  ``window / 20`` additions.
- ``ClientHistories``: the per-client rings in LRU order, bounded in clients and stored vectors.
- ``check_and_add``: the detection rules (k-th nearest earlier query, line rule, retries).
- ``save_snapshot`` / ``load_snapshot``: all of it in one ``.npz`` file (no pickle).

``History`` is the interface a shared store (instead of process memory) would implement.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import faiss
import numpy as np

faiss.omp_set_num_threads(1)  # beside ONNX Runtime, more FAISS threads oversubscribe the cores

DIGEST_BYTES = 32
SNAPSHOT_FORMAT = "firewall-probing-2"
INITIAL_ROWS = 64
TRAIN_POINTS_PER_LIST = 16  # the global IVF index is trained once this many queries per list arrived


def digest_key(digest: bytes) -> int:
    """A query's 64-bit key: the first 8 bytes of its sha256 digest (any other digest is hashed first).

    0 marks an empty slot, so a key of 0 becomes 1; a collision needs about 2**32 queries in one
    window.
    """
    digest = digest if len(digest) == DIGEST_BYTES else hashlib.sha256(digest).digest()
    return int.from_bytes(digest[:8], "little") or 1


@dataclass(frozen=True)
class Rule:
    """When a history flags a query."""

    k: int
    threshold: float  # flag when the k-th nearest earlier query is closer
    line_window: int = 0  # how many of the latest queries the line rule looks at (0: off)
    line_threshold: float = 0.0  # flag when the query is this close to a line through two of them


@dataclass(frozen=True)
class Verdict:
    """What the history says about one query."""

    kth_distance: float  # distance to the k-th nearest earlier query (inf when fewer than k)
    neighbours: int  # earlier queries closer than the threshold, among the k nearest
    line_distance: float  # distance to the nearest line through two recent queries (inf: not checked)
    retry: bool  # byte-identical to an earlier query still in the window
    flagged: bool


class History(Protocol):
    """Recent queries of one client or of all clients. A shared store can implement this."""

    def check_and_add(self, vectors: np.ndarray, keys: Sequence[int], now: float, rule: Rule) -> list[Verdict]: ...

    def mark_flagged(self, key: int) -> None: ...

    def __len__(self) -> int: ...


class RingHistory:
    """The last ``window`` queries (and, optionally, only those of the last ``seconds``).

    Vectors live in a ring buffer that grows by doubling up to ``window`` rows and is searched
    exactly with ``faiss.knn``. Beside each vector: its time, its digest key and whether it was
    flagged (for the retry rule); no Python object per query.
    """

    def __init__(self, dim: int, window: int, seconds: float | None = None):
        self.dim, self.window, self.seconds = dim, window, seconds
        rows = min(INITIAL_ROWS, window)
        self.vectors = np.zeros((rows, dim), np.float32)
        self.times = np.zeros(rows, np.float64)
        self.keys = np.zeros(rows, np.uint64)  # 0: empty slot
        self.flagged = np.zeros(rows, bool)
        self.head = 0  # next slot written
        self.count = 0
        self.total = 0  # queries ever added (sequence number of the next one)
        self.retries = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        return len(self.vectors)

    def _grow(self) -> None:
        rows = min(2 * self.capacity, self.window)
        order = self._order()
        arrays = []
        for old in (self.vectors, self.times, self.keys, self.flagged):
            new = np.zeros((rows, *old.shape[1:]), old.dtype)
            new[: self.count] = old[order]
            arrays.append(new)
        self.vectors, self.times, self.keys, self.flagged = arrays
        self.head = self.count % rows

    def _order(self) -> np.ndarray:
        """Slots of the live queries, oldest first."""
        return (self.head - self.count + np.arange(self.count)) % self.capacity

    def _drop_oldest(self) -> None:
        self.keys[(self.head - self.count) % self.capacity] = 0
        self.count -= 1

    def expire(self, now: float) -> None:
        if self.seconds is None:
            return
        cutoff = now - self.seconds
        while self.count and self.times[(self.head - self.count) % self.capacity] < cutoff:
            self._drop_oldest()

    def _add(self, vector: np.ndarray, key: int, flagged: bool, now: float) -> None:
        if self.count == self.capacity:
            if self.capacity < self.window:
                self._grow()
            else:
                self._drop_oldest()
        self.vectors[self.head] = vector
        self.times[self.head] = now
        self.keys[self.head] = key
        self.flagged[self.head] = flagged
        self.head = (self.head + 1) % self.capacity
        self.count += 1
        self.total += 1

    def repeat_of(self, key: int) -> bool | None:
        """None when no query in the window has this key, else whether any copy was flagged."""
        slots = np.flatnonzero(self.keys == np.uint64(key))
        return bool(self.flagged[slots].any()) if len(slots) else None

    def mark_flagged(self, key: int) -> None:
        """Record that another rule flagged this query, so that its repeats stay flagged here too."""
        self.flagged[self.keys == np.uint64(key)] = True

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Distances from each query to its k nearest stored vectors, ascending, inf-padded."""
        if self.count == self.capacity:  # full: every row is live, order does not matter
            parts = [(0, self.capacity)]
        else:  # the live rows may wrap around the end after time-based expiry
            oldest = (self.head - self.count) % self.capacity
            end = oldest + self.count
            parts = [(oldest, min(end, self.capacity))] + ([(0, end - self.capacity)] if end > self.capacity else [])
        found = [np.full((len(queries), k), np.inf, np.float32)]
        for start, stop in parts:
            if stop > start:
                squared, _ = faiss.knn(queries, self.vectors[start:stop], min(k, stop - start))
                found.append(np.sqrt(np.maximum(squared, 0.0)))
        return np.sort(np.concatenate(found, axis=1), axis=1)[:, :k]

    def line_distances(self, queries: np.ndarray, recent: int) -> np.ndarray:
        """Distance from each query to the plane through the origin spanned by two of the latest
        ``recent`` queries: the one nearest to it and whichever other fits best (inf if fewer than 2).

        Embeddings are normalized, so every blend ``(1 - a) x + a u`` of two earlier queries, and
        every point ``x + c d`` on a ray through two of them, lies in (or very near) that plane:
        the binary and line searches of decision-based attacks land there from their first steps.
        Only points between the two count (positive weights on both), not points beyond them.
        """
        count = min(self.count, recent)
        found = np.full(len(queries), np.inf, np.float32)
        if count < 2:
            return found
        latest = self.vectors[(self.head - count + np.arange(count)) % self.capacity]
        squared_norms = (latest * latest).sum(axis=1)
        for row, query in enumerate(queries):
            nearest = int(np.argmin(squared_norms - 2.0 * (latest @ query)))
            axis = latest[nearest] / max(float(np.sqrt(squared_norms[nearest])), 1e-6)
            residual = query - (query @ axis) * axis  # the query off the nearest one's direction
            along = latest @ axis
            across = squared_norms - along * along  # each candidate's squared part off that direction
            across[nearest] = 0.0
            usable = across > 1e-8
            # query = a * nearest + b * candidate + rest; only a, b > 0 (between the two, as in a
            # binary or line search), not beyond them (as in one-pixel shifts of one image)
            b = np.where(usable, latest @ residual, 0.0) / np.where(usable, across, 1.0)
            a = float(query @ axis) - b * along
            usable &= (a > 0) & (b > 0)
            if usable.any():
                explained = b[usable] ** 2 * across[usable]
                found[row] = np.sqrt(max(float(residual @ residual - explained.max()), 0.0))
        return found

    def check_and_add(self, vectors: np.ndarray, keys: Sequence[int], now: float, rule: Rule) -> list[Verdict]:
        self.expire(now)
        return check_and_add(self, vectors, keys, now, rule)


def check_and_add(
    history: RingHistory | IndexedHistory, vectors: np.ndarray, keys: Sequence[int], now: float, rule: Rule
) -> list[Verdict]:
    """The detection rules, shared by both histories (the caller holds the history's lock)."""
    k, threshold = rule.k, rule.threshold
    batch_flags: dict[int, bool] = {}
    repeats: dict[int, bool | None] = {}  # item -> verdict of its original in the history
    fresh: list[int] = []
    for i, key in enumerate(keys):
        earlier = None if key in batch_flags else history.repeat_of(key)
        if key in batch_flags or earlier is not None:
            repeats[i] = earlier
        else:
            batch_flags[key] = False
            fresh.append(i)
    distances = np.full((len(fresh), k), np.inf, np.float32)
    lines = np.full(len(fresh), np.inf, np.float32)
    if fresh:
        queries = np.ascontiguousarray(vectors[fresh], dtype=np.float32)
        if len(history):
            distances = history.search(queries, k)
        if rule.line_window and isinstance(history, RingHistory):
            lines = history.line_distances(queries, rule.line_window)
        if len(fresh) > 1:  # earlier images of the same request count too
            within = np.sqrt(np.maximum(((queries[:, None, :] - queries[None, :, :]) ** 2).sum(-1), 0.0))
            within[np.triu_indices(len(fresh))] = np.inf
            distances = np.sort(np.concatenate([distances, within], axis=1), axis=1)[:, :k]
    verdicts: dict[int, Verdict] = {}
    for row, i in enumerate(fresh):
        kth, line = float(distances[row, k - 1]), float(lines[row])
        flagged = kth < threshold or line < rule.line_threshold
        batch_flags[keys[i]] = flagged
        neighbours = int((distances[row] < threshold).sum())
        verdicts[i] = Verdict(kth, neighbours, line, retry=False, flagged=flagged)
        history._add(vectors[i], keys[i], flagged, now)
    for i, earlier in repeats.items():
        flagged = earlier if earlier is not None else batch_flags[keys[i]]
        history.retries += 1
        verdicts[i] = Verdict(0.0, 0, np.inf, retry=True, flagged=flagged)
    return [verdicts[i] for i in range(len(keys))]


class IndexedHistory:
    """A ring history searched through an IVF index once enough queries arrived to train it.

    The ring buffer stays the source of truth (and what a snapshot holds); the IVF index holds
    the same vectors under their sequence numbers, and expired ones are removed in one pass every
    ``window // 20`` additions (searches skip them meanwhile with an id selector).
    """

    def __init__(self, dim: int, window: int, lists: int, probes: int):
        self.ring = RingHistory(dim, window)
        self.lists, self.probes = lists, probes
        self.train_size = min(window, TRAIN_POINTS_PER_LIST * lists)
        self.index: faiss.IndexIVFFlat | None = None
        self.removed_below = 0
        self.lock = self.ring.lock

    def __len__(self) -> int:
        return len(self.ring)

    def repeat_of(self, key: int) -> bool | None:
        return self.ring.repeat_of(key)

    def mark_flagged(self, key: int) -> None:
        self.ring.mark_flagged(key)

    @property
    def retries(self) -> int:
        return self.ring.retries

    @retries.setter
    def retries(self, value: int) -> None:
        self.ring.retries = value

    def _oldest_id(self) -> int:
        return self.ring.total - len(self.ring)

    def _build_index(self) -> None:
        stored = self.ring.vectors[self.ring._order()]
        quantizer = faiss.IndexFlatL2(self.ring.dim)
        index = faiss.IndexIVFFlat(quantizer, self.ring.dim, self.lists)
        index.cp.min_points_per_centroid = TRAIN_POINTS_PER_LIST
        index.train(stored)
        index.nprobe = self.probes
        index.add_with_ids(stored, np.arange(self._oldest_id(), self.ring.total, dtype=np.int64))
        self.index, self.quantizer, self.removed_below = index, quantizer, self._oldest_id()

    def reindex(self) -> None:
        """(Re)build the IVF index from the ring, once the ring holds enough vectors to train it."""
        self.index = None
        if len(self.ring) >= self.train_size:
            self._build_index()

    def _add(self, vector: np.ndarray, key: int, flagged: bool, now: float) -> None:
        self.ring._add(vector, key, flagged, now)
        if self.index is not None:
            self.index.add_with_ids(vector[None, :], np.array([self.ring.total - 1], np.int64))
            if self._oldest_id() - self.removed_below >= max(1, self.ring.window // 20):
                self.index.remove_ids(faiss.IDSelectorRange(0, self._oldest_id()))
                self.removed_below = self._oldest_id()
        elif len(self.ring) >= self.train_size:
            self._build_index()

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        if self.index is None:
            return self.ring.search(queries, k)
        if self._oldest_id() > self.removed_below:  # skip expired ids not yet removed
            live = faiss.IDSelectorRange(self._oldest_id(), self.ring.total)
            squared, ids = self.index.search(queries, k, params=faiss.SearchParametersIVF(sel=live, nprobe=self.probes))
        else:
            squared, ids = self.index.search(queries, k)
        distances = np.sqrt(np.maximum(squared, 0.0))
        distances[ids < 0] = np.inf  # fewer than k found
        return distances

    def check_and_add(self, vectors: np.ndarray, keys: Sequence[int], now: float, rule: Rule) -> list[Verdict]:
        return check_and_add(self, vectors, keys, now, rule)


class ClientHistories:
    """Per-client ring histories in LRU order, bounded in clients and in stored vectors."""

    def __init__(self, dim: int, window: int, seconds: float | None, max_clients: int, max_vectors: int):
        self.dim, self.window, self.seconds = dim, window, seconds
        self.max_clients, self.max_vectors = max_clients, max_vectors
        self.clients: OrderedDict[str, RingHistory] = OrderedDict()
        self.rows = 0  # allocated rows across all clients
        self.evicted = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.clients)

    def get(self, client_id: str) -> RingHistory:
        with self.lock:
            history = self.clients.get(client_id)
            if history is None:
                history = RingHistory(self.dim, self.window, self.seconds)
                self.clients[client_id] = history
                self.rows += history.capacity
                self._evict(keep=client_id)
            else:
                self.clients.move_to_end(client_id)
            return history

    def account(self, client_id: str, rows_before: int, history: RingHistory) -> None:
        """Record a history's growth, then evict the least recently seen clients if over budget."""
        with self.lock:
            if self.clients.get(client_id) is history:
                self.rows += history.capacity - rows_before
                self._evict(keep=client_id)

    def _evict(self, keep: str) -> None:
        while len(self.clients) > 1 and (len(self.clients) > self.max_clients or self.rows > self.max_vectors):
            oldest = next(iter(self.clients))
            if oldest == keep:
                self.clients.move_to_end(keep)
                continue
            self.rows -= self.clients.pop(oldest).capacity
            self.evicted += 1

    def items(self) -> list[tuple[str, RingHistory]]:
        with self.lock:
            return list(self.clients.items())


SNAPSHOT_ARRAYS = ("vectors", "times", "keys", "flagged", "counters")


def _ring_arrays(ring: RingHistory) -> dict[str, np.ndarray]:
    order = ring._order()
    return {
        "vectors": ring.vectors[order],
        "times": ring.times[order],
        "keys": ring.keys[order],
        "flagged": ring.flagged[order],
        "counters": np.array([ring.total, ring.retries], np.int64),
    }


def _restore_ring(ring: RingHistory, arrays: dict[str, np.ndarray]) -> None:
    vectors, times, keys, flagged = arrays["vectors"], arrays["times"], arrays["keys"], arrays["flagged"]
    if vectors.ndim != 2 or vectors.shape[1] != ring.dim or not len(vectors) == len(times) == len(keys) == len(flagged):
        raise ValueError("snapshot arrays do not match the embedding")
    for vector, when, key, flag in zip(vectors, times, keys, flagged):
        ring._add(vector.astype(np.float32), int(key), bool(flag), float(when))
    ring.total, ring.retries = int(arrays["counters"][0]), int(arrays["counters"][1])


def save_snapshot(path: Path, dim: int, clients: ClientHistories, global_history: IndexedHistory | None) -> None:
    arrays: dict[str, np.ndarray] = {"format": np.array(SNAPSHOT_FORMAT), "dim": np.array(dim)}
    entries = clients.items()
    arrays["client_ids"] = np.array([client_id for client_id, _ in entries], dtype=str)
    for n, (_, history) in enumerate(entries):
        with history.lock:
            arrays.update({f"client{n}_{key}": value for key, value in _ring_arrays(history).items()})
    if global_history is not None:
        with global_history.lock:
            arrays.update({f"global_{key}": value for key, value in _ring_arrays(global_history.ring).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **arrays)
    partial.replace(path)  # atomic: a crash mid-write leaves the previous snapshot


def load_snapshot(path: Path, dim: int, clients: ClientHistories, global_history: IndexedHistory | None) -> None:
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != SNAPSHOT_FORMAT or int(data["dim"]) != dim:
            raise ValueError("snapshot format or embedding size differs")
        for n, client_id in enumerate(data["client_ids"]):
            arrays = {key: data[f"client{n}_{key}"] for key in SNAPSHOT_ARRAYS}
            history = clients.get(str(client_id))
            before = history.capacity
            _restore_ring(history, arrays)
            clients.account(str(client_id), before, history)
        if global_history is not None and "global_vectors" in data:
            _restore_ring(global_history.ring, {key: data[f"global_{key}"] for key in SNAPSHOT_ARRAYS})
            global_history.reindex()
