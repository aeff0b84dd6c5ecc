"""What a stateful detector needs from the state that outlives a request, as interfaces.

The firewall passes an object with ``cusum`` and ``feed`` to a stage's ``share`` method: in
process memory (one replica) or in a shared store (several replicas, ``firewall.redis_state``).
Detectors depend on these interfaces only, so they stay a library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ClientTest(Protocol):
    """A sequential test per client over its flagged images (``detectors.evidence.Cusum`` in memory)."""

    threshold: float

    def add(self, key: str, flags: list[bool], now: float) -> float:
        """Observe a client's images in order; return the statistic after the largest of them."""

    def current(self, key: str) -> float: ...

    def forget(self, key: str) -> None: ...


@dataclass(frozen=True)
class QueryRows:
    """Queries one replica placed in its history for one request, as other replicas add them to theirs."""

    vectors: np.ndarray  # float32 [n, dim]
    keys: np.ndarray  # uint64 [n], digest keys
    labels: np.ndarray  # int64 [n], what the model said
    answers: np.ndarray  # int64 [n], what the client got
    evidence: np.ndarray  # bool [n]
    times: np.ndarray  # float64 [n], wall-clock seconds
    client: str = ""  # who sent them: their evidence counts for this client id
    address: str = ""  # and for this source address
    weight: float = 0.0  # what they added to that client's and address's evidence

    def __len__(self) -> int:
        return len(self.keys)


class QueryFeed(Protocol):
    def catch_up(self) -> None:
        """Receive the queries the other replicas published so far (before a search)."""

    def publish(self, rows: QueryRows) -> None:
        """Hand one request's queries to the others (before its answer). Never fails: while the store
        is away they wait in a bounded buffer (beyond, dropped and counted)."""


class SharedState(Protocol):
    def cusum(self, name: str, p0: float, p1: float, threshold: float, max_keys: int, keep_s: float) -> ClientTest:
        """Page's CUSUM per client (``detectors.evidence.Cusum``), one statistic per client for every
        replica; a shared store forgets a statistic ``keep_s`` after its last image."""

    def feed(self, name: str, receive: Callable[[QueryRows], None], forget: Callable[[str], None]) -> QueryFeed | None:
        """Exchange queries with the other replicas: ``receive`` gets theirs, one request's rows at a
        time, on a worker thread (``catch_up``'s or the store's reader); ``forget`` gets the client
        ids and addresses an operator reset on another replica. None when there are no other
        replicas (process memory)."""
