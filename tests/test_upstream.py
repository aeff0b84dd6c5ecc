"""Upstream mode: the firewall forwards sanitized tensors to a real MLServer on loopback.

Besides the MNIST model, the MLServer serves copies of it with another head: one that answers
labels only (ArgMax, INT64 [B]) and two that answer malformed outputs (a shape that does not match
the batch, a datatype the firewall does not read). An upstream that hangs, exceeds its timeout or
dies mid-run is a real MLServer stopped (SIGSTOP) or killed (SIGKILL).
"""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from firewall.backends import RestUpstreamPredictor
from models.runtime import bundled_model_path
from tests.conftest import address, make_settings, running_firewall, uint8_input, wait_until
from tests.upstream import PROCESS_GROUPS, free_port, mlserver

HEADS = {  # model name -> (output name, the node that computes it from the logits, its type and shape)
    "mnist-labels": ("label", helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0), TensorProto.INT64, ["N"]),
    "mnist-pooled": ("pooled", helper.make_node("ReduceMean", ["logits"], ["pooled"], axes=[0], keepdims=1), TensorProto.FLOAT, [1, 10]),
    "mnist-bytes": ("bytes", helper.make_node("Cast", ["logits"], ["bytes"], to=TensorProto.UINT8), TensorProto.UINT8, ["N", 10]),
}  # fmt: skip


def with_head(folder: Path, name: str) -> Path:
    """The bundled MNIST model with its logits replaced by the head named ``name``."""
    output, node, kind, shape = HEADS[name]
    model = onnx.load(bundled_model_path("mnist"))
    model.graph.node.append(node)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(output, kind, shape))
    onnx.checker.check_model(model)
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    return path


def backend(upstream_address: str, model_name: str = "mnist", **overrides) -> dict:
    return {"kind": "upstream", "address": upstream_address, "model_name": model_name, **overrides}


def upstream_settings(upstream_address: str, timeout_s: float = 5.0, **overrides):
    return make_settings(models={"mnist": {"backend": backend(upstream_address, timeout_s=timeout_s, **overrides)}})


@pytest.fixture(scope="module")
def upstream_addresses(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """One MLServer (the MNIST model and its other heads): its gRPC and its REST address."""
    folder = tmp_path_factory.mktemp("heads")
    others = {name: with_head(folder, name) for name in HEADS}
    rest_port = free_port()
    with mlserver("mnist", bundled_model_path("mnist"), http_port=rest_port, others=others) as grpc_address:
        yield grpc_address, f"127.0.0.1:{rest_port}"


@pytest.fixture(scope="module")
def upstream(upstream_addresses) -> str:
    return upstream_addresses[0]


def test_upstream_labels_match_the_embedded_model(upstream, mnist_heldout):
    images, labels = mnist_heldout
    with running_firewall(make_settings()) as embedded, running_firewall(upstream_settings(upstream)) as forwarding:
        with triton.InferenceServerClient(address(embedded)) as a, triton.InferenceServerClient(address(forwarding)) as b:
            assert b.is_model_ready("mnist")
            local = a.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
            remote = b.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
    assert remote.tolist() == local.tolist()
    assert (remote == labels[:32]).mean() >= 0.9


def test_rest_upstream_answers_both_bindings_like_the_embedded_model(upstream_addresses, mnist_heldout):
    images, _ = mnist_heldout
    rest_settings = upstream_settings(upstream_addresses[1], protocol="rest")
    with running_firewall(make_settings()) as embedded, running_firewall(rest_settings) as forwarding:
        assert isinstance(forwarding.service.pipelines["mnist"].predictor, RestUpstreamPredictor)
        with triton.InferenceServerClient(address(embedded)) as a, triton.InferenceServerClient(address(forwarding)) as b:
            assert b.is_server_ready() and b.is_model_ready("mnist")
            local = a.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
            remote = b.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
        over_http = triton_http.InferenceServerClient(f"127.0.0.1:{forwarding.http_port}")
        try:
            tensor = triton_http.InferInput("image", [32, 28, 28], "UINT8")
            tensor.set_data_from_numpy(images[:32])
            remote_http = over_http.infer("mnist", [tensor]).as_numpy("label")
        finally:
            over_http.close()
    assert remote.tolist() == local.tolist() == remote_http.tolist()


def test_client_stream_works_over_a_unary_upstream(upstream, mnist_heldout):
    images, _ = mnist_heldout
    answers: queue.Queue = queue.Queue()
    with running_firewall(upstream_settings(upstream)) as forwarding:
        with triton.InferenceServerClient(address(forwarding)) as client:
            unary = client.infer("mnist", [uint8_input(images[:8])]).as_numpy("label")
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for index in range(8):
                client.async_stream_infer("mnist", [uint8_input(images[index : index + 1])], request_id=str(index))
            results = [answers.get(timeout=30) for _ in range(8)]
            client.stop_stream()
    assert all(error is None for _, error in results)
    streamed = {int(r.get_response().id): int(r.as_numpy("label")[0]) for r, _ in results}
    assert [streamed[index] for index in range(8)] == unary.tolist()


def test_upstream_down_is_unavailable_and_not_ready(mnist_heldout):
    images, _ = mnist_heldout
    with running_firewall(upstream_settings(f"127.0.0.1:{free_port()}", timeout_s=1.0)) as forwarding:
        with triton.InferenceServerClient(address(forwarding)) as client:
            assert client.is_server_live()
            assert not client.is_server_ready() and not client.is_model_ready("mnist")
            with pytest.raises(InferenceServerException) as raised:
                client.infer("mnist", [uint8_input(images[:1])])
    assert raised.value.status() == "StatusCode.UNAVAILABLE"
    assert raised.value.message() == "model unavailable"


def test_hung_upstream_fails_fast_turns_not_ready_and_recovers(upstream_addresses, mnist_heldout):
    """SIGSTOP the real MLServer: for a firewall forwarding over gRPC and one forwarding over REST,
    readiness turns NOT_SERVING, calls fail with UNAVAILABLE (the breaker opens, so later calls
    never wait for the upstream), and after SIGCONT they serve again."""
    images, _ = mnist_heldout
    grpc_address, rest_address = upstream_addresses
    over_grpc = upstream_settings(grpc_address, timeout_s=1.0)
    over_rest = upstream_settings(rest_address, timeout_s=1.0, protocol="rest")
    with running_firewall(over_grpc) as via_grpc, running_firewall(over_rest) as via_rest:
        firewalls = (via_grpc, via_rest)
        predictors = [firewall.service.pipelines["mnist"].predictor for firewall in firewalls]
        clients = [triton.InferenceServerClient(address(firewall)) for firewall in firewalls]
        try:
            for client in clients:
                assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
            os.killpg(PROCESS_GROUPS[grpc_address], signal.SIGSTOP)
            try:
                for client, predictor in zip(clients, predictors, strict=True):
                    wait_until(lambda client=client: not client.is_server_ready())
                    wait_until(lambda predictor=predictor: predictor.breaker.is_open)  # the failed readiness probes open it
                    with pytest.raises(InferenceServerException) as raised:
                        client.infer("mnist", [uint8_input(images[:1])])
                    assert raised.value.status() == "StatusCode.UNAVAILABLE"
            finally:
                os.killpg(PROCESS_GROUPS[grpc_address], signal.SIGCONT)
            for client, predictor in zip(clients, predictors, strict=True):
                wait_until(client.is_server_ready)
                assert not predictor.breaker.is_open
                assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
        finally:
            for client in clients:
                client.close()


def test_an_upstream_answering_labels_only_gives_the_same_labels(upstream, mnist_heldout):
    images, _ = mnist_heldout
    onnx_path = str(bundled_model_path("mnist"))
    models = {
        "mnist": {"backend": backend(upstream)},
        "labels": {"onnx": onnx_path, "backend": backend(upstream, "mnist-labels", output_name="label")},
    }
    with running_firewall(make_settings(models=models)) as forwarding, triton.InferenceServerClient(address(forwarding)) as client:
        logits = client.infer("mnist", [uint8_input(images[:16])]).as_numpy("label")
        labels = client.infer("labels", [uint8_input(images[:16])]).as_numpy("label")
    assert labels.dtype == logits.dtype and labels.tolist() == logits.tolist()


@pytest.mark.parametrize("head", ["mnist-pooled", "mnist-bytes"])
def test_a_malformed_upstream_answer_is_unavailable_and_the_firewall_serves_on(upstream, mnist_heldout, head):
    images, _ = mnist_heldout
    onnx_path = str(bundled_model_path("mnist"))
    output = HEADS[head][0]
    models = {
        "mnist": {"backend": backend(upstream)},
        "broken": {"onnx": onnx_path, "backend": backend(upstream, head, output_name=output)},
    }
    with running_firewall(make_settings(models=models)) as forwarding, triton.InferenceServerClient(address(forwarding)) as client:
        for _ in range(5):  # more than breaker_failures: a malformed answer is not the upstream being down
            with pytest.raises(InferenceServerException) as raised:
                client.infer("broken", [uint8_input(images[:4])])
            assert (raised.value.status(), raised.value.message()) == ("StatusCode.UNAVAILABLE", "model unavailable")
        assert client.infer("mnist", [uint8_input(images[:4])]).as_numpy("label").shape == (4,)


def test_an_upstream_call_past_its_timeout_is_unavailable(upstream, mnist_heldout):
    """The breaker cannot open (1000 failures), so only the per-call timeout can end the call: without
    it the client would wait out its own 30 s deadline (DEADLINE_EXCEEDED)."""
    images, _ = mnist_heldout
    settings = upstream_settings(upstream, timeout_s=0.5, breaker_failures=1000)
    with running_firewall(settings) as forwarding, triton.InferenceServerClient(address(forwarding)) as client:
        assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
        os.killpg(PROCESS_GROUPS[upstream], signal.SIGSTOP)
        try:
            with pytest.raises(InferenceServerException) as raised:
                client.infer("mnist", [uint8_input(images[:1])], client_timeout=30)
        finally:
            os.killpg(PROCESS_GROUPS[upstream], signal.SIGCONT)
        wait_until(client.is_server_ready)
        assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
    assert raised.value.status() == "StatusCode.UNAVAILABLE"


def health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_an_upstream_that_dies_mid_run_turns_health_not_serving_and_back(mnist_heldout):
    images, _ = mnist_heldout
    port = free_port()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with mlserver("mnist", bundled_model_path("mnist"), grpc_port=port) as upstream_address:
        forwarding_context = running_firewall(upstream_settings(upstream_address, timeout_s=1.0))
        forwarding = forwarding_context.__enter__()
        os.killpg(PROCESS_GROUPS[upstream_address], signal.SIGKILL)
    try:
        with grpc.insecure_channel(address(forwarding)) as channel, triton.InferenceServerClient(address(forwarding)) as client:
            wait_until(lambda: health(channel, "") == not_serving)
            assert health(channel, "inference.GRPCInferenceService") == not_serving
            assert health(channel, "liveness") == serving  # the process itself is fine
            with pytest.raises(InferenceServerException) as raised:
                client.infer("mnist", [uint8_input(images[:1])])
            assert raised.value.status() == "StatusCode.UNAVAILABLE"
            with mlserver("mnist", bundled_model_path("mnist"), grpc_port=port):  # the upstream is restarted
                wait_until(lambda: health(channel, "") == serving)
                assert health(channel, "inference.GRPCInferenceService") == serving
                assert client.infer("mnist", [uint8_input(images[:4])]).as_numpy("label").shape == (4,)
    finally:
        forwarding_context.__exit__(None, None, None)
