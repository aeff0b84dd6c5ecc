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
holds every pipeline worker cannot delay it; each change is logged once. The same tick logs the end
of every ban that is over. The admin endpoint (firewall/admin.py) has its own listener. SIGHUP
reloads the configuration file (firewall/reload.py); a file that fails its checks is logged as one
error and the running configuration stays. Start-up refuses to run (``StartupError``: one line,
exit status 2) on a taken port (SO_REUSEPORT is off, so a second firewall cannot share the
port), a bad address, a bad log level, an invalid or unreadable configuration or a missing model.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Callable

import cv2
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from firewall import http, reload
from firewall.admin import AdminService, admin_server
from firewall.alerts import AlertAggregator
from firewall.bans import BanLog
from firewall.config import ConfigError, Settings, load_settings
from firewall.logs import configure_logging
from firewall.metrics import Metrics
from firewall.pipeline import build_pipelines
from firewall.policy import ResponsePolicy
from firewall.protocol import pb, pb_grpc
from firewall.service import InferenceService, log
from firewall.stage import Finding, RequestContext
from firewall.state import ClientState, MemoryClientState
from firewall.throttle import Admission
from firewall.tls import server_credentials

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
READINESS_SERVICES = ("", SERVICE_NAME)
LIVENESS_SERVICE = "liveness"
READINESS_INTERVAL_S = 0.5
CLIENT_SNAPSHOT = "clients.json"


def transport_ceiling(max_message_bytes: int) -> int:
    """gRPC core's receive limit: what a connection may make the server buffer for one message."""
    return min(2 * max_message_bytes, 2**31 - 1)


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


def build_state(settings: Settings) -> ClientState:
    """Process memory, or Redis shared by every replica (with this process's memory as its fallback)."""
    keep_offences_s = max([model.policy.ban.forget_s for model in settings.models.values()] + [settings.throttle.refusal_window_s])
    local = MemoryClientState(settings.max_tracked_clients, settings.max_protected_clients, keep_offences_s)
    if settings.state.backend == "memory":
        return local
    from firewall.redis_state import RedisClientState  # the redis client is needed only here

    return RedisClientState(settings.state, local, keep_offences_s)


class Firewall:
    """A running firewall: build it from settings, ``await start()``, ``await stop()``.

    ``source`` reads the configuration again for a reload (None: this firewall cannot reload).
    """

    def __init__(self, settings: Settings, source: Callable[[], Settings] | None = None):
        self.settings = settings
        self.source = source
        for name, model in settings.models.items():
            path = settings.onnx_path(name)
            if not path.is_file():
                known = "" if model.onnx is not None else " (not a bundled model: set models.<name>.onnx)"
                raise StartupError(f"model {name!r}: no ONNX file at {path}{known}")
        state = build_state(settings)
        self.state = state
        try:
            pipelines = build_pipelines(settings, state)
        except Exception as error:  # ONNX Runtime, FAISS, a detector's own checks
            raise StartupError(f"cannot load the models: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
        self.snapshot_path: Path | None = settings.snapshot_dir / CLIENT_SNAPSHOT if settings.snapshot_dir else None
        if self.snapshot_path is not None and self.snapshot_path.exists():
            try:
                log.info("state.restored", records=state.restore(self.snapshot_path), path=str(self.snapshot_path))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("state.restore_failed", path=str(self.snapshot_path), error=str(error))
        if self.snapshot_path is None:
            log.warning("state.not_persisted", reason="snapshot_dir is not set: a restart forgets bans and query history")
        self.alerts = AlertAggregator(settings.alerts)
        self.bans = BanLog(state)
        self.metrics = Metrics(pipelines, state)
        self.policy = ResponsePolicy(settings, state, self.alerts, self.bans)
        for name, pipeline in pipelines.items():
            pipeline.observe = self.metrics.observer(name)
            pipeline.report = self._report_deferred(self.policy)
        self.admission = Admission(state, settings.throttle, self.bans)
        self.service = InferenceService(settings, pipelines, self.policy, self.admission, self.metrics)
        self.health = HealthServicer()
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # gRPC core's own refusal states its limit ("Received message larger than max (N vs. M)"):
            # its limit is set above ours, so a message over ``max_message_bytes`` is refused by the
            # request path with a message that names none; only one over the ceiling reaches core's.
            ("grpc.max_receive_message_length", transport_ceiling(settings.max_message_bytes)),
            ("grpc.so_reuseport", 0),  # a taken port fails here instead of being shared silently
            # HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: calls beyond it wait in the client, so one
            # connection cannot fill the queue of calls that wait for the event loop ahead of others'.
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            # Count open streams as HTTP/2 does: with core's default "overload protection", streams a
            # client opened before it read the limit are reset (REFUSED_STREAM) and its calls fail.
            ("grpc.http.overload_protection", 0),
        ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
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
            handler_cancellation=True,  # a closed connection cancels its request: queued work is dropped
        )
        self.admin: grpc.aio.Server | None = None
        self.admin_port: int | None = None  # 0 for a unix socket
        if settings.admin.listen is not None:
            service = AdminService(state, self.bans, self.alerts, pipelines, self.reload)
            try:
                if not settings.admin.listen.startswith("unix:"):
                    check_listen(settings.admin.listen)
                self.admin, self.admin_port = admin_server(settings.admin.listen, settings.admin.tls, service)
            except (StartupError, RuntimeError, OSError, ValueError) as error:
                raise StartupError(f"admin endpoint (admin.listen): {error}") from None
        self._ready: bool | None = None
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
        await self.state.start()
        await self.server.start()
        if self.settings.http_listen is not None:
            await self._start_http(self.settings.http_listen)
        if self.admin is not None:
            await self.admin.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        self._readiness = asyncio.create_task(self._watch_readiness())
        log.info(
            "server.started",
            listen=self.settings.listen,
            port=self.port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            admin_listen=self.settings.admin.listen,
            models=sorted(self.service.pipelines),
        )

    async def stop(self) -> None:
        log.info("server.stopping", grace_s=self.settings.shutdown_grace_s)
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.enter_graceful_shutdown()
        if self.admin is not None:
            await self.admin.stop(None)
        await asyncio.gather(self.server.stop(self.settings.shutdown_grace_s), self.http.cleanup())
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)
        await self.state.close()
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

    def _report_deferred(self, policy: ResponsePolicy) -> Callable[[RequestContext, list[Finding]], None]:
        """Findings of the stages run after the answer: counted and alerted like the others, action monitor."""

        def report(ctx: RequestContext, findings: list[Finding]) -> None:
            for finding in findings:
                self.metrics.findings.labels(ctx.model, finding.rule).inc()
            policy.alert(ctx, findings, "monitor")

        return report

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
            self.bans.expire()

    async def _update_readiness(self) -> None:
        ready = await self.service.all_ready()
        if ready != self._ready:
            fields = {"event.category": ["process"], "event.type": ["change"], "firewall.ready": ready}
            (log.info if ready else log.warning)("server.ready" if ready else "server.not_ready", **fields)
            self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_SERVICES:
            await self.health.set(name, status)

    def reload(self, operator: str) -> list[str]:
        """Read the configuration again and swap in what changed; return the changed fields.

        Raises ``ConfigError`` (logged as one error) and keeps the running configuration when the
        file is invalid or changes what needs a restart.
        """
        fields = {"event.category": ["configuration"], "event.type": ["change"], "user.name": operator}
        try:
            if self.source is None:
                raise ConfigError("this firewall was not started from a configuration it can read again")
            try:
                new = self.source()
            except OSError as error:
                raise ConfigError(f"cannot read the configuration: {error}") from None
            change = reload.plan(self.settings, new)
        except ConfigError as error:
            log.error("config.reload_failed", **fields, **{"event.outcome": "failure", "error.message": str(error)})
            raise
        reload.apply(change, self.policy, self.admission, self.alerts, self.service.pipelines)
        self.settings = new
        log.info("config.reloaded", **fields, **{"event.outcome": "success", "firewall.changed": change.changed})
        return change.changed


async def serve(settings: Settings, source: Callable[[], Settings] | None = None) -> None:
    firewall = Firewall(settings, source)
    try:
        await firewall.start()
    except StartupError:
        await firewall.server.stop(None)
        await firewall.http.cleanup()
        if firewall.admin is not None:
            await firewall.admin.stop(None)
        firewall.metrics.close()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload_quietly, firewall)
    await stopping.wait()
    await firewall.stop()


def reload_quietly(firewall: Firewall) -> None:
    """SIGHUP: reload; a failure is already logged, and the firewall goes on as it was."""
    try:
        firewall.reload("SIGHUP")
    except ConfigError:
        pass


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

EPILOG = """The gRPC listener is `listen` (default 0.0.0.0:8001), the HTTP/JSON one `http_listen` (default
0.0.0.0:8000), Prometheus metrics are served on `metrics_listen` (default 0.0.0.0:9108) and the
admin endpoint on `admin.listen` (default 127.0.0.1:8002). Every configuration field can be overridden from the environment as
FIREWALL_<FIELD>, with __ between nested names (FIREWALL_THROTTLE__RATE=50); an unknown FIREWALL_*
variable is an error. `firewall config --reference` lists every field. SIGHUP reloads the file.
"""


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (default: the bundled MNIST configuration)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="gRPC listener (overrides `listen` of the configuration)")
    parser.add_argument(
        "--http-listen", metavar="HOST:PORT", help="HTTP/JSON listener (overrides `http_listen` of the configuration)"
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="lowest level logged (default: %(default)s)"
    )


def run_cli(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)

    def source() -> Settings:
        overrides = {"listen": args.listen, "http_listen": args.http_listen}
        return load_settings(args.config).model_copy(update={key: value for key, value in overrides.items() if value})

    try:
        settings = source()
    except (ConfigError, OSError) as error:
        print(f"firewall: invalid configuration: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, source))
    except StartupError as error:
        print(f"firewall: {error}", file=sys.stderr)
        return 2
    return 0
