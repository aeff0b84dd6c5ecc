"""Prediction backends: where the sanitized, model-ready tensor is finally classified.

Both reduce the model's output to the top label, so nothing else ever leaves the firewall.
- ``EmbeddedPredictor`` answers with the local ONNX model's forward pass on the request, the one
  the detectors share (``detectors.forward``).
- ``UpstreamPredictor`` forwards the tensor as a unary ModelInfer to a KServe-v2 gRPC server
  (Triton, KServe, MLServer). Clients may stream to the firewall even though such servers
  often offer unary calls only.
- ``RestUpstreamPredictor`` forwards it over the same protocol's HTTP/JSON binding (KServe's
  default), ``protocol: rest`` in the backend configuration.

An upstream (over either protocol) that hangs or dies must not make every client wait out a timeout: each call has its
own deadline (``timeout_s``, shorter than clients' deadlines), and a ``CircuitBreaker`` opens after
``breaker_failures`` consecutive failures. While open, calls fail at once with UNAVAILABLE; after
``breaker_open_s`` (doubling up to ``breaker_max_open_s`` while probes fail) one call is let
through as a probe (half-open), and the readiness probe, every half second, closes the breaker as
soon as the upstream answers again. The channel reconnects with a short backoff (0.1-1 s) so a
restarted upstream is found quickly.

``submit`` returns at once with a function that gives the labels when called. The pipeline submits
as soon as the sanitizer has made the tensor: a gRPC upstream gets the call then (a gRPC future)
and works while the firewall's own stages run, so the answer costs the longer of the two rather
than their sum; over REST the call is made when the answer is wanted.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from typing import Callable, Protocol

import grpc
import httpx
import numpy as np

from detectors.forward import shared_forward
from firewall.config import EmbeddedBackend, UpstreamBackend
from firewall.errors import Unavailable
from firewall.protocol import pb, pb_grpc
from firewall.stage import RequestContext
from models.runtime import OnnxClassifier


class BackendUnavailable(Unavailable):
    """The model server could not answer (down, timed out or answered nonsense)."""


Answer = Callable[[], np.ndarray]  # the labels of a submitted batch, waited for when called


class Predictor(Protocol):
    def submit(self, ctx: RequestContext) -> Answer: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class EmbeddedPredictor:
    def __init__(self, classifier: OnnxClassifier):
        self.classifier = classifier

    def submit(self, ctx: RequestContext) -> Answer:
        return lambda: shared_forward(ctx, self.classifier).labels  # run when asked, once for all stages

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


_OUTPUT_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4"}
_TYPED_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}


class CircuitBreaker:
    """Closed: calls go through. Open: calls fail fast until the open period ends, then one probe."""

    def __init__(self, failures: int, open_s: float, max_open_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.open_s, self.max_open_s, self.clock = failures, open_s, max_open_s, clock
        self.consecutive = 0
        self.open_until: float | None = None  # None: closed
        self.open_for = open_s
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allow(self) -> bool:
        with self._lock:
            if self.open_until is None:
                return True
            now = self.clock()
            if now < self.open_until:
                return False
            self.open_until = now + self.open_for  # half-open: this call is the probe, the others wait for it
            return True

    def observe(self, ok: bool) -> None:
        if ok:
            self.success()
        else:
            self.failure()

    def success(self) -> None:
        with self._lock:
            self.consecutive, self.open_until, self.open_for = 0, None, self.open_s

    def failure(self) -> None:
        with self._lock:
            self.consecutive += 1
            if self.open_until is not None:
                self.open_for = min(self.open_for * 2, self.max_open_s)
                self.open_until = self.clock() + self.open_for
            elif self.consecutive >= self.failures:
                self.open_until = self.clock() + self.open_for


class UpstreamPredictor:
    def __init__(self, config: UpstreamBackend, max_message_bytes: int):
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_open_s, config.breaker_max_open_s)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if config.tls is None:
            self.channel = grpc.insecure_channel(config.address, options=options)
        else:
            tls = config.tls
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca.read_bytes() if tls.ca else None,
                private_key=tls.key.read_bytes() if tls.key else None,
                certificate_chain=tls.cert.read_bytes() if tls.cert else None,
            )
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(config.address, credentials, options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def submit(self, ctx: RequestContext) -> Answer:
        """Send the call now; the returned function waits for its labels (or raises BackendUnavailable)."""
        batch = np.ascontiguousarray(ctx.tensor, dtype="<f4")
        request = pb.ModelInferRequest(
            model_name=self.config.model_name,
            model_version=self.config.model_version,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=self.config.input_name, datatype="FP32", shape=batch.shape)],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=self.config.output_name)],
            raw_input_contents=[batch.tobytes()],
        )
        if not self.breaker.allow():

            def circuit_open() -> np.ndarray:
                raise BackendUnavailable("upstream circuit open")

            return circuit_open
        call = self.stub.ModelInfer.future(request, timeout=self.config.timeout_s)
        call.add_done_callback(lambda done: self.breaker.failure() if done.exception() else self.breaker.success())

        def labels() -> np.ndarray:
            try:
                response = call.result()
            except grpc.RpcError as error:
                raise BackendUnavailable(f"upstream ModelInfer failed: {error.code().name}") from None
            return self._labels(response, batch.shape[0])

        return labels

    def ready(self) -> bool:
        """Probe the upstream (the readiness watcher calls this every half second); it also drives the breaker."""
        try:
            request = pb.ModelReadyRequest(name=self.config.model_name, version=self.config.model_version)
            ready = self.stub.ModelReady(request, timeout=self.config.ready_timeout_s).ready
        except grpc.RpcError:
            ready = False
        self.breaker.observe(ready)
        return ready

    def close(self) -> None:
        self.channel.close()

    def _labels(self, response: pb.ModelInferResponse, batch_size: int) -> np.ndarray:
        for index, output in enumerate(response.outputs):
            if output.name == self.config.output_name:
                break
        else:
            raise BackendUnavailable("upstream response lacks the configured output")
        if output.datatype not in _OUTPUT_DTYPES:
            raise BackendUnavailable(f"upstream output datatype {output.datatype} is not supported")
        if response.raw_output_contents:
            if index >= len(response.raw_output_contents):
                raise BackendUnavailable("upstream raw outputs do not match its output list")
            values = np.frombuffer(response.raw_output_contents[index], dtype=_OUTPUT_DTYPES[output.datatype])
        elif output.datatype in _TYPED_FIELDS:
            values = np.asarray(getattr(output.contents, _TYPED_FIELDS[output.datatype]))
        else:
            raise BackendUnavailable("upstream output carries no data")
        return top_labels(values, tuple(output.shape), batch_size)


class RestUpstreamPredictor:
    """The same upstream contract over the protocol's HTTP/JSON binding: JSON tensors both ways."""

    def __init__(self, config: UpstreamBackend):
        self.config = config
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_open_s, config.breaker_max_open_s)
        tls = config.tls
        scheme = "http" if tls is None else "https"
        version = f"/versions/{config.model_version}" if config.model_version else ""
        self.model_url = f"{scheme}://{config.address}/v2/models/{config.model_name}{version}"
        verify: ssl.SSLContext | bool = True
        if tls is not None:
            verify = ssl.create_default_context(cafile=tls.ca)
            if tls.cert is not None:
                verify.load_cert_chain(tls.cert, tls.key)
        # The name sent (SNI) and checked in the server certificate, when it is not the address's host.
        self.extensions = {"sni_hostname": tls.server_name} if tls is not None and tls.server_name else {}
        self.client = httpx.Client(verify=verify, timeout=config.timeout_s, headers={"Content-Type": "application/json"})

    def submit(self, ctx: RequestContext) -> Answer:
        """Over HTTP the call is made when the answer is wanted (it does not overlap the stages)."""
        return lambda: self._infer(np.asarray(ctx.tensor, dtype=np.float32))

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        body = {
            "inputs": [{"name": self.config.input_name, "datatype": "FP32", "shape": list(batch.shape), "data": batch.ravel().tolist()}],
            "outputs": [{"name": self.config.output_name}],
        }
        if not self.breaker.allow():
            raise BackendUnavailable("upstream circuit open")
        try:
            reply = self.client.post(self.model_url + "/infer", content=json.dumps(body), extensions=self.extensions)
            reply.raise_for_status()
            outputs = reply.json()["outputs"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            self.breaker.failure()
            raise BackendUnavailable(f"upstream REST infer failed: {type(error).__name__}") from None
        self.breaker.success()
        return self._labels(outputs, batch.shape[0])

    def ready(self) -> bool:
        """Probe the upstream (the readiness watcher calls this every half second); it also drives the breaker."""
        try:
            reply = self.client.get(self.model_url + "/ready", timeout=self.config.ready_timeout_s, extensions=self.extensions)
            ready = reply.status_code == 200
        except httpx.HTTPError:
            ready = False
        self.breaker.observe(ready)
        return ready

    def close(self) -> None:
        self.client.close()

    def _labels(self, outputs: object, batch_size: int) -> np.ndarray:
        if not isinstance(outputs, list):
            raise BackendUnavailable("upstream response lacks outputs")
        output = next((o for o in outputs if isinstance(o, dict) and o.get("name") == self.config.output_name), None)
        if output is None:
            raise BackendUnavailable("upstream response lacks the configured output")
        if output.get("datatype") not in _OUTPUT_DTYPES:
            raise BackendUnavailable(f"upstream output datatype {output.get('datatype')} is not supported")
        try:
            values = np.asarray(output["data"], dtype=_OUTPUT_DTYPES[output["datatype"]]).ravel()
            shape = tuple(int(d) for d in output["shape"])
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable("upstream output carries no usable data") from None
        return top_labels(values, shape, batch_size)


def top_labels(values: np.ndarray, shape: tuple[int, ...], batch_size: int) -> np.ndarray:
    """Top label per item from upstream logits [B, K] (or labels [B] or [B, 1] if it already reduces them)."""
    if int(np.prod(shape)) != values.size or not shape or shape[0] != batch_size:
        raise BackendUnavailable("upstream output shape does not match the request")
    if values.size == batch_size:  # one value per item: labels, [B] or [B, 1] (as MLServer's codec shapes them)
        return values.astype(np.int64)
    return values.reshape(batch_size, -1).argmax(axis=1).astype(np.int64)


def build_predictor(backend: EmbeddedBackend | UpstreamBackend, classifier: OnnxClassifier, max_message_bytes: int) -> Predictor:
    if isinstance(backend, UpstreamBackend) and backend.protocol == "rest":
        return RestUpstreamPredictor(backend)
    if isinstance(backend, UpstreamBackend):
        return UpstreamPredictor(backend, max_message_bytes)
    return EmbeddedPredictor(classifier)
