"""Work once, batch across requests, monitor after the answer (issue 13): the mechanisms, not their speed."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from firewall.deferred import DeferredQueue
from firewall.protocol import pb_grpc
from firewall.stage import Finding, RequestContext
from models.batching import MicroBatcher
from models.mc_dropout import McDropoutHead, NoSplitError
from models.runtime import OnnxClassifier, bundled_calibration, bundled_model_path
from tests.conftest import address, make_settings, running_firewall
from tests.test_metrics import call, scrape


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_concurrent_callers_share_a_call_and_each_gets_its_own_rows() -> None:
    calls: list[int] = []
    release = threading.Event()

    def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        calls.append(len(batch))
        if len(calls) == 1:
            release.wait(30)  # the first call holds until the others queued behind it
        return (batch * 2, batch[:, :1])

    batcher = MicroBatcher(run, max_rows=64)
    results: dict[int, tuple[np.ndarray, ...]] = {}
    inputs = {n: np.full((1 + n % 3, 2), n, np.float32) for n in range(8)}
    first = threading.Thread(target=lambda: results.__setitem__(0, batcher(inputs[0])))
    first.start()
    wait_until(lambda: len(calls) == 1)
    others = [threading.Thread(target=lambda n=n: results.__setitem__(n, batcher(inputs[n]))) for n in range(1, 8)]
    for thread in others:
        thread.start()
    wait_until(lambda: len(batcher._queue) == 7)
    release.set()
    for thread in [first, *others]:
        thread.join(30)
    assert calls == [len(inputs[0]), sum(len(inputs[n]) for n in range(1, 8))]  # the seven queued ran as one
    for n, batch in inputs.items():
        np.testing.assert_array_equal(results[n][0], batch * 2)
        np.testing.assert_array_equal(results[n][1], batch[:, :1])


def test_a_failed_call_fails_its_callers_only_and_rows_are_capped() -> None:
    def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        if (batch < 0).any():
            raise ValueError("bad batch")
        return (batch,)

    batcher = MicroBatcher(run, max_rows=4)
    with pytest.raises(ValueError):
        batcher(np.full((2, 1), -1.0))
    np.testing.assert_array_equal(batcher(np.ones((6, 1)))[0], np.ones((6, 1)))  # alone, over the cap: runs anyway


def test_deferred_work_beyond_capacity_is_dropped_and_counted_and_close_finishes_the_rest() -> None:
    gate, done = threading.Event(), []
    deferred = DeferredQueue("test", capacity=2)
    assert deferred.submit(lambda: (gate.wait(30), done.append(0)))
    wait_until(lambda: len(deferred) == 0)  # the worker holds the first job
    assert deferred.submit(lambda: done.append(1)) and deferred.submit(lambda: done.append(2))
    assert not deferred.submit(lambda: done.append(3))
    assert deferred.dropped == 1
    gate.set()
    deferred.close()
    assert done == [0, 1, 2]


def test_forward_returns_the_models_logits_and_the_head_samples_around_them() -> None:
    model = OnnxClassifier(bundled_model_path("mnist"))
    batch = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    import onnxruntime as ort

    plain = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    forward = model.forward(batch)
    np.testing.assert_allclose(forward.logits, plain.run(None, {model.input.name: batch})[0], atol=1e-5)
    head = McDropoutHead(model.path)
    samples = head.sample_logits(forward.features, 400)
    assert samples.shape == (400, 3, 10) and np.ptp(samples, axis=0).max() > 0  # dropout is on
    np.testing.assert_allclose(samples.mean(axis=0), forward.logits, atol=0.25 * np.abs(forward.logits).max())


def test_a_dropout_bypassed_by_a_skip_connection_cannot_be_split() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"], ratio=0.5),
        helper.make_node("Add", ["d", "x"], ["y"]),  # x skips the Dropout
    ]
    model = helper.make_model(helper.make_graph(nodes, "skip", [x], [y]), opset_imports=[helper.make_opsetid("", 11)])
    onnx.checker.check_model(model)
    with pytest.raises(NoSplitError):
        McDropoutHead(model)


class Watcher:
    """A monitor-only stage: one finding per request; records what it was handed."""

    name = "watcher"
    rules = ("test.watch",)

    def __init__(self):
        self.seen: list[tuple[int, int]] = []  # (decoded images held, tensor rows)

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        self.seen.append((len(ctx.images), len(ctx.tensor)))
        return [Finding("test.watch", 1.0, 0.5)]


def test_monitor_only_stages_run_after_the_answer_and_their_findings_are_counted(mnist_heldout) -> None:
    images, _ = mnist_heldout
    detectors = bundled_calibration("mnist")["detectors"]
    policy = {"action": "reject", "rules": {"test.watch": "monitor", "uncertainty": "monitor", "squeeze": "monitor", "adversarial": "monitor"}}
    settings = make_settings(models={"mnist": {"detectors": detectors, "policy": policy}})
    watcher = Watcher()
    with running_firewall(settings) as firewall:
        pipeline = firewall.service.pipelines["mnist"]
        assert [stage.name for stage in pipeline.stages] == ["sanitize", "probing"]
        assert [stage.name for stage in pipeline.monitors] == ["uncertainty", "squeeze", "adversarial"]
        pipeline.monitors.append(watcher)
        with grpc.insecure_channel(address(firewall)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert call(stub, images[:2], "watched") == grpc.StatusCode.OK  # reject would refuse it inline
            pipeline.settle()
            assert scrape(firewall.metrics_port)[("firewall_findings_total", (("model", "mnist"), ("rule", "test.watch")))] == 1
            assert scrape(firewall.metrics_port)[("firewall_deferred_dropped_total", (("model", "mnist"),))] == 0
    assert watcher.seen == [(0, 2)]  # the queue holds the model-ready tensor, not the decoded images


def test_a_policy_that_no_longer_only_monitors_a_stage_runs_it_before_the_answer() -> None:
    detectors = bundled_calibration("mnist")["detectors"]
    settings = make_settings(models={"mnist": {"detectors": detectors}})
    with running_firewall(settings) as firewall:
        pipeline = firewall.service.pipelines["mnist"]
        assert [stage.name for stage in pipeline.monitors] == ["uncertainty", "squeeze", "adversarial"]
        stricter = pipeline.policy.model_copy(update={"rules": {**pipeline.policy.rules, "squeeze": "reject"}})
        pipeline.arrange(stricter)  # what a reload does
        assert [stage.name for stage in pipeline.stages] == ["sanitize", "probing", "squeeze"]
        assert [stage.name for stage in pipeline.monitors] == ["uncertainty", "adversarial"]
