"""The bundled models: their contract, their accuracy on the committed fixtures, and live MC dropout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from firewall.cli import main as firewall_main
from models.accuracy import evaluation_split, measure_accuracy, to_model_input
from models.mc_dropout import McDropoutClassifier
from models.runtime import OnnxClassifier, bundled_model_path

FIXTURES = Path(__file__).parent / "fixtures"
MNIST_FIXTURE = FIXTURES / "mnist_heldout.npz"
CIFAR10_FIXTURE = FIXTURES / "cifar10_test"
BUNDLED = {"mnist": ((1, 28, 28), MNIST_FIXTURE), "cifar10": ((3, 32, 32), CIFAR10_FIXTURE)}
# The fixtures are samples of the evaluation split: 1,000 MNIST digits, 100 CIFAR-10 images. The bars
# sit below the models' full-split accuracy (see each MODEL_CARD.md) by about three standard errors.
FIXTURE_ACCURACY = {"mnist": 0.98, "cifar10": 0.70}


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_contract(name: str):
    path = bundled_model_path(name)
    assert path.stat().st_size < 10_000_000
    assert (path.parent / "MODEL_CARD.md").is_file()
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == list(BUNDLED[name][0])
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [d.dim_value for d in graph_output.type.tensor_type.shape.dim][1:] == [10]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Dropout") >= 2
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":  # running statistics, not batch statistics
            assert len(node.output) == 1
            assert all(attr.i == 0 for attr in node.attribute if attr.name == "training_mode")


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("blur_sigma", [None, 0.7])
def test_bundled_model_accuracy_on_fixtures(name: str, blur_sigma: float | None):
    images, labels = evaluation_split(name, BUNDLED[name][1])
    score = measure_accuracy(OnnxClassifier(bundled_model_path(name)), images, labels, blur_sigma=blur_sigma)
    assert score >= FIXTURE_ACCURACY[name]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_dropout_is_live_after_rewrite(name: str):
    images, labels = evaluation_split(name, BUNDLED[name][1])
    batch = to_model_input(images[:4])
    passes = McDropoutClassifier(bundled_model_path(name)).sample_logits(batch, passes=16)
    assert passes.shape == (16, 4, 10)
    assert len({passes[p, 0].tobytes() for p in range(16)}) == 16
    deterministic = OnnxClassifier(bundled_model_path(name)).logits(batch)
    assert np.all(passes.mean(axis=0).argmax(axis=1) == deterministic.argmax(axis=1))


@pytest.mark.parametrize("name", BUNDLED)
def test_accuracy_cli_prints_json(name: str, capsys):
    args = ["accuracy", str(bundled_model_path(name)), "--data", str(BUNDLED[name][1]), "--blur-sigma", "0.7"]
    assert firewall_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == name and report["blur_sigma"] == 0.7
    assert report["images"] == {"mnist": 1000, "cifar10": 100}[name]
    assert report["accuracy"] >= FIXTURE_ACCURACY[name]


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("missing.onnx", MNIST_FIXTURE, "missing.onnx"),
        (str(MNIST_FIXTURE), MNIST_FIXTURE, "not an ONNX model"),
        ("cifar10", MNIST_FIXTURE, "takes"),  # a 3-channel model asked to read MNIST as CIFAR-10
        ("mnist", FIXTURES / "missing.npz", "missing.npz"),
    ],
)
def test_accuracy_cli_bad_input_exits_2(model: str, data: Path, message: str, capsys):
    path = bundled_model_path(model) if model in BUNDLED else Path(model)
    extra = ["--dataset", "mnist"] if model == "cifar10" else []
    assert firewall_main(["accuracy", str(path), "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
