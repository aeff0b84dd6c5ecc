"""Hostile-load measurements against a real `firewall serve` process (issue 12). A script, not a test.

    python benchmarks/hostile.py bomb [--root DIR] [--images 16]

``bomb``: one request of N all-zero 4096 x 4096 16-bit RGBA PNGs (131 KB each on the wire, 128 MiB
each if decoded), then a normal 28x28 request; prints the status, the time, the server's peak RSS
(VmHWM) and its RSS 2 s later. ``--root`` runs the firewall from another checkout (for a
before/after comparison: ``--root /path/to/main``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
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


def start(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "FIREWALL_METRICS_LISTEN": f"127.0.0.1:{free_port()}", "FIREWALL_HTTP_LISTEN": "127.0.0.1:0", "FIREWALL_THROTTLE__ENABLED": "false"}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["bomb"])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    bomb(args.root.resolve(), args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
