"""Throttling through a real server: the configured rate holds, batches pay per image, suspects
draw from the tighter bucket, the concurrency cap holds, and the state stays bounded."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from firewall.protocol import pb, pb_grpc
from firewall.state import MemoryClientState, take_tokens
from tests.conftest import address, make_settings, running_firewall
from tests.stages import Flagger, Slow, marked, with_stage

RATE, BURST = 40.0, 4


def request(images: np.ndarray, model: str = "mnist") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(images.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[images.tobytes()])


def outcome(stub, message: pb.ModelInferRequest, client_id: str) -> grpc.StatusCode:
    try:
        stub.ModelInfer(message, metadata=[("x-client-id", client_id)], timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def firewall():
    settings = make_settings(
        throttle={"rate": RATE, "burst": BURST, "suspect_rate": 0.5, "suspect_burst": 2},
        models={"mnist": {"policy": {"action": "reject"}}},
    )
    with running_firewall(settings) as running:
        with with_stage(running, Flagger()):
            yield running


@pytest.fixture
def stub(firewall):
    with grpc.insecure_channel(address(firewall)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_rate_holds_within_ten_percent_over_five_seconds(stub, mnist_heldout):
    images, _ = mnist_heldout
    message = request(images[:1])
    answered = throttled = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < 5.0:
        code = outcome(stub, message, "steady")
        if code == grpc.StatusCode.OK:
            answered += 1
        else:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            throttled += 1
            time.sleep(0.002)
    rate = (answered - BURST) / elapsed
    assert abs(rate - RATE) / RATE < 0.10, (answered, throttled, elapsed)
    assert throttled > answered  # the client asked for far more than the rate


def test_a_batch_pays_one_token_per_image(stub, mnist_heldout):
    images, _ = mnist_heldout
    time.sleep(0.2)  # the bucket is full again (4 tokens at 40/s)
    assert outcome(stub, request(images[:4]), "batcher") == grpc.StatusCode.OK
    assert outcome(stub, request(images[:4]), "batcher") == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_invalid_requests_draw_from_the_address_bucket_and_create_no_client_record():
    garbage = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])],
        raw_input_contents=[b"short"],
    )
    # A slow refill, so that a loaded machine cannot refill the bucket between two calls.
    settings = make_settings(throttle={"rate": 0.1, "burst": BURST, "address_rate": 0.1, "address_burst": BURST})
    with running_firewall(settings) as firewall:
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            codes = [outcome(stub, garbage, f"garbler-{n}") for n in range(BURST + 3)]
        tracked = len(firewall.service.admission.state)
    assert codes[:BURST] == [grpc.StatusCode.INVALID_ARGUMENT] * BURST
    assert set(codes[BURST:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # fresh ids do not refill it
    assert tracked == 1  # the address's bucket only: no garbler id was recorded


def test_a_client_with_a_refused_finding_gets_the_tighter_bucket(stub, mnist_heldout):
    images, _ = mnist_heldout
    assert outcome(stub, request(marked(images[:1])), "suspect") == grpc.StatusCode.PERMISSION_DENIED
    codes = [outcome(stub, request(images[i : i + 1]), "suspect") for i in range(4)]
    assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert outcome(stub, request(images[:1]), "innocent") == grpc.StatusCode.OK


def test_the_global_concurrency_cap_refuses_beyond_it(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(max_concurrent_requests=2, throttle={"enabled": False})
    codes: list[grpc.StatusCode] = []
    with running_firewall(settings) as firewall, with_stage(firewall, Slow(0.5)):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            callers = [
                threading.Thread(target=lambda i=i: codes.append(outcome(stub, request(images[:1]), f"c{i}")))
                for i in range(4)
            ]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join()
    assert sorted(code.name for code in codes) == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]


def test_token_bucket_arithmetic():
    record = MemoryClientState(1).update("a", lambda r: r)
    assert take_tokens(record, 3, rate=2.0, burst=4, now=0.0)  # starts full: 4 -> 1
    assert not take_tokens(record, 2, rate=2.0, burst=4, now=0.0)
    assert take_tokens(record, 2, rate=2.0, burst=4, now=0.5)  # 1 + 1 = 2 -> 0
    assert take_tokens(record, 10, rate=2.0, burst=4, now=10.0)  # larger than the burst: overdraws a full bucket
    assert record.tokens == -6 and not take_tokens(record, 1, rate=2.0, burst=4, now=13.0)


def test_client_state_forgets_the_least_recently_seen():
    state = MemoryClientState(max_clients=3)
    for key in ("a", "b", "c"):
        state.update(key, lambda record: record.last_labels.__setitem__("m", 1))
    state.update("a", lambda record: None)  # a is seen again
    state.update("d", lambda record: None)
    assert len(state) == 3 and state.get("b") is None and state.get("a").last_labels == {"m": 1}
    assert state.get("zzz") is None and len(state) == 3  # reading never creates
