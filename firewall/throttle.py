"""Admission, on the event loop before any work is queued: bans first, then the client's token bucket.

A token bucket (rate r tokens per second, capacity b) lets a client spend b tokens at once and r
per second after that; one token is one image, so batching does not multiply an attacker's
queries. A request may overdraw the bucket once it holds at least min(cost, burst) tokens, so a
batch larger than the burst is slowed, not refused forever. A client whose recent findings were
refused draws from the tighter suspect bucket (suspect_rate, suspect_burst) instead: decision-based
attacks need thousands of queries (HopSkipJumpAttack, Chen, Jordan & Wainwright, IEEE S&P 2020),
so slowing a suspect to about one query per second stretches an attack from minutes into hours.
"""

from __future__ import annotations

import time
from typing import Callable

from firewall.config import ThrottleConfig
from firewall.errors import Refused, Throttled
from firewall.protocol import pb
from firewall.state import ClientRecord, ClientState


class Banned(Refused):
    """Refused because of a ban. The client sees the same status and message as any refusal."""


def peer_key(peer: str) -> str:
    """The state key of a peer address (a ban by address); client ids are keys as they are."""
    return f"peer {peer}"


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
    def __init__(self, state: ClientState, config: ThrottleConfig, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.config = config
        self.clock = clock

    def admit(self, client_id: str, peer: str, cost: int) -> None:
        """Raise ``Banned`` for a banned client or address, ``Throttled`` for an empty bucket."""
        now = self.clock()
        peer_record = self.state.get(peer_key(peer))
        if peer_record is not None and peer_record.banned_until > now:
            raise Banned("peer address banned")
        verdict = self.state.update(client_id, lambda record: self._verdict(record, cost, now))
        if verdict is not None:
            raise verdict

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


def request_cost(request: pb.ModelInferRequest, max_batch: int) -> int:
    """Tokens a request costs: its declared batch size, within [1, max_batch] (the codec checks the rest)."""
    shape = request.inputs[0].shape if request.inputs else ()
    declared = shape[0] if len(shape) > 0 else 1
    return min(max(declared, 1), max_batch)
