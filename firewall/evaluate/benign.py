"""Benign traffic: many clients, each sending its own held-out images at a human-like pace.

Each client waits an exponentially distributed gap (mean ``interval_s``) before each image, as
independent users do, and with probability ``retry_rate`` sends the same request again byte for
byte, as a client does after a lost answer. Every refusal of this traffic is a false positive;
throttling is waited out and counted apart.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from firewall.evaluate.endpoint import Endpoint, Refusal


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
