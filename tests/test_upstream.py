"""Upstream mode: the firewall forwards sanitized tensors to a real MLServer on loopback."""

from __future__ import annotations

import queue

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from models.runtime import bundled_model_path
from tests.conftest import address, make_settings, running_firewall, uint8_input
from tests.upstream import free_port, mlserver


def upstream_settings(upstream_address: str, timeout_s: float = 5.0):
    backend = {"kind": "upstream", "address": upstream_address, "model_name": "mnist", "timeout_s": timeout_s}
    return make_settings(models={"mnist": {"backend": backend}})


@pytest.fixture(scope="module")
def upstream():
    with mlserver("mnist", bundled_model_path("mnist")) as upstream_address:
        yield upstream_address


def test_upstream_labels_match_the_embedded_model(upstream, mnist_heldout):
    images, labels = mnist_heldout
    with running_firewall(make_settings()) as embedded, running_firewall(upstream_settings(upstream)) as forwarding:
        with triton.InferenceServerClient(address(embedded)) as a, triton.InferenceServerClient(address(forwarding)) as b:
            assert b.is_model_ready("mnist")
            local = a.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
            remote = b.infer("mnist", [uint8_input(images[:32])]).as_numpy("label")
    assert remote.tolist() == local.tolist()
    assert (remote == labels[:32]).mean() >= 0.9


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


def test_hung_upstream_fails_fast_turns_not_ready_and_recovers(mnist_heldout):
    """SIGSTOP the real MLServer: readiness turns NOT_SERVING, calls fail with UNAVAILABLE (the
    breaker opens, so later calls never wait for the upstream), and after SIGCONT it serves again."""
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

    with mlserver("mnist", bundled_model_path("mnist")) as upstream_address:
        with running_firewall(upstream_settings(upstream_address, timeout_s=1.0)) as forwarding:
            predictor = forwarding.service.pipelines["mnist"].predictor
            with triton.InferenceServerClient(address(forwarding)) as client:
                assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
                os.killpg(PROCESS_GROUPS[upstream_address], signal.SIGSTOP)
                try:
                    wait_until(lambda: not client.is_server_ready())
                    wait_until(lambda: predictor.breaker.is_open)  # the failed readiness probes open it
                    with pytest.raises(InferenceServerException) as raised:
                        client.infer("mnist", [uint8_input(images[:1])])
                    assert raised.value.status() == "StatusCode.UNAVAILABLE"
                finally:
                    os.killpg(PROCESS_GROUPS[upstream_address], signal.SIGCONT)
                wait_until(client.is_server_ready)
                assert not predictor.breaker.is_open
                assert client.infer("mnist", [uint8_input(images[:1])]).as_numpy("label").shape == (1,)
