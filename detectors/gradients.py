"""A differentiable PyTorch view of an ONNX image classifier, for white-box evaluation only.

The uncertainty detector is evaluated against gradient attacks (FGSM, PGD, Carlini-Wagner from
ART), which need the model's gradients; the firewall itself only ever runs the ONNX file. This
module interprets the plain feed-forward operators that image classifiers export to (Conv,
BatchNormalization, Gemm, pooling, element-wise arithmetic, ...) with torch functions, reading the
weights from the ONNX initializers, so the attacks target exactly the bundled model. Dropout is
the identity here (inference). It needs torch (the ``train``/``eval`` extras) and is imported only
by tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _pads(attrs: dict[str, Any]) -> tuple[int, ...]:
    pads = attrs.get("pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise NotImplementedError("asymmetric padding")
    return (pads[0], pads[1])


def _conv(x, w, b=None, **a):
    return F.conv2d(
        x,
        w,
        b,
        stride=a.get("strides", [1, 1]),
        padding=_pads(a),
        dilation=a.get("dilations", [1, 1]),
        groups=a.get("group", 1),
    )


def _gemm(a, b, c=None, **attrs):
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


def _batch_norm(x, scale, bias, mean, var, **a):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _max_pool(x, **a):
    return F.max_pool2d(x, a["kernel_shape"], a.get("strides", a["kernel_shape"]), _pads(a))


def _avg_pool(x, **a):
    return F.avg_pool2d(x, a["kernel_shape"], a.get("strides", a["kernel_shape"]), _pads(a))


def _flatten(x, **a):
    axis = a.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": _flatten,
    "Reshape": lambda x, shape, **a: x.reshape(
        [x.shape[i] if s == 0 else s for i, s in enumerate(shape.long().tolist())]
    ),
    "Relu": lambda x: F.relu(x),
    "Sigmoid": torch.sigmoid,
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, **a: x,
    "MatMul": torch.matmul,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
}


class OnnxTorchModule(torch.nn.Module):
    """Runs an ONNX classifier graph with torch ops: float32 [N, C, H, W] in, logits out."""

    def __init__(self, path: str | Path):
        super().__init__()
        proto = onnx.load(str(path))
        self.graph = proto.graph
        self.constants = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in self.graph.initializer
        }
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = torch.from_numpy(
                    numpy_helper.to_array(_attributes(node)["value"]).copy()
                )
            elif node.op_type not in OPS:
                raise NotImplementedError(f"ONNX operator {node.op_type} is not interpreted")
        self.input_name = next(i.name for i in self.graph.input if i.name not in self.constants)
        self.output_name = self.graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = dict(self.constants)
        values[self.input_name] = x.float()  # ART's black-box attacks start from float64 noise
        for node in self.graph.node:
            if node.op_type == "Constant":
                continue
            inputs = [values[name] if name else None for name in node.input]
            while inputs and inputs[-1] is None:
                inputs.pop()
            values[node.output[0]] = OPS[node.op_type](*inputs, **_attributes(node))
        return values[self.output_name]


def art_classifier(path: str | Path, input_shape: tuple[int, int, int], classes: int):
    """An ART PyTorchClassifier over the ONNX model, pixels in [0, 1]."""
    from art.estimators.classification import PyTorchClassifier

    module = OnnxTorchModule(path).eval()
    return PyTorchClassifier(
        module, loss=torch.nn.CrossEntropyLoss(), input_shape=input_shape, nb_classes=classes, clip_values=(0.0, 1.0)
    )
