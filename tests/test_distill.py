"""Defensive distillation (`firewall distill`) and the bundled distilled models behind the firewall."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton

from firewall.cli import main as firewall_main
from firewall.config import Settings
from models.accuracy import evaluation_split, measure_accuracy
from models.distill import distill
from models.runtime import OnnxClassifier, bundled_model_path
from models.training import export_onnx, seed_everything
from tests.conftest import FIXTURES, address, make_settings, running_firewall, uint8_input

DISTILLED = {name: bundled_model_path(name).with_name("distilled.onnx") for name in ("mnist", "cifar10")}
TRAIN = 640  # fixture digits the test student learns from; the rest of the fixture measures it


@pytest.fixture(scope="module")
def cifar10_fixture() -> tuple[np.ndarray, np.ndarray]:
    return evaluation_split("cifar10", FIXTURES / "cifar10_test")


@pytest.fixture
def seeded_torch() -> Iterator[torch.Generator]:
    """Seeded, deterministic torch for one test; the process's thread count and kernels restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield seed_everything(0, threads=1)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_a_short_distillation_exports_dropout_and_beats_chance_by_far(tmp_path: Path, mnist_heldout, seeded_torch):
    images, labels = mnist_heldout
    teacher = OnnxClassifier(bundled_model_path("mnist"), max_rows=64)
    train = torch.from_numpy(images[:TRAIN]).unsqueeze(1)
    student = distill(teacher, train, temperature=20.0, epochs=6, lr=0.01, generator=seeded_torch, log=lambda _: None)
    export_onnx(student, (1, 28, 28), tmp_path / "student.onnx")

    ops = [node.op_type for node in onnx.load(str(tmp_path / "student.onnx")).graph.node]
    assert ops.count("Dropout") == 3  # MC dropout still has its masks to sample
    accuracy = measure_accuracy(OnnxClassifier(tmp_path / "student.onnx"), images[TRAIN:], labels[TRAIN:])
    assert accuracy >= 0.6, accuracy  # chance is 0.1


@pytest.mark.parametrize(
    ("teacher", "extra", "message"),
    [
        ("mnist", ["--temperature", "0"], "--temperature and --lr must be positive"),
        ("mnist", ["--lr", "0"], "--temperature and --lr must be positive"),
        ("mnist", ["--limit", "0"], "--epochs and --limit at least 1"),
        ("cifar10", [], "Is a directory"),  # a folder where the CIFAR-10 zip belongs
        ("odd-shape", [], "distill handles models taking (1, 28, 28) or (3, 32, 32)"),
        ("garbage", [], "is not an ONNX model"),
    ],
)
def test_cli_refuses_bad_input_with_exit_2(tmp_path: Path, capsys, teacher: str, extra: list[str], message: str):
    if teacher == "garbage":
        (tmp_path / "garbage.onnx").write_bytes(b"not a model")
        path = tmp_path / "garbage.onnx"
    elif teacher == "odd-shape":
        path = tmp_path / "odd.onnx"
        export_onnx(torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout(), torch.nn.Flatten()), (3, 16, 16), path)
    else:
        path = bundled_model_path(teacher)
    argv = ["distill", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "out.onnx"), *extra]
    assert firewall_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_a_short_cifar10_distillation_trains_a_colour_student_with_dropout(tmp_path: Path, cifar10_fixture, seeded_torch):
    images, _ = cifar10_fixture
    teacher = OnnxClassifier(bundled_model_path("cifar10"))
    losses: list[float] = []
    student = distill(
        teacher, torch.from_numpy(images).permute(0, 3, 1, 2), temperature=20.0, epochs=6, lr=0.05,
        generator=seeded_torch, log=lambda line: losses.append(float(line.split()[3])),
    )  # fmt: skip
    export_onnx(student, (3, 32, 32), tmp_path / "student.onnx")

    assert OnnxClassifier(tmp_path / "student.onnx").input_shape == (3, 32, 32)
    assert [node.op_type for node in onnx.load(str(tmp_path / "student.onnx")).graph.node].count("Dropout") == 3
    assert losses[-1] < 0.97 * losses[0], losses  # it moves towards the teacher's soft labels (measured: 0.95)


def fixture_split(name: str, mnist_heldout, cifar10_fixture) -> tuple[np.ndarray, np.ndarray]:
    return mnist_heldout if name == "mnist" else cifar10_fixture


@pytest.mark.parametrize(("name", "least"), [("mnist", 0.985), ("cifar10", 0.8)])  # teachers: 0.997, 0.89
def test_the_bundled_distilled_models_keep_dropout_and_are_accurate(name, least, mnist_heldout, cifar10_fixture):
    images, labels = fixture_split(name, mnist_heldout, cifar10_fixture)
    assert [node.op_type for node in onnx.load(str(DISTILLED[name])).graph.node].count("Dropout") == 3
    assert measure_accuracy(OnnxClassifier(DISTILLED[name]), images, labels) >= least


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_serving_a_distilled_model_takes_its_calibration_beside_it(tmp_path: Path, name: str):
    served = Settings(models={name: {"onnx": str(DISTILLED[name])}}).models[name]
    assert [d.kind for d in served.detectors] == ["probing", "uncertainty", "squeeze"]
    bundled = Settings(models={name: {}}).models[name]
    assert served.detectors[1].threshold != bundled.detectors[1].threshold  # its own, not the teacher's
    copy = shutil.copy(DISTILLED[name], tmp_path / "copy.onnx")  # nothing calibrated beside it
    assert Settings(models={name: {"onnx": str(copy)}}).models[name].detectors == []


@pytest.mark.parametrize(("name", "least"), [("mnist", 62), ("cifar10", 48)])
def test_the_firewall_serves_a_distilled_model_accurately_with_its_detectors(name, least, mnist_heldout, cifar10_fixture):
    images, labels = fixture_split(name, mnist_heldout, cifar10_fixture)
    listeners = make_settings().model_dump(include={"listen", "http_listen", "metrics_listen", "admin"})
    settings = Settings(**listeners, models={name: {"onnx": str(DISTILLED[name])}})  # the documented switch
    assert len(settings.models[name].detectors) == 3
    with running_firewall(settings) as firewall, triton.InferenceServerClient(address(firewall)) as client:
        answers = client.infer(name, [uint8_input(images[:64])]).as_numpy("label")
    assert (answers == labels[:64]).sum() >= least
