"""The operators' endpoint: see the tracked clients and bans, inspect a client, lift a ban, reset a
client, reload the configuration. `firewall admin` (firewall/admin_cli.py) is its client.

A gRPC service of its own, ``firewall.Admin``, on its own listener (``admin.listen``): local by
default (127.0.0.1, or a unix socket, made readable by its owner only), mutual TLS otherwise, so
that the port clients reach for inference never carries it. Messages are JSON documents, so any
gRPC client can call it without stubs. It reads and changes client state only through the
``ClientState`` interface (memory or a shared store alike) and the stages' optional
``client_evidence``/``forget_client``. Every call is an ECS audit event (``event.category: configuration`` or
``iam``), naming the operator (the certificate identity with mutual TLS, else the peer) in
``user.name`` and the client acted on in ``user.target.id``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Awaitable, Callable

import grpc
import structlog

from firewall.alerts import AlertAggregator
from firewall.bans import BanLog, peer_key
from firewall.config import AdminTLS, ConfigError
from firewall.pipeline import ModelPipeline
from firewall.state import ClientRecord, ClientState
from firewall.tls import certificate_identity, server_credentials

log = structlog.get_logger("firewall.admin")

SERVICE = "firewall.Admin"
LIST_LIMIT = 100  # clients listed by default, banned first
Handler = Callable[[dict[str, Any], grpc.aio.ServicerContext], Awaitable[dict[str, Any]]]


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def decode(payload: bytes) -> dict[str, Any]:
    document = json.loads(payload or b"{}")
    if not isinstance(document, dict):
        raise ValueError("an admin request is a JSON object")
    return document


def state_key(request: dict[str, Any]) -> str:
    """The key a request names: ``{"client": id}`` or ``{"address": ip}``."""
    if isinstance(request.get("address"), str) and request["address"]:
        return peer_key(request["address"])
    if isinstance(request.get("client"), str) and request["client"]:
        return request["client"]
    raise ValueError("name a client or an address")


class AdminService:
    def __init__(
        self,
        state: ClientState,
        bans: BanLog,
        alerts: AlertAggregator,
        pipelines: dict[str, ModelPipeline],
        reload: Callable[[str], list[str]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.state = state
        self.bans = bans
        self.alerts = alerts
        self.pipelines = pipelines
        self.reload_configuration = reload  # raises ConfigError; returns the fields changed
        self.clock = clock

    def handlers(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Handler] = {
            "List": self.list,
            "Show": self.show,
            "Lift": self.lift,
            "Reset": self.reset,
            "Reload": self.reload,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(self._audited(name, method), request_deserializer=decode, response_serializer=encode)
                for name, method in methods.items()
            },
        )

    # -- the calls --------------------------------------------------------------------------------

    async def list(self, request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        limit, banned_only = request.get("limit", LIST_LIMIT), request.get("banned", False)
        if not isinstance(limit, int) or not isinstance(banned_only, bool):
            raise ValueError("limit is an integer and banned a boolean")
        return await asyncio.to_thread(self._list, limit, banned_only)  # off the event loop: O(tracked clients)

    def _list(self, limit: int, banned_only: bool) -> dict[str, Any]:
        now = self.clock()
        items = self.state.items()
        rows = [self._summary(key, record, now) for key, record in items if not banned_only or record.banned_until > now]
        rows.sort(key=lambda row: (-row["banned_s"], -row["suspect_s"], row["key"]))
        return {
            "tracked": len(items),
            "bans_active": sum(record.banned_until > now for _, record in items),
            "clients": rows[: max(limit, 0)],
        }

    async def show(self, request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        key = state_key(request)
        record = self.state.get(key)
        evidence = {
            name: {stage.name: stage.client_evidence(key) for stage in pipeline.chain if hasattr(stage, "client_evidence")}
            for name, pipeline in self.pipelines.items()
        }
        return {
            "key": key,
            "state": None if record is None else {**self._summary(key, record, self.clock()), "first_labels": record.first_labels},
            "findings": self.alerts.episodes(key),
            "evidence": evidence,
        }

    async def lift(self, request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        key = state_key(request)
        now = self.clock()
        record = self.state.get(key)
        if record is None or record.banned_until <= now:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{key} is not banned")
        self.state.lift(key)
        self.bans.lifted(key, operator(context))
        return {"key": key, "lifted": True}

    async def reset(self, request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        key = state_key(request)
        record = self.state.get(key)
        removed = self.state.remove(key)
        for pipeline in self.pipelines.values():
            for stage in pipeline.chain:
                if hasattr(stage, "forget_client"):
                    stage.forget_client(key)
        if record is not None and record.banned_until > self.clock():
            self.bans.lifted(key, operator(context))
        return {"key": key, "reset": True, "was_tracked": removed}

    async def reload(self, request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        try:
            changed = self.reload_configuration(operator(context))
        except ConfigError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return {"reloaded": True, "changed": changed}

    # -- helpers ----------------------------------------------------------------------------------

    def _summary(self, key: str, record: ClientRecord, now: float) -> dict[str, Any]:
        return {
            "key": key,
            "banned_s": round(max(record.banned_until - now, 0.0), 3),
            "suspect_s": round(max(record.suspect_until - now, 0.0), 3),
            "offences": record.offences,
        }

    def _audited(self, name: str, method: Handler) -> Handler:
        category, kind = AUDIT[name]

        async def call(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
            fields: dict[str, Any] = {
                "event.kind": "event",
                "event.category": [category],
                "event.type": [kind],
                "event.action": f"admin-{name.lower()}",
                "user.name": operator(context),
            }
            try:
                target = state_key(request)
            except ValueError:
                target = None
            if target is not None:
                fields["user.target.id"] = target
            try:
                response = await method(request, context)
            except ValueError as error:  # a malformed request (its message says what is expected)
                log.info("admin.call", **fields, **{"event.outcome": "failure", "event.reason": str(error)})
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except grpc.aio.AbortError:
                log.info("admin.call", **fields, **{"event.outcome": "failure", "event.reason": context.details() or ""})
                raise
            log.info("admin.call", **fields, **{"event.outcome": "success"})
            return response

        return call


# ECS category and type of each call's audit event.
AUDIT = {
    "List": ("iam", "info"),
    "Show": ("iam", "info"),
    "Lift": ("iam", "change"),
    "Reset": ("iam", "deletion"),
    "Reload": ("configuration", "change"),
}


def operator(context: grpc.aio.ServicerContext) -> str:
    return certificate_identity(context) or context.peer()


def admin_server(listen: str, tls: AdminTLS | None, service: AdminService) -> tuple[grpc.aio.Server, int]:
    """The admin listener, bound but not started, and its port (0 for a unix socket).

    Raises ``RuntimeError`` when the address cannot be bound.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((service.handlers(),))
    port = server.add_insecure_port(listen) if tls is None else server.add_secure_port(listen, server_credentials(tls))
    if listen.startswith("unix:"):
        os.chmod(listen.removeprefix("unix:").removeprefix("//"), 0o600)  # its owner only
        return server, 0
    if port == 0:
        raise RuntimeError("address in use or invalid")
    return server, port
