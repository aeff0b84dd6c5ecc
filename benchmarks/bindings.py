"""The two bindings side by side: one `firewall serve` process, called over gRPC and over HTTP.

    python benchmarks/bindings.py [--seconds 5] [--rounds 3] [--callers 1,16]

The firewall runs the bundled MNIST model embedded with pass-through stages (no detectors,
throttling far above the offered load). This process is the load generator: N callers, each with
its own ``x-client-id``, sending one 28x28 UINT8 ``image`` per request back to back, over
(a) gRPC (grpc.aio, one channel), (b) HTTP with the binary tensor extension and (c) HTTP with JSON
tensors (httpx, one connection pool). The three take turns for every caller count and round, so
background load falls on all alike. Prints a Markdown table with the firewall process's CPU time
per request (from /proc, all its threads: it leaves out the load generator, whose HTTP client costs
more than its gRPC one) and each HTTP variant's throughput relative to gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firewall.protocol import pb, pb_grpc  # noqa: E402

IMAGE = np.load(ROOT / "tests" / "fixtures" / "mnist_heldout.npz")["images"][0]
Call = Callable[[int], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_firewall(folder: Path) -> tuple[subprocess.Popen, int, int]:
    grpc_port, http_port = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{grpc_port}",
        "http_listen": f"127.0.0.1:{http_port}",
        "metrics_listen": "127.0.0.1:0",
        "throttle": {"rate": 1e6, "burst": 1_000_000},
        "max_requests_per_client": 64,
        "models": {"mnist": {"detectors": []}},
    }
    (folder / "firewall.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "firewall", "serve", "--config", str(folder / "firewall.yaml"), "--log-level", "WARNING"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status_code == 200:
                return process, grpc_port, http_port
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the firewall did not get ready")


def grpc_call(channel: grpc.aio.Channel) -> Call:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[IMAGE.tobytes()])

    async def call(caller: int) -> None:
        await stub.ModelInfer(request, metadata=(("x-client-id", f"c{caller}"),))

    return call


def http_call(client: httpx.AsyncClient, binary: bool) -> Call:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28]}
    if binary:
        header = json.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": IMAGE.nbytes}}]}).encode()
        body, headers = header + IMAGE.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    else:
        body, headers = json.dumps({"inputs": [tensor | {"data": IMAGE.ravel().tolist()}]}).encode(), {}

    async def call(caller: int) -> None:
        reply = await client.post("/v2/models/mnist/infer", content=body, headers=headers | {"x-client-id": f"c{caller}"})
        reply.raise_for_status()

    return call


async def load(call: Call, callers: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return latencies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def measure(pid: int, grpc_port: int, http_port: int, callers: list[int], seconds: float, rounds: int) -> dict:
    results: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], float] = {}
    limits = httpx.Limits(max_connections=max(callers), max_keepalive_connections=max(callers))
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", limits=limits, timeout=30) as client,
    ):
        calls = {"gRPC": grpc_call(channel), "HTTP binary": http_call(client, True), "HTTP JSON": http_call(client, False)}
        for name, call in calls.items():
            await load(call, 1, 0.5)  # warm up connections
        for count in callers:
            for _ in range(rounds):
                for name, call in calls.items():
                    before = cpu_seconds(pid)
                    results.setdefault((name, count), []).extend(await load(call, count, seconds))
                    cpu[name, count] = cpu.get((name, count), 0.0) + cpu_seconds(pid) - before
    return {
        key: (len(v) / (seconds * rounds), np.percentile(v, 50) * 1e3, np.percentile(v, 99) * 1e3, cpu[key] / len(v) * 1e3)
        for key, v in results.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", default="1,16")
    args = parser.parse_args()
    callers = [int(c) for c in args.callers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        process, grpc_port, http_port = start_firewall(Path(folder))
        try:
            table = asyncio.run(measure(process.pid, grpc_port, http_port, callers, args.seconds, args.rounds))
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    print("| binding | callers | requests/s | p50 ms | p99 ms | firewall CPU ms per request | throughput / gRPC |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, count), (rate, p50, p99, cpu) in table.items():
        print(f"| {name} | {count} | {rate:.0f} | {p50:.2f} | {p99:.2f} | {cpu:.2f} | {rate / table[('gRPC', count)][0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
