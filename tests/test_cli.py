"""`firewall serve` as a user runs it: a real process, SIGTERM drains it, bad config fails fast."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from models.runtime import bundled_model_path
from tests.conftest import address, make_settings, running_firewall, uint8_input, wait_until
from tests.stages import Gate
from tests.upstream import PROCESS_GROUPS, free_port, mlserver


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """``firewall serve ARGS`` in a process of its own; returns it and its metrics address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREWALL_")}
    metrics = env["FIREWALL_METRICS_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["FIREWALL_HTTP_LISTEN"] = "127.0.0.1:0"
    env["FIREWALL_ADMIN__LISTEN"] = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "firewall", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    return process, metrics


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


def refuses_new_calls(target: str) -> bool:
    """Whether a fresh connection's call fails: the server has begun to stop."""
    with triton.InferenceServerClient(target) as fresh:
        try:
            fresh.is_server_live(client_timeout=5)
        except InferenceServerException:
            return True
    return False


def requests_received(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("firewall_requests_total{"))


def test_serve_answers_then_drains_the_calls_in_flight_on_sigterm(mnist_heldout, tmp_path):
    """Eight calls are held inside the firewall by a stopped (SIGSTOP) upstream MLServer when SIGTERM
    arrives; the upstream resumes only once the server refuses new calls, and every held call must
    still come back with its label."""
    images, labels = mnist_heldout
    port = free_port()
    answers: queue.Queue = queue.Queue()
    with mlserver("mnist", bundled_model_path("mnist")) as upstream:
        backend = {"kind": "upstream", "address": upstream, "model_name": "mnist", "timeout_s": 120, "breaker_failures": 1000}
        config = tmp_path / "firewall.yaml"
        # A long grace period: a loaded machine must not turn a drain into cancelled calls.
        config.write_text(yaml.safe_dump({"shutdown_grace_s": 60, "models": {"mnist": {"detectors": [], "backend": backend}}}))
        process, metrics = start("--config", str(config), "--listen", f"127.0.0.1:{port}")
        try:
            with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
                wait_live(client, process)
                assert client.infer("mnist", [uint8_input(images[:4])]).as_numpy("label").tolist() == labels[:4].tolist()
                os.killpg(PROCESS_GROUPS[upstream], signal.SIGSTOP)
                try:
                    for index in range(8):  # one id each: a single id may have only 8 calls in flight
                        client.async_infer(
                            "mnist",
                            [uint8_input(images[index : index + 1])],
                            lambda result, error: answers.put((result, error)),
                            headers={"x-client-id": f"drain-{index}"},
                        )
                    wait_until(lambda: requests_received(metrics) == 9)  # all eight are inside the firewall
                    process.send_signal(signal.SIGTERM)
                    wait_until(lambda: refuses_new_calls(f"127.0.0.1:{port}"))
                    assert answers.empty()  # still held by the upstream
                finally:
                    os.killpg(PROCESS_GROUPS[upstream], signal.SIGCONT)
                results = [answers.get(timeout=120) for _ in range(8)]
            assert process.wait(timeout=60) == 0
        finally:
            process.kill()
    assert [error for _, error in results] == [None] * 8
    assert sorted(result.as_numpy("label")[0] for result, _ in results) == sorted(labels[:8])
    assert '"message": "server.stopped"' in process.stdout.read()


def test_stop_lets_in_flight_calls_finish(mnist_heldout):
    images, labels = mnist_heldout
    answers: queue.Queue = queue.Queue()
    gate = Gate()
    serving = running_firewall(make_settings(shutdown_grace_s=60))
    firewall = serving.__enter__()
    target = address(firewall)
    firewall.service.pipelines["mnist"].stages.append(gate)
    with triton.InferenceServerClient(target) as client:
        client.async_infer("mnist", [uint8_input(images[:1])], lambda result, error: answers.put((result, error)))
        gate.wait_entered(1)
        stopping = threading.Thread(target=serving.__exit__, args=(None, None, None))
        stopping.start()
        wait_until(lambda: refuses_new_calls(target))  # the stop has begun while the call is held
        gate.release()
        result, error = answers.get(timeout=120)
        stopping.join()
    assert error is None and result.as_numpy("label").tolist() == labels[:1].tolist()


def test_invalid_configuration_fails_at_start_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  mnist:\n    limits: {max_pixels: -1}\n")
    process, _ = start("--config", str(config))
    assert process.wait(timeout=60) == 2
    assert "max_pixels" in process.stderr.read()
