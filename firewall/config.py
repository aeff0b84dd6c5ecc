"""Configuration: one YAML file validated with pydantic; every field overridable from the environment.

Precedence: environment (``FIREWALL_<FIELD>``, ``__`` between nested names, for example
``FIREWALL_MODELS__MNIST__BACKEND__ADDRESS=127.0.0.1:9001``) over the file over the defaults.
Without a file the bundled ``firewall/default.yaml`` applies: the MNIST model, embedded.
An invalid configuration fails at start-up with pydantic's message, which names the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from detectors.registry import DetectorConfig
from detectors.sanitizer import SanitizerConfig
from models.runtime import bundled_calibration, bundled_model_path


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
    """Forward the sanitized tensor to a KServe-v2 model server (Triton, KServe, MLServer), over
    gRPC or over the protocol's HTTP/JSON binding (``protocol: rest``, KServe's default)."""

    kind: Literal["upstream"]
    protocol: Literal["grpc", "rest"] = "grpc"
    address: str  # HOST:PORT of the model server's port for that protocol
    model_name: str
    model_version: str = ""
    input_name: str = "input"
    output_name: str = "logits"
    timeout_s: PositiveFloat = 2.0  # per call; shorter than the clients' own deadlines
    ready_timeout_s: PositiveFloat = 1.0  # per readiness probe
    # Circuit breaker: after this many consecutive failed calls, calls fail fast (UNAVAILABLE) and
    # only a probe every ``breaker_open_s`` (doubling up to ``breaker_max_open_s``) reaches the server.
    breaker_failures: PositiveInt = 3
    breaker_open_s: PositiveFloat = 0.25
    breaker_max_open_s: PositiveFloat = 1.0
    tls: UpstreamTLS | None = None


Backend = Annotated[Union[EmbeddedBackend, UpstreamBackend], Field(discriminator="kind")]


class InputLimits(Strict):
    max_batch: PositiveInt = 64
    max_pixels: PositiveInt = 4096 * 4096  # per image
    # Decoded bytes (pixels x channels x bytes per sample, read from the header before decoding):
    # a 4096 x 4096 RGBA 8-bit image is 64 MiB; the same in 16 bits (128 MiB) is refused.
    max_image_bytes: PositiveInt = 64 * 1024 * 1024
    max_request_bytes: PositiveInt = 256 * 1024 * 1024  # all images of one request together


Action = Literal["reject", "ban", "decoy", "monitor"]


class BanConfig(Strict):
    """How long a ``ban`` lasts: ``first_s`` for a first offence, times ``factor`` for each repeat."""

    first_s: PositiveFloat = 60.0
    factor: float = Field(default=4.0, ge=1.0)
    max_s: PositiveFloat = 24 * 3600.0
    forget_s: PositiveFloat = 24 * 3600.0  # an offence this long after the previous one counts as a first
    # Also ban the peer address, so a new client id from it is refused too. Not behind a proxy or
    # NAT shared by others: the address banned would be theirs as well.
    by_peer: bool = False


class PolicyConfig(Strict):
    """What a finding does to the client (see firewall/policy.py).

    reject: PERMISSION_DENIED for that request. ban: PERMISSION_DENIED, and every request of the
    client for a cool-down. decoy: a plausible label that carries no signal, the client is not told.
    monitor: the genuine answer. Every action raises an alert.
    """

    # An explicit refusal is an oracle an adaptive attacker steers by (Feng et al., CCS 2023); a
    # decoy teaches it nothing, and a benign client that lands in a probed region gets the label
    # its content had anyway (README, Detection: the measurements behind this default).
    action: Action = "decoy"
    # Per-rule overrides by rule name. The per-image detectors flag a client whose rate of flagged
    # images is far above the calibrated benign 5 %: worth an alert, not a changed answer. An
    # address may be a NAT or proxy in front of many benign users: its evidence alerts only.
    rules: dict[str, Action] = {"uncertainty": "monitor", "squeeze": "monitor", "probing.address": "monitor"}
    ban: BanConfig = BanConfig()


class ProtectedModel(Strict):
    onnx: Path | None = None  # local copy of the model; default: the bundled models/<name>/model.onnx
    backend: Backend = EmbeddedBackend()
    policy: PolicyConfig = PolicyConfig()
    limits: InputLimits = InputLimits()
    sanitizer: SanitizerConfig = SanitizerConfig()
    detectors: list[DetectorConfig] = []  # in order; a bundled model without this key gets its calibrated set


class ThrottleConfig(Strict):
    """Per-client token buckets, one token per image. A throttled request gets RESOURCE_EXHAUSTED.

    A client whose findings were refused draws from the tighter suspect bucket for ``suspect_s``
    seconds: after a ``reject``, or after the end of a ``ban``. ``decoy`` and ``monitor`` leave the
    client's bucket as it was, so nothing visible changes.
    """

    enabled: bool = True
    rate: PositiveFloat = 100.0  # images per second per client
    burst: PositiveInt = 200
    suspect_rate: PositiveFloat = 1.0
    suspect_burst: PositiveInt = 5
    suspect_s: PositiveFloat = 600.0
    # Every request also draws from its source address's bucket (fresh ids do not multiply the budget).
    # Default: ten times the client's.
    address_rate: PositiveFloat | None = None
    address_burst: PositiveInt | None = None
    # Refusal budget per address: more than this many policy refusals of its ids within the window
    # and the address is refused (PERMISSION_DENIED) for the cool-down.
    address_refusals: PositiveInt = 20
    refusal_window_s: PositiveFloat = 600.0
    address_cooldown_s: PositiveFloat = 600.0

    @model_validator(mode="after")
    def _address_bucket_is_larger(self) -> "ThrottleConfig":
        if self.address_rate is None:
            self.address_rate = 10 * self.rate
        if self.address_burst is None:
            self.address_burst = 10 * self.burst
        if self.address_rate < self.rate or self.address_burst < self.burst:
            raise ValueError("throttle.address_rate and address_burst must be at least rate and burst")
        return self


class AlertConfig(Strict):
    """Alert aggregation per (client, model, rule, action): the first finding is logged at once,
    then one line per ``interval_s`` with the count, and a last line once the client has been
    quiet for ``idle_s`` (or at shutdown)."""

    interval_s: PositiveFloat = 60.0
    idle_s: PositiveFloat = 300.0
    max_episodes: PositiveInt = 10_000  # beyond this the stalest episode is closed (its last line logged)


class ListenerTLS(Strict):
    """TLS on the gRPC and HTTP listeners; with ``client_ca`` set, mutual TLS: a client must present a
    certificate signed by that CA and its identity (SAN, else CN) becomes the client id."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    # With mTLS, the client id header is honoured only from these peers: IP addresses or networks
    # ("10.0.0.0/8") or certificate identities ("envoy.internal"). Others are identified by their certificate.
    trusted_proxies: list[str] = []

    @model_validator(mode="after")
    def _proxies_need_mtls(self) -> "ListenerTLS":
        if self.trusted_proxies and self.client_ca is None:
            raise ValueError("tls.trusted_proxies: requires tls.client_ca (mutual TLS)")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIREWALL_", env_nested_delimiter="__", extra="forbid")

    listen: str = "0.0.0.0:8001"
    http_listen: str | None = "0.0.0.0:8000"  # the HTTP/JSON binding (null: gRPC only)
    metrics_listen: str = "0.0.0.0:9108"
    client_id_header: str = "x-client-id"
    tls: ListenerTLS | None = None
    throttle: ThrottleConfig = ThrottleConfig()
    alerts: AlertConfig = AlertConfig()
    max_tracked_clients: PositiveInt = 100_000  # buckets and last answers; least recently seen clients are forgotten first
    # Bans, offence counts, suspects and refusal windows: never evicted before they expire; at the
    # cap, ids not yet tracked are refused (RESOURCE_EXHAUSTED) instead.
    max_protected_clients: PositiveInt = 100_000
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    max_concurrent_requests: PositiveInt = 64
    max_requests_per_client: PositiveInt = 8  # in flight at once, per client id
    max_requests_per_address: PositiveInt = 48  # in flight at once, per source address
    max_decoding_bytes: PositiveInt = 512 * 1024 * 1024  # decoded image bytes held by requests in flight, server-wide
    heavy_request_bytes: PositiveInt = 4 * 1024 * 1024  # a request decoding more is heavy ...
    max_heavy_requests: PositiveInt | None = None  # ... and at most this many run at once (default: half the workers)
    workers: PositiveInt = 8  # threads running the pipeline; requests beyond them wait, bounded by the cap above
    shutdown_grace_s: PositiveFloat = 10.0
    snapshot_dir: Path | None = None  # stateful detectors without their own snapshot_path persist here
    models: dict[str, ProtectedModel]

    @model_validator(mode="before")
    @classmethod
    def _calibrated_defaults(cls, data: Any) -> Any:
        """A bundled model configured without detectors gets the sanitizer and detectors calibrated for it."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        models = {}
        for name, model in data["models"].items():
            if isinstance(model, dict) and model.get("onnx") is None and "detectors" not in model:
                calibrated = bundled_calibration(name)
                model = {**{key: calibrated[key] for key in ("sanitizer", "detectors") if key in calibrated}, **model}
            models[name] = model
        return {**data, "models": models}

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
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{source}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the configuration must be a mapping")
    return Settings(**data)
