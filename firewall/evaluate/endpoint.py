"""A live Open Inference Protocol endpoint, called through a real ``tritonclient.grpc`` client.

Two kinds of endpoint answer differently, so each gets an adapter:
- ``firewall``: the public contract, input ``image`` (pixels [B,H,W,C], UINT8 or FP32 in [0,1], or
  encoded images, PNG or JPEG, as a BYTES tensor [B]), output ``label`` INT64 [B]; no scores.
- ``model``: a bare model server, the unprotected baseline: the model's own FP32 [B,C,H,W] input
  and its scores (logits or probabilities) [B,K]. Names come from ModelMetadata; servers that
  publish none (MLServer without a signature) get ``input`` and ``logits``.
``auto`` picks ``firewall`` when ModelMetadata lists an input named ``image``.

Every call carries the simulated client's ``x-client-id``. A refusal (PERMISSION_DENIED or
RESOURCE_EXHAUSTED) is an answer the evaluation counts; any other failure ends the run. Clients
wait out throttling (RESOURCE_EXHAUSTED) the way a well-behaved client does, with exponential
backoff, so that a rate limit slows an attack down but is not mistaken for a detection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from firewall.evaluate.errors import EvaluationError
from models.runtime import softmax

Kind = Literal["auto", "firewall", "model"]
CLIENT_ID_HEADER = "x-client-id"
FIREWALL_INPUT = "image"
FIREWALL_OUTPUT = "label"
MODEL_INPUT = "input"
MODEL_OUTPUT = "logits"
REFUSAL_STATUSES = ("StatusCode.PERMISSION_DENIED", "StatusCode.RESOURCE_EXHAUSTED")
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
PATIENCE_S = 30.0  # a client gives up on a request it has been throttled on for this long


class EndpointError(EvaluationError):
    """The endpoint cannot be used: unreachable, unknown model, or a failure that is no refusal."""


class Refusal(Exception):
    """The endpoint refused this request (a detection, a ban or throttling)."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status.removeprefix("StatusCode.")

    @property
    def throttled(self) -> bool:
        return self.status == "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Answer:
    labels: np.ndarray  # int64 [B]
    probabilities: np.ndarray | None  # [B, K] when the endpoint returns scores (a bare model), else None


@dataclass(frozen=True)
class Request:
    """A prepared request: sending it twice sends byte-identical tensors (a client retry)."""

    inputs: list[triton.InferInput]
    outputs: list[triton.InferRequestedOutput]


class Adapter:
    """Turns canonical pixels (float32 in [0, 1] or uint8, [B,H,W,C]) into one endpoint's request."""

    def __init__(self, kind: Literal["firewall", "model"], input_name: str, output_name: str):
        self.kind = kind
        self.input_name = input_name
        self.output_name = output_name

    def request(self, pixels: np.ndarray) -> Request:
        if self.kind == "firewall":
            tensor = pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        else:
            scale = np.float32(255.0 if pixels.dtype == np.uint8 else 1.0)
            tensor = pixels.transpose(0, 3, 1, 2).astype(np.float32) / scale
        tensor = np.ascontiguousarray(tensor)
        datatype = "UINT8" if tensor.dtype == np.uint8 else "FP32"
        infer_input = triton.InferInput(self.input_name, list(tensor.shape), datatype)
        infer_input.set_data_from_numpy(tensor)
        return Request([infer_input], [triton.InferRequestedOutput(self.output_name)])

    def request_encoded(self, encoded: Sequence[bytes]) -> Request:
        """Encoded images (PNG, JPEG, ...) as one BYTES tensor [B]: only a firewall decodes them."""
        if self.kind != "firewall":
            raise EndpointError("a bare model server takes pixels, not encoded images")
        tensor = np.empty(len(encoded), dtype=np.object_)
        tensor[:] = [bytes(item) for item in encoded]
        infer_input = triton.InferInput(self.input_name, [len(encoded)], "BYTES")
        infer_input.set_data_from_numpy(tensor)
        return Request([infer_input], [triton.InferRequestedOutput(self.output_name)])

    def answer(self, result: triton.InferResult) -> Answer:
        values = result.as_numpy(self.output_name)
        if values is None:
            raise EndpointError(f"the answer lacks the output {self.output_name!r}")
        if values.ndim == 1:
            return Answer(values.astype(np.int64), None)
        scores = values.reshape(len(values), -1).astype(np.float64)
        is_distribution = (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
        return Answer(scores.argmax(axis=1).astype(np.int64), scores if is_distribution else softmax(scores))


def detect_adapter(metadata, kind: Kind) -> Adapter:
    input_names = [tensor.name for tensor in metadata.inputs]
    output_names = [tensor.name for tensor in metadata.outputs]
    if kind == "auto":
        kind = "firewall" if FIREWALL_INPUT in input_names else "model"
    if kind == "firewall":
        return Adapter("firewall", FIREWALL_INPUT, FIREWALL_OUTPUT)
    return Adapter("model", (input_names or [MODEL_INPUT])[0], (output_names or [MODEL_OUTPUT])[0])


def _failure(address: str, error: InferenceServerException) -> EndpointError:
    return EndpointError(f"{address}: {error.status() or 'error'}: {error.message()}")


class Endpoint:
    """One endpoint and one gRPC channel, shared by all the simulated clients (thread-safe)."""

    def __init__(self, address: str, model: str, kind: Kind = "auto", timeout_s: float = 10.0):
        self.address = address
        self.model = model
        self.timeout_s = timeout_s
        self.client = triton.InferenceServerClient(address)
        try:
            if not self.client.is_server_live(client_timeout=timeout_s):
                raise EndpointError(f"{address} is not live")
            metadata = self.client.get_model_metadata(model, client_timeout=timeout_s)
        except InferenceServerException as error:
            self.client.close()
            if error.status() == "StatusCode.NOT_FOUND":
                raise EndpointError(f"{address} does not serve a model named {model!r}") from None
            raise EndpointError(f"cannot reach {address}: {error.message()}") from None
        self.adapter = detect_adapter(metadata, kind)

    @property
    def kind(self) -> str:
        return self.adapter.kind

    def request(self, pixels: np.ndarray) -> Request:
        return self.adapter.request(pixels)

    def request_encoded(self, encoded: Sequence[bytes]) -> Request:
        """A BYTES request of encoded images (a firewall only; EndpointError for a bare model server)."""
        return self.adapter.request_encoded(encoded)

    def send(self, request: Request, client_id: str) -> Answer:
        """Raises Refusal when the endpoint refuses, EndpointError on any other failure."""
        try:
            result = self.client.infer(
                self.model,
                request.inputs,
                outputs=request.outputs,
                headers={CLIENT_ID_HEADER: client_id},
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            if error.status() in REFUSAL_STATUSES:
                raise Refusal(error.status()) from None
            raise _failure(self.address, error) from None
        return self.adapter.answer(result)

    def outcome(self, pixels: np.ndarray, client_id: str) -> str:
        """What one request of ``pixels`` (uint8 [N, H, W, C]) got: "OK" or the refusal's status."""
        try:
            self.send(self.request(pixels), client_id)
        except Refusal as refusal:
            return refusal.status
        return "OK"

    def send_patiently(self, request: Request, client_id: str, patience_s: float = PATIENCE_S) -> tuple[Answer, int]:
        """``send``, retried with backoff while throttled, for up to ``patience_s`` seconds of waiting.

        Returns the answer and how many tries were throttled; raises the last Refusal otherwise."""
        delay, waited, throttled = BACKOFF_FIRST_S, 0.0, 0
        while True:
            try:
                return self.send(request, client_id), throttled
            except Refusal as refusal:
                if not refusal.throttled or waited >= patience_s:
                    raise
            throttled += 1
            time.sleep(delay)
            waited += delay
            delay = min(2 * delay, BACKOFF_MAX_S)

    def close(self) -> None:
        self.client.close()


class RoundRobin(Endpoint):
    """Several replicas of one endpoint behind a client that sends each request to the next one in
    turn (what a round-robin load balancer does), retries included."""

    def __init__(self, addresses: Sequence[str], model: str, kind: Kind = "auto", timeout_s: float = 10.0):
        self.replicas = [Endpoint(address, model, kind, timeout_s) for address in addresses]
        self.address, self.model, self.timeout_s = ",".join(addresses), model, timeout_s
        self.adapter = self.replicas[0].adapter
        self.turn = 0

    def send(self, request: Request, client_id: str) -> Answer:
        replica = self.replicas[self.turn % len(self.replicas)]
        self.turn += 1
        return replica.send(request, client_id)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


class AsyncEndpoint:
    """The same endpoint through ``tritonclient.grpc.aio``, for many concurrent callers."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.client = triton_aio.InferenceServerClient(endpoint.address)

    async def send(self, request: Request, client_id: str) -> None:
        """Raises Refusal or EndpointError like ``Endpoint.send``; the answer itself is not needed."""
        try:
            await self.client.infer(
                self.endpoint.model,
                request.inputs,
                outputs=request.outputs,
                headers={CLIENT_ID_HEADER: client_id},
                client_timeout=self.endpoint.timeout_s,
            )
        except InferenceServerException as error:
            if error.status() in REFUSAL_STATUSES:
                raise Refusal(error.status()) from None
            raise _failure(self.endpoint.address, error) from None

    async def close(self) -> None:
        await self.client.close()
