"""Upstream mode: the firewall forwards sanitized tensors to a real MLServer on loopback."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from firewall.backends import RestUpstreamPredictor
from models.runtime import bundled_model_path
from tests.conftest import address, make_settings, running_firewall, uint8_input
from tests.upstream import free_port, mlserver


def upstream_settings(upstream_address: str, timeout_s: float = 5.0, protocol: str = "grpc"):
    backend = {"kind": "upstream", "protocol": protocol, "address": upstream_address, "model_name": "mnist", "timeout_s": timeout_s}
    return make_settings(models={"mnist": {"backend": backend}})


@pytest.fixture(scope="module")
def upstream_addresses() -> Iterator[tuple[str, str]]:
    """One MLServer: its gRPC and its REST address."""
    rest_port = free_port()
    with mlserver("mnist", bundled_model_path("mnist"), http_port=rest_port) as grpc_address:
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
    images, labels = mnist_heldout
    answers: queue.Queue = queue.Queue()
    with running_firewall(upstream_settings(upstream)) as forwarding:
        with triton.InferenceServerClient(address(forwarding)) as client:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for index in range(5):
                client.async_stream_infer("mnist", [uint8_input(images[index : index + 1])], request_id=str(index))
            results = [answers.get(timeout=30) for _ in range(5)]
            client.stop_stream()
    assert all(error is None for _, error in results)
    assert sorted(int(r.get_response().id) for r, _ in results) == list(range(5))


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


def test_hung_upstream_fails_fast_turns_not_ready_and_recovers(mnist_heldout):
    """SIGSTOP the real MLServer: for a firewall forwarding over gRPC and one forwarding over REST,
    readiness turns NOT_SERVING, calls fail with UNAVAILABLE (the breaker opens, so later calls
    never wait for the upstream), and after SIGCONT they serve again."""
    import os
    import signal
    import time

    from tests.upstream import PROCESS_GROUPS

    images, _ = mnist_heldout

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    rest_port = free_port()
    with mlserver("mnist", bundled_model_path("mnist"), http_port=rest_port) as upstream_address:
        over_grpc = upstream_settings(upstream_address, timeout_s=1.0)
        over_rest = upstream_settings(f"127.0.0.1:{rest_port}", timeout_s=1.0, protocol="rest")
        with running_firewall(over_grpc) as via_grpc, running_firewall(over_rest) as via_rest:
            firewalls = (via_grpc, via_rest)
            predictors = [firewall.service.pipelines["mnist"].predictor for firewall in firewalls]
            clients = [triton.InferenceServerClient(address(firewall)) for firewall in firewalls]
            try:
                for client in clients:
                    assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
                os.killpg(PROCESS_GROUPS[upstream_address], signal.SIGSTOP)
                try:
                    for client, predictor in zip(clients, predictors, strict=True):
                        wait_until(lambda client=client: not client.is_server_ready())
                        wait_until(lambda predictor=predictor: predictor.breaker.is_open)  # the failed readiness probes open it
                        with pytest.raises(InferenceServerException) as raised:
                            client.infer("mnist", [uint8_input(images[:1])])
                        assert raised.value.status() == "StatusCode.UNAVAILABLE"
                finally:
                    os.killpg(PROCESS_GROUPS[upstream_address], signal.SIGCONT)
                for client, predictor in zip(clients, predictors, strict=True):
                    wait_until(client.is_server_ready)
                    assert not predictor.breaker.is_open
                    assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
            finally:
                for client in clients:
                    client.close()
