"""structlog configured once: JSON lines on stdout with Elastic Common Schema (ECS) field names.

Fields are flat dotted keys (``"user.id"``), which ECS ingest pipelines expand. structlog's own
keys take their ECS names, ``message`` and ``log.level``, so that ``event`` stays free for the
``event.*`` fields of alerts. The request's fields are bound per call with
``structlog.contextvars`` (``request_fields``), so every line logged while serving a request
carries them.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger


def ecs_names(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict["message"] = event_dict.pop("event")
    event_dict["log.level"] = event_dict.pop("level")
    return event_dict


def logging_config(level: str = "INFO", stream: TextIO | None = None) -> dict[str, Any]:
    """The structlog configuration as data (tests apply it to their own stream)."""
    return {
        "processors": [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="@timestamp"),
            structlog.processors.dict_tracebacks,
            ecs_names,
            structlog.processors.JSONRenderer(),
        ],
        "wrapper_class": structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        "logger_factory": structlog.PrintLoggerFactory(stream or sys.stdout),
    }


def configure_logging(level: str = "INFO") -> None:
    structlog.configure(**logging_config(level), cache_logger_on_first_use=True)


def source_fields(peer: str) -> dict[str, str]:
    """ECS ``source.ip`` for an IP address; ``source.address`` for anything else (a Unix socket)."""
    try:
        ipaddress.ip_address(peer)
    except ValueError:
        return {"source.address": peer}
    return {"source.ip": peer}


def request_fields(request_id: str, model: str, client_id: str, peer: str) -> dict[str, str]:
    return {"firewall.request_id": request_id, "firewall.model": model, "user.id": client_id, **source_fields(peer)}
