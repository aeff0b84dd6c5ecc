"""MC-dropout rewrite, run by real ONNX Runtime under its default session options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from firewall.cli import main as firewall_main
from models.mc_dropout import McDropoutClassifier, NoDropoutError, mc_dropout_model

RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(16, 10)).astype(np.float32)
BIAS = RNG.normal(size=(10,)).astype(np.float32)


def tiny_classifier(*, dropout: bool = True, ratio: float = 0.5) -> onnx.ModelProto:
    """input [N,1,4,4] -> Flatten -> Dropout(training_mode=true) -> MatMul + bias -> logits [N,10]."""
    nodes = [helper.make_node("Flatten", ["input"], ["flat"])]
    if dropout:
        nodes.append(helper.make_node("Dropout", ["flat", "ratio", "training"], ["dropped"], name="drop"))
    nodes += [
        helper.make_node("MatMul", ["dropped" if dropout else "flat", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(WEIGHTS, "weights"), numpy_helper.from_array(BIAS, "bias")]
    if dropout:
        initializers += [
            numpy_helper.from_array(np.array(ratio, np.float32), "ratio"),
            numpy_helper.from_array(np.array(True), "training"),
        ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def identity_dropout(ratio: float) -> onnx.ModelProto:
    """Y, mask = Dropout(X) in opset 11, where the ratio is an attribute."""
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["y", "mask"], ratio=ratio)], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 1000])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), ort.SessionOptions(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def sample() -> np.ndarray:
    return RNG.random((1, 1, 4, 4), dtype=np.float32)


def deterministic_logits(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) @ WEIGHTS + BIAS


def test_ort_default_options_eliminate_dropout_even_in_training_mode():
    """Why the rewrite exists: exported as-is, dropout never runs under ORT's default optimisation."""
    batch = np.repeat(sample(), 8, axis=0)
    first, second = run(tiny_classifier(), {"input": batch})[0], run(tiny_classifier(), {"input": batch})[0]
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, np.repeat(deterministic_logits(batch[:1]), 8, axis=0), rtol=1e-5, atol=1e-5)


def test_copies_in_one_batched_run_get_different_masks():
    passes = McDropoutClassifier(tiny_classifier()).sample_logits(sample(), passes=32)
    assert passes.shape == (32, 1, 10) and passes.dtype == np.float32
    rows = passes[:, 0, :]
    assert len({row.tobytes() for row in rows}) == 32


def test_every_batch_item_is_sampled_per_pass():
    batch = RNG.random((3, 1, 4, 4), dtype=np.float32)
    passes = McDropoutClassifier(tiny_classifier()).sample_logits(batch, passes=5)
    assert passes.shape == (5, 3, 10)
    assert not np.allclose(passes[:, 0], passes[:, 1])  # items keep their own place in each pass


def test_mean_of_many_passes_approaches_the_deterministic_output():
    x = sample()
    passes = McDropoutClassifier(tiny_classifier(ratio=0.5)).sample_logits(x, passes=4000)
    # Inverted dropout is unbiased; with p = 0.5 each input term's variance is (x_i w_ij)^2.
    standard_error = np.sqrt(((x.reshape(-1, 1) * WEIGHTS) ** 2).sum(axis=0) / len(passes))
    assert np.all(np.abs(passes.mean(axis=0) - deterministic_logits(x)) < 5 * standard_error)


def test_ratio_zero_gives_the_deterministic_model():
    batch = RNG.random((4, 1, 4, 4), dtype=np.float32)
    original = run(tiny_classifier(dropout=False), {"input": batch})[0]
    rewritten = run(mc_dropout_model(tiny_classifier(), ratio=0.0), {"input": batch})[0]
    np.testing.assert_allclose(rewritten, original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [None, 0.2])
def test_node_ratio_or_override_sets_the_drop_rate_and_scale(ratio):
    x = RNG.random((100, 1000), dtype=np.float32) + 0.5
    y, mask = run(mc_dropout_model(identity_dropout(0.3), ratio=ratio), {"x": x})
    p = 0.3 if ratio is None else ratio
    assert abs((y == 0).mean() - p) < 0.01
    np.testing.assert_array_equal(mask, y != 0)
    np.testing.assert_allclose(y[mask], x[mask] / (1 - p), rtol=1e-6)


def test_rewritten_graph_has_no_dropout_and_explicit_mask_ops():
    ops = [node.op_type for node in mc_dropout_model(tiny_classifier()).graph.node]
    assert "Dropout" not in ops
    assert {"RandomUniformLike", "Less", "Cast", "Mul"} <= set(ops)


def test_model_without_dropout_is_refused():
    with pytest.raises(NoDropoutError, match="no Dropout node"):
        mc_dropout_model(tiny_classifier(dropout=False))


def test_rewriting_twice_is_refused():
    with pytest.raises(NoDropoutError, match="already rewritten"):
        mc_dropout_model(mc_dropout_model(tiny_classifier()))


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        mc_dropout_model(tiny_classifier(), ratio=ratio)


def test_cli_writes_a_model_whose_dropout_runs(tmp_path: Path, capsys):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(tiny_classifier(), str(source))
    assert firewall_main(["mc-dropout", str(source), str(target)]) == 0
    assert "rewrote 1 Dropout node" in capsys.readouterr().out
    passes = McDropoutClassifier(target).sample_logits(sample(), passes=8)
    assert len({row.tobytes() for row in passes[:, 0]}) == 8


def test_cli_ratio_zero_is_deterministic(tmp_path: Path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(tiny_classifier(), str(source))
    assert firewall_main(["mc-dropout", str(source), str(target), "--ratio", "0"]) == 0
    passes = McDropoutClassifier(target).sample_logits(sample(), passes=8)
    assert np.all(passes == passes[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [("no-dropout", "no Dropout node"), ("garbage", "not an ONNX model"), ("missing", "No such file")],
)
def test_cli_bad_input_exits_2_with_a_message(tmp_path: Path, capsys, content: str, message: str):
    source = tmp_path / "in.onnx"
    if content == "no-dropout":
        onnx.save(tiny_classifier(dropout=False), str(source))
    elif content == "garbage":
        source.write_bytes(b"this is not a model")
    assert firewall_main(["mc-dropout", str(source), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_ratio_zero_keeps_the_mask_output_all_true():
    x = RNG.random((2, 1000), dtype=np.float32)
    y, mask = run(mc_dropout_model(identity_dropout(0.3), ratio=0.0), {"x": x})
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()
