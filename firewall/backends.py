"""Prediction backends: where the sanitized, model-ready tensor is finally classified.

Both reduce the model's output to the top label, so nothing else ever leaves the firewall.
- ``EmbeddedPredictor`` runs the local ONNX model in-process.
- ``UpstreamPredictor`` forwards the tensor as a unary ModelInfer to a KServe-v2 gRPC server
  (Triton, KServe, MLServer). Clients may stream to the firewall even though such servers
  often offer unary calls only.
"""

from __future__ import annotations

from typing import Protocol

import grpc
import numpy as np

from firewall.config import EmbeddedBackend, UpstreamBackend
from firewall.errors import Unavailable
from firewall.protocol import pb, pb_grpc
from models.runtime import OnnxClassifier


class BackendUnavailable(Unavailable):
    """The model server could not answer (down, timed out or answered nonsense)."""


class Predictor(Protocol):
    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class EmbeddedPredictor:
    def __init__(self, classifier: OnnxClassifier):
        self.classifier = classifier

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.classifier.predict(batch)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


_OUTPUT_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4"}
_TYPED_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}


class UpstreamPredictor:
    def __init__(self, config: UpstreamBackend, max_message_bytes: int):
        self.config = config
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
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

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype="<f4")
        request = pb.ModelInferRequest(
            model_name=self.config.model_name,
            model_version=self.config.model_version,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=self.config.input_name, datatype="FP32", shape=batch.shape)],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=self.config.output_name)],
            raw_input_contents=[batch.tobytes()],
        )
        try:
            response = self.stub.ModelInfer(request, timeout=self.config.timeout_s)
        except grpc.RpcError as error:
            raise BackendUnavailable(f"upstream ModelInfer failed: {error.code().name}") from None
        return self._labels(response, batch.shape[0])

    def ready(self) -> bool:
        try:
            request = pb.ModelReadyRequest(name=self.config.model_name, version=self.config.model_version)
            return self.stub.ModelReady(request, timeout=self.config.timeout_s).ready
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self.channel.close()

    def _labels(self, response: pb.ModelInferResponse, batch_size: int) -> np.ndarray:
        """Top label per item from upstream logits [B, K] (or labels [B] if it already reduces them)."""
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
        shape = tuple(output.shape)
        if int(np.prod(shape)) != values.size or not shape or shape[0] != batch_size:
            raise BackendUnavailable("upstream output shape does not match the request")
        values = values.reshape(shape)
        if values.ndim == 1:
            return values.astype(np.int64)
        return values.reshape(batch_size, -1).argmax(axis=1).astype(np.int64)


def build_predictor(backend: EmbeddedBackend | UpstreamBackend, classifier: OnnxClassifier, max_message_bytes: int) -> Predictor:
    if isinstance(backend, UpstreamBackend):
        return UpstreamPredictor(backend, max_message_bytes)
    return EmbeddedPredictor(classifier)
