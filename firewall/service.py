"""The Open Inference Protocol servicer: identify, admit, decode, inspect, decide, predict, respond.

gRPC handlers run on the event loop and only do bookkeeping; everything CPU-bound (decoding,
sanitizing, detectors, the model) runs in one call on a bounded worker pool. Admission (bans, the
client's token bucket, the concurrency cap) is decided before any work is queued, so hostile load
cannot grow a queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import structlog

from firewall import codec
from firewall.config import Settings
from firewall.errors import InvalidInput, Refused, Rejection, Throttled, UnknownModel
from firewall.logs import request_fields
from firewall.metrics import Metrics, refusal_outcome
from firewall.pipeline import ModelPipeline
from firewall.policy import ResponsePolicy
from firewall.protocol import pb, pb_grpc
from firewall.stage import RequestContext
from firewall.throttle import Admission, request_cost
from firewall.tls import TrustedProxies, certificate_identity

log = structlog.get_logger("firewall")

SERVER_NAME = "inference-firewall"
MAX_CLIENT_ID_LENGTH = 128


@dataclass(frozen=True)
class Identity:
    client_id: str
    peer: str  # the caller's IP address, or the raw gRPC peer string for other transports


def peer_address(peer: str) -> str:
    """'ipv4:10.0.0.1:5000' -> '10.0.0.1'; 'ipv6:[::1]:5000' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        settings: Settings,
        pipelines: dict[str, ModelPipeline],
        policy: ResponsePolicy,
        admission: Admission,
        metrics: Metrics,
    ):
        self.settings = settings
        self.pipelines = pipelines
        self.policy = policy
        self.admission = admission
        self.metrics = metrics
        self.trusted_proxies = TrustedProxies(settings.tls.trusted_proxies if settings.tls else [])
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="pipeline")
        self.in_flight = 0

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.all_ready())

    async def ModelReady(self, request, context):
        pipeline = await self._pipeline_or_abort(request.name, context)
        ready = await asyncio.get_running_loop().run_in_executor(self.executor, pipeline.predictor.ready)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version="2")

    async def ModelMetadata(self, request, context):
        pipeline = await self._pipeline_or_abort(request.name, context)
        spec = pipeline.classifier.input
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=["1"],
            platform="inference-firewall",
            inputs=[tensor(name=codec.INPUT_NAME, datatype="UINT8", shape=[-1, spec.height, spec.width, spec.channels])],
            outputs=[tensor(name=codec.OUTPUT_NAME, datatype="INT64", shape=[-1])],
        )

    async def all_ready(self) -> bool:
        loop = asyncio.get_running_loop()
        checks = [loop.run_in_executor(self.executor, p.predictor.ready) for p in self.pipelines.values()]
        return all(await asyncio.gather(*checks))

    async def _pipeline_or_abort(self, name: str, context) -> ModelPipeline:
        if name not in self.pipelines:
            await context.abort(grpc.StatusCode.NOT_FOUND, UnknownModel.public_message)
        return self.pipelines[name]

    # -- inference -----------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, self._identify(context))
        except Rejection as rejection:
            await context.abort(rejection.code, rejection.public_message)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One stream, many requests: an error answers that request only and the stream goes on.
        async for request in request_iterator:
            try:
                response = await self._infer(request, self._identify(context))
                yield pb.ModelStreamInferResponse(infer_response=response)
            except Rejection as rejection:
                yield pb.ModelStreamInferResponse(
                    error_message=rejection.public_message, infer_response=pb.ModelInferResponse(id=request.id)
                )

    def _identify(self, context) -> Identity:
        peer = peer_address(context.peer())
        certified = certificate_identity(context)  # None unless mutual TLS
        claimed = dict(context.invocation_metadata() or ()).get(self.settings.client_id_header)
        if certified is not None and not self.trusted_proxies.trusts(peer, certified):
            claimed = None  # with mutual TLS only a trusted proxy speaks for another client
        if claimed is None:
            return Identity(client_id=certified or peer, peer=peer)
        if not claimed or len(claimed) > MAX_CLIENT_ID_LENGTH or not claimed.isprintable():
            raise InvalidInput("invalid client id")
        return Identity(client_id=claimed, peer=peer)

    async def _infer(self, request: pb.ModelInferRequest, identity: Identity) -> pb.ModelInferResponse:
        request_id = uuid.uuid4().hex
        pipeline = self.pipelines.get(request.model_name)
        model = pipeline.name if pipeline else ""  # metric labels never take a client's string
        self.metrics.requests.labels(model).inc()
        fields = request_fields(request_id, request.model_name[:MAX_CLIENT_ID_LENGTH], identity.client_id, identity.peer)
        with structlog.contextvars.bound_contextvars(**fields):
            try:
                if pipeline is None:
                    raise UnknownModel(f"model {request.model_name!r} is not protected here")
                self.admission.admit(identity.client_id, identity.peer, request_cost(request, pipeline.limits.max_batch))
                if self.in_flight >= self.settings.max_concurrent_requests:
                    raise Throttled("global concurrency cap reached")
                self.in_flight += 1
                try:
                    loop = asyncio.get_running_loop()
                    handle = contextvars.copy_context().run  # the worker logs with this request's fields
                    return await loop.run_in_executor(self.executor, handle, self._handle, pipeline, request, identity, request_id)
                finally:
                    self.in_flight -= 1
            except Rejection as rejection:
                self.metrics.decisions.labels(model, refusal_outcome(rejection)).inc()
                # Policy refusals are reported by alerts and metrics; a line per refused query would flood the log.
                level = logging.DEBUG if isinstance(rejection, (Refused, Throttled)) else logging.INFO
                log.log(level, "request.refused", code=rejection.code.name, reason=rejection.detail)
                raise
            except Exception:
                self.metrics.decisions.labels(model, "failed").inc()
                log.exception("request.failed")
                raise Rejection("unexpected error") from None

    def _handle(self, pipeline: ModelPipeline, request: pb.ModelInferRequest, identity: Identity, request_id: str):
        decoded = codec.decode_request(request, pipeline.limits)
        ctx = RequestContext(
            request_id=request_id,
            model=pipeline.name,
            client_id=identity.client_id,
            peer=identity.peer,
            images=decoded.images,
            digests=decoded.digests,
        )
        pipeline.inspect(ctx)
        for finding in ctx.findings:
            self.metrics.findings.labels(pipeline.name, finding.rule).inc()
        outcome = self.policy.decide(ctx, pipeline)
        self.metrics.decisions.labels(pipeline.name, outcome).inc()
        return codec.encode_response(request, pipeline.name, ctx.labels)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        for pipeline in self.pipelines.values():
            pipeline.close()
