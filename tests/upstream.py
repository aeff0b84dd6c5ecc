"""Start a real MLServer (KServe-v2 gRPC and REST) on loopback serving an ONNX model: the upstream under test.

    python -m tests.upstream --listen 127.0.0.1:9001 --model mnist [--onnx PATH]

runs it in the foreground until interrupted (used by deploy/local_pod.py as well as the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc

from firewall.protocol import pb, pb_grpc
from models.runtime import bundled_model_path

RUNTIME = Path(__file__).resolve().parent.parent / "deploy" / "mlserver" / "onnx_runtime.py"
PROCESS_GROUPS: dict[str, int] = {}  # address -> process group of the running MLServer (to stop or kill it in tests)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_model_ready(address: str, model: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"upstream model {model!r} not ready at {address} after {timeout_s}s")


@contextmanager
def mlserver(
    model: str,
    onnx: Path,
    host: str = "127.0.0.1",
    grpc_port: int | None = None,
    http_port: int | None = None,
    others: dict[str, Path] | None = None,
) -> Iterator[str]:
    """Run MLServer with ``onnx`` under the name ``model`` (and each of ``others`` under its name);
    yields its gRPC address (REST: on ``http_port``)."""
    grpc_port = grpc_port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="mlserver-"))
    models = {model: onnx, **(others or {})}
    try:
        for name, path in models.items():
            model_dir = workdir / name
            model_dir.mkdir()
            shutil.copy(RUNTIME, model_dir / RUNTIME.name)
            model_settings = {"name": name, "implementation": "onnx_runtime.OnnxRuntime", "parameters": {"uri": str(path)}}
            (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
        settings = {
            "host": host,
            "http_port": http_port or free_port(),
            "grpc_port": grpc_port,
            "metrics_endpoint": None,
            "parallel_workers": 0,
            "debug": False,
        }
        (workdir / "settings.json").write_text(json.dumps(settings))
        env = {**os.environ, "PYTHONPATH": str(workdir / model)}  # the runtime module (the same file in every model folder)
        process = subprocess.Popen(
            [sys.executable, "-m", "mlserver.cli.main", "start", str(workdir)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        address = f"{host}:{grpc_port}"
        PROCESS_GROUPS[address] = process.pid
        try:
            for name in models:
                wait_model_ready(address, name)
            yield address
        finally:
            PROCESS_GROUPS.pop(address, None)
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9001")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--onnx", type=Path)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with mlserver(args.model, args.onnx or bundled_model_path(args.model), host, int(port)) as address:
        print(f"upstream ready at {address}", flush=True)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
