"""The Open Inference Protocol servicer: identify, admit, decode, inspect, decide, predict, respond.

``identify`` and ``infer`` are the one request path; the gRPC handlers here and the HTTP routes
(firewall/http.py) are thin adapters over it and over the shared metadata, configuration,
statistics and readiness answers, so both bindings admit, inspect and answer alike.

Handlers run on the event loop and only do bookkeeping; everything CPU-bound (decoding,
sanitizing, detectors, the model) runs in one call on a bounded worker pool. Admission is decided
on the event loop before any work is queued, so hostile load cannot grow a queue, in this order:
bans (read only), the address's bucket (every request, valid or not), the model name, the cheap
checks of the codec (shapes, sizes, image headers: nothing decoded), the client's bucket (only now
is a client record created), the in-flight shares and the decoding budget. A free worker takes
established clients' work before fresh ids' (firewall/scheduler.py). Work whose deadline
(``request_timeout_s``, or the client's own if sooner) has passed by the time a worker takes it,
or whose client has gone (a cancelled call, a closed HTTP connection), is dropped and counted
(outcome ``abandoned``). After a request that decoded more
than ``heavy_request_bytes`` the freed memory is handed back to the system (``malloc_trim``).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import importlib.metadata
import inspect
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import structlog

from firewall import codec, statistics
from firewall.config import Settings
from firewall.errors import Banned, Expired, InvalidInput, Refused, Rejection, TooLarge, UnknownModel
from firewall.forwarded import ForwardedAddress
from firewall.logs import refusal_level, rejection_fields, request_fields
from firewall.metrics import Metrics, refusal_outcome
from firewall.pacing import Pacer
from firewall.pipeline import ModelPipeline
from firewall.policy import ResponsePolicy
from firewall.protocol import pb, pb_grpc
from firewall.scheduler import PriorityExecutor
from firewall.stage import RequestContext
from firewall.throttle import Admission, InFlight, Ticket, request_cost
from firewall.tls import TrustedProxies, certificate_identity

log = structlog.get_logger("firewall")

VERSION = importlib.metadata.version("inference-firewall")
# Triton's names for the protocol extensions served in full (RepositoryIndex is served, but not the
# rest of model_repository: loading and unloading).
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
MAX_CLIENT_ID_LENGTH = 128


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): return freed heap pages to the system (a no-op elsewhere)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


release_memory = _malloc_trim()


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
        self.pacer = Pacer()
        self.metrics = metrics
        self.trusted_proxies = TrustedProxies(settings.tls.trusted_proxies if settings.tls else [])
        self.mutual_tls = settings.tls is not None and settings.tls.client_ca is not None
        self.forwarded = ForwardedAddress(settings.forwarded.trusted_proxies, settings.forwarded.header)
        self.executor = PriorityExecutor(settings.workers, thread_name_prefix="pipeline")
        # Readiness checks never wait behind pipeline work (a hung upstream can hold every worker).
        self.probe_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe")
        self.in_flight = InFlight(
            total=settings.max_concurrent_requests,
            per_client=settings.max_requests_per_client,
            per_address=settings.max_requests_per_address,
            max_decoding_bytes=settings.max_decoding_bytes,
            heavy_request_bytes=settings.heavy_request_bytes,
            max_heavy=settings.max_heavy_requests or max(1, settings.workers // 2),
            max_new=settings.max_new_client_requests or max(1, settings.max_concurrent_requests // 2),
        )
        self.signatures = {name: codec.signature(p.classifier) for name, p in pipelines.items()}
        self.statistics = {name: statistics.ModelStatistics() for name in pipelines}

    # -- health, metadata, configuration, statistics (shared by both bindings) ------------------

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.settings.server_metadata.name, version=VERSION, extensions=EXTENSIONS)

    async def model_ready(self, name: str) -> bool:
        pipeline = self.pipeline(name)
        return await asyncio.get_running_loop().run_in_executor(self.probe_executor, pipeline.predictor.ready)

    def model_metadata(self, name: str) -> pb.ModelMetadataResponse:
        pipeline, own = self.pipeline(name), self.signatures[name]
        spec = pipeline.classifier.input
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=["1"],
            platform=self.settings.server_metadata.platform,
            inputs=[
                tensor(name=codec.INPUT_NAME, datatype="UINT8", shape=[-1, spec.height, spec.width, spec.channels]),
                tensor(name=own.input_name, datatype="FP32", shape=[-1, own.channels, own.height, own.width]),
            ],
            outputs=[
                tensor(name=codec.OUTPUT_NAME, datatype="INT64", shape=[-1]),
                tensor(name=own.output_name, datatype="FP32", shape=[-1, own.classes]),
            ],
        )

    def model_config(self, name: str) -> pb.ModelConfigResponse:
        pipeline, own = self.pipeline(name), self.signatures[name]
        spec = pipeline.classifier.input
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=pipeline.name,
                platform=self.settings.server_metadata.platform,
                backend=self.settings.server_metadata.platform,
                max_batch_size=pipeline.limits.max_batch,
                input=[
                    pb.ModelInput(
                        name=codec.INPUT_NAME,
                        data_type=pb.TYPE_UINT8,
                        format=pb.ModelInput.FORMAT_NHWC,
                        dims=[spec.height, spec.width, spec.channels],
                        optional=True,
                    ),
                    pb.ModelInput(
                        name=own.input_name,
                        data_type=pb.TYPE_FP32,
                        format=pb.ModelInput.FORMAT_NCHW,
                        dims=[own.channels, own.height, own.width],
                        optional=True,
                    ),
                ],
                output=[
                    # Triton's way of saying [B]: one element per item, reshaped to no dimension.
                    pb.ModelOutput(name=codec.OUTPUT_NAME, data_type=pb.TYPE_INT64, dims=[1], reshape=pb.ModelTensorReshape()),
                    pb.ModelOutput(name=own.output_name, data_type=pb.TYPE_FP32, dims=[own.classes]),
                ],
            )
        )

    async def repository_index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for name in sorted(self.pipelines):
            ready = await self.model_ready(name)
            if ready or not ready_only:
                index.models.add(name=name, version="1", state="READY" if ready else "UNAVAILABLE")
        return index

    def model_statistics(self, name: str = "") -> pb.ModelStatisticsResponse:
        names = [self.pipeline(name).name] if name else sorted(self.pipelines)
        return pb.ModelStatisticsResponse(model_stats=[self.statistics[n].message(n) for n in names])

    def pipeline(self, name: str) -> ModelPipeline:
        if name not in self.pipelines:
            raise UnknownModel(f"model {name[:MAX_CLIENT_ID_LENGTH]!r} is not protected here")
        return self.pipelines[name]

    async def all_ready(self) -> bool:
        loop = asyncio.get_running_loop()
        checks = [loop.run_in_executor(self.probe_executor, p.predictor.ready) for p in self.pipelines.values()]
        return all(await asyncio.gather(*checks))

    # -- the gRPC binding ----------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.all_ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=await _answer(context, lambda: self.model_ready(request.name)))

    async def ServerMetadata(self, request, context):
        return self.server_metadata()

    async def ModelMetadata(self, request, context):
        return await _answer(context, lambda: self.model_metadata(request.name))

    async def ModelConfig(self, request, context):
        return await _answer(context, lambda: self.model_config(request.name))

    async def ModelStatistics(self, request, context):
        return await _answer(context, lambda: self.model_statistics(request.name))

    async def RepositoryIndex(self, request, context):
        return await self.repository_index(request.ready)

    async def ModelInfer(self, request, context):
        return await _answer(context, lambda: self._grpc_infer(request, context))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One stream, many requests: an error answers that request only and the stream goes on.
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._grpc_infer(request, context))
            except Rejection as rejection:
                yield pb.ModelStreamInferResponse(
                    error_message=rejection.public_message, infer_response=pb.ModelInferResponse(id=request.id)
                )

    async def _grpc_infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        metadata = context.invocation_metadata() or ()
        claimed = dict(metadata).get(self.settings.client_id_header)
        forwarded = [value for key, value in metadata if key == self.forwarded.header]
        certified = certificate_identity(context) if self.mutual_tls else None  # costly: only where there can be one
        identity = self.identify(peer_address(context.peer()), claimed, certified, forwarded)
        return await self.infer(request, identity, context.time_remaining())

    # -- the request path both bindings share --------------------------------------------------

    def identify(self, peer: str, claimed: str | None, certified: str | None, forwarded: Sequence[str]) -> Identity:
        """Who is calling: the claimed client id header, else the certificate (mutual TLS), else the
        address; the address is the forwarded one when ``peer`` is a trusted proxy (firewall/forwarded.py)."""
        if certified is not None and not self.trusted_proxies.trusts(peer, certified):
            claimed = None  # with mutual TLS only a trusted proxy speaks for another client
        peer = self.forwarded.client(peer, forwarded)
        if claimed is None:
            return Identity(client_id=certified or peer, peer=peer)
        if not claimed or len(claimed) > MAX_CLIENT_ID_LENGTH or not claimed.isprintable():
            raise InvalidInput("invalid client id")
        return Identity(client_id=claimed, peer=peer)

    async def infer(
        self, request: pb.ModelInferRequest, identity: Identity, time_remaining: float | None = None
    ) -> pb.ModelInferResponse:
        """Admit, inspect and answer one inference request; raises ``Rejection`` with the client's status.

        ``time_remaining``: the transport's deadline (gRPC). If the client goes away (the task is
        cancelled), work that no worker has taken yet is dropped.
        """
        request_id = uuid.uuid4().hex
        started = time.perf_counter_ns()
        deadline = self.deadline(request, time_remaining)
        pipeline = self.pipelines.get(request.model_name)
        model = pipeline.name if pipeline else ""  # metric labels never take a client's string
        self.metrics.requests.labels(model).inc()
        fields = request_fields(request_id, request.model_name[:MAX_CLIENT_ID_LENGTH], identity.client_id, identity.peer)
        with structlog.contextvars.bound_contextvars(**fields):
            try:
                cost = request_cost(request, pipeline.limits.max_batch if pipeline else 1)
                await self.admission.admit_address(identity.client_id, identity.peer, cost)  # unknown models and invalid input pay too
                if pipeline is None:
                    raise UnknownModel(f"model {request.model_name!r} is not protected here")
                if request.ByteSize() > self.settings.max_message_bytes:
                    raise TooLarge(f"message of {request.ByteSize()} bytes")
                # invalid input creates no client record
                plan = codec.plan_request(request, pipeline.limits, self.signatures[pipeline.name])
                created = await self.admission.charge_client(identity.client_id, cost)
                try:
                    ticket = self.in_flight.enter(identity.client_id, identity.peer, plan.decoded_bytes, created)
                except Rejection:
                    if created:
                        self.admission.state.discard(identity.client_id)
                    raise
                handle = contextvars.copy_context().run  # the worker logs with this request's fields
                queued = time.perf_counter_ns()
                work = self.executor.submit(ticket.priority, handle, self._handle, pipeline, request, plan, identity, request_id, deadline)
                try:
                    response, began = await asyncio.wrap_future(work)
                    done = time.perf_counter_ns()
                    self.statistics[pipeline.name].answered(plan.batch, done - started, began - queued, done - began)
                    self.pacer.record((done - started) / 1e9)
                    return response
                except asyncio.CancelledError:  # the client went away (disconnected, cancelled, past its deadline)
                    if work.cancel():  # no worker had taken it: dropped
                        self._failed(pipeline, started)
                        self.metrics.decisions.labels(model, "abandoned").inc()
                        log.debug("request.abandoned")
                    raise
                except InvalidInput:
                    if created:
                        self.admission.state.discard(identity.client_id)
                    raise
                except Refused:
                    await self.admission.count_refusal(identity.peer)  # the pipeline's policy refused: the address's budget
                    self.pacer.record((time.perf_counter_ns() - started) / 1e9)
                    raise
                finally:
                    if work.done():
                        self._leave(ticket)
                    else:  # a worker still runs it: its share is held until it ends
                        loop = asyncio.get_running_loop()
                        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._leave, ticket))
            except Rejection as rejection:
                self._failed(pipeline, started)
                self.metrics.decisions.labels(model, refusal_outcome(rejection)).inc()
                log.log(refusal_level(rejection), "request.refused", **rejection_fields(rejection))
                if isinstance(rejection, Banned):  # as slow as a refusal the pipeline decided
                    await self.pacer.hold((time.perf_counter_ns() - started) / 1e9)
                raise
            except Exception:
                self._failed(pipeline, started)
                self.metrics.decisions.labels(model, "failed").inc()
                log.exception("request.failed")
                raise Rejection("unexpected error") from None

    def deadline(self, request: pb.ModelInferRequest, time_remaining: float | None) -> float:
        """When the answer stops being wanted (``time.monotonic``): ``request_timeout_s`` from now, or
        sooner when the client says so with the transport's deadline or the request's ``timeout``
        parameter (microseconds, as Triton's clients send it)."""
        limits = [self.settings.request_timeout_s]
        if time_remaining is not None:
            limits.append(time_remaining)
        timeout = request.parameters.get("timeout")
        if timeout is not None and timeout.WhichOneof("parameter_choice") == "int64_param" and timeout.int64_param > 0:
            limits.append(timeout.int64_param / 1e6)
        return time.monotonic() + min(limits)

    def _leave(self, ticket: Ticket) -> None:
        self.in_flight.leave(ticket)
        if ticket.heavy:
            release_memory()

    def _failed(self, pipeline: ModelPipeline | None, started: int) -> None:
        if pipeline is not None:
            self.statistics[pipeline.name].failed(time.perf_counter_ns() - started)

    def _handle(
        self,
        pipeline: ModelPipeline,
        request: pb.ModelInferRequest,
        plan: codec.Plan,
        identity: Identity,
        request_id: str,
        deadline: float,
    ) -> tuple[pb.ModelInferResponse, int]:
        began = time.perf_counter_ns()
        if time.monotonic() > deadline:
            raise Expired("deadline passed while queued")  # nobody is waiting for the answer any more
        decoded = codec.decode_plan(plan, pipeline.limits)
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
        response = codec.encode_response(request, pipeline.name, ctx.labels, plan.outputs, self.signatures[pipeline.name])
        return response, began

    def close(self) -> None:
        self.executor.shutdown()
        self.probe_executor.shutdown(wait=True, cancel_futures=True)
        for pipeline in self.pipelines.values():
            pipeline.close()


async def _answer(context, call: Callable[[], Any]) -> Any:
    """Run a shared handler for the gRPC binding: a ``Rejection`` aborts the call with its status."""
    try:
        result = call()
        return await result if inspect.isawaitable(result) else result
    except Rejection as rejection:
        await context.abort(rejection.code, rejection.public_message)
