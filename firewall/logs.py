"""structlog configured once: JSON lines on stdout with Elastic Common Schema (ECS) field names.

Fields are flat dotted keys (``"user.id"``), which ECS ingest pipelines expand. structlog's own
keys take their ECS names, ``message`` and ``log.level``, so that ``event`` stays free for the
``event.*`` fields. Every line is an ECS event: ``event.kind`` ("event" unless the line says
otherwise, "alert" for alerts), ``event.action`` (the message, "ban.started" -> "ban-started"),
``ecs.version``; a logged exception becomes ``error.type``, ``error.message`` and
``error.stack_trace``; a field outside ECS moves under the ``firewall.`` namespace (a few common
names take their ECS field: ``path`` -> ``file.path``, ``error`` -> ``error.message``). The request's fields are bound per call with
``structlog.contextvars`` (``request_fields``), so every line logged while serving a request
carries them.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import traceback
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from firewall.errors import Refused, Rejection, Throttled, Unavailable

ECS_VERSION = "8.11.0"
ECS_NAMES = {"path": "file.path", "error": "error.message", "reason": "event.reason"}
KEPT = {"message", "log.level", "@timestamp"}


def ecs_names(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    message = event_dict.pop("event")
    event_dict["message"] = message
    event_dict["log.level"] = event_dict.pop("level")
    error = event_dict.pop("exc_info", None)
    if error:
        error = sys.exc_info()[1] if error is True else error
        if isinstance(error, BaseException):
            event_dict["error.type"] = type(error).__name__
            event_dict["error.message"] = str(error)
            event_dict["error.stack_trace"] = "".join(traceback.format_exception(error))
    for key in [key for key in event_dict if "." not in key and key not in KEPT]:
        event_dict[ECS_NAMES.get(key, f"firewall.{key}")] = event_dict.pop(key)
    event_dict.setdefault("event.kind", "event")
    event_dict.setdefault("event.action", str(message).replace(".", "-").replace(" ", "-"))
    event_dict.setdefault("ecs.version", ECS_VERSION)
    return event_dict


def logging_config(level: str = "INFO", stream: TextIO | None = None) -> dict[str, Any]:
    """The structlog configuration as data (tests apply it to their own stream)."""
    return {
        "processors": [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="@timestamp"),
            ecs_names,
            structlog.processors.JSONRenderer(),
        ],
        "wrapper_class": structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        "logger_factory": structlog.PrintLoggerFactory(stream or sys.stdout),
    }


def configure_logging(level: str = "INFO") -> None:
    structlog.configure(**logging_config(level), cache_logger_on_first_use=True)


def refusal_level(rejection: Rejection) -> int:
    """Policy refusals and throttling: debug (alerts and metrics report them; a line per refused query
    would flood the log). The model server failing: warning. Bad input: info."""
    if isinstance(rejection, (Refused, Throttled)):
        return logging.DEBUG
    return logging.WARNING if isinstance(rejection, Unavailable) else logging.INFO


def rejection_fields(rejection: Rejection) -> dict[str, object]:
    """ECS fields of a request that was not answered."""
    return {
        "event.category": ["network"],
        "event.type": ["denied"],
        "event.outcome": "failure",
        "error.code": rejection.code.name,
        "event.reason": rejection.detail,
    }


def source_fields(peer: str) -> dict[str, str]:
    """ECS ``source.ip`` for an IP address; ``source.address`` for anything else (a Unix socket)."""
    try:
        ipaddress.ip_address(peer)
    except ValueError:
        return {"source.address": peer}
    return {"source.ip": peer}


def request_fields(request_id: str, model: str, client_id: str, peer: str) -> dict[str, str]:
    client = {"user.id": client_id} if client_id else {}  # none: a line about an address
    return {"firewall.request_id": request_id, "firewall.model": model, **client, **source_fields(peer)}
