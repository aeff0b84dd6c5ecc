"""What protection costs: the firewall side by side with the bare model servers, same run, same machine.

    python benchmarks/service.py [--seconds 5] [--rounds 3] [--callers 1,64] [--servers all] [--mnist DIR]

Servers, each in its own process:

- ``echo``: a grpc.aio server whose ModelInfer answers a fixed ``label`` without looking (the floor).
- ``model``: the unprotected model server: grpc.aio and ONNX Runtime (same build, execution
  provider and thread settings as the firewall's), the bundled MNIST model, the ``image`` UINT8 tensor scaled to
  [0, 1], the top label back.
- ``firewall``: ``firewall serve`` with its defaults (sanitizer, probing, uncertainty, squeeze).
- ``passthrough``: ``firewall serve`` with the sanitizer only (no detectors).
- ``mlserver``: bare MLServer (``tests/upstream.py``) running the same model with ONNX Runtime.
- ``firewall+mlserver``: ``firewall serve`` with its defaults in front of that MLServer (upstream).
- ``firewall-inline`` (only when named in ``--servers``): the defaults, but uncertainty and squeeze
  set to ``decoy`` instead of ``monitor``, so they run before the answer as they used to (the
  answers differ only for a client over their CUSUM, which this traffic never is).

Throttling stays on but with rates far above the offered load, and the per-address in-flight share
is raised to the caller count (every caller here comes from 127.0.0.1). This process is the load
generator: N callers on one grpc.aio channel, each with its own ``x-client-id``, back to back.
Every request carries an MNIST digit with one or two low bits flipped (request n: digit n mod the
number of digits: the 1,000 of ``tests/fixtures``, or the 10,000 of ``--mnist DIR``), so no two
requests are byte-identical (probing searches every query); once the digits run out the content
repeats, and the per-image detectors score only new content (``detectors.forward.novel_items``). The MLServer rows send the model-ready FP32 [1, 1, 28, 28] tensor
(MLServer does not take the firewall's ``image``). The servers take turns for every caller count
and round (the order alternates), so background load on a shared machine falls on all alike.
Prints a Markdown table (requests/s, p50, p99, server CPU per request) and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firewall.protocol import pb, pb_grpc  # noqa: E402
from models.data import load_mnist  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path, default_providers, session_options  # noqa: E402

MODEL = "mnist"
FIXTURE = ROOT / "tests" / "fixtures" / "mnist_heldout.npz"
SERVERS = ("echo", "model", "firewall", "passthrough", "mlserver", "firewall+mlserver")
EXTRA = ("firewall-inline",)  # on request (--servers): what running the monitors after the answer saves
FIREWALLS = ("firewall", "passthrough", "firewall+mlserver", "firewall-inline")
RATIOS = (  # (protected, bare): the goal is at least 0.8x
    ("firewall", "model"),
    ("passthrough", "model"),
    ("model", "echo"),
    ("firewall+mlserver", "mlserver"),
    ("firewall-inline", "model"),
)


def label_response(labels: np.ndarray) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=MODEL,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[len(labels)])],
        raw_output_contents=[labels.astype("<i8").tobytes()],
    )


class EchoService(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every ModelInfer with the same one-label response."""

    response = label_response(np.array([7]))

    async def ModelInfer(self, request, context):
        return self.response

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)


class ModelService(EchoService):
    """The unprotected model server: UINT8 [B, 28, 28, 1] pixels in, the top label out."""

    def __init__(self):
        import onnxruntime as ort

        path = bundled_model_path(MODEL)
        self.input = OnnxClassifier(path).input
        self.session = ort.InferenceSession(str(path), session_options(1), providers=default_providers())

    async def ModelInfer(self, request, context):
        shape = tuple(request.inputs[0].shape)
        pixels = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(shape)
        batch = (pixels.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        logits = self.session.run(None, {self.input.name: batch})[0]
        return label_response(logits.argmax(axis=1))


async def serve(kind: str, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoService() if kind == "echo" else ModelService(), server)
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


def firewall_config(port: int, metrics_port: int, callers: int, name: str, upstream: str | None) -> dict:
    model: dict = {"detectors": []} if name == "passthrough" else {}  # {}: the bundled model's calibrated detectors
    if name == "firewall-inline":
        model["policy"] = {"rules": {"uncertainty": "decoy", "squeeze": "decoy", "probing.address": "monitor"}}
    if upstream is not None:
        model["backend"] = {"kind": "upstream", "address": upstream, "model_name": MODEL}
    return {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": f"127.0.0.1:{metrics_port}",
        "http_listen": "127.0.0.1:0",
        "models": {MODEL: model},
        "throttle": {"rate": 1e9, "burst": 10**9},  # token buckets on, but never the bottleneck
        "max_concurrent_requests": max(64, callers),
        "max_requests_per_address": max(48, callers),  # every caller is 127.0.0.1
    }


@dataclass
class Server:
    address: str
    pid: int
    process: subprocess.Popen | None = None
    metrics_port: int | None = None

    def deferred_dropped(self) -> float | None:
        """The firewall's count of monitoring dropped because its queue was full (None: not a firewall)."""
        if self.metrics_port is None:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
        counts = [float(line.split()[-1]) for line in lines if line.startswith("firewall_deferred_dropped_total")]
        return sum(counts) if counts else None  # no monitors, no queue


def start_firewall(workdir: Path, name: str, callers: int, upstream: str | None) -> Server:
    port, metrics_port = free_port(), free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(firewall_config(port, metrics_port, callers, name, upstream)))
    command = [sys.executable, "-m", "firewall", "serve", "--config", str(config), "--log-level", "WARNING"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    return Server(f"127.0.0.1:{port}", process.pid, process, metrics_port)


def start_plain(kind: str) -> Server:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)], cwd=ROOT)
    return Server(f"127.0.0.1:{port}", process.pid, process)


def wait_ready(address: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not ready after {timeout_s}s")


class Requests:
    """Request n: digit n mod N with low bits of two pixels flipped (never byte-identical)."""

    def __init__(self, model_ready: bool, mnist: Path | None):
        self.images = load_mnist(mnist)[0] if mnist else np.load(FIXTURE)["images"]  # uint8 [N, 28, 28]
        self.model_ready = model_ready
        self.count = 0

    def next(self) -> pb.ModelInferRequest:
        n, self.count = self.count, self.count + 1
        image = self.images[n % len(self.images)].copy()
        variant = n // len(self.images)
        image.flat[variant % image.size] ^= 1
        image.flat[(variant // image.size + 7) % image.size] ^= 2
        if self.model_ready:
            tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 28, 28])
            return pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[tensor],
                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")],
                raw_input_contents=[(image.astype("<f4") / 255.0).tobytes()],
            )
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
        return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[image.tobytes()])


@dataclass
class Sample:
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    server_cpu_s: float = 0.0  # CPU time the server process spent meanwhile, all its threads

    def add(self, other: Sample) -> None:
        self.latencies_s += other.latencies_s
        self.elapsed_s += other.elapsed_s
        self.server_cpu_s += other.server_cpu_s

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies_s) * 1000.0, q))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(server: Server, requests: Requests, callers: int, seconds: float) -> Sample:
    """The calls completed in ``seconds`` after a short warm-up."""
    sample = Sample()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def caller(n: int, deadline: float) -> None:
            metadata = (("x-client-id", f"bench-{n}"),)
            while time.perf_counter() < deadline:
                request = requests.next()
                started = time.perf_counter()
                await stub.ModelInfer(request, metadata=metadata)
                sample.latencies_s.append(time.perf_counter() - started)

        await asyncio.gather(*(caller(n, time.perf_counter() + 0.5) for n in range(callers)))  # warm-up
        sample.latencies_s.clear()
        cpu, started = cpu_seconds(server.pid), time.perf_counter()
        await asyncio.gather(*(caller(n, started + seconds) for n in range(callers)))
        sample.elapsed_s = time.perf_counter() - started
        sample.server_cpu_s = cpu_seconds(server.pid) - cpu
    return sample


def measure(
    servers: dict[str, Server], callers_levels: list[int], seconds: float, rounds: int, mnist: Path | None
) -> dict:
    """Returns (name, callers) -> Sample."""
    requests = {name: Requests(name == "mlserver", mnist) for name in servers}
    results = {(name, callers): Sample() for name in servers for callers in callers_levels}
    steps = rounds * len(callers_levels) * len(servers)
    with tqdm(total=steps, unit="run", disable=None, file=sys.stderr) as progress:  # quiet off a terminal
        for round_index in range(rounds):
            for callers in callers_levels:
                order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                for name in order:
                    sample = asyncio.run(load(servers[name], requests[name], callers, seconds))
                    results[(name, callers)].add(sample)
                    progress.set_postfix_str(f"round {round_index + 1}, {callers} callers, {name}: {sample.rate:.0f} req/s")
                    progress.update()
    return results


def table(results: dict[tuple[str, int], Sample], names: list[str], callers_levels: list[int]) -> str:
    lines = [
        "| server | callers | requests/s | p50 ms | p99 ms | server CPU ms per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for callers in callers_levels:
        for name in names:
            sample = results[(name, callers)]
            cpu_ms = 1000.0 * sample.server_cpu_s / len(sample.latencies_s)
            lines.append(
                f"| {name} | {callers} | {sample.rate:,.0f} | {sample.percentile_ms(50):.2f} "
                f"| {sample.percentile_ms(99):.2f} | {cpu_ms:.2f} |"
            )
    lines += ["", "| ratio | " + " | ".join(f"{c} caller{'s' if c > 1 else ''}" for c in callers_levels) + " |"]
    lines.append("| --- |" + " ---: |" * len(callers_levels))
    for protected, bare in RATIOS:
        if protected in names and bare in names:
            ratios = [results[(protected, c)].rate / results[(bare, c)].rate for c in callers_levels]
            lines.append(f"| {protected} / {bare} throughput | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    for protected, bare in RATIOS:
        if bare == "model" and protected in names and bare in names and 1 in callers_levels:
            added = results[(protected, 1)].percentile_ms(99) - results[(bare, 1)].percentile_ms(99)
            lines.append(f"\n{protected}: p99 at 1 caller {added:+.2f} ms against {bare}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per server, caller count and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", default="1,64", help="comma-separated concurrent callers")
    parser.add_argument("--servers", default="all", help=f"comma-separated, of {','.join(SERVERS + EXTRA)}")
    parser.add_argument("--mnist", type=Path, help="MNIST folder (t10k files): 10,000 digits instead of 1,000")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)  # a server process
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], int(args.serve[1])))
        return 0
    callers_levels = [int(part) for part in args.callers.split(",")]
    names = list(SERVERS) if args.servers == "all" else args.servers.split(",")
    most = max(callers_levels)
    with tempfile.TemporaryDirectory(prefix="bench-service-") as workdir, contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        if "mlserver" in names or "firewall+mlserver" in names:
            from tests.upstream import PROCESS_GROUPS, mlserver

            upstream = stack.enter_context(mlserver(MODEL, bundled_model_path(MODEL)))
            if "mlserver" in names:
                servers["mlserver"] = Server(upstream, PROCESS_GROUPS[upstream])
        for name in names:
            if name in ("echo", "model"):
                servers[name] = start_plain(name)
            elif name in FIREWALLS:
                remote = upstream if name == "firewall+mlserver" else None
                servers[name] = start_firewall(Path(workdir), name, most, remote)
        try:
            for server in servers.values():
                wait_ready(server.address)
            chosen = {name: servers[name] for name in names}
            results = measure(chosen, callers_levels, args.seconds, args.rounds, args.mnist)
            dropped = {name: server.deferred_dropped() for name, server in chosen.items()}
        finally:
            for server in servers.values():
                if server.process is not None:
                    server.process.send_signal(signal.SIGTERM)
            for server in servers.values():
                if server.process is not None:
                    server.process.wait(timeout=60)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
    digits = "10,000 MNIST digits" if args.mnist else "1,000 held-out digits"
    print(f"\n{machine}; {args.rounds} interleaved rounds of {args.seconds:g} s per server and caller count; {digits}\n")
    print(table(results, names, callers_levels))
    answered = {name: sum(len(results[(name, c)].latencies_s) for c in callers_levels) for name in names}
    for name, count in dropped.items():
        if count is not None:
            print(f"{name}: after-answer monitoring dropped (queue full) for {count:.0f} requests ({answered[name]:,} measured, warm-ups besides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
