"""`firewall serve`: the grpc.aio server with the inference service, health and reflection.

Health (grpc.health.v1): the service "liveness" is SERVING while the process runs; "" and
"inference.GRPCInferenceService" are SERVING while every protected model can answer (so a
readiness probe fails while the upstream model server is down). On SIGTERM or SIGINT the server
reports NOT_SERVING, stops accepting calls, lets in-flight calls finish within the grace period,
then closes the stages (which persist their state), logs the last line of every open alert
episode and stops the metrics endpoint (``metrics_listen``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import cv2
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from pydantic import ValidationError

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
READINESS_INTERVAL_S = 5.0

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
        pipelines = build_pipelines(settings)
        state = MemoryClientState(settings.max_tracked_clients)
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
        ]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, self.server, pool=pb.DESCRIPTOR.pool)
        if settings.tls is None:
            self.port = self.server.add_insecure_port(settings.listen)
        else:
            self.port = self.server.add_secure_port(settings.listen, server_credentials(settings.tls))
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        self.metrics_port: int | None = None  # set by start()
        self._readiness: asyncio.Task | None = None
        self._alert_flusher: asyncio.Task | None = None

    async def start(self) -> None:
        self.metrics_port = self.metrics.serve(self.settings.metrics_listen)
        self._alert_flusher = asyncio.create_task(self.alerts.run())
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        self._readiness = asyncio.create_task(self._watch_readiness())
        log.info(
            "server.started",
            listen=self.settings.listen,
            port=self.port,
            metrics_port=self.metrics_port,
            models=sorted(self.service.pipelines),
        )

    async def stop(self) -> None:
        log.info("server.stopping", grace_s=self.settings.shutdown_grace_s)
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        await asyncio.get_running_loop().run_in_executor(None, self.service.close)
        if self._alert_flusher is not None:
            self._alert_flusher.cancel()
        self.alerts.close()
        self.metrics.close()
        log.info("server.stopped")

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            await self._update_readiness()

    async def _update_readiness(self) -> None:
        ready = await self.service.all_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_SERVICES:
            await self.health.set(name, status)


async def serve(settings: Settings) -> None:
    firewall = Firewall(settings)
    await firewall.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await firewall.stop()


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file (default: the bundled MNIST configuration)")
    parser.add_argument("--listen", help="HOST:PORT for gRPC (overrides the configuration)")
    parser.add_argument("--log-level", default="INFO")


def run_cli(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        settings = load_settings(args.config)
    except (ValidationError, ValueError, OSError) as error:
        print(f"firewall: invalid configuration: {error}", file=sys.stderr)
        return 2
    if args.listen:
        settings = settings.model_copy(update={"listen": args.listen})
    asyncio.run(serve(settings))
    return 0
