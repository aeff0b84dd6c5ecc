"""Stateful detection of query-based (probing) attacks by near-duplicate queries.

Chen, Carlini & Wagner, "Stateful Detection of Black-Box Adversarial Attacks" (AsiaCCS workshop
2020, arXiv 2019): decision-based attacks such as HopSkipJump, Boundary and Sign-OPT must query
many near-identical images, which benign traffic almost never does. Each sanitized query is
embedded (``detectors.embedders``) and compared with that client's recent queries; a query whose
``k``-th nearest earlier query lies closer than ``threshold`` raises a finding ("probing.client").
Chen et al. use k = 50 with a threshold at 0.1 % benign false positives; Blacklight (Li et al.,
USENIX Security 2022) hashes quantized pixels and flags on hash matches. Here k defaults to 1 with
a tighter, calibrated threshold: an attack is flagged within a few queries, and the averaging
embedding keeps matching when an attacker blinds every query with fresh noise (which defeats
exact hashes).

A second per-client rule catches the first steps of the attacks' binary and line searches, which
are still far apart: the queries ``(1 - a) x + a u`` of a binary search between ``x`` and ``u``
(HopSkipJump, Boundary, GeoDA) and ``x + c d`` of a line search (Sign-OPT) all lie on one line, and
their normalized embeddings in one plane through the origin. A query closer than
``line_threshold`` to the plane spanned by its nearest and any other of the client's latest
``line_window`` queries raises the same finding. Benign images almost never are such blends.

Rules that keep benign traffic clean:
- Byte-identical repeats (retries, ``ctx.digests``) are counted apart and never trigger by
  themselves: a repeat takes the verdict of its original, so a retried benign image stays
  accepted and a refused probe stays refused, whichever client id re-sends it (a query flagged
  by a client rule is marked flagged in the global history too).
- Every image of a request is compared with the earlier images of the same request too.

A second, global history across all clients ("probing.global", nearest-query rule only) catches
one attacker spread over many client ids (Sybil) or taking a new id after each refusal. It is
searched with an IVF index (exact search until enough queries arrived to train its quantizer).

Memory is bounded: at most ``max_clients`` tracked clients and ``max_vectors`` stored vectors
across them (least recently seen clients are evicted first), ``client_window`` queries and
``client_window_seconds`` seconds per client, ``global_window`` queries overall; old queries leave
ring buffers in O(1) (``detectors.history``). FAISS runs with one thread. The histories are
written to ``snapshot_path`` by ``close()`` and read back at start; a missing or unreadable
snapshot is logged and ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Sequence

import structlog
from pydantic import BaseModel, ConfigDict, Field

from detectors.embedders import Embedder, EmbeddingConfig, PixelEmbeddingConfig
from detectors.history import (
    ClientHistories,
    IndexedHistory,
    Rule,
    Verdict,
    digest_key,
    load_snapshot,
    save_snapshot,
)
from firewall.stage import Finding, RequestContext
from models.runtime import OnnxClassifier

log = structlog.get_logger(__name__)


class ProbingConfig(BaseModel):
    """Probing detector settings. Thresholds are distances between normalized embeddings."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["probing"] = "probing"
    embedding: EmbeddingConfig = Field(default_factory=PixelEmbeddingConfig)
    k: int = Field(1, ge=1, le=100, description="flag when the k-th nearest earlier query is closer than threshold")
    threshold: float = Field(0.05, ge=0.0, description="per-client distance threshold (calibrate: 0.1% benign FP)")
    line_window: int = Field(64, ge=0, description="latest client queries the line rule looks at; 0 turns it off")
    line_threshold: float = Field(0.03, ge=0.0, description="flag a query this close to a line through two of them")
    client_window: int = Field(10_000, ge=1, description="queries remembered per client")
    client_window_seconds: float | None = Field(None, gt=0, description="forget a client's queries after this long")
    max_clients: int = Field(10_000, ge=1, description="tracked clients; least recently seen evicted first")
    max_vectors: int = Field(2_000_000, ge=1, description="vectors stored across all clients")
    global_index: bool = Field(True, description="also compare with recent queries of all clients (Sybil)")
    global_k: int = Field(1, ge=1, le=100)
    global_threshold: float = Field(0.05, ge=0.0, description="global distance threshold")
    global_window: int = Field(100_000, ge=1, description="queries remembered across all clients")
    global_lists: int = Field(1024, ge=1, description="IVF lists of the global index")
    global_probes: int = Field(8, ge=1, description="IVF lists searched per query")
    snapshot_path: Path | None = Field(None, description="history written here at shutdown and read at start")

    def build(self, model: OnnxClassifier) -> ProbingStage:
        return ProbingStage(self, self.embedding.build(model.input))


class ProbingStage:
    """Pipeline stage: embeds ``ctx.tensor``, checks the client's and the global history."""

    name = "probing"

    def __init__(self, config: ProbingConfig, embedder: Embedder):
        self.config = config
        self.embedder = embedder
        self.client_rule = Rule(config.k, config.threshold, config.line_window, config.line_threshold)
        self.global_rule = Rule(config.global_k, config.global_threshold)
        self._start_empty()
        if config.snapshot_path is not None:
            self._load(config.snapshot_path)

    def _start_empty(self) -> None:
        config, dim = self.config, self.embedder.dim
        self.clients = ClientHistories(
            dim, config.client_window, config.client_window_seconds, config.max_clients, config.max_vectors
        )
        self.global_history = (
            IndexedHistory(dim, config.global_window, config.global_lists, config.global_probes)
            if config.global_index
            else None
        )

    def _load(self, path: Path) -> None:
        if not path.exists():
            log.info("probing snapshot not found, starting empty", path=str(path))
            return
        try:
            load_snapshot(path, self.embedder.dim, self.clients, self.global_history)
        except Exception as error:  # a bad snapshot must never stop the firewall
            log.warning("probing snapshot unreadable, starting empty", path=str(path), error=type(error).__name__)
            self._start_empty()
        else:
            log.info("probing snapshot loaded", path=str(path), clients=len(self.clients))

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.tensor is None or not len(ctx.tensor):
            return []
        vectors = self.embedder(ctx.tensor)
        ctx.scratch["embeddings"] = vectors
        received = ctx.digests if len(ctx.digests) == len(vectors) else [row.tobytes() for row in ctx.tensor]
        keys = [digest_key(digest) for digest in received]
        now = time.time()
        history = self.clients.get(ctx.client_id)
        with history.lock:
            rows_before = history.capacity
            verdicts = history.check_and_add(vectors, keys, now, self.client_rule)
            retries = history.retries
        self.clients.account(ctx.client_id, rows_before, history)
        findings = [self._finding("probing.client", verdicts, self.client_rule, retries)]
        if self.global_history is not None:
            with self.global_history.lock:
                global_verdicts = self.global_history.check_and_add(vectors, keys, now, self.global_rule)
                for key, verdict in zip(keys, verdicts):
                    if verdict.flagged:  # a repeat from another id is then refused by the global rule
                        self.global_history.mark_flagged(key)
            findings.append(self._finding("probing.global", global_verdicts, self.global_rule, None))
        return [finding for finding in findings if finding is not None]

    @staticmethod
    def _finding(name: str, verdicts: list[Verdict], rule: Rule, retries: int | None) -> Finding | None:
        flagged = [i for i, verdict in enumerate(verdicts) if verdict.flagged]
        if not flagged:
            return None
        first = flagged[0]
        verdict = verdicts[first]
        on_line = not verdict.retry and verdict.kth_distance >= rule.threshold
        details = {
            "matched": "retry" if verdict.retry else "line" if on_line else "nearest",
            "k": rule.k,
            "kth_distance": verdict.kth_distance,
            "neighbours_within_threshold": verdict.neighbours,
            "line_distance": verdict.line_distance,
            "flagged_items": len(flagged),
        }
        if retries is not None:
            details["client_retries"] = retries
        if on_line:
            return Finding(name, verdict.line_distance, rule.line_threshold, item=first, details=details)
        return Finding(name, verdict.kth_distance, rule.threshold, item=first, details=details)

    def stats(self) -> dict[str, float]:
        clients = self.clients.items()
        stats = {
            "tracked_clients": float(len(clients)),
            "client_vectors": float(sum(len(history) for _, history in clients)),
            "client_vector_rows_allocated": float(self.clients.rows),
            "evicted_clients": float(self.clients.evicted),
            "client_retries": float(sum(history.retries for _, history in clients)),
        }
        if self.global_history is not None:
            stats["global_vectors"] = float(len(self.global_history))
            stats["global_retries"] = float(self.global_history.retries)
        return stats

    def close(self) -> None:
        if self.config.snapshot_path is None:
            return
        try:
            save_snapshot(self.config.snapshot_path, self.embedder.dim, self.clients, self.global_history)
        except OSError as error:
            log.warning("probing snapshot not written", path=str(self.config.snapshot_path), error=str(error))
        else:
            log.info("probing snapshot written", path=str(self.config.snapshot_path), clients=len(self.clients))
