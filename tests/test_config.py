"""Configuration: the bundled default, environment overrides, and errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from firewall.config import UpstreamBackend, load_settings
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
    with pytest.raises(ValidationError) as raised:
        load_settings(config)
    assert field in str(raised.value)
