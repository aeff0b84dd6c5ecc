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

Buckets, bans and refusal budgets live in the state (``firewall.state``): process memory, or Redis
shared by every replica (``firewall.redis_state``), where each decision is one Lua script.

``InFlight`` bounds concurrent work: a global cap, a share per client and per address, a
server-wide budget of bytes being decoded at once, and a cap on "heavy" requests (more than
``heavy_request_bytes`` decoded) so that large images can never occupy every worker. Beyond any of
them the request is refused at once with RESOURCE_EXHAUSTED: there is never a queue that outlives
a client's deadline. Ids first seen in the request (the record was created by it) may hold at most
``max_new_client_requests`` of the slots, so a flood of fresh ids always leaves room for clients
already known, and their work waits behind established clients' (firewall/scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from firewall.bans import BanLog, peer_key
from firewall.config import ThrottleConfig
from firewall.errors import Throttled
from firewall.protocol import pb
from firewall.state import Bucket, ClientState


class Admission:
    """Which buckets a request draws from, and with what parameters; the state decides atomically."""

    def __init__(self, state: ClientState, config: ThrottleConfig, bans: BanLog):
        self.state = state
        self.config = config  # replaced whole on reload
        self.bans = bans

    def buckets(self) -> tuple[Bucket | None, Bucket | None, Bucket]:
        """The address's, the client's and the suspect bucket (None: throttling off)."""
        config = self.config
        if not config.enabled:
            return None, None, Bucket(config.suspect_rate, config.suspect_burst)
        return (
            Bucket(config.address_rate, config.address_burst),
            Bucket(config.rate, config.burst),
            Bucket(config.suspect_rate, config.suspect_burst),
        )

    async def admit_address(self, client_id: str, peer: str, cost: int) -> None:
        """``Banned`` for a banned client or address, else spend from the address's bucket (every
        request, valid or not): ``Throttled`` when empty. Creates no client record."""
        await self.state.admit_address(client_id, peer_key(peer), cost, self.buckets()[0])

    async def charge_client(self, client_id: str, cost: int) -> bool:
        """Spend from the client's bucket (the suspect one while suspect); return whether the record is new.

        While the protected state is full, ids not tracked yet are refused rather than any ban forgotten.
        """
        _, bucket, suspect = self.buckets()
        return await self.state.admit_client(client_id, cost, bucket, suspect)

    async def count_refusal(self, peer: str) -> None:
        """A policy refusal of one of the address's ids: past the budget the address is refused for a while."""
        config = self.config
        key = peer_key(peer)
        if await self.state.count_refusal(key, config.address_refusals, config.refusal_window_s, config.address_cooldown_s):
            self.bans.started(key, config.address_cooldown_s, "address refusal budget spent")


@dataclass(frozen=True)
class Ticket:
    client_id: str
    peer: str
    decoded_bytes: int
    heavy: bool
    new: bool  # the client id was first seen in this request
    priority: tuple[int, int]  # which waiting request a free worker takes first (firewall/scheduler.py)


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
        max_new: int,
    ):
        self.total, self.per_client, self.per_address, self.max_new = total, per_client, per_address, max_new
        self.max_decoding_bytes, self.heavy_request_bytes, self.max_heavy = max_decoding_bytes, heavy_request_bytes, max_heavy
        self.count = 0
        self.decoding_bytes = 0
        self.heavy = 0
        self.new = 0
        self.clients: dict[str, int] = {}
        self.addresses: dict[str, int] = {}

    def enter(self, client_id: str, peer: str, decoded_bytes: int, new: bool) -> Ticket:
        heavy = decoded_bytes > self.heavy_request_bytes
        if self.count >= self.total:
            raise Throttled("global concurrency cap reached")
        if new and self.new >= self.max_new:
            raise Throttled("share of new clients reached")
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
        self.new += new
        self.clients[client_id] = self.clients.get(client_id, 0) + 1
        self.addresses[peer] = self.addresses.get(peer, 0) + 1
        # Established clients first, then the client with the fewest requests in flight.
        return Ticket(client_id, peer, decoded_bytes, heavy, new, (int(new), self.clients[client_id]))

    def leave(self, ticket: Ticket) -> None:
        self.count -= 1
        self.decoding_bytes -= ticket.decoded_bytes
        self.heavy -= ticket.heavy
        self.new -= ticket.new
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
