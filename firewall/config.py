"""Configuration: one YAML file validated with pydantic; every field overridable from the environment.

Precedence: environment (``FIREWALL_<FIELD>``, ``__`` between nested names, for example
``FIREWALL_MODELS__MNIST__BACKEND__ADDRESS=127.0.0.1:9001``) over the file over the defaults.
Without a file the bundled ``firewall/default.yaml`` applies: the MNIST model, embedded.
An invalid configuration fails at start-up with pydantic's message, which names the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from detectors.sanitizer import SanitizerConfig
from models.runtime import bundled_model_path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddedBackend(Strict):
    """Run the protected model in-process with ONNX Runtime."""

    kind: Literal["embedded"] = "embedded"


class UpstreamTLS(Strict):
    ca: Path | None = None  # trust these roots instead of the system's
    cert: Path | None = None  # client certificate for mTLS
    key: Path | None = None
    server_name: str | None = None  # override the name checked in the server certificate


class UpstreamBackend(Strict):
    """Forward the sanitized tensor to a KServe-v2 gRPC model server (Triton, KServe, MLServer)."""

    kind: Literal["upstream"]
    address: str
    model_name: str
    model_version: str = ""
    input_name: str = "input"
    output_name: str = "logits"
    timeout_s: PositiveFloat = 5.0
    tls: UpstreamTLS | None = None


Backend = Annotated[Union[EmbeddedBackend, UpstreamBackend], Field(discriminator="kind")]


class InputLimits(Strict):
    max_batch: PositiveInt = 64
    max_pixels: PositiveInt = 4096 * 4096  # per image


class ProtectedModel(Strict):
    onnx: Path | None = None  # local copy of the model; default: the bundled models/<name>/model.onnx
    backend: Backend = EmbeddedBackend()
    limits: InputLimits = InputLimits()
    sanitizer: SanitizerConfig = SanitizerConfig()
    detectors: list[dict] = []  # TODO(lead): detectors.registry.DetectorConfig once merged


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIREWALL_", env_nested_delimiter="__", extra="forbid")

    listen: str = "0.0.0.0:8001"
    metrics_listen: str = "0.0.0.0:9108"
    client_id_header: str = "x-client-id"
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    max_concurrent_requests: PositiveInt = 64
    workers: PositiveInt = 8  # threads running the pipeline; requests beyond them wait, bounded by the cap above
    shutdown_grace_s: PositiveFloat = 10.0
    snapshot_dir: Path | None = None  # stateful detectors without their own snapshot_path persist here
    models: dict[str, ProtectedModel]

    @model_validator(mode="after")
    def _at_least_one_model(self) -> "Settings":
        if not self.models:
            raise ValueError("models: at least one protected model is required")
        return self

    def onnx_path(self, name: str) -> Path:
        return self.models[name].onnx or bundled_model_path(name)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # the file arrives as init values; the environment wins


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the YAML file (default: the bundled one); the environment overrides it."""
    source = Path(path) if path else Path(str(resources.files("firewall").joinpath("default.yaml")))
    data = yaml.safe_load(source.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the configuration must be a mapping")
    return Settings(**data)
