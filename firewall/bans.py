"""Bans as ECS events: one line when a ban starts, one when it ends (expired or lifted).

A ban ends silently in the client state (its time passes), so the bans this process started are
kept in a heap by end time and ``expire()``, called periodically, logs each end once it is due.
A ban that was extended meanwhile (by another replica sharing the state) is put back with its new
end. The heap holds one entry per active ban, which the protected state's cap bounds.
"""

from __future__ import annotations

import heapq
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from firewall.logs import source_fields
from firewall.state import ClientState

log = structlog.get_logger("firewall.bans")

PEER_PREFIX = "peer "


def peer_key(peer: str) -> str:
    """The state key of a peer address (a ban by address); client ids are keys as they are."""
    return f"{PEER_PREFIX}{peer}"


def subject_fields(key: str) -> dict[str, str]:
    """ECS fields naming whom a state key is about: ``user.id``, or ``source.ip`` for an address."""
    return source_fields(key.removeprefix(PEER_PREFIX)) if key.startswith(PEER_PREFIX) else {"user.id": key}


def wall_time(seconds_from_now: float) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class BanLog:
    def __init__(self, state: ClientState, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.clock = clock
        self._ends: list[tuple[float, str]] = []  # (end, key), earliest first
        self._active: dict[str, float] = {}  # key -> the end its start line announced
        self._lock = threading.Lock()

    def started(self, key: str, duration_s: float, reason: str) -> None:
        """Log a ban's start (``reason``: the rules or the budget that caused it)."""
        end = self.clock() + duration_s
        with self._lock:
            self._active[key] = end
            heapq.heappush(self._ends, (end, key))
        log.warning(
            "ban.started",
            **subject_fields(key),
            **{
                "event.category": ["intrusion_detection"],
                "event.type": ["start", "denied"],
                "event.reason": reason,
                "event.end": wall_time(duration_s),
                "firewall.ban_s": duration_s,
            },
        )

    def lifted(self, key: str, operator: str) -> None:
        """Log the end of a ban an operator lifted."""
        with self._lock:
            self._active.pop(key, None)
        self._ended(key, f"lifted by {operator}")

    def expire(self) -> None:
        """Log the end of every ban that is over now."""
        now = self.clock()
        due = []
        with self._lock:
            while self._ends and self._ends[0][0] <= now:
                end, key = heapq.heappop(self._ends)
                if self._active.get(key) == end:
                    due.append(key)
        for key in due:
            record = self.state.get(key)
            until = record.banned_until if record is not None else 0.0
            with self._lock:
                if self._active.get(key) is None:
                    continue  # lifted meanwhile
                if until > now:  # extended elsewhere: wait for the new end
                    self._active[key] = until
                    heapq.heappush(self._ends, (until, key))
                    continue
                del self._active[key]
            self._ended(key, "expired")

    def __len__(self) -> int:
        return len(self._active)

    @staticmethod
    def _ended(key: str, reason: str) -> None:
        log.info(
            "ban.ended",
            **subject_fields(key),
            **{"event.category": ["intrusion_detection"], "event.type": ["end"], "event.reason": reason},
        )
