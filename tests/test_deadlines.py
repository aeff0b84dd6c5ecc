"""Deadlines and departed clients on both bindings, through the real server with real clients: a
full server refuses at once, and work no worker has taken yet is dropped (and counted) once its
deadline passes or its client goes away. A gate holds the one worker, so which request waits is
known exactly; the only sleep makes sure a 1 ms deadline has passed (sleeping never ends early)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from firewall.protocol import pb, pb_grpc
from tests.conftest import address, make_settings, running_firewall, wait_until
from tests.stages import Gate, with_stage

THROTTLED = {"grpc": "StatusCode.RESOURCE_EXHAUSTED", "http": "429"}


def abandoned(firewall) -> float:
    return firewall.metrics.registry.get_sample_value("firewall_decisions_total", {"model": "mnist", "outcome": "abandoned"}) or 0.0


def infer(binding: str, firewall, pixels: np.ndarray, client_id: str, timeout_us: int | None = None) -> str:
    """One tritonclient call; "OK" or the error's status."""
    module = triton_grpc if binding == "grpc" else triton_http
    url = address(firewall) if binding == "grpc" else f"127.0.0.1:{firewall.http_port}"
    client = module.InferenceServerClient(url)
    tensor = module.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    try:
        client.infer("mnist", [tensor], headers={"x-client-id": client_id}, timeout=timeout_us)
    except InferenceServerException as error:
        return error.status()
    finally:
        client.close()
    return "OK"


def in_background(call: Callable[[], str]) -> tuple[threading.Thread, list[str]]:
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


@pytest.fixture
def one_worker():
    """A firewall with one worker, held by a gate."""
    settings = make_settings(workers=1, throttle={"enabled": False})
    with running_firewall(settings) as firewall, with_stage(firewall, Gate()) as gate:
        yield firewall, gate


def hold_the_worker(firewall, gate: Gate, pixels: np.ndarray) -> tuple[threading.Thread, list[str]]:
    first = in_background(lambda: infer("grpc", firewall, pixels, "first"))
    gate.wait_entered(1)
    return first


def test_a_full_server_answers_at_once_on_both_bindings(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(workers=1, max_concurrent_requests=1, throttle={"enabled": False})
    with running_firewall(settings) as firewall, with_stage(firewall, Gate()) as gate:
        thread, first = hold_the_worker(firewall, gate, images[:1])
        # The gate is still closed: these answers cannot have waited for the held request.
        assert infer("http", firewall, images[:1], "second") == THROTTLED["http"]
        assert infer("grpc", firewall, images[:1], "second") == THROTTLED["grpc"]
        gate.release()
        thread.join()
    assert first == ["OK"] and gate.entered == 1


@pytest.mark.parametrize("binding", ["grpc", "http"])
def test_work_past_the_requests_timeout_is_dropped(binding, one_worker, mnist_heldout):
    images, _ = mnist_heldout
    firewall, gate = one_worker
    thread, first = hold_the_worker(firewall, gate, images[:1])
    late = in_background(lambda: infer(binding, firewall, images[:1], "late", timeout_us=1000))
    wait_until(lambda: firewall.service.in_flight.count == 2)  # queued behind the gate
    time.sleep(0.01)  # its 1 ms has passed
    gate.release()
    for waiting in (thread, late[0]):
        waiting.join()
    assert first == ["OK"] and late[1] == [THROTTLED[binding]]
    assert gate.entered == 1 and abandoned(firewall) == 1  # the late request never reached the pipeline


def test_work_past_the_server_side_limit_is_dropped(one_worker, mnist_heldout):
    images, _ = mnist_heldout
    firewall, gate = one_worker
    thread, first = hold_the_worker(firewall, gate, images[:1])
    service = firewall.service
    service.settings = service.settings.model_copy(update={"request_timeout_s": 0.001})
    late = in_background(lambda: infer("http", firewall, images[:1], "late"))  # no timeout of its own
    wait_until(lambda: service.in_flight.count == 2)
    time.sleep(0.01)
    gate.release()
    for waiting in (thread, late[0]):
        waiting.join()
    assert first == ["OK"] and late[1] == [THROTTLED["http"]] and abandoned(firewall) == 1 and gate.entered == 1


def raw_http_request(firewall, pixels: np.ndarray) -> socket.socket:
    """An HTTP inference request sent in full on a socket the test closes itself."""
    body = b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": %s}]}' % str(pixels.ravel().tolist()).encode()
    head = f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    connection = socket.create_connection(("127.0.0.1", firewall.http_port))
    connection.sendall(head.encode() + body)
    return connection


@pytest.mark.parametrize("binding", ["grpc", "http"])
def test_a_client_that_goes_away_has_its_queued_work_dropped(binding, one_worker, mnist_heldout):
    images, _ = mnist_heldout
    firewall, gate = one_worker
    thread, first = hold_the_worker(firewall, gate, images[:1])
    with grpc.insecure_channel(address(firewall)) as channel:
        if binding == "grpc":
            tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
            request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[images[0].tobytes()])
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, metadata=[("x-client-id", "gone")])
            wait_until(lambda: firewall.service.in_flight.count == 2)
            call.cancel()
        else:
            connection = raw_http_request(firewall, images[:1])
            wait_until(lambda: firewall.service.in_flight.count == 2)
            connection.close()
        wait_until(lambda: abandoned(firewall) == 1)  # dropped while the worker is still held
        gate.release()
        thread.join()
    assert first == ["OK"] and gate.entered == 1
    wait_until(lambda: firewall.service.in_flight.count == 0)
