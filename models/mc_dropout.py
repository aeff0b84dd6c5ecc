"""Make an ONNX model's Dropout active at inference, for Monte-Carlo dropout.

Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
Learning", ICML 2016: keeping dropout on at test time and running T stochastic passes samples an
approximate posterior predictive; the spread of the T outputs measures the model's uncertainty.

Why a rewrite: ONNX Runtime's graph optimizer (pass ``EliminateDropout``, on at the default level)
deletes every Dropout node, even one whose ``training_mode`` input is true, so an exported model gives
identical outputs run after run. Each Dropout node is therefore replaced by explicit mask ops, which
no optimizer folds because random ops are never constant:

    keep = Less(RandomUniformLike(X), 1 - p)        # each element kept with probability 1 - p
    Y    = X * (Cast(keep) * 1 / (1 - p))           # inverted dropout: E[Y] = X

Every element of every batch row draws its own mask, so N copies of one input in one batched run are
N independent passes. p is each node's own ratio unless ``ratio`` overrides it; p = 0 turns a node
into Identity, giving the deterministic model. The node's ``training_mode`` input is ignored: the
rewritten dropout is always on. Only the main graph is rewritten (not If/Loop bodies).

Two ways to sample, one per ``dropout`` setting of the uncertainty detector:

- ``McDropoutClassifier`` (all): every Dropout on, the whole network run T times, as in Gal &
  Ghahramani and Feinman et al. (2017).
- ``McDropoutHead`` (last, the default): only the model's last Dropout on. The network runs once
  (``OnnxClassifier.forward`` also returns the last Dropout's input, the *features*) and only the
  *head*, the subgraph from the features to the logits, runs T times, on the features tiled. The
  earlier layers are deterministic, as in last-layer Bayesian approximations (Snoek et al.,
  "Scalable Bayesian Optimization Using Deep Neural Networks", ICML 2015; Riquelme, Tucker & Snoek,
  "Deep Bayesian Bandits Showdown", ICLR 2018), so the scores differ from full MC dropout and the
  threshold is calibrated for this mode. For the bundled models the head is one Dropout and one
  Gemm: 16 passes cost a small fraction of one network run. A model whose logits depend on more
  than the last Dropout's input (a skip connection around it) cannot be split (``NoSplitError``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from models.runtime import InputSpec, default_providers, input_spec, last_dropout_input, session_options

DEFAULT_RATIO = 0.5  # the ONNX default when a Dropout node gives no ratio
REWRITE_MARKER = "mc_dropout.rewritten_nodes"  # metadata key set on rewritten models


class NoDropoutError(ValueError):
    """The model has no Dropout node to turn into Monte-Carlo dropout."""


def _is_dropout(node: onnx.NodeProto) -> bool:
    return node.op_type == "Dropout" and node.domain in ("", "ai.onnx")


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values known before running: initializers and the outputs of Constant nodes."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _node_ratio(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> float:
    for attr in node.attribute:  # opset 7-11 keep the ratio as an attribute
        if attr.name == "ratio":
            return float(attr.f)
    if len(node.input) > 1 and node.input[1]:  # opset 12+: an optional input
        if node.input[1] not in constants:
            raise ValueError(f"Dropout node {node.name!r} takes its ratio from a runtime input; pass ratio=")
        return float(constants[node.input[1]])
    return DEFAULT_RATIO


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


class _Names:
    """Fresh tensor and node names that cannot clash with any already in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
        self.used |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _mask_nodes(
    node: onnx.NodeProto, p: float, elem_type: int, names: _Names, graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """The explicit ops that replace one Dropout node with dropout probability ``p``."""
    x, y = node.input[0], node.output[0]
    mask_out = node.output[1] if len(node.output) > 1 and node.output[1] else None
    base = node.name or y
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    if p == 0.0:
        nodes = [helper.make_node("Identity", [x], [y], name=names(f"{base}/identity"))]
        if mask_out:
            shape = names(f"{base}/shape")
            nodes += [
                helper.make_node("Shape", [x], [shape], name=names(f"{base}/shape_op")),
                helper.make_node(
                    "ConstantOfShape", [shape], [mask_out], name=names(f"{base}/all_kept"),
                    value=helper.make_tensor("value", onnx.TensorProto.BOOL, [1], [True]),
                ),  # fmt: skip
            ]
        return nodes
    keep_prob, scale = names(f"{base}/keep_prob"), names(f"{base}/scale")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1.0 - p, dtype=dtype), keep_prob),
            numpy_helper.from_array(np.array(1.0 / (1.0 - p), dtype=dtype), scale),
        ]
    )
    uniform, keep = names(f"{base}/uniform"), mask_out or names(f"{base}/keep")
    kept, mask = names(f"{base}/kept"), names(f"{base}/mask")
    return [
        helper.make_node("RandomUniformLike", [x], [uniform], name=names(f"{base}/random"), dtype=elem_type),
        helper.make_node("Less", [uniform, keep_prob], [keep], name=names(f"{base}/compare")),
        helper.make_node("Cast", [keep], [kept], name=names(f"{base}/cast"), to=elem_type),
        helper.make_node("Mul", [kept, scale], [mask], name=names(f"{base}/scale_mask")),
        helper.make_node("Mul", [x, mask], [y], name=names(f"{base}/apply_mask")),
    ]


def _drop_unused_constants(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the Dropout nodes' former ratio/training_mode constants that nothing reads any more."""
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = candidates - consumed
    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in unused)]
    kept_inits = [i for i in graph.initializer if i.name not in unused]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)


def mc_dropout_model(model: onnx.ModelProto, *, ratio: float | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with every Dropout node rewritten into explicit, always-on mask ops.

    ``ratio`` None keeps each node's own dropout probability; a number in [0, 1) replaces them all
    (0 gives the deterministic model). Raises NoDropoutError when the model has no Dropout node.
    """
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if is_rewritten(model):
        raise NoDropoutError("the model's dropout is already rewritten into always-on mask ops")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    dropouts = sum(1 for node in graph.node if _is_dropout(node))
    if not dropouts:
        raise NoDropoutError("the model has no Dropout node; Monte-Carlo dropout needs a model trained with dropout")
    constants, elem_types, names = _constants(graph), _elem_types(out), _Names(graph)
    rewritten: list[onnx.NodeProto] = []
    former_inputs: set[str] = set()
    for node in graph.node:
        if not _is_dropout(node):
            rewritten.append(node)
            continue
        p = _node_ratio(node, constants) if ratio is None else ratio
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout node {node.name!r} has ratio {p}, outside [0, 1)")
        elem_type = elem_types.get(node.input[0]) or onnx.TensorProto.FLOAT
        rewritten.extend(_mask_nodes(node, p, elem_type, names, graph))
        former_inputs.update(name for name in node.input[1:] if name)
    del graph.node[:]
    graph.node.extend(rewritten)
    _drop_unused_constants(graph, former_inputs)
    out.metadata_props.append(onnx.StringStringEntryProto(key=REWRITE_MARKER, value=str(dropouts)))
    onnx.checker.check_model(out)
    return out


def mc_dropout_file(src: str | Path, dst: str | Path, *, ratio: float | None = None) -> int:
    """Rewrite the model file ``src`` into ``dst``; returns the number of Dropout nodes rewritten."""
    model = mc_dropout_model(onnx.load(str(src)), ratio=ratio)
    onnx.save(model, str(dst))
    return int(next(p.value for p in model.metadata_props if p.key == REWRITE_MARKER))


def is_rewritten(model: onnx.ModelProto) -> bool:
    return any(p.key == REWRITE_MARKER for p in model.metadata_props)


class McDropoutClassifier:
    """Runs T Monte-Carlo dropout passes of an image classifier as one batched ONNX Runtime call.

    Takes a model with Dropout nodes (rewritten here, in memory) or one already rewritten by
    ``firewall mc-dropout``. Session options are ONNX Runtime's defaults (full graph optimisation).
    """

    def __init__(self, model: str | Path | onnx.ModelProto, *, threads: int = 1, providers: list[str] | None = None):
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        if not is_rewritten(proto):
            proto = mc_dropout_model(proto)
        self.input: InputSpec = input_spec(proto)
        self.output_name = proto.graph.output[0].name
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(threads), providers=providers or default_providers()
        )

    def sample_logits(self, batch: np.ndarray, passes: int) -> np.ndarray:
        """float32 [passes, B, K]: each of ``passes`` copies of the batch under its own dropout masks."""
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        tiled = np.concatenate([batch.astype(np.float32, copy=False)] * passes)
        logits = self.session.run([self.output_name], {self.input.name: tiled})[0]
        return logits.reshape(passes, batch.shape[0], -1)


class NoSplitError(ValueError):
    """The model cannot be split at its last Dropout into a network run once and a head run T times."""


def _head_nodes(graph: onnx.GraphProto, features: str, output: str) -> list[onnx.NodeProto]:
    """The nodes the output needs, back to ``features``; NoSplitError when it needs anything else."""
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {init.name for init in graph.initializer}
    needed: set[int] = set()
    stack, seen = [output], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name == features or name in initializers:
            continue
        seen.add(name)
        if name not in producers:
            raise NoSplitError("the logits depend on more than the last Dropout's input; use dropout: all")
        needed.add(id(producers[name]))
        stack.extend(producers[name].input)
    return [node for node in graph.node if id(node) in needed]


def head_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The subgraph from the last Dropout's input to the logits, that Dropout rewritten always-on.

    Inputs: the features [B, ...] and ``repeats`` (int64, [passes, 1, ...]): the head tiles the
    features itself, so on a GPU they never leave the device between the network and the head."""
    features = last_dropout_input(model)
    if features is None:
        raise NoDropoutError("the model has no Dropout node; Monte-Carlo dropout needs a model trained with dropout")
    graph = onnx.shape_inference.infer_shapes(model).graph
    values = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    if features not in values:
        raise NoSplitError(f"the shape of the last Dropout's input {features!r} is unknown")
    feature_type = onnx.TypeProto()
    feature_type.CopyFrom(values[features].type)
    feature_type.tensor_type.shape.dim[0].dim_param = "batch"  # passes x batch rows
    nodes = _head_nodes(graph, features, graph.output[0].name)
    used = {name for node in nodes for name in node.input}
    names = _Names(graph)
    source, repeats = names("features"), names("repeats")
    tile = helper.make_node("Tile", [source, repeats], [features], name=names("tile_passes"))
    rank = len(feature_type.tensor_type.shape.dim)
    head = helper.make_graph(
        [tile, *nodes],
        "mc_dropout_head",
        [
            helper.make_value_info(source, feature_type),
            helper.make_tensor_value_info(repeats, onnx.TensorProto.INT64, [rank]),
        ],
        [graph.output[0]],
        [init for init in graph.initializer if init.name in used],
    )
    return mc_dropout_model(helper.make_model(head, opset_imports=model.opset_import, ir_version=model.ir_version))


class McDropoutHead:
    """T Monte-Carlo passes of a model's head (its last Dropout on) on features the network computed once."""

    def __init__(self, model: str | Path | onnx.ModelProto, *, providers: list[str] | None = None):
        proto = head_model(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
        self.features_name, self.repeats_name = (value.name for value in proto.graph.input)
        self.output_name = proto.graph.output[0].name
        self.session = ort.InferenceSession(
            proto.SerializeToString(), session_options(1), providers=providers or default_providers()
        )

    def sample_logits(self, features: np.ndarray, passes: int) -> np.ndarray:
        """float32 [passes, B, K]: the head under ``passes`` independent dropout masks."""
        if passes < 1:
            raise ValueError(f"passes must be at least 1, got {passes}")
        logits = self.session.run([self.output_name], self.inputs(features, passes))[0]
        return logits.reshape(passes, features.shape[0], -1)

    def inputs(self, features: np.ndarray, passes: int) -> dict[str, np.ndarray]:
        return {self.features_name: features, self.repeats_name: repeats(features.ndim, passes)}


def repeats(rank: int, passes: int) -> np.ndarray:
    """Tile's repeats: ``passes`` copies of the batch along its first axis."""
    return np.array([passes] + [1] * (rank - 1), np.int64)


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="IN.onnx", help="model with Dropout nodes")
    parser.add_argument("target", type=Path, metavar="OUT.onnx", help="where to write the rewritten model")
    parser.add_argument(
        "--ratio", type=float, default=None, metavar="P",
        help="dropout probability for every node, in [0, 1) (default: each node's own)",
    )  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    try:
        count = mc_dropout_file(args.source, args.target, ratio=args.ratio)
    except DecodeError:
        print(f"firewall mc-dropout: {args.source} is not an ONNX model", file=sys.stderr)
        return 2
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        print(f"firewall mc-dropout: {error}", file=sys.stderr)
        return 2
    print(f"rewrote {count} Dropout node(s) into always-on dropout: {args.target}")
    return 0
