"""Per-client state that outlives a request: token bucket, suspicion, bans, the last genuine answer.

Everything goes through one small interface, ``ClientState``: read a record, or change it
atomically. ``MemoryClientState`` keeps the records in process memory, bounded by an LRU cap (the
least recently seen client is forgotten first). A shared store (Redis, for several replicas)
can replace it by running ``update`` as an optimistic transaction on the serialized record.
Times are the caller's clock (``time.monotonic`` in the service).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class ClientRecord:
    tokens: float | None = None  # None until the bucket is first used: it starts full
    refilled_at: float = 0.0
    suspect_until: float = 0.0  # the tighter bucket applies until then
    banned_until: float = 0.0
    offences: int = 0  # bans so far, for escalation
    last_offence_at: float = 0.0
    last_labels: dict[str, int] = field(default_factory=dict)  # model -> last genuine label answered


class ClientState(Protocol):
    def get(self, key: str) -> ClientRecord | None:
        """A copy of the record, or None when the key is not tracked. Never creates one."""

    def update(self, key: str, change: Callable[[ClientRecord], T]) -> T:
        """Apply ``change`` to the key's record (a fresh one if untracked) atomically; return its result."""

    def records(self) -> list[ClientRecord]:
        """Every tracked record, to read only (metrics)."""

    def __len__(self) -> int: ...


class MemoryClientState:
    def __init__(self, max_clients: int):
        self.max_clients = max_clients
        self._records: OrderedDict[str, ClientRecord] = OrderedDict()
        self._lock = threading.Lock()  # the event loop and the pipeline's worker threads share it

    def get(self, key: str) -> ClientRecord | None:
        with self._lock:
            record = self._records.get(key)
            return None if record is None else replace(record, last_labels=dict(record.last_labels))

    def update(self, key: str, change: Callable[[ClientRecord], T]) -> T:
        with self._lock:
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = ClientRecord()
                if len(self._records) > self.max_clients:
                    self._records.popitem(last=False)
            else:
                self._records.move_to_end(key)
            return change(record)

    def records(self) -> list[ClientRecord]:
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)
