"""The firewall's alert log, read back after the run: the operator's view of what was detected.

Alerts are JSON objects, one per line, with flat ECS keys: ``"event.kind": "alert"``, ``@timestamp``,
``rule.name``, ``user.id`` (the client id), ``event.action`` (the response taken), and the
firewall's ``firewall.score``, ``firewall.threshold`` and ``firewall.count`` (findings the line
stands for; lines without it count one). Other lines (start-up logs, plain text) are skipped.
Alerts are aggregated per client and rule, but the first one for a client is written at once, so
the number of queries a client had sent by its first alert's timestamp is its queries to
detection. That compares the firewall's clock with the evaluator's: it holds when both run on one
host or on synchronised hosts.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Alert:
    time: float  # seconds since the epoch
    client_id: str
    rule: str
    action: str
    score: float | None
    threshold: float | None
    count: int
    level: str = ""  # log.level: warning for alerts that matter; "" when the line has none


def read_alerts(path: str | Path, client_prefix: str) -> list[Alert]:
    """The alerts about this run's clients (their ids start with ``client_prefix``), oldest first."""
    alerts = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("event.kind") != "alert":
                continue
            client_id = str(record.get("user.id", ""))
            if not client_id.startswith(client_prefix):
                continue
            try:
                stamp = datetime.fromisoformat(str(record["@timestamp"])).timestamp()
            except (KeyError, ValueError):
                continue
            alerts.append(
                Alert(
                    time=stamp,
                    client_id=client_id,
                    rule=str(record.get("rule.name", "")),
                    action=str(record.get("event.action", "")),
                    score=_number(record.get("firewall.score")),
                    threshold=_number(record.get("firewall.threshold")),
                    count=int(_number(record.get("firewall.count", 1)) or 0),
                    level=str(record.get("log.level", "")),
                )
            )
    return sorted(alerts, key=lambda alert: alert.time)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def first_alert_times(alerts: list[Alert]) -> dict[str, float]:
    first: dict[str, float] = {}
    for alert in alerts:
        first.setdefault(alert.client_id, alert.time)
    return first


def queries_before(sent_times: list[float], moment: float) -> int:
    """How many of the (sorted) send times are at or before ``moment``."""
    return bisect_right(sent_times, moment)
