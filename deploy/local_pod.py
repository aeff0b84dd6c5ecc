"""Run the classifier pod on one machine: a KServe V2 model server and the firewall in front of it.

It mirrors deploy/k8s: the model server listens on loopback only, the firewall runs in upstream
mode with the pod's own configuration file (deploy/k8s/base/firewall.yaml) and the same kind of
environment overrides, and the script waits for both to be healthy before it reports ready.

    python deploy/local_pod.py     # firewall on 127.0.0.1:8001 -> model server on 127.0.0.1:9001

Ctrl-C or SIGTERM stops both, the firewall first so no client request reaches a stopped model
server; exit status 0 then. If either process dies, the other is stopped and the status is 1.
Run it from the repository root: the model server is the tests' MLServer harness (tests/upstream.py)
with the runtime in deploy/mlserver, so MLServer must be installed (the project's test extra).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from healthcheck import serving

REPO = Path(__file__).resolve().parent.parent
POD_CONFIG = REPO / "deploy" / "k8s" / "base" / "firewall.yaml"
STOP_GRACE_S = 30.0  # the firewall drains for shutdown_grace_s (10 s); MLServer takes several seconds
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]


def _say(message: str) -> None:
    print(f"local-pod: {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if this script dies without stopping it (SIGKILL, a crash)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
    _say(f"starting {name}: {' '.join(argv)}")
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches this script only; it stops the children in order
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    return Child(name, process)


def _stop(child: Child) -> None:
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _say(f"{child.name} ignored SIGTERM for {STOP_GRACE_S:.0f} s; killing it")
            child.process.kill()
            child.process.wait()
    _say(f"{child.name} stopped (exit status {child.process.returncode})")


def model_server_ready(address: str) -> bool:
    """KServe V2 ServerReady without generated stubs: the request is empty, and the reply encodes
    ``bool ready = 1`` as the bytes 08 01 when true."""
    with grpc.insecure_channel(address) as channel:
        server_ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
        try:
            return server_ready(b"", timeout=1.0) == b"\x08\x01"
        except grpc.RpcError:
            return False


def firewall_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        return serving(channel, timeout=1.0)


def _wait_until(ready: Callable[[], bool], child: Child, stop: threading.Event, timeout_s: float) -> str | None:
    """None once ``ready()`` holds; otherwise why waiting ended."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if child.process.poll() is not None:
            return f"{child.name} exited with status {child.process.returncode} before it was ready"
        if stop.is_set():
            return "stopped while starting"
        if time.monotonic() > deadline:
            return f"{child.name} not ready after {timeout_s:.0f} s"
        stop.wait(0.25)
    return None


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="firewall-snapshots-") as snapshot_dir:
        try:
            model_server = _start(
                "model server",
                [sys.executable, "-m", "tests.upstream", "--listen", args.upstream_listen, "--model", "mnist"],
            )
            children.append(model_server)
            failure = _wait_until(
                lambda: model_server_ready(args.upstream_listen), model_server, stop, args.ready_timeout
            )
            if failure:
                _say(failure)
                return 0 if stop.is_set() else 1

            # The pod's ConfigMap, with the pod's ports and paths swapped for local ones through the
            # same environment overrides the Kubernetes manifests use.
            overrides = {
                "FIREWALL_METRICS_LISTEN": args.metrics_listen,
                "FIREWALL_HTTP_LISTEN": args.http_listen,
                "FIREWALL_SNAPSHOT_DIR": snapshot_dir,
                "FIREWALL_ADMIN__LISTEN": f"unix:{snapshot_dir}/admin.sock",  # this run's own socket
                "FIREWALL_MODELS__MNIST__BACKEND__ADDRESS": args.upstream_listen,
            }
            firewall = _start(
                "firewall",
                [sys.executable, "-m", "firewall", "serve", "--config", str(args.config), "--listen", args.listen],
                env={**os.environ, **overrides},
            )
            children.append(firewall)
            failure = _wait_until(lambda: firewall_serving(args.listen), firewall, stop, args.ready_timeout)
            if failure:
                _say(failure)
                return 0 if stop.is_set() else 1

            _say(
                f"ready: firewall {args.listen} (HTTP {args.http_listen}, metrics {args.metrics_listen},"
                f" admin {overrides['FIREWALL_ADMIN__LISTEN']}) -> model server {args.upstream_listen}"
            )
            while not stop.wait(0.5):
                for child in children:
                    if child.process.poll() is not None:
                        _say(f"{child.name} exited with status {child.process.returncode}")
                        return 1
            return 0
        finally:
            for child in reversed(children):  # the firewall first
                _stop(child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8001", help="the firewall's gRPC address")
    parser.add_argument("--http-listen", default="127.0.0.1:8000", help="the firewall's HTTP/JSON address")
    parser.add_argument("--metrics-listen", default="127.0.0.1:9108", help="the firewall's Prometheus address")
    parser.add_argument("--upstream-listen", default="127.0.0.1:9001", help="the model server's gRPC address")
    parser.add_argument("--config", type=Path, default=POD_CONFIG, help="firewall configuration file")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds each process has to get ready")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
