"""Security alerts: ECS JSON lines, aggregated per (client, model, rule, action) into episodes.
An alert about a source address (``probing.address``) accuses no client: its episode is the
address's, and its lines carry ``source.ip`` and no ``user.id``.

A probing attack raises a finding on nearly every query; one line per finding would bury the
operator and let an attacker flood the log. So the first finding of an episode is logged at once
(``firewall.episode: start``), then at most one line per ``interval_s`` carries the exact number
of findings since the previous line (``firewall.count``) and the strongest of them, the one
farthest past its threshold, whichever way the detector's score points ("ongoing"),
and a last line ("end") follows once the client has raised no finding for ``idle_s``, or at
shutdown, or when the episode is evicted to keep at most ``max_episodes``. No finding is lost:
the counts of an episode's lines add up to its findings. ``event.type`` is "denied", or
"allowed" when the client got its genuine answer (monitor). An alert is logged at its finding's
severity: warning, or info for a single observation that is evidence but no verdict on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import structlog

from firewall.config import AlertConfig
from firewall.logs import ECS_VERSION, request_fields

log = structlog.get_logger("firewall.alerts")

ALLOWING_ACTIONS = {"monitor"}  # the client got its genuine answer


@dataclass(frozen=True)
class Alert:
    rule: str
    action: str  # the response taken: reject, ban, decoy or monitor
    model: str
    client_id: str
    peer: str
    request_id: str
    score: float
    threshold: float
    severity: str = "warning"  # "info": a single observation, evidence on its own, logged below warning

    @property
    def key(self) -> tuple[str, str, str, str]:
        """An episode per client, or per address for an alert that accuses no client."""
        return (self.client_id or f"address {self.peer}", self.model, self.rule, self.action)

    @property
    def margin(self) -> float:
        return abs(self.score - self.threshold)


@dataclass
class Episode:
    started: str  # ISO time of the first finding
    last_seen: float
    last_line_at: float
    latest: Alert
    strongest: Alert | None = None  # the largest margin among the findings not yet logged
    pending: int = 0
    total: int = 1  # findings since the episode started


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or infinity


class AlertAggregator:
    def __init__(self, config: AlertConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._episodes: OrderedDict[tuple[str, str, str, str], Episode] = OrderedDict()  # least recently seen first
        self._lock = threading.Lock()

    def record(self, alert: Alert) -> None:
        """Count one finding; log it now when it starts an episode."""
        now = self.clock()
        lines = []
        with self._lock:
            episode = self._episodes.get(alert.key)
            if episode is None:
                episode = Episode(started=utc_now(), last_seen=now, last_line_at=now, latest=alert)
                self._episodes[alert.key] = episode
                lines.append(self._line(episode, alert, 1, "start"))
                if len(self._episodes) > self.config.max_episodes:
                    _, evicted = self._episodes.popitem(last=False)
                    lines.append(self._last_line(evicted))
            else:
                self._episodes.move_to_end(alert.key)
                episode.last_seen = now
                episode.latest = alert
                episode.pending += 1
                episode.total += 1
                if episode.strongest is None or alert.margin > episode.strongest.margin:
                    episode.strongest = alert
        self._emit(lines)

    def flush(self) -> None:
        """Log the interval lines that are due, and end the episodes that went quiet."""
        now = self.clock()
        lines = []
        with self._lock:
            for key, episode in list(self._episodes.items()):
                if now - episode.last_seen >= self.config.idle_s:
                    del self._episodes[key]
                    lines.append(self._last_line(episode))
                elif episode.pending and now - episode.last_line_at >= self.config.interval_s:
                    lines.append(self._line(episode, episode.strongest, episode.pending, "ongoing"))
                    episode.pending, episode.strongest, episode.last_line_at = 0, None, now
        self._emit(lines)

    def close(self) -> None:
        """End every episode (at shutdown)."""
        with self._lock:
            lines = [self._last_line(episode) for episode in self._episodes.values()]
            self._episodes.clear()
        self._emit(lines)

    async def run(self) -> None:
        """Flush periodically until cancelled."""
        tick = min(self.config.interval_s, self.config.idle_s) / 4
        while True:
            await asyncio.sleep(tick)
            self.flush()

    def episodes(self, client_id: str) -> list[dict[str, Any]]:
        """The client's open episodes, its recent findings (the admin endpoint's show)."""
        now = self.clock()
        with self._lock:
            return [
                {
                    "model": model,
                    "rule": rule,
                    "action": action,
                    "started": episode.started,
                    "findings": episode.total,
                    "last_seen_s_ago": round(now - episode.last_seen, 3),
                    "last_score": finite(episode.latest.score),
                    "threshold": finite(episode.latest.threshold),
                }
                for (client, model, rule, action), episode in self._episodes.items()
                if client == client_id
            ]

    def __len__(self) -> int:
        return len(self._episodes)

    def _last_line(self, episode: Episode) -> dict[str, Any]:
        line = self._line(episode, episode.strongest or episode.latest, episode.pending, "end")
        line["event.end"] = utc_now()
        return line

    def _line(self, episode: Episode, alert: Alert, count: int, phase: str) -> dict[str, Any]:
        outcome = "allowed" if alert.action in ALLOWING_ACTIONS else "denied"
        return {
            **request_fields(alert.request_id, alert.model, alert.client_id, alert.peer),
            "ecs.version": ECS_VERSION,
            "event.kind": "alert",
            "event.category": ["intrusion_detection"],
            "event.type": [outcome],
            "event.action": alert.action,
            "event.start": episode.started,
            "rule.id": f"{alert.model}/{alert.rule}",
            "rule.name": alert.rule,
            "firewall.score": finite(alert.score),
            "firewall.threshold": finite(alert.threshold),
            "firewall.count": count,
            "firewall.episode": phase,
            "log.level": alert.severity,
        }

    @staticmethod
    def _emit(lines: list[dict[str, Any]]) -> None:
        for line in lines:
            level = line.pop("log.level")
            # A line carries its own fields: the request being served (bound in the logging context)
            # may not be the one the line is about, and an address alert names no client.
            contextvars.Context().run((log.info if level == "info" else log.warning), "alert", **line)
