"""The firewall through a real tritonclient: metadata, health, unary, streaming, and every bad input."""

from __future__ import annotations

import queue
import threading

import cv2
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from firewall.protocol import pb, pb_grpc
from tests.conftest import address, make_settings, pixel_bomb, running_firewall, uint8_input
from tests.stages import Recorder, with_stage


def infer_labels(client, images: np.ndarray, client_id: str = "tester") -> np.ndarray:
    result = client.infer("mnist", [uint8_input(images)], headers={"x-client-id": client_id})
    return result.as_numpy("label")


def test_metadata_health_and_reflection(firewall, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    metadata = client.get_model_metadata("mnist")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "UINT8", [-1, 28, 28, 1]),
        ("input", "FP32", [-1, 1, 28, 28]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("label", "INT64", [-1]), ("logits", "FP32", [-1, 10])]
    with grpc.insecure_channel(address(firewall)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "liveness"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:  # off by default: the chain stays unnamed
            list_services(channel)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def list_services(channel) -> set[str]:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    return {s.name for s in answer.list_services_response.service}


def test_reflection_when_enabled():
    with running_firewall(make_settings(reflection=True)) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= list_services(channel)


def test_metadata_names_nothing_of_the_firewall(client):
    server = client.get_server_metadata()
    model = client.get_model_metadata("mnist")
    config = client.get_model_config("mnist").config
    assert server.name == "inference-server" and model.platform == config.platform == "onnxruntime_onnx"
    said = f"{server} {model} {config}".lower()
    assert "firewall" not in said and "sidecar" not in said


def test_unary_labels_are_correct(client, mnist_heldout):
    images, labels = mnist_heldout
    predicted = infer_labels(client, images[:64])
    assert predicted.dtype == np.int64 and predicted.shape == (64,)
    assert (predicted == labels[:64]).mean() >= 0.95


def test_every_input_form_gives_the_same_label(client, mnist_heldout):
    images, labels = mnist_heldout
    digit = images[0]
    expected = infer_labels(client, digit[None])

    as_float = triton.InferInput("image", [1, 28, 28, 1], "FP32")
    as_float.set_data_from_numpy((digit[None, :, :, None] / 255.0).astype(np.float32))
    png = cv2.imencode(".png", digit)[1].tobytes()
    as_png = triton.InferInput("image", [1], "BYTES")
    as_png.set_data_from_numpy(np.array([png], dtype=np.object_))
    big_rgb = cv2.cvtColor(cv2.resize(digit, (112, 112), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2RGB)
    as_rgb = uint8_input(big_rgb[None])
    jpeg = cv2.imencode(".jpg", cv2.resize(digit, (56, 56)), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    as_jpeg = triton.InferInput("image", [1], "BYTES")
    as_jpeg.set_data_from_numpy(np.array([jpeg], dtype=np.object_))

    for tensor in (as_float, as_png, as_rgb, as_jpeg):
        assert client.infer("mnist", [tensor]).as_numpy("label").tolist() == expected.tolist()
    assert expected[0] == labels[0]


def test_typed_contents_are_accepted(firewall, mnist_heldout):
    images, labels = mnist_heldout
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[2, 28, 28])
    tensor.contents.uint_contents.extend(images[:2].ravel().tolist())
    with grpc.insecure_channel(address(firewall)) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            pb.ModelInferRequest(model_name="mnist", inputs=[tensor])
        )
    assert [o.name for o in response.outputs] == ["label"] and len(response.raw_output_contents) == 1
    assert np.frombuffer(response.raw_output_contents[0], "<i8").tolist() == labels[:2].tolist()


def test_streaming_answers_every_request_in_order(firewall, mnist_heldout):
    images, labels = mnist_heldout
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(address(firewall)) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers={"x-client-id": "streamer"})
        for index in range(8):
            client.async_stream_infer("mnist", [uint8_input(images[index : index + 1])], request_id=str(index))
        bad = triton.InferInput("image", [1, 28, 28], "FP32")
        bad.set_data_from_numpy(np.full((1, 28, 28), np.nan, np.float32))
        client.async_stream_infer("mnist", [bad], request_id="bad")
        client.async_stream_infer("mnist", [uint8_input(images[8:9])], request_id="8")
        results = [answers.get(timeout=30) for _ in range(10)]
        client.stop_stream()
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and "FP32 pixels must be finite" in str(errors[0])
    answered = {r.get_response().id: r.as_numpy("label")[0] for r, e in results if e is None}
    assert sorted(answered, key=int) == [str(i) for i in range(9)]
    assert np.mean([answered[str(i)] == labels[i] for i in range(9)]) >= 0.85


def _raw_request(datatype: str, shape: list[int], raw: bytes, model: str = "mnist", name: str = "image"):
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)],
        raw_input_contents=[raw],
    )


def _length_prefixed(*items: bytes) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


BAD_REQUESTS = {
    "wrong dtype": (_raw_request("INT32", [1, 28, 28], bytes(4 * 784)), grpc.StatusCode.INVALID_ARGUMENT),
    "raw length mismatch": (_raw_request("UINT8", [1, 28, 28], bytes(100)), grpc.StatusCode.INVALID_ARGUMENT),
    "undecodable image": (_raw_request("BYTES", [1], _length_prefixed(b"\x89PNG\r\n\x1a\n" + b"junk" * 20)), grpc.StatusCode.INVALID_ARGUMENT),
    "truncated length prefix": (_raw_request("BYTES", [1], b"\xff\xff\x00"), grpc.StatusCode.INVALID_ARGUMENT),
    "nan pixels": (_raw_request("FP32", [1, 2, 2], np.full(4, np.nan, "<f4").tobytes()), grpc.StatusCode.INVALID_ARGUMENT),
    "inf pixels": (_raw_request("FP32", [1, 2, 2], np.full(4, np.inf, "<f4").tobytes()), grpc.StatusCode.INVALID_ARGUMENT),
    "zero-size": (_raw_request("UINT8", [0, 28, 28], b""), grpc.StatusCode.INVALID_ARGUMENT),
    "too many pixels": (_raw_request("UINT8", [1, 5000, 5000], b""), grpc.StatusCode.INVALID_ARGUMENT),
    "batch too large": (_raw_request("UINT8", [65, 1, 1], bytes(65)), grpc.StatusCode.INVALID_ARGUMENT),
    "five channels": (_raw_request("UINT8", [1, 2, 2, 5], bytes(20)), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong input name": (_raw_request("UINT8", [1, 28, 28], bytes(784), name="pixels"), grpc.StatusCode.INVALID_ARGUMENT),
    "own input, wrong layout": (_raw_request("FP32", [1, 28, 28, 1], bytes(4 * 784), name="input"), grpc.StatusCode.INVALID_ARGUMENT),
    "own input, wrong datatype": (_raw_request("UINT8", [1, 1, 28, 28], bytes(784), name="input"), grpc.StatusCode.INVALID_ARGUMENT),
    "own input out of range": (_raw_request("FP32", [1, 1, 28, 28], np.full(784, 255, "<f4").tobytes(), name="input"), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown output": (
        pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            raw_input_contents=[bytes(784)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown model": (_raw_request("UINT8", [1, 28, 28], bytes(784), model="secret"), grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_its_status_and_a_generic_message(firewall, case):
    request, code = BAD_REQUESTS[case]
    with grpc.insecure_channel(address(firewall)) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert raised.value.code() == code
    message = raised.value.details()
    assert "Traceback" not in message and "/" not in message and len(message) < 80


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_pixel_bomb_is_refused_from_its_header(client, ext):
    # Well formed and decodable by OpenCV (25 Mpixels, 25 MB decoded, inside every byte limit), so
    # only the firewall's own header check against max_pixels (16.7 Mpixels) stands in its way.
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([pixel_bomb(ext)], dtype=np.object_))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mnist", [tensor])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    tensor.set_data_from_numpy(np.array([pixel_bomb(ext, side=4096)], dtype=np.object_))
    assert client.infer("mnist", [tensor]).as_numpy("label").shape == (1,)  # at the limit: answered


def test_good_client_keeps_being_served_during_bad_input(firewall, mnist_heldout):
    images, labels = mnist_heldout
    stop = threading.Event()
    attacker_errors: list[grpc.StatusCode] = []

    def send_garbage():
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                for request, _ in BAD_REQUESTS.values():
                    try:
                        stub.ModelInfer(request, timeout=10)
                    except grpc.RpcError as error:
                        attacker_errors.append(error.code())

    attacker = threading.Thread(target=send_garbage)
    attacker.start()
    try:
        with triton.InferenceServerClient(address(firewall)) as good:
            answers = [infer_labels(good, images[i : i + 1], "good")[0] for i in range(40)]
    finally:
        stop.set()
        attacker.join()
    assert np.mean(np.array(answers) == labels[:40]) >= 0.9
    assert attacker_errors and grpc.StatusCode.INTERNAL not in attacker_errors
    assert grpc.StatusCode.UNAVAILABLE not in attacker_errors


def test_invalid_client_id_is_rejected(client, mnist_heldout):
    images, _ = mnist_heldout
    with pytest.raises(InferenceServerException) as raised:
        infer_labels(client, images[:1], client_id="x" * 500)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_call_without_a_client_id_is_identified_by_its_address(firewall, mnist_heldout):
    images, _ = mnist_heldout
    with with_stage(firewall, Recorder()) as recorder:
        for _ in range(2):  # two connections: two source ports, one address
            with triton.InferenceServerClient(address(firewall)) as anonymous:
                anonymous.infer("mnist", [uint8_input(images[:1])])
        with triton.InferenceServerClient(address(firewall)) as named:
            infer_labels(named, images[:1], client_id="named")
    assert recorder.client_ids == ["127.0.0.1", "127.0.0.1", "named"]
