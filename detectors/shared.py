"""What a stateful detector needs from the state that outlives a request, as interfaces.

The firewall passes an object with ``counts`` and ``feed`` to a stage's ``share`` method: in
process memory (one replica) or in a shared store (several replicas, ``firewall.redis_state``).
Detectors depend on these interfaces only, so they stay a library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Counts(Protocol):
    """Per-key counts that decay with time (``detectors.evidence.DecayingCount`` in memory)."""

    def add(self, key: str, count: float, now: float) -> float:
        """Add ``count`` observations; return the key's decayed count (a shared store uses its own clock)."""

    def current(self, key: str, now: float) -> float:
        """The key's decayed count, without adding to it."""

    def forget(self, key: str) -> None: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class QueryRows:
    """Queries one replica placed in its history, as other replicas add them to theirs."""

    vectors: np.ndarray  # float32 [n, dim]
    keys: np.ndarray  # uint64 [n], digest keys
    labels: np.ndarray  # int64 [n], what the model said
    answers: np.ndarray  # int64 [n], what the client got
    evidence: np.ndarray  # bool [n]
    times: np.ndarray  # float64 [n], wall-clock seconds

    def __len__(self) -> int:
        return len(self.keys)


class QueryFeed(Protocol):
    def publish(self, rows: QueryRows) -> None:
        """Hand this replica's queries to the others; never blocks (a full buffer drops and counts)."""


class SharedState(Protocol):
    def counts(self, name: str, half_life_s: float, max_keys: int) -> Counts: ...

    def feed(self, name: str, receive: Callable[[QueryRows], None]) -> QueryFeed | None:
        """Exchange queries with the other replicas: ``receive`` gets theirs, on a worker thread.
        None when there are no other replicas (process memory)."""
