"""Hostile-load measurements against a real `firewall serve` process (issue 12). A script, not a test.

    python benchmarks/hostile.py bomb [--root DIR] [--images 16]
    python benchmarks/hostile.py flood [--callers 500] [--seconds 30] [--one-id] [--connections 1]
    python benchmarks/hostile.py flush [--ids 100000] [--tracked 10000]

``bomb``: one request of N all-zero 4096 x 4096 16-bit RGBA PNGs (131 KB each on the wire, 128 MiB
each if decoded), then a normal 28x28 request; prints the status, the time, the server's peak RSS
(VmHWM) and its RSS 2 s later. ``--root`` runs the firewall from another checkout (for a
before/after comparison: ``--root /path/to/main``).

``flood``: a normal client sends one digit every 0.2 s, alone and then while ``--callers`` hostile
callers (a process of their own, grpc.aio, each calling in a loop with a fresh id each, or all one
id with ``--one-id``; over one connection, or spread over ``--connections``) keep the server busy; prints the normal client's success share and p99 beside
its idle p99. Everything runs from 127.0.0.1, so the per-address limits, which would hold the flood
to one address's share, are lifted here: the figure is for hostile callers from many addresses.

``flush``: an attacker probes (one digit plus a little noise, again and again, policy ``ban`` for
an hour) until it is banned; then ``--ids`` fresh ids each send one request, four in five of them
empty ``{model_name: mnist}`` requests that fail validation and the fifth a held-out digit, with
the LRU of ordinary clients at ``--tracked`` (so it turns over ids / tracked / 5 times); prints how
the flood was answered, then whether the attacker is still refused and its offence count (from the
admin endpoint). Address limits (the address's refusal budget too) are lifted as for ``flood``, so
the attacker is refused for its own ban, not its address's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import cv2
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from firewall.protocol import pb, pb_grpc  # noqa: E402
from tests.upstream import free_port  # noqa: E402


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def bytes_request(items: list[bytes]) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(items)])
    tensor.contents.bytes_contents.extend(items)
    return pb.ModelInferRequest(model_name="mnist", inputs=[tensor])


def start(root: Path, **overrides: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "FIREWALL_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "FIREWALL_HTTP_LISTEN": "127.0.0.1:0",
        "FIREWALL_ADMIN__LISTEN": "127.0.0.1:0",
        "FIREWALL_THROTTLE__ENABLED": "false",
        **overrides,
    }
    process = subprocess.Popen([sys.executable, "-m", "firewall", "serve", "--listen", f"127.0.0.1:{port}"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
    return process, address


def bomb(root: Path, images: int) -> None:
    ok, png = cv2.imencode(".png", np.zeros((4096, 4096, 4), np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    process, address = start(root)
    try:
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            before = status_kib(process.pid, "VmRSS")
            started = time.perf_counter()
            try:
                stub.ModelInfer(bytes_request([png.tobytes()] * images), timeout=600)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            elapsed = time.perf_counter() - started
            peak = status_kib(process.pid, "VmHWM")
            small = cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes()
            started = time.perf_counter()
            stub.ModelInfer(bytes_request([small]), timeout=60)
            normal = time.perf_counter() - started
            time.sleep(2)
            after = status_kib(process.pid, "VmRSS")
        print(
            f"root={root} images={images} wire={len(png) * images / 1e6:.1f} MB status={code} time={elapsed:.2f} s "
            f"rss_before={before / 1024:.0f} MiB peak={peak / 1024:.0f} MiB rss_after_2s={after / 1024:.0f} MiB normal_request={normal * 1000:.1f} ms"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


def digit_request() -> pb.ModelInferRequest:
    pixels = np.zeros((1, 28, 28), np.uint8)
    pixels[0, 6:22, 12:16] = 255  # a "1"
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
    return pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[pixels.tobytes()])


def normal_client(address: str, seconds: float) -> tuple[int, list[float]]:
    """Calls every 0.2 s for ``seconds``; returns the calls made and the latencies of those answered."""
    latencies, calls = [], 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.perf_counter()
            calls += 1
            try:
                stub.ModelInfer(digit_request(), metadata=[("x-client-id", "normal")], timeout=5)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                pass
            time.sleep(max(0.0, 0.2 - (time.perf_counter() - started)))
    return calls, latencies


async def hostile_callers(address: str, callers: int, seconds: float, one_id: bool, connections: int) -> None:
    request = digit_request()
    # A subchannel pool of its own per channel: otherwise channels to one target share a connection.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
    until = time.monotonic() + seconds

    async def caller(k: int) -> None:
        sent = 0
        while time.monotonic() < until:
            client = "hostile" if one_id else f"hostile-{k}-{sent}"
            sent += 1
            with contextlib.suppress(grpc.RpcError):
                await stubs[k % connections].ModelInfer(request, metadata=[("x-client-id", client)], timeout=10)

    try:
        await asyncio.gather(*(caller(k) for k in range(callers)))
    finally:
        for channel in channels:
            await channel.close()


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) * 1e3 if samples else float("nan")


def flood(root: Path, callers: int, seconds: float, one_id: bool, connections: int) -> None:
    lifted = {"FIREWALL_THROTTLE__ENABLED": "true", "FIREWALL_MAX_REQUESTS_PER_ADDRESS": "100000",
              "FIREWALL_THROTTLE__ADDRESS_RATE": "1000000", "FIREWALL_THROTTLE__ADDRESS_BURST": "1000000"}  # fmt: skip
    process, address = start(root, **lifted)
    try:
        idle_calls, idle = normal_client(address, 10)
        command = [sys.executable, __file__, "callers", "--address", address, "--callers", str(callers), "--seconds", str(seconds + 4),
                   "--connections", str(connections)]  # fmt: skip
        hostile = subprocess.Popen([*command, *(["--one-id"] if one_id else [])])
        time.sleep(3)  # the flood ramps up
        calls, loaded = normal_client(address, seconds)
        hostile.wait(timeout=seconds + 60)
    finally:
        process.terminate()
        process.wait(timeout=30)
    p50, p99 = partial(percentile_ms, q=50), partial(percentile_ms, q=99)
    print(
        f"callers={callers} connections={connections} one_id={one_id} idle: {len(idle)}/{idle_calls} answered, "
        f"p50 {p50(idle):.1f} ms, p99 {p99(idle):.1f} ms; flooded: {len(loaded)}/{calls} answered ({len(loaded) / max(calls, 1):.0%}), "
        f"p50 {p50(loaded):.1f} ms, p99 {p99(loaded):.1f} ms ({p99(loaded) / p99(idle):.1f} x idle)"
    )


def attack_until_banned(stub, limit: int = 500) -> int:
    """A decision-based attack's queries under one id until refused; returns the queries it took.

    A bisection between two held-out digits of different classes, with a little noise on each
    query: near-duplicates whose answers change at the decision boundary, as HopSkipJump's are.
    """
    heldout = np.load(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mnist_heldout.npz")
    images, labels = heldout["images"], heldout["labels"]
    source, target = images[0].astype(np.float32), images[int(np.argmax(labels != labels[0]))].astype(np.float32)
    noise = np.random.default_rng(0)
    low, high = 0.0, 1.0
    for query in range(1, limit + 1):
        blend = (low + high) / 2
        probe = np.clip((1 - blend) * source + blend * target + noise.normal(0, 2, source.shape), 0, 255).astype(np.uint8)[None]
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(probe.shape))
        request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[probe.tobytes()])
        try:
            response = stub.ModelInfer(request, metadata=[("x-client-id", "attacker")], timeout=30)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                return query
            raise
        label = int(np.frombuffer(response.raw_output_contents[0], np.int64)[0])
        if high - low > 1e-3:  # then stay at the boundary
            low, high = (blend, high) if label == labels[0] else (low, blend)
    raise SystemExit(f"the attacker was not banned within {limit} queries")


async def fresh_ids(address: str, ids: int, concurrency: int = 64) -> dict[str, int]:
    """``ids`` fresh ids, one request each (4 in 5 empty, the fifth a held-out digit); the count of each status."""
    heldout = np.load(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mnist_heldout.npz")["images"]
    empty = pb.ModelInferRequest(model_name="mnist")
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker(first: int) -> None:
            for n in range(first, ids, concurrency):
                if n % 5:
                    request = empty
                else:
                    image = heldout[(n // 5) % len(heldout)][None]
                    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(image.shape))
                    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[image.tobytes()])
                try:
                    await stub.ModelInfer(request, metadata=[("x-client-id", f"fresh-{n}")], timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return codes


def flush(root: Path, ids: int, tracked: int) -> None:
    admin = f"127.0.0.1:{free_port()}"
    overrides = {"FIREWALL_THROTTLE__ENABLED": "true", "FIREWALL_MAX_REQUESTS_PER_ADDRESS": "100000",
                 "FIREWALL_THROTTLE__ADDRESS_RATE": "1000000", "FIREWALL_THROTTLE__ADDRESS_BURST": "1000000",
                 "FIREWALL_THROTTLE__ADDRESS_REFUSALS": "1000000", "FIREWALL_MODELS__MNIST__POLICY__ACTION": "ban", "FIREWALL_MODELS__MNIST__POLICY__BAN__FIRST_S": "3600",
                 "FIREWALL_MAX_TRACKED_CLIENTS": str(tracked), "FIREWALL_ADMIN__LISTEN": admin}  # fmt: skip
    process, address = start(root, **overrides)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            queries = attack_until_banned(stub)
            started = time.perf_counter()
            codes = asyncio.run(fresh_ids(address, ids))
            elapsed = time.perf_counter() - started
            try:
                stub.ModelInfer(digit_request(), metadata=[("x-client-id", "attacker")], timeout=30)
                after = "OK"
            except grpc.RpcError as error:
                after = error.code().name
        shown = subprocess.run(
            [sys.executable, "-m", "firewall", "admin", "--admin", admin, "--json", "show", "attacker"],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        state = json.loads(shown.stdout)["state"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(
        f"root={root} banned after {queries} queries; {ids} fresh ids (tracked {tracked}) in {elapsed:.1f} s "
        f"({ids / elapsed:.0f}/s): {codes}; the attacker afterwards: {after}, "
        f"ban left {state['banned_s']:.0f} s, offences {state['offences']}" if state else "the attacker afterwards: not tracked"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["bomb", "flood", "flush", "callers"], help="callers: the flood's own process")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--images", type=int, default=16, help="bomb: images in the request")
    parser.add_argument("--callers", type=int, default=500, help="flood: hostile callers")
    parser.add_argument("--seconds", type=float, default=30.0, help="flood: how long the flood lasts")
    parser.add_argument("--one-id", action="store_true", help="flood: every hostile call under one client id")
    parser.add_argument("--connections", type=int, default=1, help="flood: connections the hostile callers share")
    parser.add_argument("--ids", type=int, default=100_000, help="flush: fresh ids after the ban")
    parser.add_argument("--tracked", type=int, default=10_000, help="flush: max_tracked_clients (the LRU of ordinary clients)")
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario == "bomb":
        bomb(args.root.resolve(), args.images)
    elif args.scenario == "flood":
        flood(args.root.resolve(), args.callers, args.seconds, args.one_id, args.connections)
    elif args.scenario == "flush":
        flush(args.root.resolve(), args.ids, args.tracked)
    else:
        asyncio.run(hostile_callers(args.address, args.callers, args.seconds, args.one_id, args.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
