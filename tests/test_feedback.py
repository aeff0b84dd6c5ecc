"""Minimal feedback: over every refusal path, nothing a client sees names a detector, repeats a
score or threshold, or shows a file path; answers carry the label only; metadata only the contract."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.protocol import pb, pb_grpc
from firewall.stage import Finding
from tests.conftest import address, make_settings, running_firewall
from tests.upstream import free_port

GENERIC = {
    "reject": ("PERMISSION_DENIED", "request refused"),
    "ban": ("PERMISSION_DENIED", "request refused"),
    "banned": ("PERMISSION_DENIED", "request refused"),
    "throttled": ("RESOURCE_EXHAUSTED", "too many requests"),
    "crash": ("INTERNAL", "internal error"),
    "unknown": ("NOT_FOUND", "unknown model"),
    "unavailable": ("UNAVAILABLE", "model unavailable"),
}
ANSWERED = ("decoy", "monitor")
PATHS = sorted(GENERIC) + ["invalid", *ANSWERED]


class Scripted:
    """Raises the findings (or the crash) the current example asks for."""

    name = "scripted"

    def __init__(self):
        self.plan: dict = {}

    def __call__(self, ctx):
        if self.plan.get("crash"):
            raise RuntimeError(f"{self.plan['path']}: {self.plan['rule']} scored {self.plan['score']!r}")
        if self.plan.get("flag"):
            return [Finding(self.plan["rule"], self.plan["score"], self.plan["threshold"], item=i) for i in range(ctx.batch_size)]
        return []


@pytest.fixture(scope="module")
def served():
    onnx = str(make_settings().onnx_path("mnist"))
    upstream = {"kind": "upstream", "address": f"127.0.0.1:{free_port()}", "model_name": "gone", "timeout_s": 2}
    models = {
        "reject": {"onnx": onnx, "policy": {"action": "reject"}},
        "ban": {"onnx": onnx, "policy": {"action": "ban"}},
        "decoy": {"onnx": onnx, "policy": {"action": "decoy"}},
        "monitor": {"onnx": onnx, "policy": {"action": "monitor"}},
        "upstream": {"onnx": onnx, "backend": upstream},
    }
    throttle = {"rate": 10_000, "burst": 10_000, "suspect_rate": 0.001, "suspect_burst": 1, "address_refusals": 1_000_000}
    stage = Scripted()
    with running_firewall(make_settings(models=models, throttle=throttle)) as firewall:
        for pipeline in firewall.service.pipelines.values():
            pipeline.stages.append(stage)
        with grpc.insecure_channel(address(firewall)) as channel:
            yield firewall, stage, pb_grpc.GRPCInferenceServiceStub(channel), onnx


def infer_request(model: str, images: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(images.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[images.tobytes()])


def bytes_request(model: str, payload: bytes) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[len(payload).to_bytes(4, "little") + payload])


def send(stub, request: pb.ModelInferRequest, client_id: str, stream: bool) -> dict:
    """Everything the client sees: status, message, metadata, and the response."""
    metadata = [("x-client-id", client_id)]
    if stream:
        call = stub.ModelStreamInfer(iter([request]), metadata=metadata)
        (answer,) = list(call)
        seen = {"metadata": [*call.initial_metadata(), *call.trailing_metadata()]}
        if answer.error_message:
            return {**seen, "message": answer.error_message}
        return {**seen, "response": answer.infer_response, "code": "OK"}
    try:
        response, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        metadata = [*(error.initial_metadata() or ()), *(error.trailing_metadata() or ())]
        return {"code": error.code().name, "message": error.details(), "metadata": metadata}
    return {"code": "OK", "response": response, "metadata": [*call.initial_metadata(), *call.trailing_metadata()]}


def number_forms(value: float) -> set[str]:
    return {repr(value), str(value)} | {format(value, spec) for spec in (".6g", ".4g", ".3g", ".2f", ".3f", ".4f")}


scores = st.floats(min_value=0.001, max_value=1000.0).filter(lambda x: len(format(x, ".3g")) >= 4)


@settings(max_examples=80, deadline=None)
@given(
    path=st.sampled_from(PATHS),
    stream=st.booleans(),
    rule=st.from_regex(r"[a-z]{3,10}\.[a-z]{3,10}", fullmatch=True),
    score=scores,
    threshold=scores,
    folder=st.from_regex(r"[a-z]{3,10}", fullmatch=True),
    junk=st.binary(min_size=1, max_size=64),
)
def test_nothing_a_client_sees_leaks_detector_detail(served, mnist_heldout, path, stream, rule, score, threshold, folder, junk):
    firewall, stage, stub, onnx = served
    images, _ = mnist_heldout
    client_id = uuid.uuid4().hex
    secret_path = f"/srv/{folder}/model.onnx"
    stage.plan = {"flag": True, "crash": path == "crash", "rule": rule, "score": score, "threshold": threshold, "path": secret_path}
    image = images[:1]
    model = {"ban": "ban", "banned": "ban", "decoy": "decoy", "monitor": "monitor", "unavailable": "upstream"}.get(path, "reject")
    if path == "banned":
        assert send(stub, infer_request("ban", image), client_id, stream)["message"] == "request refused"
    if path == "throttled":
        send(stub, infer_request("reject", image), client_id, stream)  # a refused finding: now a suspect
    if path in ("banned", "throttled", "unavailable"):
        stage.plan["flag"] = False  # the refusal comes from the ban, the suspect bucket or the upstream
    if path == "throttled":
        send(stub, infer_request("reject", image), client_id, stream)  # spends the suspect bucket's one token
    if path == "unknown":
        request = infer_request(f"{folder}.{rule}", image)
    elif path == "invalid":
        request = bytes_request(model, junk)
    else:
        request = infer_request(model, image)

    seen = send(stub, request, client_id, stream)

    visible = [seen.get("message", ""), *(f"{key}={value}" for key, value in seen["metadata"])]
    forbidden = {rule, secret_path, onnx, "/", "Traceback", stage.name} | number_forms(score) | number_forms(threshold)
    for text in visible:
        assert not [word for word in forbidden if word in text], (path, text)
    if path in GENERIC:
        code, message = GENERIC[path]
        assert seen["message"] == message and (stream or seen["code"] == code)
    elif path == "invalid":
        assert seen["message"] and (stream or seen["code"] == "INVALID_ARGUMENT")
    else:
        response = seen["response"]
        assert [output.name for output in response.outputs] == ["label"] and not response.parameters
        assert not any(output.parameters for output in response.outputs)
        assert 0 <= np.frombuffer(response.raw_output_contents[0], "<i8")[0] < 10


def test_model_metadata_shows_only_the_contract(served):
    firewall, _, stub, onnx = served
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="reject"))
    # The contract: `image` and the model's own input in; `label` and the model's own output (a one-hot) out.
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "UINT8", [-1, 28, 28, 1]), ("input", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("label", "INT64", [-1]), ("logits", "FP32", [-1, 10])]
    text = str(metadata)
    assert onnx not in text and "/" not in text and "policy" not in text
