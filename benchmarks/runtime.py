"""Thread settings and batch sizes, measured: ONNX Runtime intra-op threads, FAISS threads, per-image cost by batch.

    python benchmarks/runtime.py [--repeat 200]

The bundled MNIST model's forward pass (the network once, logits and features) per batch size and
intra-op thread count, in ms per call and per image (what cross-request micro-batching can save),
and one probing search (16 nearest among 100,000 64-d vectors, IVF 1,024 lists, 8 probed) per FAISS
thread count. Median of ``repeat`` calls after a warm-up, in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detectors.history import QueryHistory  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path  # noqa: E402


def median_ms(function, *args, repeat: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        function(*args)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function(*args)
        samples.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| ONNX Runtime threads | batch | ms per call | ms per image |\n| ---: | ---: | ---: | ---: |")
    for threads in (1, 2):
        model = OnnxClassifier(bundled_model_path("mnist"), threads=threads)
        for batch in (1, 2, 4, 8, 16, 64):
            x = rng.random((batch, 1, 28, 28), dtype=np.float32)
            ms = median_ms(model.forward, x, repeat=max(10, args.repeat // batch))
            print(f"| {threads} | {batch} | {ms:.3f} | {ms / batch:.3f} |")
    history = QueryHistory(64, 100_000, 1024, 8)
    vectors = rng.standard_normal((100_000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for n, vector in enumerate(vectors):
        history.add(vector, n, 0, 0, False, 0.0)
    print("\n| FAISS threads | one probing search, ms |\n| ---: | ---: |")
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        ms = median_ms(lambda: history.near(vectors[rng.integers(len(vectors))], 0.2, 16), repeat=args.repeat)
        print(f"| {threads} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
