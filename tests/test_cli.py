"""`firewall serve` as a user runs it: a real process, SIGTERM drains it, bad config fails fast."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time

import tritonclient.grpc as triton

from tests.conftest import address, make_settings, running_firewall, uint8_input
from tests.stages import Slow, with_stage
from tests.upstream import free_port


def start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREWALL_")}
    env["FIREWALL_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["FIREWALL_HTTP_LISTEN"] = "127.0.0.1:0"
    env["FIREWALL_ADMIN__LISTEN"] = f"127.0.0.1:{free_port()}"
    return subprocess.Popen(
        [sys.executable, "-m", "firewall", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_live(client: triton.InferenceServerClient, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if client.is_server_ready():
                return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError("firewall did not become ready")


def test_serve_answers_then_drains_on_sigterm(mnist_heldout):
    images, labels = mnist_heldout
    port = free_port()
    process = start("--listen", f"127.0.0.1:{port}")
    answers: queue.Queue = queue.Queue()
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            wait_live(client, process)
            assert client.infer("mnist", [uint8_input(images[:4])]).as_numpy("label").tolist() == labels[:4].tolist()
            for index in range(16):  # one id each: a single id may have only 8 calls in flight
                client.async_infer(
                    "mnist",
                    [uint8_input(images[index : index + 1])],
                    lambda result, error: answers.put((result, error)),
                    headers={"x-client-id": f"drain-{index}"},
                )
            process.send_signal(signal.SIGTERM)
            results = [answers.get(timeout=30) for _ in range(16)]
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    # None hangs and no internal error leaks: calls the server had not started yet are turned away.
    for result, error in results:
        assert error is None or error.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
    log = process.stdout.read()
    assert '"message": "server.stopped"' in log


def test_stop_lets_in_flight_calls_finish(mnist_heldout):
    images, labels = mnist_heldout
    answers: queue.Queue = queue.Queue()
    with running_firewall(make_settings()) as firewall:
        client = triton.InferenceServerClient(address(firewall))
        with with_stage(firewall, Slow(1.0)):
            client.async_infer("mnist", [uint8_input(images[:1])], lambda result, error: answers.put((result, error)))
            time.sleep(0.3)  # the call is inside the slow stage when the stop begins
    try:
        result, error = answers.get(timeout=30)
    finally:
        client.close()
    assert error is None and result.as_numpy("label").tolist() == labels[:1].tolist()


def test_invalid_configuration_fails_at_start_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  mnist:\n    limits: {max_pixels: -1}\n")
    process = start("--config", str(config))
    assert process.wait(timeout=60) == 2
    assert "max_pixels" in process.stderr.read()
