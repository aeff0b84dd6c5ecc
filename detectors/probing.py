"""Stateful detection of decision-based (probing) attacks: regions of input space whose answers disagree.

A decision-based attack (HopSkipJump, Boundary, Sign-OPT, GeoDA) must send many near-duplicate
queries whose answers *change*: it finds the decision boundary next to an image by querying on both
sides of it. Benign traffic re-sends content too (retries, re-encodings, resized copies, camera
bursts, the same popular image from many users), but the model gives all copies of one content the
same answer, so re-sent content carries no information to an attacker and no evidence here. This
stage therefore looks for label disagreement among near-duplicates, across all clients:

- Every sanitized query is embedded (``detectors.embedders``: by default a shift-centred, normalized
  8 x 8 thumbnail, the "pixel" encoder of Chen, Carlini & Wagner, "Stateful Detection of Black-Box
  Adversarial Attacks", 2019) and labelled by the firewall's own copy of the model.
- It is compared with the recent queries of *all* clients (``detectors.history``): its at most
  ``neighbours`` nearest within ``radius``. When one of them got another label from the model, the
  query is *evidence*: it explores a decision boundary.
- A query that is evidence, or lies within ``radius`` of evidence, is *probed*: it raises
  ``probing.region`` carrying the answer its oldest neighbour got. Under the ``decoy`` policy that
  is what the client gets, so around an attacked image every answer stays what the first query
  there got, whichever side of the boundary a query lies on and whichever client id sent it: the
  attacker's binary searches and gradient estimates see a constant, and a fresh id buys nothing.
  Only evidence makes a query probed (being near a probed query does not), so a benign chance
  neighbour changes the answers of its direct neighbours at most and never spreads.
- Evidence per client id and per source address: a decayed count of the evidence it sent
  (``detectors.evidence.DecayingCount``), plus ``probed_weight`` (0.5) for each new query it sent
  into ground other queries probed: an attack spread over many ids (a Sybil attack) leaves
  evidence mostly in regions its other ids opened, and every id exploring them reads the boundary
  too. A benign client meets a probed region rarely and only with the few images it re-sends.
  At ``client_threshold`` (``address_threshold``) it raises ``probing.client``
  (``probing.address``), a warning-level alert naming the attacker (the address alert names the
  address only: the ids behind it may be many benign users of one NAT), on each of its queries
  while the evidence lasts. ``probing.client`` is about the client as a whole (no item), so under
  ``decoy`` every answer it gets is one constant (the first label it was answered,
  ``firewall.policy``), probed region or not: the regions' answers are what their first query
  got, and an attack that walks into new ground would otherwise still read genuine answers at its
  frontier. A single probed query is an info-level observation only.
- A byte-identical repeat is no new query: it gets the answer its original got.
- ``ctx.scratch["novel"]`` tells later stages which images are new content (no earlier query
  within the radius, this request's earlier images included), so that the per-image detectors
  count a re-sent image once.

The radius is a trade-off that ``firewall calibrate`` measures on benign images: large enough that
the blends and noisy copies an attack sends around an image lie within it, small enough that two
distinct benign images the model labels differently almost never do.

Related work: Blacklight (Li et al., USENIX Security 2022) flags hash matches across all clients;
PIHA (Choi et al., 2023) and QPA (Li et al., "Query Provenance Analysis", 2024) link queries into
provenance chains. Those flag re-sent benign content, which this rule tolerates by construction.
The constant answer is a decoy in the sense of Feng, Hooda, Mangaokar, Fawaz, Jha & Prakash
("Stateful Defenses for Machine Learning Models Are Not Yet Secure Against Black-box Attacks",
CCS 2023): an explicit refusal is an oracle their adaptive attacker (OARS) steers by; a constant
answer is not.

Several replicas (``share``): the firewall hands the stage its state (``detectors.shared``). The
evidence counts are then one count per client id and per address across every replica, and each
replica publishes the queries it placed (embedding, digest key, label, answer, evidence flag, time)
and adds the other replicas' to its own history, so a search stays local and never waits for the
network, and an attack spread over replicas lands in one history.

Memory is bounded: ``window`` queries (embedding, time, key, label, answer, evidence flag) and at
most ``max_clients`` evidence counters per kind. FAISS runs with one thread. The history is written
to ``snapshot_path`` by ``close()`` and read back at start; a missing or unreadable snapshot is
logged and ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, Sequence

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from detectors.embedders import Embedder, EmbeddingConfig, PixelEmbeddingConfig
from detectors.evidence import DecayingCount
from detectors.forward import shared_forward
from detectors.history import EvidenceHistory, QueryHistory, digest_key, load_snapshot, save_snapshot
from detectors.shared import QueryFeed, QueryRows, SharedState
from firewall.stage import Finding, RequestContext
from models.runtime import OnnxClassifier

log = structlog.get_logger(__name__)


class Placement(NamedTuple):
    """What one query turned out to be."""

    answer: int | None  # the answer it gets when probed, else None
    evidence: bool  # an earlier query within the radius got another label
    novel: bool  # no copy of its content (byte-identical or within the radius) came before
    repeat: bool = False  # byte-identical to a query in the history: not stored again


class ProbingConfig(BaseModel):
    """Probing detector settings. Distances are between normalized embeddings."""

    model_config = ConfigDict(extra="forbid")
    live_fields: ClassVar[frozenset[str]] = frozenset({"radius", "neighbours", "spread", "probed_weight", "client_threshold", "address_threshold"})  # read per call: a reload may change them

    kind: Literal["probing"] = Field("probing", description="selects this detector")
    embedding: EmbeddingConfig = Field(default_factory=PixelEmbeddingConfig, description="how queries are embedded")
    radius: float = Field(0.15, ge=0.0, description="queries this close are near-duplicates (calibrated)")
    neighbours: int = Field(16, ge=1, le=256, description="nearest earlier queries compared with each query")
    spread: float = Field(2.0, ge=1.0, description="queries within spread x radius of evidence are probed")
    evidence_window: int = Field(20_000, ge=1, description="evidence queries remembered")
    window: int = Field(100_000, ge=1, description="queries remembered across all clients")
    lists: int = Field(1024, ge=1, description="IVF lists of the history's index")
    probes: int = Field(8, ge=1, description="IVF lists searched per query")
    probed_weight: float = Field(0.5, ge=0.0, le=1.0, description="what a new probed query that is not itself evidence adds to its client's and address's evidence")
    client_threshold: float = Field(10.0, gt=0, description="decayed evidence that flags a client id")
    address_threshold: float = Field(40.0, gt=0, description="decayed evidence that flags a source address")
    evidence_half_life_s: float = Field(3600.0, gt=0, description="evidence halves after this long")
    max_clients: int = Field(100_000, ge=1, description="evidence counters kept per kind; least recent forgotten")
    snapshot_path: Path | None = Field(None, description="history written here at shutdown and read at start")

    def build(self, model: OnnxClassifier) -> ProbingStage:
        return ProbingStage(self, self.embedding.build(model.input), model)


class ProbingStage:
    """Pipeline stage: embeds and labels ``ctx.tensor``, compares each image with all recent queries."""

    name = "probing"
    rules = ("probing.region", "probing.client", "probing.address")

    def __init__(self, config: ProbingConfig, embedder: Embedder, model: OnnxClassifier):
        self.config = config
        self.embedder = embedder
        self.model = model
        self.clients = DecayingCount(config.evidence_half_life_s, config.max_clients)
        self.addresses = DecayingCount(config.evidence_half_life_s, config.max_clients)
        self.feed: QueryFeed | None = None
        self._start_empty()
        if config.snapshot_path is not None:
            self._load(config.snapshot_path)

    def _start_empty(self) -> None:
        config = self.config
        self.history = QueryHistory(self.embedder.dim, config.window, config.lists, config.probes)
        self.evidence = EvidenceHistory(self.embedder.dim, config.evidence_window)

    def _load(self, path: Path) -> None:
        if not path.exists():
            log.info("probing snapshot not found, starting empty", path=str(path))
            return
        try:
            load_snapshot(path, self.history)
        except Exception as error:  # a bad snapshot must never stop the firewall
            log.warning("probing snapshot unreadable, starting empty", path=str(path), error=type(error).__name__)
            self._start_empty()
        else:
            log.info("probing snapshot loaded", path=str(path), queries=len(self.history))

    def share(self, state: SharedState, name: str) -> None:
        """Count evidence in ``state`` and exchange queries through it (several replicas)."""
        config = self.config
        self.clients = state.counts(f"{name}.clients", config.evidence_half_life_s, config.max_clients)
        self.addresses = state.counts(f"{name}.addresses", config.evidence_half_life_s, config.max_clients)
        self.feed = state.feed(name, self._receive)

    def _receive(self, rows: QueryRows) -> None:
        """Add queries other replicas placed to this history (no search: they were placed there)."""
        if rows.vectors.ndim != 2 or rows.vectors.shape[1] != self.embedder.dim:
            log.warning("probing queries of another embedding ignored", dim=rows.vectors.shape[-1])
            return
        with self.history.lock:
            for vector, key, label, answer, evidence, when in zip(
                rows.vectors, rows.keys, rows.labels, rows.answers, rows.evidence, rows.times
            ):
                self.history.add(vector, int(key), int(label), int(answer), bool(evidence), float(when))
                if evidence:
                    self.evidence.add(vector, int(answer))

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]:
        if ctx.tensor is None or not len(ctx.tensor):
            return []
        vectors = self.embedder(ctx.tensor)
        labels = shared_forward(ctx, self.model).labels  # the answer's own forward pass
        ctx.scratch["embeddings"] = vectors
        received = ctx.digests if len(ctx.digests) == len(vectors) else [row.tobytes() for row in ctx.tensor]
        keys = [digest_key(digest) for digest in received]
        now = time.time()
        with self.history.lock:
            placed = [self._place(vector, key, int(label), now) for vector, key, label in zip(vectors, keys, labels)]
        ctx.scratch["novel"] = [placement.novel for placement in placed]
        if self.feed is not None:
            self._publish(vectors, keys, labels, placed, now)
        return self._findings(ctx, placed, now)

    def _publish(self, vectors: np.ndarray, keys: list[int], labels: np.ndarray, placed: list[Placement], now: float) -> None:
        stored = [i for i, placement in enumerate(placed) if not placement.repeat]
        if stored:
            answers = [labels[i] if placed[i].answer is None else placed[i].answer for i in stored]
            self.feed.publish(
                QueryRows(
                    vectors=np.ascontiguousarray(vectors[stored], np.float32),
                    keys=np.array([keys[i] for i in stored], np.uint64),
                    labels=labels[stored].astype(np.int64),
                    answers=np.array(answers, np.int64),
                    evidence=np.array([placed[i].evidence for i in stored], bool),
                    times=np.full(len(stored), now),
                )
            )

    def _place(self, vector: np.ndarray, key: int, label: int, now: float) -> Placement:
        """Store one query and say what it is."""
        history, config = self.history, self.config
        repeat = history.repeat_of(key)
        if repeat is not None:  # the same bytes again: no new information, the same answer
            answer = int(history.answers[repeat])
            return Placement(answer if answer != label else None, evidence=False, novel=False, repeat=True)
        near = history.near(vector, config.radius, config.neighbours)
        evidence = bool((history.labels[near.slots] != label).any())
        answer = self.evidence.nearest(vector, config.spread * config.radius)
        if answer is None and evidence:  # the first evidence here: what the area's first query got
            answer = int(history.answers[near.oldest])
        if evidence:
            self.evidence.add(vector, answer)
        history.add(vector, key, label, label if answer is None else answer, evidence, now)
        return Placement(answer, evidence, novel=not len(near.slots))

    def _findings(self, ctx: RequestContext, placed: list[Placement], now: float) -> list[Finding]:
        probed = [i for i, placement in enumerate(placed) if placement.answer is not None]
        evidence = sum(placement.evidence for placement in placed)
        # exploring ground others probed also teaches the client the boundary: counted, at a weight
        explored = sum(placement.answer is not None and not (placement.evidence or placement.repeat) for placement in placed)
        weight = evidence + self.config.probed_weight * explored
        client = self.clients.add(ctx.client_id, weight, now)
        address = self.addresses.add(ctx.peer, weight, now)
        findings = [
            Finding("probing.region", float(evidence), 1.0, item=i, answer=placed[i].answer, severity="info")
            for i in probed
        ]
        first = probed[0] if probed else None
        details = {"probed_items": len(probed), "evidence_items": evidence}
        if client >= self.config.client_threshold:
            findings.append(
                Finding("probing.client", client, self.config.client_threshold, details=details)
            )
        if address >= self.config.address_threshold:
            findings.append(
                Finding("probing.address", address, self.config.address_threshold, item=first, details=details, about="address")
            )
        return findings

    def client_evidence(self, client_id: str) -> dict[str, float]:
        return {"client": self.clients.current(client_id, time.time()), "client_threshold": self.config.client_threshold}

    def forget_client(self, client_id: str) -> None:
        self.clients.forget(client_id)

    def stats(self) -> dict[str, float]:
        return {
            "history_queries": float(len(self.history)),
            "history_evidence": float(self.history.evidence_count),
            "tracked_clients": float(len(self.clients)),
            "tracked_addresses": float(len(self.addresses)),
        }

    def close(self) -> None:
        if self.config.snapshot_path is None:
            return
        try:
            save_snapshot(self.config.snapshot_path, self.history)
        except OSError as error:
            log.warning("probing snapshot not written", path=str(self.config.snapshot_path), error=str(error))
        else:
            log.info("probing snapshot written", path=str(self.config.snapshot_path), queries=len(self.history))
