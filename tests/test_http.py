"""The HTTP/JSON binding: an unchanged tritonclient.http, plain JSON over httpx, and the gRPC tests' bad input."""

from __future__ import annotations

import json
import socket
import time

import cv2
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from firewall.http import HEADER_LENGTH, STATUS
from firewall.protocol import pb, pb_grpc
from models.runtime import bundled_model_path
from tests.conftest import address, make_settings, running_firewall
from tests.stages import Flagger, Recorder, marked, with_stage
from tests.test_service import BAD_REQUESTS


def http_address(firewall) -> str:
    return f"127.0.0.1:{firewall.http_port}"


@pytest.fixture
def rest(firewall):
    with httpx.Client(base_url=f"http://{http_address(firewall)}", timeout=30) as connected:
        yield connected


@pytest.fixture
def http_client(firewall):
    connected = triton_http.InferenceServerClient(http_address(firewall))
    yield connected
    connected.close()


def test_tritonclient_http_unchanged(http_client, mnist_heldout):
    images, labels = mnist_heldout
    assert http_client.is_server_live() and http_client.is_server_ready() and http_client.is_model_ready("mnist")
    metadata = http_client.get_model_metadata("mnist")
    assert [i["name"] for i in metadata["inputs"]] == ["image", "input"]
    assert http_client.get_model_config("mnist")["max_batch_size"] == 64
    assert http_client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]
    assert http_client.get_model_repository_index() == [{"name": "mnist", "version": "1", "state": "READY", "reason": ""}]
    batch = images[:32]
    for binary in (True, False):
        image = triton_http.InferInput("image", list(batch.shape), "UINT8")
        image.set_data_from_numpy(batch, binary_data=binary)
        output = triton_http.InferRequestedOutput("label", binary_data=binary)
        result = http_client.infer("mnist", [image], outputs=[output], headers={"x-client-id": "http"})
        assert (result.as_numpy("label") == labels[:32]).mean() >= 0.95
        nchw = (batch[:, None] / 255.0).astype(np.float32)
        own = triton_http.InferInput("input", list(nchw.shape), "FP32")
        own.set_data_from_numpy(nchw, binary_data=binary)
        logits = http_client.infer("mnist", [own], outputs=[triton_http.InferRequestedOutput("logits", binary_data=binary)])
        one_hot = logits.as_numpy("logits")
        assert one_hot.shape == (32, 10) and one_hot.argmax(axis=1).tolist() == result.as_numpy("label").tolist()
    png = triton_http.InferInput("image", [1], "BYTES")
    png.set_data_from_numpy(np.array([cv2.imencode(".png", images[0])[1].tobytes()], dtype=np.object_))
    assert http_client.infer("mnist", [png]).as_numpy("label")[0] == labels[0]
    assert http_client.get_inference_statistics("mnist")["model_stats"][0]["inference_count"] >= 65
    assert [m["name"] for m in http_client.get_inference_statistics()["model_stats"]] == ["mnist"]


def test_plain_json(rest, mnist_heldout, firewall):
    images, labels = mnist_heldout
    requests_before = firewall.metrics.registry.get_sample_value("firewall_requests_total", {"model": "mnist"})
    body = {"id": "7", "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 28, 28], "data": images[:2].tolist()}]}
    reply = rest.post("/v2/models/mnist/infer", json=body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    assert "server" not in reply.headers  # nothing names the HTTP server
    answer = reply.json()
    assert answer["id"] == "7" and answer["model_name"] == "mnist"
    assert answer["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2], "data": labels[:2].tolist()}]
    flat = (images[:1] / 255.0).ravel().tolist()  # the model's own tensor, flat row-major
    own = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": flat}]}
    (logits,) = rest.post("/v2/models/mnist/infer", json=own).json()["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [1, 10] and np.argmax(logits["data"]) == labels[0]
    assert firewall.metrics.registry.get_sample_value("firewall_requests_total", {"model": "mnist"}) == requests_before + 2
    assert rest.get("/v2").json()["name"] == "inference-server"
    assert rest.get("/v2/health/live").json() == {"live": True}
    assert rest.get("/v2/models/mnist/ready").status_code == 200
    assert rest.get("/v2/models/mnist/versions/1").json()["outputs"][1] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert rest.get("/v2/models/secret").json() == {"error": "unknown model"}
    assert rest.get("/v2/nowhere").status_code == 404 and rest.delete("/v2").status_code == 405


def _as_rest(request) -> tuple[dict, bytes]:
    """A ModelInferRequest of the gRPC tests as the binary extension carries it."""
    (tensor,) = request.inputs
    raw = request.raw_input_contents[0]
    header = {
        "inputs": [
            {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "parameters": {"binary_data_size": len(raw)}}
        ]
    }
    header["outputs"] = [{"name": output.name} for output in request.outputs]
    return header, raw


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_grpc_bad_input_gets_the_same_message_and_its_status_over_rest(firewall, rest, case):
    request, code = BAD_REQUESTS[case]
    with grpc.insecure_channel(address(firewall)) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    header, raw = _as_rest(request)
    text = json.dumps(header).encode()
    reply = rest.post(f"/v2/models/{request.model_name}/infer", content=text + raw, headers={HEADER_LENGTH: str(len(text))})
    assert reply.status_code == STATUS[code]
    assert reply.json() == {"error": raised.value.details()}


JSON_BAD = {
    "not json": b"{",
    "not an object": b"[1]",
    "no inputs": b"{}",
    "ragged data": json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2], "data": [[1, 2], [3]]}]}).encode(),
    "strings as pixels": json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1], "data": ["a"]}]}).encode(),
    "negative uint8": json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1], "data": [-1]}]}).encode(),
    "shape not a list": json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": 3, "data": [1, 2, 3]}]}).encode(),
    "no data": json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1]}]}).encode(),
    "deep nesting": b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", sorted(JSON_BAD))
def test_malformed_json_is_a_400_with_a_short_message(rest, case):
    reply = rest.post("/v2/models/mnist/infer", content=JSON_BAD[case])
    assert reply.status_code == 400
    message = reply.json()["error"]
    assert "Traceback" not in message and len(message) < 80


def test_binary_header_length_is_checked(rest):
    reply = rest.post("/v2/models/mnist/infer", content=b"{}", headers={HEADER_LENGTH: "99"})
    assert reply.status_code == 400


def test_body_over_the_message_limit_is_refused():
    with running_firewall(make_settings(max_message_bytes=1024 * 1024)) as firewall:
        with httpx.Client(base_url=f"http://{http_address(firewall)}", timeout=30) as rest:
            reply = rest.post("/v2/models/mnist/infer", content=b" " * (2 * 1024 * 1024))
            assert reply.status_code == 413 and reply.json() == {"error": "request too large"}
            assert rest.get("/v2/health/live").status_code == 200


def test_identity_throttle_policy_alerts_and_upstream_outage_over_rest(mnist_heldout, log_lines):  # noqa: F811
    images, _ = mnist_heldout
    down = {"kind": "upstream", "protocol": "rest", "address": "127.0.0.1:9", "model_name": "mnist", "timeout_s": 1}
    settings = make_settings(
        throttle={"rate": 0.001, "burst": 2},
        models={"mnist": {"policy": {"action": "reject"}}, "down": {"onnx": str(bundled_model_path("mnist")), "backend": down}},
    )
    with (
        running_firewall(settings) as firewall,
        with_stage(firewall, Flagger(), ["mnist"]),
        with_stage(firewall, Recorder(), ["mnist"]) as recorder,
    ):
        client = triton_http.InferenceServerClient(http_address(firewall))
        try:

            def status(model: str, pixels: np.ndarray, client_id: str) -> str | None:
                tensor = triton_http.InferInput("image", list(pixels.shape), "UINT8")
                tensor.set_data_from_numpy(pixels)
                try:
                    client.infer(model, [tensor], headers={"x-client-id": client_id})
                except InferenceServerException as error:
                    return f"{error.status()} {error.message()}"
                return None

            assert status("mnist", images[:1], "alice") is None and recorder.client_ids == ["alice"]
            assert status("mnist", marked(images[:1]), "mallory") == "403 request refused"
            assert status("mnist", images[:1], "bob") is None and status("mnist", images[:1], "bob") is None
            assert status("mnist", images[:1], "bob") == "429 too many requests"
            assert status("mnist", images[:1], "carol") is None  # a throttled id is its own
            assert status("mnist", images[:1], "x" * 500) == "400 invalid client id"
            assert status("down", images[:1], "dave") == "503 model unavailable"
            assert not client.is_server_ready() and not client.is_model_ready("down")
        finally:
            client.close()
    (alert,) = [line for line in log_lines() if line.get("event.kind") == "alert" and line["firewall.episode"] == "start"]
    assert (alert["user.id"], alert["source.ip"], alert["event.action"], alert["rule.name"]) == (
        "mallory",
        "127.0.0.1",
        "reject",
        "test.flagger",
    )


def test_bodies_in_flight_are_bounded_without_a_queue(mnist_heldout):
    images, _ = mnist_heldout
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": images[0].ravel().tolist()}]})

    def answers(rest: httpx.Client) -> int:
        return rest.post("/v2/models/mnist/infer", content=body).status_code

    with running_firewall(make_settings(max_concurrent_requests=1)) as firewall:
        host, port = http_address(firewall).split(":")
        with httpx.Client(base_url=f"http://{http_address(firewall)}", timeout=30) as rest:
            assert answers(rest) == 200
            for _ in range(100):  # until the slow body holds the only slot (a request may race it there)
                with socket.create_connection((host, int(port))) as slow:  # a body that never finishes arriving
                    slow.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
                    if answers(rest) == 429:
                        break
                time.sleep(0.05)
            else:
                pytest.fail("an unfinished body never held the slot")
            assert wait_for(lambda: answers(rest) == 200)  # the slow client left: its slot is free again
        throttled = firewall.metrics.registry.get_sample_value("firewall_decisions_total", {"model": "", "outcome": "throttled"})
        assert throttled >= 1


def wait_for(condition, attempts: int = 200) -> bool:
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_http_listen_null_serves_grpc_only(mnist_heldout):
    images, labels = mnist_heldout
    with running_firewall(make_settings(http_listen=None)) as firewall:
        assert firewall.http_port is None
        with grpc.insecure_channel(address(firewall)) as channel:
            tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
            request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[images[0].tobytes()])
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == [labels[0]]
