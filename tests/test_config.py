"""Configuration: the bundled default, environment overrides, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from firewall.config import ConfigError, UpstreamBackend, load_settings
from firewall.reference import BEGIN, END, reference
from models.runtime import bundled_model_path


def test_bundled_default_protects_mnist_with_no_configuration():
    settings = load_settings()
    assert list(settings.models) == ["mnist"] and settings.listen == "0.0.0.0:8001"
    assert settings.onnx_path("mnist") == bundled_model_path("mnist") and bundled_model_path("mnist").is_file()


def test_environment_overrides_nested_fields(monkeypatch, tmp_path):
    config = tmp_path / "firewall.yaml"
    config.write_text("listen: 127.0.0.1:7000\nmodels:\n  mnist:\n    limits: {max_batch: 4}\n")
    monkeypatch.setenv("FIREWALL_LISTEN", "127.0.0.1:7001")
    monkeypatch.setenv("FIREWALL_MODELS__MNIST__BACKEND__KIND", "upstream")
    monkeypatch.setenv("FIREWALL_MODELS__MNIST__BACKEND__ADDRESS", "127.0.0.1:9001")
    monkeypatch.setenv("FIREWALL_MODELS__MNIST__BACKEND__MODEL_NAME", "mnist")
    settings = load_settings(config)
    assert settings.listen == "127.0.0.1:7001"
    assert settings.models["mnist"].limits.max_batch == 4
    assert isinstance(settings.models["mnist"].backend, UpstreamBackend)
    assert settings.models["mnist"].backend.address == "127.0.0.1:9001"


@pytest.mark.parametrize(
    "text, field",
    [
        ("models:\n  mnist:\n    limits: {max_batch: 0}\n", "max_batch"),
        ("models:\n  mnist:\n    backend: {kind: upstream}\n", "address"),
        ("models:\n  mnist:\n    sanitizer: {blur_kernel: 4}\n", "blur_kernel"),
        ("models: {}\n", "models"),
        ("listen: 1\nmodels:\n  mnist: {}\nunknown_field: 1\n", "unknown_field"),
    ],
)
def test_invalid_configuration_names_the_field(tmp_path, text, field):
    config = tmp_path / "firewall.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert field in str(raised.value) and "pydantic" not in str(raised.value) and "http" not in str(raised.value)


@pytest.mark.parametrize("variable", ["FIREWALL_LISTN", "FIREWALL_THROTTLE__RAT", "FIREWALL_MODELS__MNIST__POLICY__ACTON"])
def test_a_misspelt_variable_is_an_error_naming_it(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError, match=f"unknown environment variable {variable}:"):
        load_settings()


def test_an_invalid_value_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("FIREWALL_THROTTLE__RATE", "fast")
    monkeypatch.setenv("FIREWALL_MODELS__MNIST__POLICY__ACTION", "nuke")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == (
        "throttle.rate: Input should be a valid number, unable to parse string as a number (set by FIREWALL_THROTTLE__RATE); "
        "models.mnist.policy.action: Input should be 'reject', 'ban', 'decoy', 'noise' or 'monitor' "
        "(set by FIREWALL_MODELS__MNIST__POLICY__ACTION)"
    )


def test_the_readme_holds_the_generated_configuration_reference():
    """Every field of the pydantic models has a meaning, and the README shows them as they are."""
    text = reference()
    assert "| |" not in text.replace("| `-` |", "")  # no field without a description
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme[readme.index(BEGIN) : readme.index(END) + len(END)] + "\n" == text, "run: firewall config --reference"


def test_firewall_config_prints_the_effective_configuration(tmp_path):
    config = tmp_path / "firewall.yaml"
    config.write_text("models:\n  mnist: {policy: {action: ban}}\n")
    env = {"PATH": "", "FIREWALL_THROTTLE__RATE": "7"}
    done = subprocess.run([sys.executable, "-m", "firewall", "config", "--config", str(config)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "  rate: 7.0\n" in done.stdout and "    action: ban\n" in done.stdout
    assert "snapshot_dir: null" in done.stdout
    config.write_text("models:\n  mnist: {policy: {action: nuke}}\n")
    done = subprocess.run([sys.executable, "-m", "firewall", "config", "--config", str(config)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("firewall config: invalid configuration: models.mnist.policy.action")
