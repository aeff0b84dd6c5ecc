"""The one interface every pipeline stage implements: a request context in, findings out.

A stage is a small callable, the way structlog chains processors and Envoy chains filters:

    class Stage(Protocol):
        name: str
        def __call__(self, ctx: RequestContext) -> Sequence[Finding]: ...

Optionally, a stage reports ``stats() -> dict[str, float]`` (metrics), releases what it holds in
``close()``, and, when it keeps evidence per client, shows it with ``client_evidence(client_id) ->
dict[str, float]`` and drops it with ``forget_client(client_id)`` (the admin endpoint's show and reset).
A detector also names the rules it can raise (``rules``), so the pipeline knows which stages the
policy only monitors and runs those after the answer.

Stages run in order on a worker thread (never on the event loop). A stage may read and write
the context (the sanitizer fills ``ctx.tensor``; the probing stage reads it) and returns the
findings it raised, possibly none. The policy, not the stage, decides what a finding means
for the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Finding:
    """Evidence that a request looks adversarial. Operators see all of it; clients see none."""

    rule: str  # detector rule name, e.g. "probing.client"; becomes ECS rule.name
    score: float
    threshold: float
    item: int | None = None  # index in the request batch, when the finding is per image
    details: dict[str, Any] = field(default_factory=dict)
    answer: int | None = None  # the label a decoy gives this item (default: the first label the client was answered)
    severity: Literal["warning", "info"] = "warning"  # info: one observation, evidence but no warning alert
    about: Literal["client", "address"] = "client"  # whom it accuses: the client id, or its source address


@dataclass
class RequestContext:
    """Everything the stages know about one inference request."""

    request_id: str
    model: str
    client_id: str
    peer: str
    images: list[np.ndarray]  # decoded inputs, each HxWxC, uint8 or float32 in [0, 1]
    digests: list[bytes]  # sha256 of each item exactly as received (retries are byte-identical)
    tensor: np.ndarray | None = None  # sanitized model-ready batch, float32 [B, C, H, W]
    labels: np.ndarray | None = None  # int64 [B], set by the prediction step
    findings: list[Finding] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)  # values stages share (embeddings, ...)

    @property
    def batch_size(self) -> int:
        return len(self.images)


class Stage(Protocol):
    name: str

    def __call__(self, ctx: RequestContext) -> Sequence[Finding]: ...
