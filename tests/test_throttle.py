"""Throttling through a real server: the configured rate holds, batches pay per image, suspects
draw from the tighter bucket (after a reject, and after a ban until ``suspect_s`` has passed), the
concurrency cap holds, and the state stays bounded. Time is a fake clock the tests advance, so the
counts asserted do not depend on the machine's speed."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from firewall.protocol import pb, pb_grpc
from firewall.state import MemoryClientState, take_tokens
from tests.conftest import FakeClock, address, drive_clock, make_settings, running_firewall
from tests.stages import Flagger, Gate, marked, with_stage

RATE, BURST = 16.0, 4  # binary fractions of a second refill whole tokens exactly
SUSPECT_S = 600.0
BAN_S = 10.0
OK, THROTTLED, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED


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
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def firewall(clock):
    onnx = str(make_settings().onnx_path("mnist"))
    settings = make_settings(
        throttle={
            "rate": RATE,
            "burst": BURST,
            "suspect_rate": 0.5,
            "suspect_burst": 2,
            "suspect_s": SUSPECT_S,
            "address_rate": 1000.0,  # every test shares the loopback address
            "address_burst": 1000,
        },
        models={
            "mnist": {"policy": {"action": "reject"}},
            "ban": {"onnx": onnx, "policy": {"action": "ban", "ban": {"first_s": BAN_S}}},
        },
    )
    with running_firewall(settings) as running, with_stage(running, Flagger()):
        drive_clock(running, clock)
        yield running


@pytest.fixture
def stub(firewall):
    with grpc.insecure_channel(address(firewall)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_the_bucket_gives_the_burst_then_refills_at_the_rate_and_no_further(stub, clock, mnist_heldout):
    images, _ = mnist_heldout
    message = request(images[:1])
    codes = [outcome(stub, message, "steady") for _ in range(BURST + 3)]
    assert codes == [OK] * BURST + [THROTTLED] * 3  # while time stands still nothing refills
    for _ in range(8):
        clock.advance(2 / RATE)  # two tokens' worth
        assert [outcome(stub, message, "steady") for _ in range(3)] == [OK, OK, THROTTLED]
    clock.advance(3600.0)  # a long pause refills to the burst, not beyond
    assert [outcome(stub, message, "steady") for _ in range(BURST + 1)] == [OK] * BURST + [THROTTLED]


def test_a_batch_pays_one_token_per_image(stub, clock, mnist_heldout):
    images, _ = mnist_heldout
    assert outcome(stub, request(images[:4]), "batcher") == OK
    assert outcome(stub, request(images[:1]), "batcher") == THROTTLED
    clock.advance(3 / RATE)  # three tokens: not enough for a batch of four
    assert outcome(stub, request(images[:4]), "batcher") == THROTTLED
    clock.advance(1 / RATE)
    assert outcome(stub, request(images[:4]), "batcher") == OK


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
    assert outcome(stub, request(marked(images[:1])), "suspect") == REFUSED
    codes = [outcome(stub, request(images[i : i + 1]), "suspect") for i in range(4)]
    assert codes == [OK] * 2 + [THROTTLED] * 2
    assert outcome(stub, request(images[:1]), "innocent") == OK


def test_after_a_ban_ends_the_client_is_a_suspect_until_suspect_s_has_passed(stub, clock, mnist_heldout):
    images, _ = mnist_heldout
    clean = request(images[:1], "ban")
    assert outcome(stub, request(marked(images[:1]), "ban"), "convict") == REFUSED
    clock.advance(BAN_S - 0.125)
    assert outcome(stub, clean, "convict") == REFUSED  # still banned
    clock.advance(0.25)
    assert [outcome(stub, clean, "convict") for _ in range(3)] == [OK, OK, THROTTLED]  # suspect bucket: 2
    clock.advance(SUSPECT_S - 0.25)  # the suspect period runs suspect_s from the end of the ban
    assert [outcome(stub, clean, "convict") for _ in range(3)] == [OK, OK, THROTTLED]
    clock.advance(0.25)
    assert [outcome(stub, clean, "convict") for _ in range(BURST + 1)] == [OK] * BURST + [THROTTLED]


def test_the_global_concurrency_cap_refuses_beyond_it(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(max_concurrent_requests=2, max_new_client_requests=2, throttle={"enabled": False})
    codes: list[grpc.StatusCode] = []
    gate = Gate()
    with running_firewall(settings) as firewall, with_stage(firewall, gate):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            held = [
                threading.Thread(target=lambda i=i: codes.append(outcome(stub, request(images[:1]), f"c{i}")))
                for i in range(2)
            ]
            for caller in held:
                caller.start()
            gate.wait_entered(2)  # both slots taken
            beyond = [outcome(stub, request(images[:1]), f"c{i}") for i in range(2, 4)]
            gate.release()
            for caller in held:
                caller.join()
            after = outcome(stub, request(images[:1]), "c4")
    assert beyond == [THROTTLED, THROTTLED] and codes == [OK, OK] and after == OK


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
        state.update(key, lambda record: record.first_labels.__setitem__("m", 1))
    state.update("a", lambda record: None)  # a is seen again
    state.update("d", lambda record: None)
    assert len(state) == 3 and state.get("b") is None and state.get("a").first_labels == {"m": 1}
    assert state.get("zzz") is None and len(state) == 3  # reading never creates
