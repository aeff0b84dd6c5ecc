"""Each response policy's visible behaviour through a real tritonclient; ban expiry and escalation."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from firewall.config import BanConfig, ConfigError, load_settings
from firewall.state import ClientRecord, start_ban
from tests.conftest import FakeClock, address, drive_clock, make_settings, running_firewall, uint8_input
from tests.stages import Flagger, marked, with_stage

BAN = {"first_s": 0.5, "factor": 3.0, "max_s": 60.0}


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def firewall(clock):
    onnx = str(make_settings().onnx_path("mnist"))
    models = {
        "reject": {"onnx": onnx, "policy": {"action": "reject"}},
        "ban": {"onnx": onnx, "policy": {"action": "ban", "ban": BAN}},
        "ban-peer": {"onnx": onnx, "policy": {"action": "ban", "ban": {**BAN, "by_peer": True}}},
        "decoy": {"onnx": onnx, "policy": {"action": "decoy"}},
        "monitor": {"onnx": onnx, "policy": {"action": "monitor"}},
        "noise": {"onnx": onnx, "policy": {"action": "noise", "noise_sigma": 0.15}},
        "noise-faint": {"onnx": onnx, "policy": {"action": "noise", "noise_sigma": 1e-4}},
        "override": {"onnx": onnx, "policy": {"action": "ban", "rules": {"test.flagger": "monitor"}}},
    }
    with running_firewall(make_settings(models=models, throttle={"enabled": False})) as running:
        drive_clock(running, clock)
        with with_stage(running, Flagger()):
            yield running


@pytest.fixture
def client(firewall):
    with triton.InferenceServerClient(address(firewall)) as connected:
        yield connected


def infer(client, model: str, images: np.ndarray, client_id: str) -> np.ndarray:
    return client.infer(model, [uint8_input(images)], headers={"x-client-id": client_id}).as_numpy("label")


def refused(client, model: str, images: np.ndarray, client_id: str) -> bool:
    try:
        infer(client, model, images, client_id)
    except InferenceServerException as error:
        assert (error.status(), error.message()) == ("StatusCode.PERMISSION_DENIED", "request refused")
        return True
    return False


def test_reject_refuses_only_the_flagged_request(client, mnist_heldout):
    images, _ = mnist_heldout
    assert refused(client, "reject", marked(images[:1]), "r1")
    assert not refused(client, "reject", images[:1], "r1")
    assert refused(client, "reject", np.concatenate([images[:3], marked(images[3:4])]), "r1")


def test_ban_refuses_everything_then_expires_and_escalates(client, clock, mnist_heldout):
    images, _ = mnist_heldout
    clean, flagged = images[:1], marked(images[:1])
    assert refused(client, "ban", flagged, "b1")
    assert refused(client, "ban", clean, "b1") and refused(client, "monitor", clean, "b1")  # every model
    assert not refused(client, "ban", clean, "b2")  # other clients are served
    clock.advance(0.375)
    assert refused(client, "ban", clean, "b1")
    clock.advance(0.125)
    assert not refused(client, "ban", clean, "b1")  # first ban: 0.5 s

    assert refused(client, "ban", flagged, "b1")
    clock.advance(1.375)
    assert refused(client, "ban", clean, "b1")  # second ban: 0.5 s x 3
    clock.advance(0.125)
    assert not refused(client, "ban", clean, "b1")


def test_ban_by_peer_refuses_new_client_ids_from_the_address(client, clock, mnist_heldout):
    images, _ = mnist_heldout
    assert refused(client, "ban-peer", marked(images[:1]), "p1")
    assert refused(client, "ban-peer", images[:1], "p2")
    clock.advance(0.375)
    assert refused(client, "ban-peer", images[:1], "p3")
    clock.advance(0.125)
    assert not refused(client, "ban-peer", images[:1], "p2")


def test_decoy_answers_a_constant_the_client_cannot_tell_apart(client, mnist_heldout):
    images, _ = mnist_heldout
    genuine = infer(client, "decoy", images[:20], "d1")
    first = genuine[0]
    assert len(set(genuine.tolist())) > 1  # the genuine answers vary
    decoys = [infer(client, "decoy", marked(images[i : i + 1]), "d1")[0] for i in range(20, 30)]
    assert decoys == [first] * 10  # no signal: every flagged query gets the first label answered
    mixed = infer(client, "decoy", np.concatenate([images[30:32], marked(images[32:33])]), "d1")
    assert mixed[:2].tolist() == infer(client, "decoy", images[30:32], "d2").tolist()
    assert mixed[2] == first
    # Later genuine answers never move the constant.
    assert infer(client, "decoy", marked(images[33:34]), "d1")[0] == first
    # A client with no genuine answer yet gets a fixed label of its own: the same on every query,
    # and not one constant for everybody (ten clients all alike: chance 1e-9 with a keyed hash).
    fresh = {f"f{n}": {infer(client, "decoy", marked(images[i : i + 1]), f"f{n}")[0] for i in range(40, 43)} for n in range(10)}
    assert all(len(labels) == 1 for labels in fresh.values())
    own = [labels.pop() for labels in fresh.values()]
    assert len(set(own)) > 1 and all(0 <= label < 10 for label in own)


def test_noise_answers_flagged_images_from_noisy_copies_drawn_anew(client, mnist_heldout):
    images, _ = mnist_heldout
    flagged = marked(images[:32])
    model_says = infer(client, "monitor", flagged, "n0")
    assert infer(client, "noise-faint", flagged, "n1").tolist() == model_says.tolist()  # faint noise: the model's label
    loud = [infer(client, "noise", flagged, "n2") for _ in range(3)]
    assert all((answers != model_says).sum() >= 4 for answers in loud)  # sigma 0.15 changes many labels
    assert not np.array_equal(loud[0], loud[1]) and not np.array_equal(loud[1], loud[2])  # new noise each query
    mixed = infer(client, "noise", np.concatenate([images[40:44], marked(images[44:45])]), "n3")
    assert mixed[:4].tolist() == infer(client, "monitor", images[40:44], "n4").tolist()  # unflagged: genuine


def test_a_finding_that_carries_an_answer_decoys_its_item_with_it(firewall, client, mnist_heldout):
    images, _ = mnist_heldout
    genuine = infer(client, "decoy", images[50:53], "a1")
    answering = Flagger(name="answering", rule="test.answering", answer=(int(genuine[2]) + 1) % 10)
    with with_stage(firewall, answering, models=["decoy"]):
        answers = infer(client, "decoy", np.concatenate([images[50:52], marked(images[52:53])]), "a2")
    assert answers.tolist() == [*genuine[:2].tolist(), answering.answer]


def test_monitor_and_rule_override_answer_genuinely(firewall, client, mnist_heldout):
    images, _ = mnist_heldout
    flagged = marked(images[:16])
    pipeline = firewall.service.pipelines["monitor"]
    with_flagger = infer(client, "monitor", flagged, "m1")
    flagger = next(stage for stage in pipeline.stages if isinstance(stage, Flagger))
    pipeline.stages.remove(flagger)
    try:
        genuine = infer(client, "monitor", flagged, "m2")
    finally:
        pipeline.stages.append(flagger)
    assert with_flagger.tolist() == genuine.tolist()
    assert infer(client, "override", flagged, "o1").tolist() == genuine.tolist()
    assert not refused(client, "override", images[:1], "o1")  # monitor, not the model's ban


def test_ban_escalates_and_forgets():
    config = BanConfig(first_s=10, factor=4, max_s=100, forget_s=1000)
    record = ClientRecord()
    assert start_ban(record, config, suspect_s=5, now=0) == 10
    assert start_ban(record, config, suspect_s=5, now=5) is None  # already banned: not a new offence
    assert record.suspect_until == 15
    assert start_ban(record, config, suspect_s=5, now=20) == 40
    assert start_ban(record, config, suspect_s=5, now=100) == 100  # capped
    assert start_ban(record, config, suspect_s=5, now=2000) == 10  # forgotten


def test_policy_configuration_from_file_and_environment(monkeypatch, tmp_path):
    config = tmp_path / "firewall.yaml"
    config.write_text("models:\n  mnist:\n    policy: {action: decoy, rules: {probing.client: ban}, ban: {first_s: 5}}\n")
    monkeypatch.setenv("FIREWALL_MODELS__MNIST__POLICY__BAN__BY_PEER", "true")
    policy = load_settings(config).models["mnist"].policy
    assert (policy.action, policy.rules, policy.ban.first_s, policy.ban.by_peer) == ("decoy", {"probing.client": "ban"}, 5, True)
    assert make_settings().models["mnist"].policy.action == "decoy"  # the default
    config.write_text("models:\n  mnist:\n    policy: {action: explode}\n")
    with pytest.raises(ConfigError, match="action"):
        load_settings(config)
