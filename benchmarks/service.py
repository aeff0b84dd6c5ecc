"""Service overhead: the firewall against a bare gRPC echo server, same payload, same run.

    python benchmarks/service.py [--seconds 5] [--rounds 3] [--callers 1,64]

(a) echo: a grpc.aio server whose ModelInfer answers a fixed ``label`` tensor without any work.
(b) firewall: ``firewall serve`` on the bundled MNIST model, embedded, with pass-through stages
    (no detectors; throttling set far above the offered load so it never refuses).
Each server runs in its own process; this process is the load generator: N callers on one
grpc.aio channel, each with its own ``x-client-id``, sending one 28x28 UINT8 ``image`` per
request back to back. The two servers take turns for every caller count and round, so background
load on a shared machine falls on both alike. Prints a Markdown table, with the server process's
CPU time per request (read from /proc, all its threads: steadier than throughput on a shared
machine), and the throughput ratio (b)/(a) per caller count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firewall.protocol import pb, pb_grpc  # noqa: E402

MODEL = "mnist"
FIXTURE = ROOT / "tests" / "fixtures" / "mnist_heldout.npz"


class EchoService(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every ModelInfer with the same one-label response."""

    def __init__(self):
        self.response = pb.ModelInferResponse(
            model_name=MODEL,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])],
            raw_output_contents=[np.array([7], dtype="<i8").tobytes()],
        )

    async def ModelInfer(self, request, context):
        return self.response

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)


async def serve_echo(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoService(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def firewall_config(port: int) -> dict:
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "models": {MODEL: {"detectors": []}},  # pass-through: the sanitizer only
        "throttle": {"rate": 1e9, "burst": 10**9},  # token buckets on, but never the bottleneck
    }
    return config


def start_servers(workdir: Path) -> dict[str, tuple[subprocess.Popen, str]]:
    echo_port, firewall_port = free_port(), free_port()
    config = workdir / "firewall.yaml"
    config.write_text(yaml.safe_dump(firewall_config(firewall_port)))
    commands = {
        "echo": [sys.executable, __file__, "--serve-echo", str(echo_port)],
        "firewall": [sys.executable, "-m", "firewall", "serve", "--config", str(config), "--log-level", "WARNING"],
    }
    addresses = {"echo": f"127.0.0.1:{echo_port}", "firewall": f"127.0.0.1:{firewall_port}"}
    return {
        name: (subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL), addresses[name])
        for name, command in commands.items()
    }


def wait_ready(address: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"{address} not ready after {timeout_s}s")


def payload() -> pb.ModelInferRequest:
    image = np.load(FIXTURE)["images"][:1, :, :, None]  # uint8 [1, 28, 28, 1]
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=image.shape)],
        raw_input_contents=[image.tobytes()],
    )


@dataclass
class Sample:
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    server_cpu_s: float = 0.0  # CPU time the server process spent meanwhile, all its threads

    def add(self, other: "Sample") -> None:
        self.latencies_s += other.latencies_s
        self.elapsed_s += other.elapsed_s
        self.server_cpu_s += other.server_cpu_s

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(address: str, request: pb.ModelInferRequest, callers: int, seconds: float, server_pid: int) -> Sample:
    """The calls completed in ``seconds`` after a short warm-up."""
    sample = Sample()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def caller(n: int, deadline: float) -> None:
            metadata = (("x-client-id", f"bench-{n}"),)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await stub.ModelInfer(request, metadata=metadata)
                sample.latencies_s.append(time.perf_counter() - started)

        await asyncio.gather(*(caller(n, time.perf_counter() + 0.5) for n in range(callers)))  # warm-up
        sample.latencies_s.clear()
        cpu, started = cpu_seconds(server_pid), time.perf_counter()
        await asyncio.gather(*(caller(n, started + seconds) for n in range(callers)))
        sample.elapsed_s = time.perf_counter() - started
        sample.server_cpu_s = cpu_seconds(server_pid) - cpu
    return sample


def measure(servers: dict[str, tuple[str, int]], callers_levels: list[int], seconds: float, rounds: int) -> dict:
    """``servers``: name -> (address, pid). Returns (name, callers) -> Sample."""
    request = payload()
    results = {(name, callers): Sample() for name in servers for callers in callers_levels}
    for round_index in range(rounds):
        for callers in callers_levels:
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                address, pid = servers[name]
                sample = asyncio.run(load(address, request, callers, seconds, pid))
                results[(name, callers)].add(sample)
                print(f"  round {round_index + 1}, {callers} callers, {name}: {sample.rate:.0f} req/s", file=sys.stderr)
    return results


def table(results: dict[tuple[str, int], Sample], callers_levels: list[int]) -> str:
    lines = [
        "| server | callers | requests/s | p50 ms | p99 ms | server CPU ms per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for callers in callers_levels:
        for name in ("echo", "firewall"):
            sample = results[(name, callers)]
            p50, p99 = np.percentile(np.array(sample.latencies_s) * 1000.0, [50, 99])
            cpu_ms = 1000.0 * sample.server_cpu_s / len(sample.latencies_s)
            lines.append(f"| {name} | {callers} | {sample.rate:.0f} | {p50:.2f} | {p99:.2f} | {cpu_ms:.2f} |")
    lines += ["", "| callers | firewall / echo throughput |", "| ---: | ---: |"]
    for callers in callers_levels:
        ratio = results[("firewall", callers)].rate / results[("echo", callers)].rate
        lines.append(f"| {callers} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per server, caller count and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", default="1,64", help="comma-separated concurrent callers")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the echo server process
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(serve_echo(args.serve_echo))
        return 0
    callers_levels = [int(part) for part in args.callers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as workdir:
        servers = start_servers(Path(workdir))
        try:
            for _, address in servers.values():
                wait_ready(address)
            addresses = {name: (address, process.pid) for name, (process, address) in servers.items()}
            results = measure(addresses, callers_levels, args.seconds, args.rounds)
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
            for process, _ in servers.values():
                process.wait(timeout=30)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    print(f"\n{machine}; {args.rounds} interleaved rounds of {args.seconds:g} s per server and caller count\n")
    print(table(results, callers_levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
