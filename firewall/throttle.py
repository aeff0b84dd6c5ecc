"""Admission, on the event loop before any work is queued: bans, then the address's and the client's
token buckets, then the in-flight shares.

A token bucket (rate r tokens per second, capacity b) lets a client spend b tokens at once and r
per second after that; one token is one image, so batching does not multiply an attacker's
queries. A request may overdraw the bucket once it holds at least min(cost, burst) tokens, so a
batch larger than the burst is slowed, not refused forever. A client whose recent findings were
refused draws from the tighter suspect bucket (suspect_rate, suspect_burst) instead: decision-based
attacks need thousands of queries (HopSkipJumpAttack, Chen, Jordan & Wainwright, IEEE S&P 2020),
so slowing a suspect to about one query per second stretches an attack from minutes into hours.

Client ids are self-declared, so every request also draws from its source address's bucket
(``address_rate``, ``address_burst``, larger than a client's): fresh ids from one address do not
multiply its budget. Requests for an unknown model and requests that fail validation draw from the
address bucket only and create no client record. An address whose ids collect more than
``address_refusals`` policy refusals within ``refusal_window_s`` is refused as a whole for
``address_cooldown_s`` (a refusal budget per address: an attacker who takes a fresh id after each
refusal runs out of it).

``InFlight`` bounds concurrent work: a global cap, a share per client and per address, a
server-wide budget of bytes being decoded at once, and a cap on "heavy" requests (more than
``heavy_request_bytes`` decoded) so that large images can never occupy every worker. Beyond any of
them the request is refused at once with RESOURCE_EXHAUSTED: there is never a queue that outlives
a client's deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from firewall.bans import BanLog, peer_key
from firewall.config import ThrottleConfig
from firewall.errors import Refused, Throttled
from firewall.protocol import pb
from firewall.state import ClientRecord, ClientState


class Banned(Refused):
    """Refused because of a ban. The client sees the same status and message as any refusal."""


def take_tokens(record: ClientRecord, cost: int, rate: float, burst: int, now: float) -> bool:
    """Refill the record's bucket up to ``burst``, then spend ``cost`` tokens if the bucket allows it."""
    if record.tokens is None:
        record.tokens = float(burst)
    else:
        record.tokens = min(float(burst), record.tokens + (now - record.refilled_at) * rate)
    record.refilled_at = now
    if record.tokens < min(cost, burst):
        return False
    record.tokens -= cost
    return True


class Admission:
    def __init__(self, state: ClientState, config: ThrottleConfig, bans: BanLog, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.config = config  # replaced whole on reload
        self.bans = bans
        self.clock = clock

    def admit(self, client_id: str, peer: str, cost: int) -> bool:
        """All of ``check_bans``, ``charge_address`` and ``charge_client``; return whether the client is new."""
        self.check_bans(client_id, peer)
        self.charge_address(peer, cost)
        return self.charge_client(client_id, cost)

    def check_bans(self, client_id: str, peer: str) -> None:
        """Raise ``Banned`` for a banned client or address. Reads only: creates no record."""
        now = self.clock()
        peer_record = self.state.get(peer_key(peer))
        if peer_record is not None and peer_record.banned_until > now:
            raise Banned("peer address banned")
        record = self.state.get(client_id)
        if record is not None and record.banned_until > now:
            raise Banned("client banned")

    def charge_address(self, peer: str, cost: int) -> None:
        """Spend from the address's bucket (every request, valid or not); ``Throttled`` when empty."""
        config = self.config
        if not config.enabled:
            return
        now = self.clock()
        allowed = self.state.update(
            peer_key(peer), lambda record: take_tokens(record, cost, config.address_rate, config.address_burst, now)
        )
        if not allowed:
            raise Throttled("address rate limit")

    def charge_client(self, client_id: str, cost: int) -> bool:
        """Spend from the client's bucket (the suspect one while suspect); return whether the record is new.

        While the protected state is full, ids not tracked yet are refused rather than any ban forgotten.
        """
        created = not self.state.tracked(client_id)
        if created and self.state.full:
            raise Throttled("client state full")
        now = self.clock()
        verdict = self.state.update(client_id, lambda record: self._verdict(record, cost, now))
        if verdict is not None:
            raise verdict
        return created

    def count_refusal(self, peer: str) -> None:
        """A policy refusal of one of the address's ids: past the budget the address is refused for a while."""
        config = self.config
        now = self.clock()

        def count(record: ClientRecord) -> bool:
            if record.refusals_until <= now:
                record.refusals, record.refusals_until = 0, now + config.refusal_window_s
            record.refusals += 1
            if record.refusals > config.address_refusals and record.banned_until <= now:
                record.banned_until = now + config.address_cooldown_s
                record.refusals_until = max(record.refusals_until, record.banned_until)
                return True
            return False

        if self.state.update(peer_key(peer), count):
            self.bans.started(peer_key(peer), config.address_cooldown_s, "address refusal budget spent")

    def _verdict(self, record: ClientRecord, cost: int, now: float) -> Banned | Throttled | None:
        if record.banned_until > now:
            return Banned("client banned")
        config = self.config
        if not config.enabled:
            return None
        if record.suspect_until > now:
            allowed = take_tokens(record, cost, config.suspect_rate, config.suspect_burst, now)
        else:
            allowed = take_tokens(record, cost, config.rate, config.burst, now)
        return None if allowed else Throttled("client rate limit")


@dataclass(frozen=True)
class Ticket:
    client_id: str
    peer: str
    decoded_bytes: int
    heavy: bool


class InFlight:
    """Concurrent requests by share. Used on the event loop only, so it needs no lock."""

    def __init__(
        self,
        total: int,
        per_client: int,
        per_address: int,
        max_decoding_bytes: int,
        heavy_request_bytes: int,
        max_heavy: int,
    ):
        self.total, self.per_client, self.per_address = total, per_client, per_address
        self.max_decoding_bytes, self.heavy_request_bytes, self.max_heavy = max_decoding_bytes, heavy_request_bytes, max_heavy
        self.count = 0
        self.decoding_bytes = 0
        self.heavy = 0
        self.clients: dict[str, int] = {}
        self.addresses: dict[str, int] = {}

    def enter(self, client_id: str, peer: str, decoded_bytes: int) -> Ticket:
        heavy = decoded_bytes > self.heavy_request_bytes
        if self.count >= self.total:
            raise Throttled("global concurrency cap reached")
        if self.clients.get(client_id, 0) >= self.per_client:
            raise Throttled("client concurrency share reached")
        if self.addresses.get(peer, 0) >= self.per_address:
            raise Throttled("address concurrency share reached")
        if heavy and self.heavy >= self.max_heavy:
            raise Throttled("heavy request slots taken")
        if self.decoding_bytes + decoded_bytes > self.max_decoding_bytes:
            raise Throttled("decoding budget spent")
        self.count += 1
        self.decoding_bytes += decoded_bytes
        self.heavy += heavy
        self.clients[client_id] = self.clients.get(client_id, 0) + 1
        self.addresses[peer] = self.addresses.get(peer, 0) + 1
        return Ticket(client_id, peer, decoded_bytes, heavy)

    def leave(self, ticket: Ticket) -> None:
        self.count -= 1
        self.decoding_bytes -= ticket.decoded_bytes
        self.heavy -= ticket.heavy
        for table, key in ((self.clients, ticket.client_id), (self.addresses, ticket.peer)):
            if table[key] <= 1:
                del table[key]
            else:
                table[key] -= 1


def request_cost(request: pb.ModelInferRequest, max_batch: int) -> int:
    """Tokens a request costs: its declared batch size, within [1, max_batch] (the codec checks the rest)."""
    shape = request.inputs[0].shape if request.inputs else ()
    declared = shape[0] if len(shape) > 0 else 1
    return min(max(declared, 1), max_batch)
