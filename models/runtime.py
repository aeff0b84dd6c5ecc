"""Loading an ONNX image classifier and running it with ONNX Runtime.

One small wrapper shared by the embedded backend and by the detectors that need the model's own
outputs. It reads the input spec (name, channels, height, width) from the graph so the firewall can
bring any client input to it, and it never imports torch.

Work once: ``forward`` returns the logits together with the *features*, the tensor that enters the
model's last Dropout node (an extra graph output; ONNX Runtime removes Dropout at inference), so
the answer, the probing label, feature squeezing and last-layer MC dropout (``models.mc_dropout``)
all come from one run of the network. Concurrent callers share ONNX Runtime calls
(``models.batching``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import yaml

from models.batching import MicroBatcher

# Images of concurrent requests per shared call. Measured (benchmarks/runtime.py, 2 CPU cores): the
# bundled MNIST CNN costs 0.29 ms per image alone, 0.25 in batches of 2-8, and more again from 16.
MAX_ROWS = 8


def bundled_model_path(name: str) -> Path:
    """Path of ``models/<name>/model.onnx``, from a checkout or an installed package alike."""
    return Path(str(resources.files("models").joinpath(name, "model.onnx")))


def bundled_calibration(name: str) -> dict:
    """The sanitizer and detector settings calibrated for a bundled model (``thresholds.yaml``), or {}."""
    return _read_calibration(Path(str(resources.files("models").joinpath(name, "thresholds.yaml"))))


def calibration_beside(onnx_path: Path) -> dict:
    """The settings calibrated for the model file ``X.onnx`` (``X.thresholds.yaml`` beside it), or {}."""
    return _read_calibration(onnx_path.with_name(f"{onnx_path.stem}.thresholds.yaml"))


def _read_calibration(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def session_options(threads: int = 1) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def default_providers() -> list[str]:
    """CUDA first when the onnxruntime-gpu build is installed; the CPU always as fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass(frozen=True)
class InputSpec:
    name: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Forward:
    """One run of the network on a batch: logits [B, K], and the last Dropout's input [B, ...] (None without one)."""

    logits: np.ndarray
    features: np.ndarray | None

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1).astype(np.int64)


def last_dropout_input(model: onnx.ModelProto) -> str | None:
    """The tensor entering the model's last Dropout node (graphs are topologically sorted), or None."""
    dropouts = [node for node in model.graph.node if node.op_type == "Dropout" and node.domain in ("", "ai.onnx")]
    return dropouts[-1].input[0] if dropouts else None


def input_spec(model: onnx.ModelProto) -> InputSpec:
    initializers = {init.name for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d <= 0 for d in dims[1:]):
        raise ValueError(f"model input {graph_input.name!r} must be [N, C, H, W] with fixed C, H, W; got {dims}")
    return InputSpec(graph_input.name, dims[1], dims[2], dims[3])


class OnnxClassifier:
    """An image classifier in ONNX: float32 [N, C, H, W] in [0, 1] in, logits [N, K] out."""

    def __init__(self, path: str | Path, *, threads: int = 1, providers: list[str] | None = None, max_rows: int = MAX_ROWS):
        self.path = Path(path)
        proto = onnx.load(str(self.path))
        self.input = input_spec(proto)
        self.output_name = proto.graph.output[0].name
        self.features_name = last_dropout_input(proto)
        if self.features_name is not None:
            proto.graph.output.append(onnx.ValueInfoProto(name=self.features_name))
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(threads), providers=providers or default_providers()
        )
        self._outputs = [self.output_name] + ([self.features_name] if self.features_name else [])
        self._batcher = MicroBatcher(self._run, max_rows)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input.channels, self.input.height, self.input.width)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(self._outputs, {self.input.name: batch}))

    def forward(self, batch: np.ndarray) -> Forward:
        outputs = self._batcher(batch.astype(np.float32, copy=False))
        return Forward(outputs[0], outputs[1] if len(outputs) > 1 else None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(batch).logits

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(batch).labels


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
