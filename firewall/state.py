"""State that outlives a request: token buckets, bans and offences, suspicion, refusal budgets, the
first answer, and the stateful detectors' evidence and query exchange.

Everything goes through one interface, ``ClientState``, with two implementations: process memory
(``MemoryClientState``, the zero-configuration default) and Redis (``firewall.redis_state``, the
store several replicas share). Each operation is one decision taken atomically (in Redis: one Lua
script), so two replicas never act on a stale copy. The operations admission runs on the event
loop are coroutines; those the policy runs on worker threads are plain calls.

``MemoryClientState`` keeps the records in process memory in two places:

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

Times are the caller's clock (``time.monotonic`` in the service); ``snapshot``/``restore`` convert
them to durations so they survive a restart.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

from detectors.evidence import DecayingCount
from detectors.shared import Counts, QueryFeed, QueryRows
from firewall.config import BanConfig
from firewall.errors import Banned, Throttled

T = TypeVar("T")
MAX_ESCALATIONS = 64  # factor ** offences stays a finite float

PURGE_INTERVAL_S = 1.0  # at the cap, expired protected records are looked for at most this often


@dataclass(slots=True)
class ClientRecord:
    tokens: float | None = None  # None until the bucket is first used: it starts full
    refilled_at: float = 0.0
    suspect_until: float = 0.0  # the tighter bucket applies until then
    banned_until: float = 0.0
    offences: int = 0  # bans so far, for escalation
    last_offence_at: float = 0.0
    first_labels: dict[str, int] = field(default_factory=dict)  # model -> the first label answered (decoys repeat it)
    refusals: int = 0  # addresses: policy refusals of its ids in the current window
    refusals_until: float = 0.0  # end of that window


# Times in a record that are moments on the caller's clock (saved as offsets from "now").
_MOMENTS = ("refilled_at", "suspect_until", "banned_until", "last_offence_at", "refusals_until")


@dataclass(frozen=True)
class Bucket:
    """A token bucket: ``burst`` tokens at once, ``rate`` per second after that."""

    rate: float
    burst: int


def take_tokens(record: ClientRecord, cost: int, rate: float, burst: int, now: float) -> bool:
    """Refill the record's bucket up to ``burst``, then spend ``cost`` tokens if the bucket allows it.

    A request may overdraw the bucket once it holds at least min(cost, burst) tokens, so a batch
    larger than the burst is slowed, not refused forever.
    """
    if record.tokens is None:
        record.tokens = float(burst)
    else:
        record.tokens = min(float(burst), record.tokens + (now - record.refilled_at) * rate)
    record.refilled_at = now
    if record.tokens < min(cost, burst):
        return False
    record.tokens -= cost
    return True


def start_ban(record: ClientRecord, config: BanConfig, suspect_s: float, now: float) -> float | None:
    """Ban the record's client; return the duration, or None when it is banned already."""
    if record.banned_until > now:
        return None  # findings of calls admitted before the ban began are not new offences
    if now - record.last_offence_at > config.forget_s:
        record.offences = 0
    duration = min(config.first_s * config.factor ** min(record.offences, MAX_ESCALATIONS), config.max_s)
    record.offences += 1
    record.last_offence_at = now
    record.banned_until = now + duration
    record.suspect_until = record.banned_until + suspect_s
    return duration


def lift_ban(record: ClientRecord) -> None:
    """End the ban and the suspicion that follows it; the offence count stays (a repeat still escalates)."""
    record.banned_until = 0.0
    record.suspect_until = 0.0


class ClientState(Protocol):
    """The one interface to state that outlives a request. Keys are client ids and ``peer_key``s."""

    secret: bytes  # random, shared by every replica (decoy labels computed from it agree)

    # -- on the event loop (admission) -------------------------------------------------------------

    async def admit_address(self, client_key: str, peer_key: str, cost: int, bucket: Bucket | None) -> None:
        """Raise ``Banned`` when the client or its address is banned, else spend from the address's
        bucket (None: throttling off) and raise ``Throttled`` when it is empty. Creates no client record."""

    async def admit_client(self, key: str, cost: int, bucket: Bucket | None, suspect: Bucket) -> bool:
        """Raise ``Banned`` for a banned client, else spend from its bucket (the suspect one while
        suspect) and raise ``Throttled`` when empty; return whether the record is new."""

    async def count_refusal(self, peer_key: str, budget: int, window_s: float, cooldown_s: float) -> bool:
        """Count a policy refusal against the address's budget; return True when it bans the address now."""

    def discard(self, key: str) -> None:
        """Forget a record a request created before it failed validation."""

    # -- on worker threads (policy) ----------------------------------------------------------------

    def ban(self, key: str, config: BanConfig, suspect_s: float) -> float | None:
        """Start a ban (``start_ban``); return its duration, or None when already banned."""

    def suspect(self, key: str, seconds: float) -> None:
        """The client draws from the suspect bucket for ``seconds`` from now."""

    def remember(self, key: str, model: str, label: int) -> None:
        """A label the client was answered by ``model``: the first one is kept (decoys repeat it)."""

    def first_label(self, key: str, model: str) -> int | None: ...

    # -- operators (the admin endpoint, ban end events) ---------------------------------------------

    def get(self, key: str) -> ClientRecord | None:
        """A copy of the key's record on this process's clock, or None when not tracked. Never creates one."""

    def items(self) -> list[tuple[str, ClientRecord]]:
        """Every key this process holds with its record, to read only (metrics, the admin list)."""

    def remove(self, key: str) -> bool:
        """Forget everything about a key, bans included (an operator's reset); return whether it was tracked."""

    def lift(self, key: str) -> None:
        """End the key's ban and the suspicion that follows it (``lift_ban``)."""

    # -- stateful detectors (``detectors.shared.SharedState``) ---------------------------------------

    def counts(self, name: str, half_life_s: float, max_keys: int) -> Counts: ...

    def feed(self, name: str, receive: Callable[[QueryRows], None]) -> QueryFeed | None: ...

    # -- life cycle and metrics ----------------------------------------------------------------------

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def refresh(self) -> None:
        """Periodic housekeeping (expired protected records leave the table)."""

    def snapshot(self, path: Path) -> int: ...

    def restore(self, path: Path) -> int: ...

    def stats(self) -> dict[str, float]:
        """Gauges for the metrics endpoint, read from local memory only."""


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
        self.secret = os.urandom(16)

    # -- the ClientState operations --------------------------------------------------------------

    async def admit_address(self, client_key: str, peer_key: str, cost: int, bucket: Bucket | None) -> None:
        self.check_bans(client_key, peer_key)
        if bucket is not None:
            now = self.clock()
            if not self.update(peer_key, lambda record: take_tokens(record, cost, bucket.rate, bucket.burst, now)):
                raise Throttled("address rate limit")

    def check_bans(self, *keys: str) -> None:
        """Raise ``Banned`` when any key is banned. Reads only: creates no record."""
        now = self.clock()
        for key in keys:
            record = self.get(key)
            if record is not None and record.banned_until > now:
                raise Banned(f"{key!r} banned")

    async def admit_client(self, key: str, cost: int, bucket: Bucket | None, suspect: Bucket) -> bool:
        created = not self.tracked(key)
        if created and self.full:
            raise Throttled("client state full")  # refuse a new id rather than forget a ban
        now = self.clock()

        def verdict(record: ClientRecord) -> Banned | Throttled | None:
            if record.banned_until > now:
                return Banned("client banned")
            if bucket is None:
                return None
            current = suspect if record.suspect_until > now else bucket
            return None if take_tokens(record, cost, current.rate, current.burst, now) else Throttled("client rate limit")

        refusal = self.update(key, verdict)
        if refusal is not None:
            raise refusal
        return created

    async def count_refusal(self, peer_key: str, budget: int, window_s: float, cooldown_s: float) -> bool:
        now = self.clock()

        def count(record: ClientRecord) -> bool:
            if record.refusals_until <= now:
                record.refusals, record.refusals_until = 0, now + window_s
            record.refusals += 1
            if record.refusals > budget and record.banned_until <= now:
                record.banned_until = now + cooldown_s
                record.refusals_until = max(record.refusals_until, record.banned_until)
                return True
            return False

        return self.update(peer_key, count)

    def ban(self, key: str, config: BanConfig, suspect_s: float) -> float | None:
        now = self.clock()
        return self.update(key, lambda record: start_ban(record, config, suspect_s, now))

    def suspect(self, key: str, seconds: float) -> None:
        until = self.clock() + seconds
        self.update(key, lambda record: setattr(record, "suspect_until", max(record.suspect_until, until)))

    def remember(self, key: str, model: str, label: int) -> None:
        self.update(key, lambda record: record.first_labels.setdefault(model, label))

    def first_label(self, key: str, model: str) -> int | None:
        record = self.get(key)
        return None if record is None else record.first_labels.get(model)

    def counts(self, name: str, half_life_s: float, max_keys: int) -> Counts:
        return DecayingCount(half_life_s, max_keys)

    def feed(self, name: str, receive: Callable[[QueryRows], None]) -> QueryFeed | None:
        return None  # one replica: nobody to exchange queries with

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        now = self.clock()
        return {
            "tracked_clients": float(len(self)),
            "bans_active": float(sum(record.banned_until > now for _, record in self.items())),
        }

    def lift(self, key: str) -> None:
        self.update(key, lift_ban)

    def mirror_ban(self, key: str, remaining_s: float) -> None:
        """Hold a ban decided elsewhere (by a shared store) for ``remaining_s`` more seconds."""
        until = self.clock() + remaining_s
        self.update(key, lambda record: setattr(record, "banned_until", max(record.banned_until, until)))

    def active_bans(self) -> dict[str, float]:
        """Key -> seconds left, for every ban in force (a shared store resynchronises them)."""
        now = self.clock()
        with self._lock:
            return {key: record.banned_until - now for key, record in self._protected.items() if record.banned_until > now}

    # -- records -----------------------------------------------------------------------------------

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
            return None if record is None else replace(record, first_labels=dict(record.first_labels))

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
