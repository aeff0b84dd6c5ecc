"""Prometheus metrics on their own port, in a registry of their own (one per Firewall).

    firewall_requests_total{model}                 inference requests received (model "" when unknown)
    firewall_decisions_total{model, outcome}       how each request ended, see OUTCOMES
    firewall_findings_total{model, rule}           findings raised, by detector rule
    firewall_stage_seconds{model, stage}           latency of each pipeline stage and of the prediction
    firewall_tracked_clients                       clients with state (buckets, bans) in this replica's memory
    firewall_bans_active                           clients and addresses banned right now (known to this replica)
    firewall_shared_state_up                       1 while the shared store (Redis) answers, 0 while degraded
    firewall_shared_state_errors_total             calls to the shared store that failed or timed out
    firewall_shared_state_dropped_total            queries and label writes not shared (buffers full, store down)
    firewall_stage_stat{model, stage, stat}        what stages report from ``stats()`` (index sizes)
    firewall_deferred_dropped_total{model}         requests whose after-answer monitoring was dropped (queue full)

Gauges that describe state are computed when Prometheus scrapes, never on the request path.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from firewall.errors import Banned, Expired, InvalidInput, Refused, Rejection, Throttled, TooLarge, Unavailable, UnknownModel
from firewall.pipeline import ModelPipeline
from firewall.state import ClientState

OUTCOMES = (
    "answered",  # no finding: the genuine label
    "monitored",  # findings, genuine label (policy monitor)
    "decoyed",  # findings, decoy label (policy decoy)
    "noised",  # findings, the label of a noisy copy (policy noise)
    "rejected",  # findings, refused (policy reject)
    "banned",  # findings that started a ban, or a request refused by an active ban
    "throttled",  # refused by a token bucket or the concurrency cap
    "abandoned",  # dropped before a worker took it: its deadline passed, or its client went away
    "invalid",  # bad input, a message too large, or unknown model
    "unavailable",  # the model server could not answer (down, timed out, circuit open)
    "failed",  # an internal error
)
REFUSAL_OUTCOMES = (
    (Banned, "banned"),
    (Refused, "rejected"),
    (Expired, "abandoned"),
    (Throttled, "throttled"),
    (InvalidInput, "invalid"),
    (TooLarge, "invalid"),
    (UnknownModel, "invalid"),
    (Unavailable, "unavailable"),
)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def refusal_outcome(rejection: Rejection) -> str:
    return next((outcome for kind, outcome in REFUSAL_OUTCOMES if isinstance(rejection, kind)), "failed")


class Metrics:
    def __init__(
        self,
        pipelines: dict[str, ModelPipeline],
        state: ClientState,
    ):
        self.registry = CollectorRegistry()
        self.requests = Counter("firewall_requests", "Inference requests received", ["model"], registry=self.registry)
        self.decisions = Counter("firewall_decisions", "How requests ended", ["model", "outcome"], registry=self.registry)
        self.findings = Counter("firewall_findings", "Findings raised", ["model", "rule"], registry=self.registry)
        self.stage_seconds = Histogram(
            "firewall_stage_seconds", "Pipeline stage latency", ["model", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.registry.register(StateCollector(pipelines, state))
        self._server = None

    def observer(self, model: str) -> Callable[[str, float], None]:
        """The pipeline's latency hook for one model."""
        return lambda stage, seconds: self.stage_seconds.labels(model, stage).observe(seconds)

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT (port 0: any free port); return the port."""
        host, _, port = listen.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class StateCollector:
    """Gauges read from the client state and the stages at scrape time."""

    def __init__(self, pipelines: dict[str, ModelPipeline], state: ClientState):
        self.pipelines = pipelines
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state.stats()
        yield GaugeMetricFamily("firewall_tracked_clients", "Clients with state (buckets, bans)", value=state["tracked_clients"])
        yield GaugeMetricFamily("firewall_bans_active", "Clients and addresses banned now", value=state["bans_active"])
        if "shared_up" in state:
            yield GaugeMetricFamily("firewall_shared_state_up", "1 while the shared state store answers", value=state["shared_up"])
            yield CounterMetricFamily("firewall_shared_state_errors", "Failed shared state calls", value=state["shared_errors"])
            yield CounterMetricFamily("firewall_shared_state_dropped", "Queries and label writes not shared", value=state["shared_dropped"])
        stats = GaugeMetricFamily("firewall_stage_stat", "Stage statistics (index sizes)", labels=["model", "stage", "stat"])
        for model, pipeline in self.pipelines.items():
            for stage in pipeline.chain:
                report = getattr(stage, "stats", None)
                if report is not None:
                    for name, value in report().items():
                        stats.add_metric([model, stage.name, name], float(value))
        yield stats
        dropped = CounterMetricFamily(
            "firewall_deferred_dropped", "Requests whose after-answer monitoring was dropped (queue full)", labels=["model"]
        )
        for model, pipeline in self.pipelines.items():
            if pipeline.deferred is not None:
                dropped.add_metric([model], float(pipeline.deferred.dropped))
        yield dropped
