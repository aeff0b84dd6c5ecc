"""Hostile load through the real server (issue 12): image bombs inside the limits, state that a
flood of fresh ids cannot flush, identity by address, fair shares, restarts and start-up failures.

No assertion here depends on the machine's speed: concurrency is held open with a gate the test
releases, and bombs are shown to be stopped by the firewall's own header check (the decoder is
never called), not by a timing or by OpenCV refusing them itself.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from detectors.sanitizer import decode_image, read_header
from firewall.protocol import pb, pb_grpc
from firewall.state import MemoryClientState
from firewall.errors import Throttled
from firewall.throttle import Admission
from firewall.config import ThrottleConfig
from firewall.bans import BanLog
from tests.conftest import address, make_settings, running_firewall, wait_until
from tests.stages import Flagger, Gate, Recorder, Slow, marked, with_stage

ROOT = Path(__file__).resolve().parent.parent


def pixels_request(images: np.ndarray, model: str = "mnist") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(images.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[images.tobytes()])


def bytes_request(items: list[bytes]) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(items)])
    tensor.contents.bytes_contents.extend(items)
    return pb.ModelInferRequest(model_name="mnist", inputs=[tensor])


def outcome(stub, message: pb.ModelInferRequest, client_id: str) -> grpc.StatusCode:
    try:
        stub.ModelInfer(message, metadata=[("x-client-id", client_id)], timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def decodes(monkeypatch):
    """Counts every call into OpenCV's decoder."""
    calls = []
    real = cv2.imdecode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cv2, "imdecode", counting)
    return calls


def sixteen_bit_bomb(side: int) -> bytes:
    """A well-formed all-zero 16-bit RGBA PNG: tiny on the wire, side * side * 8 bytes decoded."""
    ok, buffer = cv2.imencode(".png", np.zeros((side, side, 4), np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return buffer.tobytes()


# -- 1. image bombs inside the limits --------------------------------------------------------


def test_sixteen_bit_bomb_within_the_pixel_limit_is_stopped_by_the_header_check_alone(decodes):
    bomb = sixteen_bit_bomb(2048)  # 4 Mpixels, far within max_pixels; 32 MiB decoded
    assert len(bomb) < 200_000
    header = read_header(bomb, max_pixels=4096 * 4096)
    assert (header.channels, header.sample_bytes, header.decoded_bytes) == (4, 2, 2048 * 2048 * 8)
    # OpenCV decodes it when asked: only the firewall's own byte limit stops it.
    assert decode_image(bomb, max_pixels=4096 * 4096).shape == (2048, 2048, 3)
    decodes.clear()
    settings = make_settings(models={"mnist": {"limits": {"max_image_bytes": 16 * 1024 * 1024}}})
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert outcome(stub, bytes_request([bomb]), "bomber") == grpc.StatusCode.INVALID_ARGUMENT
        small = cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes()
        assert outcome(stub, bytes_request([small]), "normal") == grpc.StatusCode.OK
    assert len(decodes) == 1  # the normal image only: the bomb never reached the decoder


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_well_formed_image_over_the_pixel_limit_is_refused_before_decoding(decodes, ext):
    image = cv2.imencode(ext, np.full((300, 300, 3), 128, np.uint8))[1].tobytes()
    assert decode_image(image, max_pixels=300 * 300).shape == (300, 300, 3)  # OpenCV would decode it
    decodes.clear()
    settings = make_settings(models={"mnist": {"limits": {"max_pixels": 256 * 256}}})
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        assert outcome(pb_grpc.GRPCInferenceServiceStub(channel), bytes_request([image]), "c") == grpc.StatusCode.INVALID_ARGUMENT
    assert decodes == []


def test_request_total_of_decoded_bytes_is_bounded(decodes):
    image = cv2.imencode(".png", np.zeros((1024, 1024, 3), np.uint8))[1].tobytes()  # 3 MiB decoded
    settings = make_settings(models={"mnist": {"limits": {"max_request_bytes": 16 * 1024 * 1024}}})
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert outcome(stub, bytes_request([image] * 6), "c") == grpc.StatusCode.INVALID_ARGUMENT  # 18 MiB
        assert decodes == []
        assert outcome(stub, bytes_request([image] * 5), "c") == grpc.StatusCode.OK  # 15 MiB


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_refused_bomb_request_costs_no_memory_with_the_defaults():
    bomb = sixteen_bit_bomb(4096)  # the bomb: 128 MiB decoded per image, 64 MiB allowed
    with running_firewall(make_settings()) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = rss_bytes()
        assert outcome(stub, bytes_request([bomb] * 16), "bomber") == grpc.StatusCode.INVALID_ARGUMENT
        grown = rss_bytes() - before
    assert grown < 64 * 1024 * 1024  # the 16 images would decode to 2 GiB (1 GiB in 8 bits)


def test_heavy_requests_never_take_every_worker(mnist_heldout):
    images, _ = mnist_heldout
    heavy = cv2.imencode(".png", np.zeros((1024, 1024), np.uint8))[1].tobytes()  # 1 MiB decoded
    settings = make_settings(workers=2, heavy_request_bytes=512 * 1024, throttle={"enabled": False})
    gate = Gate()
    codes: list[grpc.StatusCode] = []
    with running_firewall(settings) as firewall, with_stage(firewall, gate):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = threading.Thread(target=lambda: codes.append(outcome(stub, bytes_request([heavy]), "bomber-1")))
            first.start()
            wait_until(lambda: gate.entered == 1)
            # One heavy request holds the one heavy slot (half of two workers); another is refused at once.
            assert outcome(stub, bytes_request([heavy]), "bomber-2") == grpc.StatusCode.RESOURCE_EXHAUSTED
            normal = threading.Thread(target=lambda: codes.append(outcome(stub, pixels_request(images[:1]), "normal")))
            normal.start()
            wait_until(lambda: gate.entered == 2)  # the normal client got the other worker
            gate.release()
            first.join()
            normal.join()
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK]


# -- 2. bans cannot be flushed -----------------------------------------------------------------


def test_a_ban_survives_a_flood_of_fresh_ids_and_invalid_requests(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(max_tracked_clients=20, throttle={"enabled": False}, models={"mnist": {"policy": {"action": "ban"}}})
    empty = pb.ModelInferRequest(model_name="mnist")  # fails validation
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger()):
        state = firewall.service.admission.state
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert outcome(stub, pixels_request(marked(images[:1])), "attacker") == grpc.StatusCode.PERMISSION_DENIED
            for n in range(300):  # fifteen times the LRU's size
                assert outcome(stub, empty, f"empty-{n}") == grpc.StatusCode.INVALID_ARGUMENT
            assert not any(state.tracked(f"empty-{n}") for n in range(300))
            for n in range(200):
                assert outcome(stub, pixels_request(images[n % 50 : n % 50 + 1]), f"fresh-{n}") == grpc.StatusCode.OK
            assert len(state) <= 20 + state.protected_count()
            assert outcome(stub, pixels_request(images[:1]), "attacker") == grpc.StatusCode.PERMISSION_DENIED
        assert state.get("attacker").offences == 1


def test_at_the_protected_cap_new_ids_are_refused_and_no_ban_forgotten():
    now = [1000.0]
    state = MemoryClientState(max_clients=10, max_protected=2, clock=lambda: now[0])
    admission = Admission(state, ThrottleConfig(), BanLog(state))
    for key in ("a", "b"):
        state.update(key, lambda record: setattr(record, "banned_until", now[0] + 60))
    asyncio.run(admission.charge_client("known", 1))
    state.update("c", lambda record: setattr(record, "banned_until", now[0] + 60))  # a tracked id may still be banned
    assert state.full and all(state.get(key).banned_until > now[0] for key in "abc")
    with pytest.raises(Throttled):
        asyncio.run(admission.charge_client("newcomer", 1))
    asyncio.run(admission.charge_client("known", 1))  # ids already tracked are served
    now[0] += 61  # the bans expire: the table empties, new ids are admitted again
    state.refresh()
    assert not state.full and state.protected_count() == 0
    asyncio.run(admission.charge_client("newcomer", 1))


# -- 7. identity: the address counts -----------------------------------------------------------


def test_fresh_ids_from_one_address_share_its_bucket(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(throttle={"rate": 0.01, "burst": 2, "address_rate": 0.01, "address_burst": 6})
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        codes = [outcome(stub, pixels_request(images[:1]), f"id-{n}") for n in range(30)]
        unknown = outcome(stub, pixels_request(images[:1], model="nope"), "id-x")
    assert codes.count(grpc.StatusCode.OK) == 6 and set(codes[6:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert unknown == grpc.StatusCode.RESOURCE_EXHAUSTED  # unknown models draw from the address bucket too


def test_an_address_past_its_refusal_budget_is_refused_whatever_its_id(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(
        throttle={"address_refusals": 3, "refusal_window_s": 600, "address_cooldown_s": 600},
        models={"mnist": {"policy": {"action": "reject"}}},
    )
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger()):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert outcome(stub, pixels_request(images[:1]), "before") == grpc.StatusCode.OK
            # An adaptive attacker: a fresh id after every refusal.
            refused = [outcome(stub, pixels_request(marked(images[n : n + 1])), f"probe-{n}") for n in range(4)]
            assert refused == [grpc.StatusCode.PERMISSION_DENIED] * 4
            assert outcome(stub, pixels_request(images[:1]), "fresh") == grpc.StatusCode.PERMISSION_DENIED
            assert outcome(stub, pixels_request(images[:1]), "before") == grpc.StatusCode.PERMISSION_DENIED


# -- 3. fair shares ------------------------------------------------------------------------------


def test_one_client_cannot_take_the_whole_server_unary_or_streamed(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(max_requests_per_client=2, throttle={"enabled": False})
    gate = Gate()
    codes: list[grpc.StatusCode] = []
    with running_firewall(settings) as firewall, with_stage(firewall, gate):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            hogs = [threading.Thread(target=lambda: codes.append(outcome(stub, pixels_request(images[:1]), "hog"))) for _ in range(2)]
            for hog in hogs:
                hog.start()
            wait_until(lambda: gate.entered == 2)
            assert outcome(stub, pixels_request(images[:1]), "hog") == grpc.StatusCode.RESOURCE_EXHAUSTED
            streamed = list(stub.ModelStreamInfer(iter([pixels_request(images[:1])]), metadata=[("x-client-id", "hog")], timeout=30))
            assert streamed[0].error_message == "too many requests"  # a stream counts like unary calls
            normal = threading.Thread(target=lambda: codes.append(outcome(stub, pixels_request(images[:1]), "normal")))
            normal.start()
            wait_until(lambda: gate.entered == 3)
            gate.release()
            for thread in (*hogs, normal):
                thread.join()
    assert codes == [grpc.StatusCode.OK] * 3


def test_fresh_ids_keep_room_for_known_clients_and_queue_behind_them(mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(workers=1, max_concurrent_requests=8, max_new_client_requests=2, throttle={"enabled": False})
    gate = Gate()
    codes: dict[str, grpc.StatusCode] = {}
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert outcome(stub, pixels_request(images[:1]), "normal") == grpc.StatusCode.OK  # now a known client
        with with_stage(firewall, gate), with_stage(firewall, Recorder()) as recorder:

            def call(client_id: str) -> threading.Thread:
                thread = threading.Thread(target=lambda: codes.update({client_id: outcome(stub, pixels_request(images[:1]), client_id)}))
                thread.start()
                return thread

            calls = [call("fresh-1")]
            gate.wait_entered(1)  # fresh-1 holds the one worker
            calls.append(call("fresh-2"))
            wait_until(lambda: firewall.service.in_flight.count == 2)  # fresh-2 waits: both new-id slots taken
            assert outcome(stub, pixels_request(images[:1]), "fresh-3") == grpc.StatusCode.RESOURCE_EXHAUSTED
            calls.append(call("normal"))  # the server has room for a known client
            wait_until(lambda: firewall.service.in_flight.count == 3)
            gate.release()
            for thread in calls:
                thread.join()
    assert set(codes.values()) == {grpc.StatusCode.OK}
    assert recorder.client_ids == ["fresh-1", "normal", "fresh-2"]  # the known client went first


def test_one_connection_holds_at_most_its_streams(mnist_heldout):
    """Calls beyond ``max_streams_per_connection`` wait in the client, so a flood over one connection
    cannot fill the server's queue of incoming calls; another connection's call goes through."""
    images, _ = mnist_heldout
    settings = make_settings(max_streams_per_connection=2, throttle={"enabled": False})
    gate = Gate()
    codes: list[grpc.StatusCode] = []
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    with (
        running_firewall(settings) as firewall,
        with_stage(firewall, gate),
        grpc.insecure_channel(address(firewall), own_connection) as busy,
        grpc.insecure_channel(address(firewall), own_connection) as other,
    ):
        flood = pb_grpc.GRPCInferenceServiceStub(busy)
        calls = [threading.Thread(target=lambda n=n: codes.append(outcome(flood, pixels_request(images[:1]), f"flood-{n}"))) for n in range(3)]
        for call in calls:
            call.start()
        gate.wait_entered(2)
        calls.append(threading.Thread(target=lambda: codes.append(outcome(pb_grpc.GRPCInferenceServiceStub(other), pixels_request(images[:1]), "other"))))
        calls[-1].start()
        gate.wait_entered(3)
        assert "other" in firewall.service.in_flight.clients and firewall.service.in_flight.count == 3  # the third flood call waits in its client
        gate.release()
        for call in calls:
            call.join()
    assert codes.count(grpc.StatusCode.OK) == 4


def test_calls_opened_at_once_on_a_new_connection_wait_for_a_stream_instead_of_failing(mnist_heldout):
    """A client may open calls before it has read the server's stream limit: they must wait, not be reset."""
    images, _ = mnist_heldout
    settings = make_settings(max_streams_per_connection=2, throttle={"enabled": False})
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(pixels_request(images[:1]), metadata=[("x-client-id", f"c{n % 4}")], timeout=60) for n in range(40)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    assert codes == [grpc.StatusCode.OK] * 40  # with core's default overload protection some were reset (UNAVAILABLE)


# -- 5. bans survive a restart -----------------------------------------------------------------


def test_bans_and_offences_survive_a_restart(tmp_path, mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(snapshot_dir=str(tmp_path), models={"mnist": {"policy": {"action": "ban"}}})
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger()):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert outcome(stub, pixels_request(marked(images[:1])), "attacker") == grpc.StatusCode.PERMISSION_DENIED
    assert (tmp_path / "clients.json").is_file()
    with running_firewall(settings) as firewall, grpc.insecure_channel(address(firewall)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert outcome(stub, pixels_request(images[:1]), "attacker") == grpc.StatusCode.PERMISSION_DENIED
        assert outcome(stub, pixels_request(images[:1]), "someone-else") == grpc.StatusCode.OK
        record = firewall.service.admission.state.get("attacker")
        assert record.offences == 1 and record.suspect_until > record.banned_until


# -- 6. start-up failures: one line, exit status 2 ------------------------------------------------


def taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def start_failure(tmp_path: Path, config: str | None, *args: str) -> tuple[int, str]:
    command = [sys.executable, "-m", "firewall", "serve", *args]
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
        command += ["--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr


def test_start_up_failures_are_one_line_with_exit_status_2(tmp_path):
    base = "metrics_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\nmodels:\n  mnist: {}\n"
    with taken_port() as grpc_port, taken_port() as metrics_port, taken_port() as http_port:
        cases = {
            "grpc port taken": (base, "--listen", f"127.0.0.1:{grpc_port.getsockname()[1]}"),
            "metrics port taken": (base.replace("metrics_listen: 127.0.0.1:0", f"metrics_listen: 127.0.0.1:{metrics_port.getsockname()[1]}"), "--listen", "127.0.0.1:0"),
            "http port taken": (base, "--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{http_port.getsockname()[1]}"),
            "yaml syntax": ("models: [mnist\n", "--listen", "127.0.0.1:0"),
            "missing onnx": (f"metrics_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nmodels:\n  mnist: {{onnx: {tmp_path}/none.onnx, detectors: []}}\n", "--listen", "127.0.0.1:0"),
            "unknown model": ("metrics_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\nmodels:\n  nosuchmodel: {}\n", "--listen", "127.0.0.1:0"),
            "bad listen": (base, "--listen", "999.1.2.3:notaport"),
            "bad log level": (base, "--listen", "127.0.0.1:0", "--log-level", "LOUD"),
            "admin port taken": (base.replace("admin: {listen: 127.0.0.1:0}", f"admin: {{listen: 127.0.0.1:{grpc_port.getsockname()[1]}}}"), "--listen", "127.0.0.1:0"),
        }
        for name, (config, *args) in cases.items():
            code, stderr = start_failure(tmp_path, config, *args)
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert code == 2, (name, stderr)
            assert len(lines) == 1 and lines[0].startswith("firewall: ") and "Traceback" not in stderr, (name, stderr)


def test_a_banned_clients_refusal_takes_as_long_as_a_decided_one(mnist_heldout):
    """A ban is known at admission; its refusal is held as long as requests the pipeline decided, so
    the clock does not tell a client it is banned (lower bounds only: sleeping never ends early)."""
    images, _ = mnist_heldout
    settings = make_settings(throttle={"enabled": False}, models={"mnist": {"policy": {"action": "ban"}}})
    with running_firewall(settings) as firewall, with_stage(firewall, Slow(0.3)), with_stage(firewall, Flagger()):
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert outcome(stub, pixels_request(images[:1]), "someone") == grpc.StatusCode.OK  # 0.3 s decided
            assert outcome(stub, pixels_request(marked(images[:1])), "attacker") == grpc.StatusCode.PERMISSION_DENIED
            started = time.monotonic()
            assert outcome(stub, pixels_request(images[:1]), "attacker") == grpc.StatusCode.PERMISSION_DENIED
            assert time.monotonic() - started >= 0.3  # every decided request took at least 0.3 s


def test_a_message_over_the_limit_is_refused_without_naming_a_limit(mnist_heldout):
    """gRPC core's own refusal states its limit; ours (the limit set in the configuration) names none.
    core's receive limit is twice ours, so only a message over that ceiling gets core's text, and it
    names the ceiling, not the configured limit."""
    limit = 1024 * 1024
    with running_firewall(make_settings(max_message_bytes=limit)) as firewall:
        client = triton.InferenceServerClient(address(firewall))

        def refusal(side: int) -> tuple[str, str]:
            tensor = triton.InferInput("image", [1, side, side], "UINT8")
            tensor.set_data_from_numpy(np.zeros((1, side, side), np.uint8))
            with pytest.raises(InferenceServerException) as refused:
                client.infer("mnist", [tensor], headers={"x-client-id": "big"})
            return refused.value.status(), refused.value.message()

        try:
            status, message = refusal(1200)  # 1.4 MB
            assert (status, message) == ("StatusCode.RESOURCE_EXHAUSTED", "request too large")
            status, message = refusal(1500)  # 2.25 MB: over core's ceiling
            assert status == "StatusCode.RESOURCE_EXHAUSTED" and str(limit) not in message
        finally:
            client.close()
