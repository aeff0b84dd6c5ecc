"""The admin endpoint through `firewall admin` against a real firewall: list, show, lift, reset, reload,
each an ECS audit event; reload by SIGHUP semantics (an invalid file keeps the running configuration)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from firewall.admin import SERVICE
from firewall.bans import BanLog
from firewall.cli import main
from firewall.config import AdminConfig, Settings, load_settings
from firewall.state import MemoryClientState
from tests.conftest import address, running_firewall, uint8_input
from tests.stages import Flagger, marked, with_stage

CONFIG = {
    "listen": "127.0.0.1:0",
    "metrics_listen": "127.0.0.1:0",
    "http_listen": "127.0.0.1:0",
    "admin": {"listen": "127.0.0.1:0"},
    "throttle": {"enabled": False},
    "models": {
        "mnist": {
            "detectors": [{"kind": "probing", "window": 1000, "lists": 4}, {"kind": "squeeze"}],
            "policy": {"action": "ban", "ban": {"first_s": 3600}},
        }
    },
}



@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "firewall.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture
def firewall(config_file, log_lines):
    with running_firewall(load_settings(config_file)) as running:
        running.source = lambda: load_settings(config_file)  # what `firewall serve --config FILE` sets
        with with_stage(running, Flagger()):
            yield running


def admin(firewall, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["admin", "--admin", f"127.0.0.1:{firewall.admin_port}", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(firewall, images: np.ndarray, client_id: str) -> bool:
    with triton.InferenceServerClient(address(firewall)) as client:
        try:
            client.infer("mnist", [uint8_input(images)], headers={"x-client-id": client_id})
        except InferenceServerException as error:
            assert error.status() == "StatusCode.PERMISSION_DENIED"
            return True
    return False


def test_list_show_lift_reset_each_audited(firewall, capsys, log_lines, mnist_heldout):
    images, _ = mnist_heldout
    assert refused(firewall, marked(images[:1]), "mallory")  # banned for an hour
    assert not refused(firewall, images[:1], "alice")

    code, out, _ = admin(firewall, capsys, "--json", "list")
    listing = json.loads(out)
    assert code == 0 and listing["tracked"] >= 2 and listing["bans_active"] == 1
    assert listing["clients"][0]["key"] == "mallory" and listing["clients"][0]["banned_s"] > 3000
    code, out, _ = admin(firewall, capsys, "list", "--banned")
    assert code == 0 and "1 banned" in out and "mallory" in out and "alice" not in out and "{" not in out

    code, out, _ = admin(firewall, capsys, "--json", "show", "mallory")
    shown = json.loads(out)
    assert shown["state"]["offences"] == 1
    assert [(f["rule"], f["action"], f["findings"]) for f in shown["findings"]] == [("test.flagger", "ban", 1)]
    assert set(shown["evidence"]["mnist"]["squeeze"]) == {"cusum", "cusum_threshold"}
    assert shown["evidence"]["mnist"]["probing"] == {"client": 0.0, "client_threshold": 10.0}
    code, out, _ = admin(firewall, capsys, "show", "mallory")
    assert "test.flagger -> ban: 1 since" in out and "squeeze: cusum" in out and "probing: client 0" in out

    assert admin(firewall, capsys, "lift", "mallory")[:2] == (0, "ban lifted: mallory\n")
    assert not refused(firewall, images[:1], "mallory")
    code, _, err = admin(firewall, capsys, "lift", "mallory")
    assert code == 2 and err.strip() == "firewall admin: lift: NOT_FOUND: mallory is not banned"

    assert refused(firewall, marked(images[:1]), "mallory")  # a repeat offence ...
    assert json.loads(admin(firewall, capsys, "--json", "show", "mallory")[1])["state"]["offences"] == 2
    assert admin(firewall, capsys, "reset", "mallory")[:2] == (0, "reset: mallory\n")
    assert not refused(firewall, images[:1], "mallory")  # ... forgotten with its ban
    assert json.loads(admin(firewall, capsys, "--json", "show", "mallory")[1])["state"]["offences"] == 0

    with grpc.insecure_channel(f"127.0.0.1:{firewall.admin_port}") as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(f"/{SERVICE}/List", request_serializer=str.encode)('{"limit": "all"}', timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in raised.value.details()

    lines = log_lines()
    audits = [line for line in lines if line["message"] == "admin.call"]
    assert [a["event.action"] for a in audits] == (
        ["admin-list"] * 2 + ["admin-show"] * 2 + ["admin-lift"] * 2 + ["admin-show", "admin-reset", "admin-show", "admin-list"]
    )
    assert [a["event.outcome"] for a in audits if a["event.action"] == "admin-lift"] == ["success", "failure"]
    for audit in audits:
        assert audit["event.kind"] == "event" and audit["user.name"].startswith("ipv4:127.0.0.1:")
        assert audit["event.category"] in (["iam"], ["configuration"]) and audit["ecs.version"]
    assert {a.get("user.target.id") for a in audits if a["event.action"] != "admin-list"} == {"mallory"}
    assert sum(line["message"] == "state.not_persisted" for line in lines) == 1  # no snapshot_dir: said at start
    bans = [(line["message"], line.get("event.reason", "")) for line in lines if line["message"].startswith("ban.")]
    assert [message for message, _ in bans] == ["ban.started", "ban.ended", "ban.started", "ban.ended"]
    assert bans[0][1] == "test.flagger" and bans[1][1].startswith("lifted by ipv4:127.0.0.1:")


def test_reload_swaps_policy_and_thresholds_and_refuses_what_needs_a_restart(firewall, config_file, capsys, log_lines, mnist_heldout):
    images, _ = mnist_heldout
    stages = {stage.name: stage for stage in firewall.service.pipelines["mnist"].chain}
    probing, squeeze = stages["probing"], stages["squeeze"]
    changed = json.loads(json.dumps(CONFIG))
    changed["models"]["mnist"]["policy"]["action"] = "monitor"
    changed["models"]["mnist"]["detectors"][0]["client_threshold"] = 5.0
    changed["models"]["mnist"]["detectors"][1]["threshold"] = 0.5
    changed["throttle"] = {"enabled": True, "rate": 5.0}
    config_file.write_text(yaml.safe_dump(changed))
    code, out, _ = admin(firewall, capsys, "reload")
    assert code == 0
    assert out.strip() == "reloaded: " + ", ".join(
        sorted(
            [
                "models.mnist.detectors.0.client_threshold",
                "models.mnist.detectors.1.threshold",
                "models.mnist.policy.action",
                "throttle.address_rate",
                "throttle.enabled",
                "throttle.rate",
            ]
        )
    )
    assert squeeze.config.threshold == 0.5 and firewall.admission.config.rate == 5.0
    assert probing.config.client_threshold == 5.0 and probing.config.window == 1000
    assert not refused(firewall, marked(images[:1]), "eve")  # monitor now: answered

    running = firewall.settings
    for broken, reason in (
        ("models: [mnist\n", "not valid YAML"),
        (yaml.safe_dump({**changed, "listen": "127.0.0.1:1"}), "these fields need a restart: listen"),
        (yaml.safe_dump({**changed, "throttle": {"rate": -1}}), "throttle.rate: Input should be greater than 0"),
    ):
        config_file.write_text(broken)
        code, _, err = admin(firewall, capsys, "reload")
        assert code == 2 and err.startswith("firewall admin: reload: FAILED_PRECONDITION: ") and reason in err, err
        assert firewall.settings is running  # the running configuration stays
    assert squeeze.config.threshold == 0.5 and firewall.policy.settings.models["mnist"].policy.action == "monitor"

    errors = [line for line in log_lines() if line["log.level"] == "error"]
    assert [line["message"] for line in errors] == ["config.reload_failed"] * 3  # one error per failed reload
    assert all(line["event.outcome"] == "failure" and line["error.message"] for line in errors)


def test_admin_listens_locally_unless_mutual_tls():
    with pytest.raises(ValueError, match="requires admin.tls"):
        Settings(admin={"listen": "0.0.0.0:8002"}, models={"mnist": {}})
    with pytest.raises(ValueError, match="client_ca"):
        Settings(admin={"listen": "0.0.0.0:8002", "tls": {"cert": "c.pem", "key": "k.pem"}}, models={"mnist": {}})
    for local in ("127.0.0.1:8002", "[::1]:8002", "localhost:8002", "unix:/run/firewall/admin.sock"):
        assert Settings(admin={"listen": local}, models={"mnist": {}}).admin.listen == local


def test_unix_socket_is_owner_only(tmp_path, config_file, capsys):
    socket_path = tmp_path / "admin.sock"
    settings = load_settings(config_file).model_copy(update={"admin": AdminConfig(listen=f"unix:{socket_path}")})
    with running_firewall(settings) as running:
        assert running.admin_port == 0 and socket_path.stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            listed = channel.unary_unary(f"/{SERVICE}/List", request_serializer=str.encode, response_deserializer=json.loads)("{}", timeout=10)
        assert listed["bans_active"] == 0


def test_ban_end_is_logged_once_when_it_expires(log_lines):
    now = [0.0]
    state = MemoryClientState(10, clock=lambda: now[0])
    bans = BanLog(state, clock=lambda: now[0])
    state.update("c1", lambda record: setattr(record, "banned_until", 10.0))
    bans.started("c1", 10.0, "probing.client")
    state.update("peer 10.0.0.1", lambda record: setattr(record, "banned_until", 5.0))
    bans.started("peer 10.0.0.1", 5.0, "address refusal budget spent")
    now[0] = 6.0
    state.update("c1", lambda record: setattr(record, "banned_until", 20.0))  # extended (by another replica)
    bans.expire()
    now[0] = 15.0
    bans.expire()
    now[0] = 25.0
    bans.expire()
    bans.expire()
    lines = [line for line in log_lines() if line["message"].startswith("ban.")]
    assert [(line["message"], line.get("user.id"), line.get("source.ip")) for line in lines] == [
        ("ban.started", "c1", None),
        ("ban.started", None, "10.0.0.1"),
        ("ban.ended", None, "10.0.0.1"),
        ("ban.ended", "c1", None),
    ]
    assert lines[0]["event.type"] == ["start", "denied"] and lines[0]["log.level"] == "warning" and lines[0]["firewall.ban_s"] == 10.0
    assert lines[3]["event.type"] == ["end"] and lines[3]["event.reason"] == "expired" and len(bans) == 0


def test_unreachable_endpoint_is_one_line(capsys):
    from tests.upstream import free_port

    code = main(["admin", "--admin", f"127.0.0.1:{free_port()}", "list"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("firewall admin: list: UNAVAILABLE") and len(err.strip().splitlines()) == 1


def test_sighup_reloads_a_running_process(config_file):
    """`firewall serve` as a process: SIGHUP swaps a changed policy in, then an invalid file is one error."""
    from tests.upstream import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIREWALL_")}
    command = [sys.executable, "-m", "firewall", "serve", "--config", str(config_file), "--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=pump, args=(process.stdout, lines), daemon=True).start()
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 60
            while not _ready(client):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        changed = json.loads(json.dumps(CONFIG))
        changed["models"]["mnist"]["policy"]["action"] = "reject"
        config_file.write_text(yaml.safe_dump(changed))
        process.send_signal(signal.SIGHUP)
        events = [next_line(lines, "config.")]  # the process has read the file: change it again
        config_file.write_text("models: [mnist\n")
        process.send_signal(signal.SIGHUP)
        events.append(next_line(lines, "config."))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert [line["message"] for line in events] == ["config.reloaded", "config.reload_failed"]
    assert events[0]["firewall.changed"] == ["models.mnist.policy.action"] and events[0]["user.name"] == "SIGHUP"
    assert "not valid YAML" in events[1]["error.message"] and events[1]["log.level"] == "error"


def pump(stream, lines: queue.Queue) -> None:
    for text in stream:
        lines.put(text)


def next_line(lines: queue.Queue, prefix: str) -> dict:
    """The next log line whose message starts with ``prefix`` (at most a minute's wait, so never a hang)."""
    while True:
        line = json.loads(lines.get(timeout=60))
        if line["message"].startswith(prefix):
            return line


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except InferenceServerException:
        return False
