"""GPU: the firewall's model path on onnxruntime-gpu (CUDA execution provider), then the service table.

    python benchmarks/gpu.py [--batches 1,64] [--seconds 5] [--rounds 3] [--callers 1,64]

Needs the onnxruntime-gpu build (as in the GPU image, ``deploy/Dockerfile.gpu``) and a CUDA device;
without them it says so and exits with status 2.

1. The model path at library level, per batch size, CPU beside CUDA, the bundled MNIST model:
   the network once (logits and the features entering its last Dropout), last-layer MC dropout (16
   passes of the head as one batched call) and feature squeezing's two copies; and, for comparison,
   full MC dropout (the network 16 times). On CUDA the detection path uses IO binding: the input is
   copied to the device once, the features stay in device memory and go straight to the head (which
   tiles them itself, ``models.mc_dropout.head_model``), only the logits come back.
2. The same table as ``benchmarks/service.py`` (echo, unprotected model server, firewall with
   defaults, pass-through, bare MLServer, MLServer behind the firewall), run by that script: the
   firewall and the unprotected model server take the CUDA provider themselves
   (``models.runtime.default_providers``); the bare MLServer runtime stays on the CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.runtime import median_ms  # noqa: E402
from detectors.sanitizer import squeeze  # noqa: E402
from models.mc_dropout import McDropoutClassifier, McDropoutHead, repeats  # noqa: E402
from models.runtime import OnnxClassifier, bundled_model_path  # noqa: E402

PASSES = 16
CUDA = "CUDAExecutionProvider"


class BoundPath:
    """The detection path on CUDA with IO binding: features never leave the device."""

    def __init__(self, path: Path):
        self.model = OnnxClassifier(path, providers=[CUDA])
        self.head = McDropoutHead(path, providers=[CUDA])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model, head = self.model, self.head
        trunk = model.session.io_binding()
        trunk.bind_cpu_input(model.input.name, batch)
        trunk.bind_output(model.output_name, "cpu")
        trunk.bind_output(model.features_name, "cuda")
        model.session.run_with_iobinding(trunk)
        logits, features = trunk.get_outputs()
        passes = head.session.io_binding()
        passes.bind_ortvalue_input(head.features_name, features)
        passes.bind_cpu_input(head.repeats_name, repeats(len(features.shape()), PASSES))
        passes.bind_output(head.output_name, "cpu")
        head.session.run_with_iobinding(passes)
        return logits.numpy(), passes.copy_outputs_to_cpu()[0]


def model_path_table(batches: list[int]) -> str:
    path = bundled_model_path("mnist")
    rng = np.random.default_rng(0)
    cpu = ["CPUExecutionProvider"]
    paths = {
        "CPU": (OnnxClassifier(path, providers=cpu), McDropoutHead(path, providers=cpu), McDropoutClassifier(path, providers=cpu)),
        "CUDA": (OnnxClassifier(path, providers=[CUDA]), McDropoutHead(path, providers=[CUDA]), McDropoutClassifier(path, providers=[CUDA])),
    }
    bound = BoundPath(path)
    lines = [
        "| batch | device | network once | + head x16 | + squeeze copies | full MC dropout (network x16) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for size in batches:
        batch = rng.random((size, 1, 28, 28), dtype=np.float32)
        squeezed = np.concatenate([squeeze(batch, 1, None), squeeze(batch, None, 2)])
        for device, (model, head, full) in paths.items():
            once = median_ms(model.forward, batch, repeat=50, warmup=5)
            if device == "CUDA":
                with_head = median_ms(bound, batch, repeat=50, warmup=5)
            else:
                with_head = median_ms(lambda x, m=model, h=head: h.sample_logits(m.forward(x).features, PASSES), batch, repeat=50, warmup=5)
            with_squeeze = with_head + median_ms(model.logits, squeezed, repeat=50, warmup=5)
            all_layers = median_ms(full.sample_logits, batch, PASSES, repeat=20, warmup=5)
            lines.append(
                f"| {size} | {device}{' (IO binding)' if device == 'CUDA' else ''} | {once:.3f} | {with_head:.3f} "
                f"| {with_squeeze:.3f} | {all_layers:.3f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64", help="batch sizes for the model path, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", default="1,64")
    parser.add_argument("--servers", default="all")
    args = parser.parse_args()
    if CUDA not in ort.get_available_providers():
        print(f"benchmarks/gpu.py: no {CUDA} in this onnxruntime build (install onnxruntime-gpu on a CUDA machine)", file=sys.stderr)
        return 2
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}\n")
    print("Model path, median ms per batch:\n")
    print(model_path_table([int(b) for b in args.batches.split(",")]), flush=True)
    print("\nService, the firewall and the unprotected model server on CUDA:", flush=True)
    command = [sys.executable, str(ROOT / "benchmarks" / "service.py"), "--seconds", str(args.seconds),
               "--rounds", str(args.rounds), "--callers", args.callers, "--servers", args.servers]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
