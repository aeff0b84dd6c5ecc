"""`firewall serve`: the grpc.aio server with the inference service, health and reflection, and
the HTTP/JSON binding (firewall/http.py) on ``http_listen``, in the same event loop.

Health (grpc.health.v1): the service "liveness" is SERVING while the process runs; "" and
"inference.GRPCInferenceService" are SERVING while every protected model can answer (so a
readiness probe fails while the upstream model server is down). On SIGTERM or SIGINT the server
reports NOT_SERVING, stops accepting calls on both listeners, lets in-flight calls finish within the grace period,
then closes the stages (which persist their state), saves the protected client state (bans,
offence counts, suspects, refusal windows) to ``snapshot_dir/clients.json`` (read back at start),
logs the last line of every open alert episode and stops the metrics endpoint (``metrics_listen``).

Readiness is probed every ``READINESS_INTERVAL_S`` on threads of its own, so a hung upstream that
holds every pipeline worker cannot delay it. Start-up refuses to run (``StartupError``: one line,
exit status 2) on a taken port (SO_REUSEPORT is off, so a second firewall cannot share the
port), a bad address, a bad log level, an invalid or unreadable configuration or a missing model.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import cv2
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from aiohttp import web
from pydantic import ValidationError

from firewall import http
from firewall.alerts import AlertAggregator
from firewall.config import Settings, load_settings
from firewall.logs import configure_logging
from firewall.metrics import Metrics
from firewall.pipeline import build_pipelines
from firewall.policy import ResponsePolicy
from firewall.protocol import pb, pb_grpc
from firewall.service import InferenceService, log
from firewall.state import MemoryClientState
from firewall.throttle import Admission
from firewall.tls import server_credentials

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
READINESS_SERVICES = ("", SERVICE_NAME)
LIVENESS_SERVICE = "liveness"
READINESS_INTERVAL_S = 0.5
CLIENT_SNAPSHOT = "clients.json"


class StartupError(Exception):
    """The firewall cannot start; the message is the one line the operator sees."""


def split_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); raises ``StartupError``."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise StartupError(f"cannot listen on {listen}: invalid port")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_listen(listen: str) -> None:
    """Raise ``StartupError`` unless HOST:PORT can be bound now (before gRPC logs its own error)."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise StartupError(f"cannot listen on {listen}: invalid address ({error})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: only a live listener conflicts
        try:
            probe.bind(sockaddr)
        except OSError as error:
            raise StartupError(f"cannot listen on {listen}: {error.strerror}") from None

# Our messages live in a private descriptor pool (see proto/generate.py); reflection serves that
# pool, so the health and reflection protocols are added to it once, here.
for _module in (health_pb2, reflection_pb2):
    pb.DESCRIPTOR.pool.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
REFLECTED_SERVICES = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)

# The worker threads already run requests in parallel; OpenCV's own pool on images this small only
# adds hand-offs between threads.
cv2.setNumThreads(1)


class Firewall:
    """A running firewall: build it from settings, ``await start()``, ``await stop()``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        for name, model in settings.models.items():
            path = settings.onnx_path(name)
            if not path.is_file():
                known = "" if model.onnx is not None else " (not a bundled model: set models.<name>.onnx)"
                raise StartupError(f"model {name!r}: no ONNX file at {path}{known}")
        try:
            pipelines = build_pipelines(settings)
        except Exception as error:  # ONNX Runtime, FAISS, a detector's own checks
            raise StartupError(f"cannot load the models: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        keep_offences_s = max([model.policy.ban.forget_s for model in settings.models.values()] + [settings.throttle.refusal_window_s])
        state = MemoryClientState(settings.max_tracked_clients, settings.max_protected_clients, keep_offences_s)
        self.state = state
        self.snapshot_path: Path | None = settings.snapshot_dir / CLIENT_SNAPSHOT if settings.snapshot_dir else None
        if self.snapshot_path is not None and self.snapshot_path.exists():
            try:
                log.info("state.restored", records=state.restore(self.snapshot_path), path=str(self.snapshot_path))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("state.restore_failed", path=str(self.snapshot_path), error=str(error))
        self.alerts = AlertAggregator(settings.alerts)
        self.metrics = Metrics(pipelines, state)
        for name, pipeline in pipelines.items():
            pipeline.observe = self.metrics.observer(name)
        policy = ResponsePolicy(settings, state, self.alerts)
        self.service = InferenceService(settings, pipelines, policy, Admission(state, settings.throttle), self.metrics)
        self.health = HealthServicer()
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port fails here instead of being shared silently
        ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, self.server, pool=pb.DESCRIPTOR.pool)
        check_listen(settings.listen)
        try:
            if settings.tls is None:
                self.port = self.server.add_insecure_port(settings.listen)
            else:
                self.port = self.server.add_secure_port(settings.listen, server_credentials(settings.tls))
        except (RuntimeError, OSError, ValueError):
            self.port = 0
        if self.port == 0:
            raise StartupError(f"cannot listen on {settings.listen} (address in use or invalid)")
        if settings.http_listen is not None:
            check_listen(settings.http_listen)
        self.http = web.AppRunner(
            http.application(self.service, settings.max_message_bytes, settings.max_concurrent_requests),
            access_log=None,
            shutdown_timeout=settings.shutdown_grace_s,
        )
        self.metrics_port: int | None = None  # set by start()
        self.http_port: int | None = None  # set by start() when http_listen is set
        self._readiness: asyncio.Task | None = None
        self._alert_flusher: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            self.metrics_port = self.metrics.serve(self.settings.metrics_listen)
        except (OSError, ValueError) as error:
            raise StartupError(f"cannot serve metrics on {self.settings.metrics_listen}: {error.strerror or error if isinstance(error, OSError) else error}") from None
        self._alert_flusher = asyncio.create_task(self.alerts.run())
        await self.server.start()
        if self.settings.http_listen is not None:
            await self._start_http(self.settings.http_listen)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        self._readiness = asyncio.create_task(self._watch_readiness())
        log.info(
            "server.started",
            listen=self.settings.listen,
            port=self.port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            models=sorted(self.service.pipelines),
        )

    async def stop(self) -> None:
        log.info("server.stopping", grace_s=self.settings.shutdown_grace_s)
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(self.settings.shutdown_grace_s), self.http.cleanup())
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)
        if self.snapshot_path is not None:
            try:
                log.info("state.saved", records=self.state.snapshot(self.snapshot_path), path=str(self.snapshot_path))
            except OSError as error:
                log.warning("state.save_failed", path=str(self.snapshot_path), error=str(error))
        if self._alert_flusher is not None:
            self._alert_flusher.cancel()
        self.alerts.close()
        self.metrics.close()
        log.info("server.stopped")

    async def _start_http(self, listen: str) -> None:
        host, port = split_listen(listen)
        tls = http.ssl_context(self.settings.tls) if self.settings.tls is not None else None
        await self.http.setup()
        site = web.TCPSite(self.http, host, port, ssl_context=tls, reuse_port=False)
        try:
            await site.start()
        except OSError as error:
            raise StartupError(f"cannot listen on {listen}: {error.strerror}") from None
        self.http_port = site.port

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            await self._update_readiness()
            self.state.refresh()  # expired bans leave the protected table; ``full`` clears

    async def _update_readiness(self) -> None:
        ready = await self.service.all_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_SERVICES:
            await self.health.set(name, status)


async def serve(settings: Settings) -> None:
    firewall = Firewall(settings)
    try:
        await firewall.start()
    except StartupError:
        await firewall.server.stop(None)
        await firewall.http.cleanup()
        firewall.metrics.close()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await firewall.stop()


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file (default: the bundled MNIST configuration)")
    parser.add_argument("--listen", help="HOST:PORT for gRPC (overrides the configuration)")
    parser.add_argument("--http-listen", help="HOST:PORT for HTTP/JSON (overrides the configuration)")
    parser.add_argument("--log-level", default="INFO")


def run_cli(args: argparse.Namespace) -> int:
    if not isinstance(logging.getLevelName(str(args.log_level).upper()), int):
        print(f"firewall: invalid --log-level {args.log_level!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    try:
        settings = load_settings(args.config)
    except (ValidationError, ValueError, OSError) as error:
        print(f"firewall: invalid configuration: {error}", file=sys.stderr)
        return 2
    if args.listen:
        settings = settings.model_copy(update={"listen": args.listen})
    if args.http_listen:
        settings = settings.model_copy(update={"http_listen": args.http_listen})
    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        print(f"firewall: {error}", file=sys.stderr)
        return 2
    return 0
