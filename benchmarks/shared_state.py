"""Shared state on Redis: latency it adds per request, throughput of three replicas against one,
and the bytes it takes in Redis per client and per query.

    python benchmarks/shared_state.py [--requests 1000] [--rounds 3] [--seconds 5] [--callers 16]

Every firewall is a ``firewall serve`` process on the bundled MNIST model (embedded), with its
gRPC port from the configuration and its metrics port from FIREWALL_METRICS_LISTEN; Redis is a
real ``redis-server`` on loopback; this process is the load generator.

(a) latency: one caller sends ``--requests`` distinct held-out digits one after the other to a
    memory-state and a Redis-state firewall, taking turns every round, with pass-through stages
    (admission: two Lua scripts; the answer: the label write) and with the calibrated detectors
    (plus the probing evidence counts and the query stream). Throttling is on but far above the load.
(b) throughput: ``--callers`` concurrent callers (one client id each) on one Redis-state replica,
    then spread round-robin over three, for ``--seconds``, calibrated detectors.
(c) sizing: MEMORY USAGE of 1,000 clients' keys (record, banned record, labels, evidence count)
    and of the query stream per entry (what (a) and (b) published).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firewall.config import BanConfig, StateConfig  # noqa: E402
from firewall.protocol import pb, pb_grpc  # noqa: E402
from firewall.redis_state import RedisClientState  # noqa: E402
from firewall.state import Bucket, MemoryClientState  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.upstream import free_port  # noqa: E402

IMAGES = np.load(ROOT / "tests" / "fixtures" / "mnist_heldout.npz")["images"]
UNTHROTTLED = {"rate": 1e9, "burst": 10**9}


def start(workdir: Path, name: str, state: dict, detectors: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = {} if detectors else {"detectors": []}
    config = {"listen": f"127.0.0.1:{port}", "throttle": UNTHROTTLED, "state": state, "models": {"mnist": model}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "FIREWALL_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}
    command = [sys.executable, "-m", "firewall", "serve", "--config", str(path), "--log-level", "ERROR"]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


def wait_ready(address: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not ready")
            time.sleep(0.2)


def message(n: int) -> pb.ModelInferRequest:
    """The n-th request: a held-out digit, one pixel changed after each pass over them (new content)."""
    image = IMAGES[n % len(IMAGES)][None].copy()
    image[0, 0, (n // len(IMAGES)) % 28] ^= 1
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(image.shape))
    return pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[image.tobytes()])


def latencies(address: str, requests: int, offset: int) -> list[float]:
    """One caller, requests back to back; seconds per request."""
    seen = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("x-client-id", "latency"),)
        for n in range(requests):
            started = time.perf_counter()
            stub.ModelInfer(message(offset + n), metadata=metadata, timeout=30)
            seen.append(time.perf_counter() - started)
    return seen


async def throughput(addresses: list[str], callers: int, seconds: float) -> float:
    """Requests per second of ``callers`` concurrent callers, caller n on replica n mod len(addresses)."""
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
    done = [0]

    async def caller(n: int, deadline: float, count: bool) -> None:
        metadata = (("x-client-id", f"caller-{n}"),)
        k = n * 1_000_003  # callers send different digits
        while time.perf_counter() < deadline:
            await stubs[n % len(stubs)].ModelInfer(message(k), metadata=metadata)
            k += 1
            done[0] += count

    await asyncio.gather(*(caller(n, time.perf_counter() + 1.0, False) for n in range(callers)))  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(caller(n, started + seconds, True) for n in range(callers)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return done[0] / elapsed


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


async def sizing(url: str, clients: int = 1000) -> dict[str, float]:
    """Bytes in Redis per client: its record (bucket, and once banned: ban, offences, suspicion),
    its first labels, its and its address's probing evidence counts; per query in the stream."""
    local = MemoryClientState(clients)
    state = RedisClientState(StateConfig(backend="redis", url=url), local, keep_offences_s=86400.0)
    await state.start()
    slow, suspect = Bucket(0.001, 200), Bucket(1.0, 5)  # a slow refill keeps each bucket's record alive
    evidence = state.counts("mnist.probing.clients", 3600.0, clients)
    for n in range(clients):
        key = f"client-{n:06d}"
        await state.admit_client(key, 1, slow, suspect)
        await asyncio.to_thread(state.remember, key, "mnist", 3)
        await asyncio.to_thread(evidence.add, key, 1.0, 0.0)
    store = redis.Redis.from_url(url)
    await asyncio.sleep(0.5)  # the label writes land
    usage = lambda pattern: np.mean([store.memory_usage(key, samples=0) for key in store.scan_iter(pattern, count=1000)])  # noqa: E731
    result = {
        "client record (bucket)": usage(b"firewall:c:client-*"),
        "first labels": usage(b"firewall:l:client-*"),
        "evidence count": usage(b"firewall:e:*client-*"),
    }
    for n in range(clients):
        await asyncio.to_thread(state.ban, f"client-{n:06d}", BanConfig(), 600.0)
    result["client record (banned)"] = usage(b"firewall:c:client-*")
    for key in store.scan_iter(b"firewall:q:*"):
        result[f"query stream entry ({key.decode()}, {store.xlen(key)} entries)"] = store.memory_usage(key, samples=0) / store.xlen(key)
    await state.close()
    store.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=16)
    args = parser.parse_args()

    server = RedisServer()
    server.start()
    shared = {"backend": "redis", "url": server.url}
    processes = []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            servers = {}
            for detectors in (False, True):
                for backend, state in (("memory", {}), ("redis", shared)):
                    process, address = start(Path(workdir), f"{backend}-{detectors}", state, detectors)
                    processes.append(process)
                    servers[(backend, detectors)] = address
            for address in servers.values():
                wait_ready(address)

            print("| stages | state | p50 ms | p99 ms | added p50 ms | added p99 ms |")
            print("| --- | --- | ---: | ---: | ---: | ---: |")
            for detectors in (False, True):
                samples: dict[str, list[float]] = {"memory": [], "redis": []}
                for round_ in range(args.rounds):
                    for backend in samples:
                        samples[backend] += latencies(servers[(backend, detectors)], args.requests, round_ * args.requests)
                memory = percentiles(samples["memory"])
                for backend, seconds in samples.items():
                    p50, p99 = percentiles(seconds)
                    added = f"{p50 - memory[0]:+.3f} | {p99 - memory[1]:+.3f}" if backend == "redis" else "| "
                    stages = "calibrated detectors" if detectors else "pass-through"
                    print(f"| {stages} | {backend} | {p50:.3f} | {p99:.3f} | {added} |")

            # Started only now: each replica indexes every replica's queries, which on a shared
            # machine would have taken CPU from the latency run.
            extra = [start(Path(workdir), f"replica-{n}", shared, True) for n in range(2)]
            processes += [process for process, _ in extra]
            for _, address in extra:
                wait_ready(address)
            one = asyncio.run(throughput([servers[("redis", True)]], args.callers, args.seconds))
            three = asyncio.run(throughput([servers[("redis", True)], *(a for _, a in extra)], args.callers, args.seconds))
            print(f"\nthroughput, {args.callers} callers, calibrated detectors, Redis state: one replica {one:.0f}/s, "
                  f"three replicas {three:.0f}/s (ratio {three / one:.2f}) on {os.cpu_count()} cores")

            print("\nbytes in Redis (MEMORY USAGE, mean over 1,000 clients):")
            for name, value in asyncio.run(sizing(server.url)).items():
                print(f"  {name}: {value:.0f}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
