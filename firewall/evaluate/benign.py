"""Benign traffic: many clients, each sending its own held-out images at a human-like pace.

Each client waits an exponentially distributed gap (mean ``interval_s``) before each image, as
independent users do, and with probability ``retry_rate`` sends the same request again byte for
byte, as a client does after a lost answer. Every refusal of this traffic is a false positive;
throttling is waited out and counted apart.

``run_pattern`` and ``run_distinct_ids`` send the benign traffic patterns of
``firewall.evaluate.patterns`` (retries, re-encodings, camera bursts, popular images, ...) the same way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from firewall.evaluate.alerts import Alert
from firewall.evaluate.endpoint import Endpoint, Refusal, Request
from firewall.evaluate.patterns import DISTINCT_IDS, ClientStream, Query, resize


@dataclass
class ClientTraffic:
    client_id: str
    queries: int = 0
    retries: int = 0
    refused: int = 0
    throttled: int = 0  # tries answered RESOURCE_EXHAUSTED, then retried
    answered: int = 0
    correct: int = 0
    sent: list[float] = field(default_factory=list, repr=False)  # wall-clock time of each query


@dataclass
class BenignResult:
    clients: list[ClientTraffic]
    baseline_accuracy: float | None = None  # the bare model on the same images

    def summary(self) -> dict:
        queries = sum(c.queries for c in self.clients)
        refused = sum(c.refused for c in self.clients)
        answered = sum(c.answered for c in self.clients)
        refused_clients = sum(1 for c in self.clients if c.refused)
        return {
            "clients": len(self.clients),
            "queries": queries,
            "retries": sum(c.retries for c in self.clients),
            "refused_queries": refused,
            "throttled_tries": sum(c.throttled for c in self.clients),
            "refused_clients": refused_clients,
            "false_positives_per_query": refused / queries if queries else None,
            "false_positives_per_client": refused_clients / len(self.clients) if self.clients else None,
            "accuracy": sum(c.correct for c in self.clients) / answered if answered else None,
        }


def run_benign(
    endpoint: Endpoint,
    images: np.ndarray,
    labels: np.ndarray,
    client_ids: list[str],
    interval_s: float,
    retry_rate: float,
    seed: int,
    on_query: Callable[[], None] = lambda: None,
) -> BenignResult:
    """Images are uint8 [N, H, W, C]; client k sends images k, k + clients, k + 2 * clients, ..."""

    def client(k: int) -> ClientTraffic:
        rng = np.random.default_rng([seed, k])
        traffic = ClientTraffic(client_ids[k])
        for index in range(k, len(images), len(client_ids)):
            time.sleep(rng.exponential(interval_s))
            request = endpoint.request(images[index : index + 1])
            retry = rng.random() < retry_rate
            for _ in range(1 + retry):
                traffic.queries += 1
                traffic.sent.append(time.time())
                try:
                    answer, throttled = endpoint.send_patiently(request, traffic.client_id)
                except Refusal:
                    traffic.refused += 1
                    continue
                traffic.throttled += throttled
                traffic.answered += 1
                traffic.correct += int(answer.labels[0] == labels[index])
            traffic.retries += retry
            on_query()
        return traffic

    with ThreadPoolExecutor(max_workers=len(client_ids), thread_name_prefix="benign") as pool:
        return BenignResult(list(pool.map(client, range(len(client_ids)))))


def accuracy(endpoint: Endpoint, images: np.ndarray, labels: np.ndarray, client_id: str, batch: int = 64) -> float:
    """Plain accuracy in batches: the baseline's reference for what sanitizing costs in accuracy."""
    correct = 0
    for start in range(0, len(images), batch):
        answer, _ = endpoint.send_patiently(endpoint.request(images[start : start + batch]), client_id)
        correct += int((answer.labels == labels[start : start + batch]).sum())
    return correct / len(images)


# -- benign traffic patterns (firewall.evaluate.patterns) ----------------------------------------

WARNING_LEVELS = ("warning", "error", "critical")


@dataclass
class PatternClient(ClientTraffic):
    answers: list[int] = field(default_factory=list, repr=False)  # the target's label per query, -1: refused


@dataclass
class PatternResult:
    """One benign pattern sent through the target; ``baseline_answers`` are the bare model's on the same queries."""

    pattern: str
    streams: list[ClientStream] = field(repr=False)
    clients: list[PatternClient]
    baseline_answers: list[int] | None = field(default=None, repr=False)

    def summary(self, alerts: list[Alert] | None = None) -> dict:
        queries = [query for stream in self.streams for query in stream.queries]
        truth = np.array([query.label for query in queries], dtype=np.int64)
        answers = np.array([a for client in self.clients for a in client.answers], dtype=np.int64)
        answered = answers >= 0
        entry = {
            "pattern": self.pattern,
            "clients": len(self.clients),
            "queries": len(queries),
            "retries": sum(query.retry for query in queries),
            "encoded_queries": sum(query.encoded for query in queries),
            "refused_clients": sum(1 for client in self.clients if client.refused),
            "refused_queries": sum(client.refused for client in self.clients),
            "throttled_tries": sum(client.throttled for client in self.clients),
            "alerted_clients": alerted_clients(self.clients, alerts),
            "accuracy": float((answers[answered] == truth[answered]).mean()) if answered.any() else None,
            "baseline_accuracy": None,
            "agreement_with_baseline": None,
        }
        entry["refused_clients_share"] = entry["refused_clients"] / len(self.clients) if self.clients else None
        if self.baseline_answers is not None and len(queries):
            baseline = np.array(self.baseline_answers, dtype=np.int64)
            entry["baseline_accuracy"] = float((baseline == truth).mean())
            if answered.any():
                entry["agreement_with_baseline"] = float((answers[answered] == baseline[answered]).mean())
        return entry


def alerted_clients(clients: list[ClientTraffic], alerts: list[Alert] | None) -> int | None:
    """Clients with at least one warning-level alert (lines without a level count as warnings)."""
    if alerts is None:
        return None
    ids = {client.client_id for client in clients}
    return len({a.client_id for a in alerts if a.client_id in ids and (a.level or "warning") in WARNING_LEVELS})


def query_request(endpoint: Endpoint, query: Query) -> Request:
    """Encoded images go as a BYTES tensor, pixels as UINT8 [1, H, W, C]."""
    if query.encoded:
        return endpoint.request_encoded([query.payload])
    return endpoint.request(query.payload[None])


def _send_stream(
    endpoint: Endpoint, stream: ClientStream, traffic: PatternClient, rng, interval_s: float, on_query
) -> None:
    for query in stream.queries:
        if interval_s > 0 and not query.follows:
            time.sleep(rng.exponential(interval_s))
        traffic.queries += 1
        traffic.retries += query.retry
        traffic.sent.append(time.time())
        try:
            answer, throttled = endpoint.send_patiently(query_request(endpoint, query), traffic.client_id)
        except Refusal:
            traffic.refused += 1
            traffic.answers.append(-1)
        else:
            traffic.throttled += throttled
            traffic.answered += 1
            traffic.correct += int(answer.labels[0] == query.label)
            traffic.answers.append(int(answer.labels[0]))
        on_query()


def run_pattern(
    endpoint: Endpoint,
    streams: list[ClientStream],
    client_ids: list[str],
    interval_s: float,
    seed: int,
    baseline: Endpoint | None = None,
    size: tuple[int, int] | None = None,
    on_query: Callable[[], None] = lambda: None,
) -> PatternResult:
    """Every client at once, each sending its stream in order: an exponential gap (mean ``interval_s``)
    before each new image, none before a query that follows the previous one (a retry, a frame, another
    encoding). With a ``baseline``, the bare model then answers the same queries, decoded and resized
    to ``size`` (the model's own input), in batches."""
    if len(client_ids) != len(streams):
        raise ValueError("one client id per stream")

    def client(k: int) -> PatternClient:
        traffic = PatternClient(client_ids[k])
        _send_stream(endpoint, streams[k], traffic, np.random.default_rng([seed, 7919, k]), interval_s, on_query)
        return traffic

    with ThreadPoolExecutor(max_workers=max(1, len(streams)), thread_name_prefix="pattern") as pool:
        clients = list(pool.map(client, range(len(streams))))
    result = PatternResult(streams[0].pattern if streams else "", streams, clients)
    if baseline is not None and size is not None:
        queries = [query for stream in streams for query in stream.queries]
        result.baseline_answers = baseline_labels(baseline, queries, size, client_ids[0] + "-baseline")
    return result


def baseline_labels(
    endpoint: Endpoint, queries: list[Query], size: tuple[int, int], client_id: str, batch: int = 64
) -> list[int]:
    """The bare model's label for each query, decoded and brought to the model's own size."""
    labels: list[int] = []
    for start in range(0, len(queries), batch):
        pixels = np.stack([resize(query.pixels(), *size) for query in queries[start : start + batch]])
        answer, _ = endpoint.send_patiently(endpoint.request(pixels), client_id)
        labels += [int(label) for label in answer.labels]
    return labels


@dataclass
class DistinctIdsResult:
    clients: list[ClientTraffic]
    first_pass: list[bool]  # per id: every image it sent was that image's first use in the run

    def summary(self, alerts: list[Alert] | None = None) -> dict:
        ids = len(self.clients)
        refused = sum(1 for client in self.clients if client.refused)
        answered = sum(client.answered for client in self.clients)
        fresh = [client for client, first in zip(self.clients, self.first_pass) if first]
        fresh_refused = sum(1 for client in fresh if client.refused)
        return {
            "pattern": DISTINCT_IDS,
            "clients": ids,
            "queries": sum(client.queries for client in self.clients),
            "refused_clients": refused,
            "refused_clients_share": refused / ids if ids else None,
            "refused_queries": sum(client.refused for client in self.clients),
            "throttled_tries": sum(client.throttled for client in self.clients),
            "alerted_clients": alerted_clients(self.clients, alerts),
            "accuracy": sum(client.correct for client in self.clients) / answered if answered else None,
            "first_pass_clients": len(fresh),
            "first_pass_refused_clients": fresh_refused,
            "first_pass_refused_share": fresh_refused / len(fresh) if fresh else None,
        }


def run_distinct_ids(
    endpoint: Endpoint,
    streams: Iterable[ClientStream],
    prefix: str,
    workers: int = 8,
    on_client: Callable[[], None] = lambda: None,
) -> DistinctIdsResult:
    """Many one-off ids (``patterns.distinct_ids``), ``workers`` at a time, unpaced; id k is ``<prefix>-k``.

    The summary gives the refused share over all ids and over the first-pass ids alone (those whose
    images no earlier id sent: chance neighbours, not re-sent content)."""
    clients: list[ClientTraffic] = []
    first_pass: list[bool] = []

    def client(stream: ClientStream) -> PatternClient:
        traffic = PatternClient(f"{prefix}-{stream.client}")
        _send_stream(endpoint, stream, traffic, None, 0.0, lambda: None)
        on_client()
        return traffic

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distinct-ids") as pool:
        chunk: list[ClientStream] = []
        for stream in streams:
            chunk.append(stream)
            first_pass.append(all(query.copy == 0 for query in stream.queries))
            if len(chunk) == 4 * workers:
                clients += pool.map(client, chunk)
                chunk = []
        clients += pool.map(client, chunk)
    return DistinctIdsResult(clients, first_pass)
