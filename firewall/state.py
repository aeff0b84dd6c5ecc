"""Per-client state that outlives a request: token bucket, suspicion, bans, the last genuine answer.

Everything goes through one small interface, ``ClientState``: read a record, or change it
atomically. ``MemoryClientState`` keeps the records in process memory in two places:

- ordinary records (a token bucket, the last answer) in an LRU bounded by ``max_clients``: the
  least recently seen client is forgotten first, so a flood of fresh ids only forgets other
  ordinary records;
- protected records, those with an active ban, an active suspect bucket, an offence count that
  still matters for escalation (``keep_offences_s``) or an open refusal window, in a table of their
  own that no fresh id can flush: a protected record leaves it only once nothing in it is active
  any more. Its cap (``max_protected``) is a soft one: at the cap the expired records are purged,
  and while it stays full ``full`` is true and admission refuses ids it does not know yet
  (RESOURCE_EXHAUSTED), so the table can only grow by ids already tracked, and no ban is ever
  forgotten to make room.

A shared store (Redis, for several replicas) can replace it by running ``update`` as an optimistic
transaction on the serialized record. Times are the caller's clock (``time.monotonic`` in the
service); ``snapshot``/``restore`` convert them to durations so they survive a restart.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol, TypeVar

T = TypeVar("T")

PURGE_INTERVAL_S = 1.0  # at the cap, expired protected records are looked for at most this often


@dataclass(slots=True)
class ClientRecord:
    tokens: float | None = None  # None until the bucket is first used: it starts full
    refilled_at: float = 0.0
    suspect_until: float = 0.0  # the tighter bucket applies until then
    banned_until: float = 0.0
    offences: int = 0  # bans so far, for escalation
    last_offence_at: float = 0.0
    last_labels: dict[str, int] = field(default_factory=dict)  # model -> last genuine label answered
    refusals: int = 0  # addresses: policy refusals of its ids in the current window
    refusals_until: float = 0.0  # end of that window


# Times in a record that are moments on the caller's clock (saved as offsets from "now").
_MOMENTS = ("refilled_at", "suspect_until", "banned_until", "last_offence_at", "refusals_until")


class ClientState(Protocol):
    def get(self, key: str) -> ClientRecord | None:
        """A copy of the record, or None when the key is not tracked. Never creates one."""

    def update(self, key: str, change: Callable[[ClientRecord], T]) -> T:
        """Apply ``change`` to the key's record (a fresh one if untracked) atomically; return its result."""

    def discard(self, key: str) -> None:
        """Forget an ordinary record (one a request created before it failed validation)."""

    def tracked(self, key: str) -> bool: ...

    @property
    def full(self) -> bool:
        """True while the protected table is at its cap: new ids are refused."""

    def remove(self, key: str) -> bool:
        """Forget everything about a key, bans included (an operator's reset); return whether it was tracked."""

    def items(self) -> list[tuple[str, ClientRecord]]:
        """Every tracked key with its record, to read only (metrics, the admin endpoint); never change them."""

    def __len__(self) -> int: ...


class MemoryClientState:
    def __init__(
        self,
        max_clients: int,
        max_protected: int = 100_000,
        keep_offences_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_clients = max_clients
        self.max_protected = max_protected
        self.keep_offences_s = keep_offences_s
        self.clock = clock
        self._records: OrderedDict[str, ClientRecord] = OrderedDict()
        self._protected: dict[str, ClientRecord] = {}
        self._lock = threading.Lock()  # the event loop and the pipeline's worker threads share it
        self._purged_at = float("-inf")
        self.full = False

    def protects(self, record: ClientRecord, now: float) -> bool:
        return (
            record.banned_until > now
            or record.suspect_until > now
            or record.refusals_until > now
            or (record.offences > 0 and now - record.last_offence_at <= self.keep_offences_s)
        )

    def get(self, key: str) -> ClientRecord | None:
        with self._lock:
            record = self._protected.get(key) or self._records.get(key)
            return None if record is None else replace(record, last_labels=dict(record.last_labels))

    def tracked(self, key: str) -> bool:
        with self._lock:
            return key in self._protected or key in self._records

    def update(self, key: str, change: Callable[[ClientRecord], T]) -> T:
        with self._lock:
            record = self._protected.get(key)
            if record is None:
                record = self._records.pop(key, None) or ClientRecord()
            result = change(record)
            self._place(key, record, self.clock())
            return result

    def discard(self, key: str) -> None:
        with self._lock:
            self._records.pop(key, None)

    def _place(self, key: str, record: ClientRecord, now: float) -> None:
        if self.protects(record, now):
            if key not in self._protected:
                self._protected[key] = record
                if len(self._protected) > self.max_protected:
                    self._purge(now)
            return
        self._protected.pop(key, None)
        self._records[key] = record  # most recently seen at the end
        while len(self._records) > self.max_clients:
            self._records.popitem(last=False)

    def _purge(self, now: float) -> None:
        """Move protected records with nothing active left back among the ordinary ones."""
        if now - self._purged_at >= PURGE_INTERVAL_S:
            self._purged_at = now
            for key in [key for key, record in self._protected.items() if not self.protects(record, now)]:
                self._records[key] = self._protected.pop(key)
            while len(self._records) > self.max_clients:
                self._records.popitem(last=False)
        self.full = len(self._protected) >= self.max_protected

    def refresh(self) -> None:
        """Purge expired protected records now (called periodically, so ``full`` clears)."""
        with self._lock:
            self._purged_at = float("-inf")
            self._purge(self.clock())

    def remove(self, key: str) -> bool:
        with self._lock:
            return (self._protected.pop(key, None) or self._records.pop(key, None)) is not None

    def items(self) -> list[tuple[str, ClientRecord]]:
        with self._lock:  # references, not copies: 100,000 copies would hold the lock for a second
            return [*self._protected.items(), *self._records.items()]

    def protected_count(self) -> int:
        return len(self._protected)

    def __len__(self) -> int:
        return len(self._records) + len(self._protected)

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self, path: Path) -> int:
        """Write the protected records (bans, offences, suspects, refusal windows) atomically; return how many."""
        now, wall = self.clock(), time.time()
        with self._lock:
            saved = {key: _relative(record, now) for key, record in self._protected.items() if self.protects(record, now)}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps({"version": 1, "saved_at": wall, "records": saved}))
        os.replace(temporary, path)
        return len(saved)

    def restore(self, path: Path) -> int:
        """Read a snapshot written by ``snapshot``; time spent while stopped counts as elapsed."""
        data = json.loads(path.read_text())
        if data.get("version") != 1:
            raise ValueError("unknown snapshot version")
        now = self.clock()
        elapsed = max(0.0, time.time() - float(data["saved_at"]))
        with self._lock:
            for key, fields in data["records"].items():
                record = ClientRecord(**{name: value for name, value in fields.items() if name not in _MOMENTS})
                for name in _MOMENTS:
                    setattr(record, name, now + float(fields.get(name, float("-inf"))) - elapsed)
                if record.tokens is not None:
                    record.refilled_at = now  # the bucket resumes where it stopped
                self._place(str(key), record, now)
        return len(data["records"])


def _relative(record: ClientRecord, now: float) -> dict:
    fields = asdict(record)
    for name in _MOMENTS:
        fields[name] = fields[name] - now
    return fields
