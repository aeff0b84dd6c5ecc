"""Configuration: one YAML file validated with pydantic; every field overridable from the environment.

Precedence: environment (``FIREWALL_<FIELD>``, ``__`` between nested names, for example
``FIREWALL_MODELS__MNIST__BACKEND__ADDRESS=127.0.0.1:9001``) over the file over the defaults.
Without a file the bundled ``firewall/default.yaml`` applies: the MNIST model, embedded.
An invalid configuration fails at start-up (``ConfigError``) with one clause per problem, naming the
field and the environment variable that set it; a ``FIREWALL_*`` variable that names no field is an
error too (a misspelt override must not be ignored silently).
"""

from __future__ import annotations

import ipaddress
import os
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, PositiveFloat, PositiveInt, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from detectors.registry import DetectorConfig
from detectors.sanitizer import SanitizerConfig
from models.runtime import bundled_calibration, bundled_model_path, calibration_beside


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddedBackend(Strict):
    """Run the protected model in-process with ONNX Runtime."""

    kind: Literal["embedded"] = Field("embedded", description="the model runs in the firewall's process")


class UpstreamTLS(Strict):
    """TLS to the upstream model server."""

    ca: Path | None = Field(None, description="trust these roots instead of the system's")
    cert: Path | None = Field(None, description="client certificate, for mutual TLS")
    key: Path | None = Field(None, description="the client certificate's private key")
    server_name: str | None = Field(None, description="override the name checked in the server certificate")


class UpstreamBackend(Strict):
    """Forward the sanitized tensor to a KServe-v2 model server (Triton, KServe, MLServer), over
    gRPC or over the protocol's HTTP/JSON binding (``protocol: rest``, KServe's default).

    Circuit breaker: after ``breaker_failures`` consecutive failed calls, calls fail fast
    (UNAVAILABLE) and only a probe every ``breaker_open_s`` (doubling up to ``breaker_max_open_s``)
    reaches the server.
    """

    kind: Literal["upstream"] = Field(description="the model runs on a model server the firewall calls")
    protocol: Literal["grpc", "rest"] = Field("grpc", description="gRPC, or the HTTP/JSON binding (KServe's default)")
    address: str = Field(description="HOST:PORT of the model server's port for that protocol")
    model_name: str = Field(description="the model's name on the model server")
    model_version: str = Field("", description="the model's version there (empty: the server's choice)")
    input_name: str = Field("input", description="the model's input tensor")
    output_name: str = Field("logits", description="the model's output tensor (scores per class)")
    timeout_s: PositiveFloat = Field(2.0, description="per call; shorter than the clients' own deadlines")
    ready_timeout_s: PositiveFloat = Field(1.0, description="per readiness probe")
    breaker_failures: PositiveInt = Field(3, description="consecutive failed calls that open the circuit breaker")
    breaker_open_s: PositiveFloat = Field(0.25, description="first wait before a probe reaches an open breaker's server")
    breaker_max_open_s: PositiveFloat = Field(1.0, description="longest wait between probes (the wait doubles up to it)")
    tls: UpstreamTLS | None = Field(None, description="TLS to the model server (default: plaintext)")


Backend = Annotated[Union[EmbeddedBackend, UpstreamBackend], Field(discriminator="kind")]


class InputLimits(Strict):
    """Decoded bytes are pixels x channels x bytes per sample, read from the header before decoding:
    a 4096 x 4096 RGBA 8-bit image is 64 MiB; the same in 16 bits (128 MiB) is refused."""

    max_batch: PositiveInt = Field(64, description="images per request")
    max_pixels: PositiveInt = Field(4096 * 4096, description="pixels per image")
    max_image_bytes: PositiveInt = Field(64 * 1024 * 1024, description="decoded bytes per image")
    max_request_bytes: PositiveInt = Field(256 * 1024 * 1024, description="decoded bytes of all images of one request")


Action = Literal["reject", "ban", "decoy", "noise", "monitor"]


class BanConfig(Strict):
    """How long a ``ban`` lasts: ``first_s`` for a first offence, times ``factor`` for each repeat."""

    first_s: PositiveFloat = Field(60.0, description="a first offence's ban")
    factor: float = Field(default=4.0, ge=1.0, description="each repeat offence's ban is this many times longer")
    max_s: PositiveFloat = Field(24 * 3600.0, description="the longest ban")
    forget_s: PositiveFloat = Field(24 * 3600.0, description="an offence this long after the previous one counts as a first")
    # Not behind a proxy or NAT shared by others: the address banned would be theirs as well.
    by_peer: bool = Field(False, description="also ban the peer address, so a new client id from it is refused too")


class PolicyConfig(Strict):
    """What a finding does to the client (see firewall/policy.py).

    reject: PERMISSION_DENIED for that request. ban: PERMISSION_DENIED, and every request of the
    client for a cool-down. decoy: a plausible label that carries no signal, the client is not told.
    noise: the model's label for the image with Gaussian noise added (a randomized answer).
    monitor: the genuine answer. Every action raises an alert.
    """

    # An explicit refusal is an oracle an adaptive attacker steers by (Feng et al., CCS 2023); a
    # decoy teaches it nothing, and a benign client that lands in a probed region gets the label
    # its content had anyway (README, Detection: the measurements behind this default).
    action: Action = Field("decoy", description="reject, ban, decoy, noise or monitor: the response to a finding")
    # The per-image detectors flag a client whose rate of flagged images is far above the
    # calibrated benign 5 %: worth an alert, not a changed answer. An address may be a NAT or proxy
    # in front of many benign users: its evidence alerts only.
    rules: dict[str, Action] = Field(
        {"uncertainty": "monitor", "squeeze": "monitor", "adversarial": "monitor", "probing.address": "monitor"},
        description="per-rule overrides of `action`, by rule name",
    )
    ban: BanConfig = Field(BanConfig(), description="ban durations")
    noise_sigma: float = Field(0.05, gt=0.0, le=1.0, description="`noise`: standard deviation of the Gaussian noise, in pixel units of [0, 1]")


class ProtectedModel(Strict):
    """One protected model, by the name clients call it."""

    onnx: Path | None = Field(
        None,
        description="local copy of the model; default: the bundled models/<name>/model.onnx; without `detectors`, "
        "X.thresholds.yaml beside X.onnx, if present, gives the sanitizer and detectors",
    )
    backend: Backend = Field(EmbeddedBackend(), description="where the model runs: embedded or upstream")
    policy: PolicyConfig = Field(PolicyConfig(), description="what findings do to the client")
    limits: InputLimits = Field(InputLimits(), description="input size limits")
    sanitizer: SanitizerConfig = Field(SanitizerConfig(), description="preprocessing before the model")
    detectors: list[DetectorConfig] = Field(
        [], description="detectors in order; a model without this key gets its calibrated set, if any (see `onnx`)"
    )


class ThrottleConfig(Strict):
    """Per-client token buckets, one token per image. A throttled request gets RESOURCE_EXHAUSTED.

    A client whose findings were refused draws from the tighter suspect bucket for ``suspect_s``
    seconds: after a ``reject``, or after the end of a ``ban``. ``decoy`` and ``monitor`` leave the
    client's bucket as it was, so nothing visible changes. Every request also draws from its source
    address's bucket (fresh ids do not multiply the budget). An address whose ids collect more than
    ``address_refusals`` policy refusals within ``refusal_window_s`` is refused (PERMISSION_DENIED)
    for ``address_cooldown_s``.
    """

    enabled: bool = Field(True, description="throttle at all")
    rate: PositiveFloat = Field(100.0, description="images per second per client")
    burst: PositiveInt = Field(200, description="images a client may send at once")
    suspect_rate: PositiveFloat = Field(1.0, description="images per second of a suspect client")
    suspect_burst: PositiveInt = Field(5, description="images a suspect client may send at once")
    suspect_s: PositiveFloat = Field(600.0, description="how long a client stays suspect after a refusal or a ban")
    address_rate: PositiveFloat | None = Field(None, description="images per second per source address (default: 10 x rate)")
    address_burst: PositiveInt | None = Field(None, description="images an address may send at once (default: 10 x burst)")
    address_refusals: PositiveInt = Field(20, description="policy refusals of an address's ids that refuse the address")
    refusal_window_s: PositiveFloat = Field(600.0, description="the window in which those refusals are counted")
    address_cooldown_s: PositiveFloat = Field(600.0, description="how long such an address is refused")

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

    interval_s: PositiveFloat = Field(60.0, description="at most one line per episode this often")
    idle_s: PositiveFloat = Field(300.0, description="an episode ends after this long without a finding")
    max_episodes: PositiveInt = Field(10_000, description="open episodes; beyond it the stalest is closed (its last line logged)")


class ListenerTLS(Strict):
    """TLS on the gRPC and HTTP listeners; with ``client_ca`` set, mutual TLS: a client must present a
    certificate signed by that CA and its identity (SAN, else CN) becomes the client id."""

    cert: Path = Field(description="the server certificate (PEM)")
    key: Path = Field(description="its private key (PEM)")
    client_ca: Path | None = Field(None, description="with it, mutual TLS: clients must present a certificate it signed")
    trusted_proxies: list[str] = Field(
        [],
        description="with mutual TLS, peers whose client id header is honoured: IP addresses, networks "
        "(10.0.0.0/8) or certificate identities; others are identified by their certificate",
    )

    @model_validator(mode="after")
    def _proxies_need_mtls(self) -> "ListenerTLS":
        if self.trusted_proxies and self.client_ca is None:
            raise ValueError("tls.trusted_proxies: requires tls.client_ca (mutual TLS)")
        return self


class ForwardedConfig(Strict):
    """Clients behind reverse proxies or load balancers (firewall/forwarded.py). Only a request whose
    connection comes from ``trusted_proxies`` has its client address read from ``header`` (the
    right-most hop that is not a trusted proxy); from any other peer the header is ignored. The
    address keys the per-address buckets, shares, refusal budgets, bans and alerts' ``source.ip``.
    Name only proxies that overwrite or append to the header: whatever a client sends through
    another proxy is believed."""

    trusted_proxies: list[IPvAnyNetwork] = Field(
        [], description="addresses or networks (10.0.0.0/8) of the proxies in front of the firewall; empty: headers ignored"
    )
    header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for", description="the header (gRPC metadata key) the proxies write: X-Forwarded-For, or RFC 7239 Forwarded"
    )


class RedisTLS(Strict):
    """TLS to Redis (``rediss://`` URLs): trust ``ca`` instead of the system's roots; ``cert`` and
    ``key`` for mutual TLS."""

    ca: Path | None = Field(None, description="trust this CA (PEM) instead of the system's roots")
    cert: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key: Path | None = Field(None, description="its private key (PEM)")
    check_hostname: bool = Field(True, description="check the server certificate's name against the URL's host")


class StateConfig(Strict):
    """Where state that outlives a request lives (firewall/state.py, firewall/redis_state.py).

    ``memory``: in this process (one replica). ``redis``: shared by every replica through the
    Redis server at ``url`` (``redis://[:password@]host:port/db``; set it from a Secret with
    FIREWALL_STATE__URL). When Redis cannot be reached, ``fail_mode: open`` answers from this
    replica's memory (a metric and an alert say shared state is degraded) and ``closed`` answers
    UNAVAILABLE until it is back.
    """

    backend: Literal["memory", "redis"] = Field("memory", description="memory: this process; redis: shared by every replica")
    url: str = Field("redis://127.0.0.1:6379/0", description="redis://[:password@]host:port/db, rediss:// for TLS")
    key_prefix: str = Field("firewall:", min_length=1, max_length=64, description="prefix of every key in Redis")
    tls: RedisTLS | None = Field(None, description="TLS files for rediss:// URLs")
    fail_mode: Literal["open", "closed"] = Field(
        "open", description="Redis unreachable: open answers from this replica's memory, closed answers UNAVAILABLE"
    )
    timeout_s: PositiveFloat = Field(0.25, description="per call (socket, connect, a pooled connection); past it the call failed")
    max_connections: PositiveInt = Field(32, description="connections per pool; callers beyond them wait, at most timeout_s")
    retry_s: PositiveFloat = Field(0.1, description="first reconnection attempt after a failure, doubling each time")
    max_retry_s: PositiveFloat = Field(5.0, description="longest wait between reconnection attempts")
    stream_length: PositiveInt = Field(100_000, description="query stream entries kept per model (approximate trimming)")
    buffer: PositiveInt = Field(10_000, description="queries and labels waiting to be written; beyond, dropped and counted")
    label_ttl_s: PositiveFloat = Field(3600.0, description="the first label a client was answered is kept this long in Redis after its last answer")
class AdminTLS(Strict):
    """Mutual TLS on the admin endpoint: only operators holding a certificate signed by ``client_ca``."""

    cert: Path = Field(description="the server certificate (PEM)")
    key: Path = Field(description="its private key (PEM)")
    client_ca: Path = Field(description="operators' certificates must be signed by this CA")


class AdminConfig(Strict):
    """The operators' endpoint (`firewall admin`): list and inspect clients, lift bans, reload.

    Local by default. Any other address must have mutual TLS: whoever reaches it can lift bans.
    """

    listen: str | None = Field(
        "127.0.0.1:8002", description="HOST:PORT or unix:PATH; a non-loopback address needs mutual TLS; null: no admin endpoint"
    )
    tls: AdminTLS | None = Field(None, description="mutual TLS for the admin endpoint")

    @model_validator(mode="after")
    def _remote_needs_mtls(self) -> "AdminConfig":
        if self.listen is not None and self.tls is None and not is_local(self.listen):
            raise ValueError(f"admin.listen {self.listen}: not local (loopback or unix:), so it requires admin.tls")
        return self


def is_local(listen: str) -> bool:
    """A unix socket or a loopback address ("localhost" included)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerMetadata(Strict):
    """What metadata calls say about the server. Neutral by default: nothing names the firewall."""

    name: str = Field("inference-server", description="the server name of ServerMetadata and the REST server metadata")
    platform: str = Field(
        "onnxruntime_onnx", description="the platform of ModelMetadata and ModelConfig (the protected models are ONNX)"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FIREWALL_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field("0.0.0.0:8001", description="HOST:PORT of the gRPC listener (`firewall serve --listen`)")
    http_listen: str | None = Field(
        "0.0.0.0:8000", description="HOST:PORT of the HTTP/JSON binding (`firewall serve --http-listen`); null: gRPC only"
    )
    metrics_listen: str = Field("0.0.0.0:9108", description="HOST:PORT of the Prometheus endpoint")
    client_id_header: str = Field("x-client-id", description="request header naming the client; the peer address without it")
    tls: ListenerTLS | None = Field(None, description="TLS on the gRPC and HTTP listeners (default: plaintext)")
    forwarded: ForwardedConfig = Field(ForwardedConfig(), description="the client's address behind trusted reverse proxies")
    admin: AdminConfig = Field(AdminConfig(), description="the operators' endpoint")
    throttle: ThrottleConfig = Field(ThrottleConfig(), description="token buckets per client and per address")
    state: StateConfig = Field(StateConfig(), description="where state that outlives a request lives: memory, or Redis shared by replicas")
    alerts: AlertConfig = Field(AlertConfig(), description="alert aggregation")
    max_tracked_clients: PositiveInt = Field(
        100_000, description="clients with buckets and last answers; least recently seen forgotten first"
    )
    max_protected_clients: PositiveInt = Field(
        100_000,
        description="clients with bans, offences, suspicion or refusal windows: never evicted before they expire; "
        "at the cap, ids not yet tracked are refused (RESOURCE_EXHAUSTED)",
    )
    max_message_bytes: PositiveInt = Field(16 * 1024 * 1024, description="largest gRPC message")
    max_concurrent_requests: PositiveInt = Field(64, description="requests in flight; beyond it RESOURCE_EXHAUSTED, never a queue")
    max_streams_per_connection: PositiveInt = Field(
        32, description="gRPC calls open at once on one connection (HTTP/2 streams); more wait in the client"
    )
    max_requests_per_client: PositiveInt = Field(8, description="requests in flight at once per client id")
    max_requests_per_address: PositiveInt = Field(48, description="requests in flight at once per source address")
    max_new_client_requests: PositiveInt | None = Field(
        None,
        description="requests in flight at once from ids first seen in that request (default: half of max_concurrent_requests); "
        "the rest is kept for clients already known",
    )
    max_decoding_bytes: PositiveInt = Field(
        512 * 1024 * 1024, description="decoded image bytes held by requests in flight, server-wide"
    )
    heavy_request_bytes: PositiveInt = Field(4 * 1024 * 1024, description="a request decoding more is heavy")
    max_heavy_requests: PositiveInt | None = Field(None, description="heavy requests at once (default: half the workers)")
    request_timeout_s: PositiveFloat = Field(
        10.0,
        description="longest a request waits for a worker, then it is dropped; sooner when the client's gRPC deadline "
        "or the request's `timeout` parameter (microseconds, as Triton's clients send it) says so",
    )
    workers: PositiveInt = Field(8, description="threads running the pipeline")
    shutdown_grace_s: PositiveFloat = Field(10.0, description="on SIGTERM, in-flight calls may finish within this")
    snapshot_dir: Path | None = Field(
        None,
        description="where bans (clients.json) and the detectors' query history persist across restarts; "
        "default: nowhere, a restart forgets them (logged as a warning at start)",
    )
    server_metadata: ServerMetadata = Field(ServerMetadata(), description="what metadata calls say about the server")
    reflection: bool = Field(False, description="gRPC server reflection lists the services; off so the chain stays unnamed")
    models: dict[str, ProtectedModel] = Field(description="the protected models, by name")

    @model_validator(mode="before")
    @classmethod
    def _calibrated_defaults(cls, data: Any) -> Any:
        """A model configured without detectors gets the sanitizer and detectors calibrated for it: the
        bundled model's ``thresholds.yaml``, or ``X.thresholds.yaml`` beside an ``onnx: X.onnx`` file."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        models = {}
        for name, model in data["models"].items():
            if isinstance(model, dict) and "detectors" not in model:
                onnx = model.get("onnx")
                calibrated = bundled_calibration(name) if onnx is None else calibration_beside(Path(onnx))
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


class ConfigError(ValueError):
    """An invalid configuration; the message names each field at fault and the variable that set it."""


ENV_PREFIX = "FIREWALL_"
ENV_NESTING = "__"


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the YAML file (default: the bundled one); ``FIREWALL_*`` variables override it."""
    source = Path(path) if path else Path(str(resources.files("firewall").joinpath("default.yaml")))
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping")
    unknown = [name for name in sorted(os.environ) if is_firewall_variable(name) and not names_a_field(Settings, variable_path(name))]
    if unknown:
        raise ConfigError(f"unknown environment variable {', '.join(unknown)}: no such configuration field")
    try:
        return Settings(**data)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


def is_firewall_variable(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX)


def variable_path(name: str) -> list[str]:
    """FIREWALL_MODELS__MNIST__POLICY -> ["models", "mnist", "policy"] (names are not case sensitive)."""
    return name[len(ENV_PREFIX) :].lower().split(ENV_NESTING)


def names_a_field(annotation: Any, path: list[str]) -> bool:
    """Whether ``path`` leads through ``annotation``'s models (and the keys of its dicts) to a field."""
    if not path:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return names_a_field(get_args(annotation)[0], path)
    if origin in (Union, UnionType):
        return any(names_a_field(member, path) for member in get_args(annotation))
    if origin is dict:
        return names_a_field(get_args(annotation)[1], path[1:])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(path[0])
        return field is not None and names_a_field(field.annotation, path[1:])
    return False


def describe(error: ValidationError) -> str:
    """One clause per error: the field's dotted path, the problem, and the variable that set it, if any."""
    variables = {name: variable_path(name) for name in os.environ if is_firewall_variable(name)}
    clauses = []
    for problem in error.errors(include_url=False):
        location = [str(part).lower() for part in problem["loc"]]
        field = ".".join(str(part) for part in problem["loc"]) or "configuration"
        clause = f"{field}: {problem['msg'].removeprefix('Value error, ')}"
        setters = [name for name, path in variables.items() if path[: len(location)] == location or _within(path, location)]
        if setters:
            clause += f" (set by {', '.join(sorted(setters))})"
        clauses.append(clause)
    return "; ".join(clauses)


def _within(path: list[str], location: list[str]) -> bool:
    """Whether ``location`` (which may hold union tags such as "upstream") passes through ``path`` in order."""
    remaining = iter(location)
    return all(part in remaining for part in path)
