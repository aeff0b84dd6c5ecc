"""The response policy in process, on a fake clock: the action a request's findings lead to, the
answer the client gets, the alert and ban lines the operator gets, and what the state keeps.

``test_policy.py`` shows the same behaviour through a real server and client; these tests call
``ResponsePolicy.decide`` on a real pipeline (ONNX Runtime) without a server, so that mutation
testing can run them in forked processes, which gRPC does not survive."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from firewall.alerts import AlertAggregator
from firewall.bans import BanLog, peer_key
from firewall.config import AlertConfig
from firewall.errors import Banned, Refused
from firewall.pipeline import ModelPipeline, build_pipeline
from firewall.policy import ResponsePolicy, class_count
from firewall.stage import Finding, RequestContext
from firewall.state import MemoryClientState
from tests.conftest import FakeClock, make_settings

SUSPECT_S = 100.0
PEER = "10.0.0.7"


@pytest.fixture(scope="module")
def pipeline() -> Iterator[ModelPipeline]:
    settings = make_settings()
    built = build_pipeline("mnist", settings.models["mnist"], settings, MemoryClientState(16))
    yield built
    built.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_policy(clock: FakeClock, models: tuple[str, ...] = ("mnist",), **policy) -> ResponsePolicy:
    settings = make_settings(models={model: {"policy": policy} for model in models}, throttle={"suspect_s": SUSPECT_S})
    state = MemoryClientState(16, clock=clock)
    state.secret = bytes(16)  # fixed, so the decoy labels of fresh clients are the same on every run
    return ResponsePolicy(settings, state, AlertAggregator(AlertConfig(), clock), BanLog(state, clock))


def context(pipeline: ModelPipeline, images: np.ndarray, client: str = "c1", findings=(), model: str = "mnist") -> RequestContext:
    ctx = RequestContext("req-1", model, client, PEER, [image[:, :, None] for image in images], [b""] * len(images))
    pipeline.inspect(ctx)  # the sanitizer makes the tensor, the answer is submitted
    ctx.findings = list(findings)
    return ctx


def genuine(pipeline: ModelPipeline, images: np.ndarray) -> list[int]:
    return pipeline.classifier.predict(context(pipeline, images).tensor).tolist()


@pytest.fixture(scope="module")
def distinct(mnist_heldout, pipeline) -> np.ndarray:
    """Four held-out images the model labels four different ways."""
    images, _ = mnist_heldout
    labels = pipeline.classifier.predict(context(pipeline, images[:40]).tensor)
    firsts = [int(np.flatnonzero(labels == label)[0]) for label in dict.fromkeys(labels.tolist())]
    return images[firsts[:4]]


def alerts(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("event.kind") == "alert"]


def bans(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["message"] == "ban.started"]


def test_without_findings_the_genuine_answer_and_the_first_label_is_kept(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock)
    ctx = context(pipeline, distinct[1:4])
    assert policy.decide(ctx, pipeline) == "answered"
    expected = genuine(pipeline, distinct[1:4])
    assert ctx.labels.tolist() == expected and ctx.labels.dtype == np.int64
    policy.decide(context(pipeline, distinct[:1]), pipeline)
    assert policy.state.first_label("c1", "mnist") == expected[0]  # the first label answered, not a later one
    assert alerts(log_lines()) == []


def test_the_most_severe_action_of_the_findings_wins(pipeline, clock, distinct):
    policy = make_policy(clock, action="monitor", rules={"d": "decoy", "r": "reject", "b": "ban"})

    def outcome(*rules: str) -> str:
        ctx = context(pipeline, distinct[:1], client="-".join(rules), findings=[Finding(rule, 1.0, 0.5) for rule in rules])
        try:
            return policy.decide(ctx, pipeline)
        except Banned:
            return "banned"
        except Refused:
            return "refused"

    assert outcome("other") == "monitored"  # a rule with no entry takes the model's action
    assert outcome("d", "other") == "decoyed"
    assert outcome("other", "r", "d") == "refused"
    assert outcome("r", "b", "d") == "banned"
    assert outcome("b", "r") == "banned"


def test_a_rule_entry_overrides_the_models_action(pipeline, clock, distinct):
    policy = make_policy(clock, action="ban", rules={"quiet": "monitor"})
    ctx = context(pipeline, distinct[:2], findings=[Finding("quiet", 1.0, 0.5, item=0)])
    assert policy.decide(ctx, pipeline) == "monitored"
    assert ctx.labels.tolist() == genuine(pipeline, distinct[:2])
    assert policy.state.first_label("c1", "mnist") == ctx.labels[0]  # a monitored answer is an answer


def test_every_finding_becomes_an_alert_with_what_the_operator_needs(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="monitor")
    findings = [Finding("a.rule", 0.75, 0.5, item=0), Finding("b.rule", 0.25, 0.5, item=1, severity="info")]
    policy.decide(context(pipeline, distinct[:2], findings=findings), pipeline)
    lines = alerts(log_lines())
    assert [(line["rule.name"], line["firewall.score"], line["firewall.threshold"], line["log.level"]) for line in lines] == [
        ("a.rule", 0.75, 0.5, "warning"),
        ("b.rule", 0.25, 0.5, "info"),
    ]
    for line in lines:
        assert (line["event.action"], line["event.type"], line["firewall.model"]) == ("monitor", ["allowed"], "mnist")
        assert (line["user.id"], line["source.ip"], line["firewall.request_id"]) == ("c1", PEER, "req-1")


def test_an_alert_about_the_address_names_no_client(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="monitor")
    policy.decide(context(pipeline, distinct[:1], findings=[Finding("nat", 1.0, 0.5, about="address")]), pipeline)
    [line] = alerts(log_lines())
    assert (line["rule.name"], line["source.ip"], "user.id" in line) == ("nat", PEER, False)


def test_reject_refuses_and_makes_the_client_a_suspect(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="reject")
    ctx = context(pipeline, distinct[:2], findings=[Finding("r", 1.0, 0.5, item=1)])
    with pytest.raises(Refused) as refusal:
        policy.decide(ctx, pipeline)
    assert type(refusal.value) is Refused and refusal.value.public_message == "request refused"
    assert refusal.value.detail == "1 finding(s), reject"  # for the log
    record = policy.state.get("c1")
    assert record.suspect_until == clock() + SUSPECT_S and record.banned_until == 0.0
    assert record.first_labels == {}  # nothing was answered
    assert [line["event.action"] for line in alerts(log_lines())] == ["reject"]
    assert bans(log_lines()) == []


def test_ban_bans_the_client_once_and_logs_the_rules(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="ban", ban={"first_s": 10.0, "factor": 2.0})
    findings = [Finding("z.rule", 1.0, 0.5, item=0), Finding("a.rule", 1.0, 0.5, item=1), Finding("z.rule", 1.0, 0.5, item=1)]
    with pytest.raises(Banned) as banned:
        policy.decide(context(pipeline, distinct[:2], findings=findings), pipeline)
    assert (banned.value.public_message, banned.value.detail) == ("request refused", "3 finding(s), ban")
    record = policy.state.get("c1")
    assert record.banned_until == clock() + 10.0 and record.suspect_until == clock() + 10.0 + SUSPECT_S
    assert policy.state.get(peer_key(PEER)) is None  # not by peer
    clock.advance(1.0)
    with pytest.raises(Banned):  # findings of a call admitted before the ban: not a new ban
        policy.decide(context(pipeline, distinct[:1], findings=findings[:1]), pipeline)
    started = bans(log_lines())
    assert [(line["user.id"], line["event.reason"], line["firewall.ban_s"]) for line in started] == [("c1", "a.rule, z.rule", 10.0)]
    assert [line["event.action"] for line in alerts(log_lines())] == ["ban", "ban"]  # one episode per rule


def test_ban_by_peer_bans_the_address_too(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="ban", ban={"first_s": 10.0, "by_peer": True})
    with pytest.raises(Banned):
        policy.decide(context(pipeline, distinct[:1], findings=[Finding("r", 1.0, 0.5)]), pipeline)
    assert policy.state.get("c1").banned_until == policy.state.get(peer_key(PEER)).banned_until == clock() + 10.0
    assert [(line.get("user.id"), line.get("source.ip")) for line in bans(log_lines())] == [("c1", None), (None, PEER)]


def test_a_finding_about_the_client_decoys_every_image_with_its_first_label(pipeline, clock, distinct, log_lines):
    policy = make_policy(clock, action="decoy")
    policy.decide(context(pipeline, distinct[:1]), pipeline)
    policy.decide(context(pipeline, distinct[1:2]), pipeline)
    first = genuine(pipeline, distinct[:1])[0]
    ctx = context(pipeline, distinct[1:4], findings=[Finding("client", 1.0, 0.5, item=None)])
    assert policy.decide(ctx, pipeline) == "decoyed"
    assert ctx.labels.tolist() == [first] * 3 and ctx.labels.dtype == np.int64
    assert [line["event.action"] for line in alerts(log_lines())] == ["decoy"]


def test_a_finding_about_one_image_decoys_that_image_only(pipeline, clock, distinct):
    policy = make_policy(clock, action="decoy")
    labels = genuine(pipeline, distinct[:4])
    policy.decide(context(pipeline, distinct[3:4]), pipeline)
    ctx = context(pipeline, distinct[:3], findings=[Finding("item", 1.0, 0.5, item=2)])
    policy.decide(ctx, pipeline)
    assert ctx.labels.tolist() == [labels[0], labels[1], labels[3]]
    assert policy.state.first_label("c1", "mnist") == labels[3]


def test_a_decoy_answered_first_is_the_clients_first_label(pipeline, clock, distinct):
    policy = make_policy(clock, action="decoy")
    labels = genuine(pipeline, distinct[:2])
    ctx = context(pipeline, distinct[:2], client="fresh", findings=[Finding("item", 1.0, 0.5, item=0)])
    policy.decide(ctx, pipeline)
    assert ctx.labels[1] == labels[1]
    assert policy.state.first_label("fresh", "mnist") == ctx.labels[0]  # the fixed label it was given


def test_a_finding_that_carries_an_answer_gives_it_even_when_it_is_zero(pipeline, clock, distinct):
    policy = make_policy(clock, action="decoy")
    labels = genuine(pipeline, distinct[:4])
    policy.decide(context(pipeline, distinct[3:4]), pipeline)  # the fallback: labels[3]
    answer = 0 if labels[3] != 0 else 1
    findings = [Finding("probe", 1.0, 0.5, item=0, answer=answer), Finding("other", 1.0, 0.5, item=2)]
    ctx = context(pipeline, distinct[:3], findings=findings)
    policy.decide(ctx, pipeline)
    assert ctx.labels.tolist() == [answer, labels[1], labels[3]]


def test_monitored_findings_do_not_decoy(pipeline, clock, distinct):
    policy = make_policy(clock, action="decoy", rules={"watch": "monitor"})
    labels = genuine(pipeline, distinct[:4])
    policy.decide(context(pipeline, distinct[3:4]), pipeline)
    findings = [Finding("watch", 1.0, 0.5, item=None), Finding("watch", 1.0, 0.5, item=0), Finding("probe", 1.0, 0.5, item=1)]
    ctx = context(pipeline, distinct[:3], findings=findings)
    assert policy.decide(ctx, pipeline) == "decoyed"
    assert ctx.labels.tolist() == [labels[0], labels[3], labels[2]]


def test_a_finding_without_a_rule_entry_is_only_monitored_when_the_model_monitors(pipeline, clock, distinct):
    policy = make_policy(clock, action="monitor", rules={"probe": "decoy"})
    labels = genuine(pipeline, distinct[:4])
    policy.decide(context(pipeline, distinct[3:4]), pipeline)
    ctx = context(pipeline, distinct[:2], findings=[Finding("other", 1.0, 0.5, item=0), Finding("probe", 1.0, 0.5, item=1)])
    assert policy.decide(ctx, pipeline) == "decoyed"
    assert ctx.labels.tolist() == [labels[0], labels[3]]


def test_a_client_without_a_genuine_answer_gets_a_fixed_label_of_its_own(pipeline, clock, distinct):
    models = tuple(f"m{n}" for n in range(8))
    policy = make_policy(clock, models, action="decoy")

    def decoy(policy: ResponsePolicy, client: str, image: int = 0, model: str = "m0") -> int:
        ctx = context(pipeline, distinct[image : image + 1], client, [Finding("client", 1.0, 0.5)], model)
        policy.decide(ctx, pipeline)
        return int(ctx.labels[0])

    own = {client: {decoy(policy, client, image) for image in range(3)} for client in map(str, range(10))}
    assert all(len(labels) == 1 for labels in own.values())  # the same on every query
    fixed = [labels.pop() for labels in own.values()]
    assert len(set(fixed)) > 1 and all(0 <= label < 10 for label in fixed)  # not one for everybody
    assert decoy(make_policy(clock, models, action="decoy"), "0") == fixed[0]  # a replica sharing the secret agrees
    assert len({decoy(policy, "0", model=model) for model in models}) > 1  # and one per model


def test_the_class_count_comes_from_the_models_output(pipeline, tmp_path):
    assert class_count(pipeline) == 10
    settings = make_settings(models={"mnist": {"onnx": str(dynamic_class_count(pipeline, tmp_path / "dynamic.onnx"))}})
    dynamic = build_pipeline("mnist", settings.models["mnist"], settings, MemoryClientState(1))
    try:
        assert class_count(dynamic) == 1  # unknown before a run: every decoy is label 0, never out of range
    finally:
        dynamic.close()


def dynamic_class_count(pipeline: ModelPipeline, path: Path) -> Path:
    """The bundled model with its logits passed through a Compress that keeps every column: the same
    answers, but a class count that ONNX Runtime cannot know before it runs the model."""
    model = onnx.load(str(pipeline.classifier.path))
    output = model.graph.output[0]
    for node in model.graph.node:
        node.output[:] = ["all_logits" if name == output.name else name for name in node.output]
    keep = helper.make_tensor("keep", TensorProto.BOOL, [10], [True] * 10)
    model.graph.node.extend(
        [
            helper.make_node("Constant", [], ["keep"], value=keep),
            helper.make_node("Compress", ["all_logits", "keep"], [output.name], axis=1),
        ]
    )
    output.type.tensor_type.shape.dim[-1].Clear()
    output.type.tensor_type.shape.dim[-1].dim_param = "classes"
    onnx.save(model, str(path))
    return path


NOISE_SIGMA = 0.1  # where the labels of held-out digits still depend on which noise was drawn


@pytest.fixture(scope="module")
def digits(mnist_heldout) -> np.ndarray:
    return mnist_heldout[0][:64]


def noised(policy: ResponsePolicy, pipeline: ModelPipeline, images: np.ndarray, findings: list[Finding]) -> tuple[list[int], list[int]]:
    """What the policy answered, and what the same noise drawn here gives (same seed)."""
    policy.rng = np.random.default_rng(7)
    ctx = context(pipeline, images, findings=findings)
    tensor, expected = ctx.tensor.copy(), genuine(pipeline, images)
    assert policy.decide(ctx, pipeline) == "noised"
    items = sorted({finding.item for finding in findings}) if all(f.item is not None for f in findings) else list(range(len(images)))
    noise = np.random.default_rng(7).normal(0.0, NOISE_SIGMA, tensor[items].shape).astype(np.float32)
    for item, label in zip(items, pipeline.classifier.predict(np.clip(tensor[items] + noise, 0.0, 1.0))):
        expected[item] = int(label)
    return ctx.labels.tolist(), expected


def test_noise_answers_the_flagged_images_from_noisy_copies(pipeline, clock, digits):
    policy = make_policy(clock, action="noise", noise_sigma=NOISE_SIGMA)
    flagged = [Finding("n", 1.0, 0.5, item=item) for item in (*range(0, 64, 2), 2)]
    answered, expected = noised(policy, pipeline, digits, flagged)
    labels = genuine(pipeline, digits)
    assert answered == expected and answered[1::2] == labels[1::2]
    assert answered != labels  # the noise shows in the answer
    assert policy.state.first_label("c1", "mnist") == answered[0]


def test_noise_about_the_client_answers_every_image_from_a_noisy_copy(pipeline, clock, digits):
    policy = make_policy(clock, action="noise", noise_sigma=NOISE_SIGMA)
    answered, expected = noised(policy, pipeline, digits, [Finding("n", 1.0, 0.5, item=1), Finding("n", 1.0, 0.5)])
    assert answered == expected and answered != genuine(pipeline, digits)


def test_noise_draws_from_the_policys_own_generator(pipeline, clock, distinct):
    policy = make_policy(clock, action="noise")
    assert policy.decide(context(pipeline, distinct[:2], findings=[Finding("n", 1.0, 0.5)]), pipeline) == "noised"
