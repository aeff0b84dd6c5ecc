"""Cost: latency and throughput of the target beside the baseline, measured in the same run.

For each number of concurrent callers, the two endpoints take turns (target, baseline, then
baseline, target, ...) so that background load on a shared machine falls on both alike. Each
caller is one client id sending one image per request back to back, cycling through distinct
held-out images. Refused requests (throttling, detections) are counted apart from the latencies.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from firewall.evaluate.endpoint import AsyncEndpoint, Endpoint, Refusal, Request

WARMUP_REQUESTS = 20


@dataclass
class Load:
    latencies_s: list[float] = field(default_factory=list)
    refused: int = 0
    elapsed_s: float = 0.0

    def add(self, other: "Load") -> None:
        self.latencies_s += other.latencies_s
        self.refused += other.refused
        self.elapsed_s += other.elapsed_s

    def summary(self) -> dict:
        latencies_ms = np.array(self.latencies_s) * 1000.0
        answered = len(latencies_ms)
        return {
            "answered": answered,
            "refused": self.refused,
            "requests_per_s": answered / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_ms": float(np.percentile(latencies_ms, 50)) if answered else None,
            "p99_ms": float(np.percentile(latencies_ms, 99)) if answered else None,
        }


@dataclass
class CostLevel:
    callers: int
    loads: dict[str, Load]  # endpoint name ("target", "baseline") -> its measurements

    def summary(self) -> dict:
        result: dict = {"callers": self.callers, **{name: load.summary() for name, load in self.loads.items()}}
        if "baseline" in result and result["baseline"]["requests_per_s"]:
            result["throughput_ratio"] = result["target"]["requests_per_s"] / result["baseline"]["requests_per_s"]
        return result


async def _load(endpoint: AsyncEndpoint, requests: list[Request], callers: int, duration_s: float, prefix: str) -> Load:
    load = Load()
    deadline = time.perf_counter() + duration_s

    async def caller(n: int) -> None:
        index = n
        while time.perf_counter() < deadline:
            request = requests[index % len(requests)]
            index += callers
            started = time.perf_counter()
            try:
                await endpoint.send(request, f"{prefix}-{n}")
            except Refusal:
                load.refused += 1
                continue
            load.latencies_s.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    load.elapsed_s = time.perf_counter() - started
    return load


async def _measure(
    endpoints: dict[str, Endpoint],
    pixels: np.ndarray,
    levels: list[int],
    duration_s: float,
    rounds: int,
    prefix: str,
    on_slot: Callable[[], None],
) -> list[CostLevel]:
    clients = {name: AsyncEndpoint(endpoint) for name, endpoint in endpoints.items()}
    requests = {
        name: [endpoint.request(pixels[i : i + 1]) for i in range(len(pixels))] for name, endpoint in endpoints.items()
    }
    try:
        for name, client in clients.items():
            for request in requests[name][:WARMUP_REQUESTS]:
                try:
                    await client.send(request, f"{prefix}-warmup")
                except Refusal:
                    pass
        results = []
        for callers in levels:
            level = CostLevel(callers, {name: Load() for name in clients})
            for round_index in range(rounds):
                order = list(clients) if round_index % 2 == 0 else list(reversed(clients))
                for name in order:
                    tag = f"{prefix}-{callers}-{round_index}"
                    level.loads[name].add(await _load(clients[name], requests[name], callers, duration_s, tag))
                    on_slot()
            results.append(level)
        return results
    finally:
        for client in clients.values():
            await client.close()


def measure_cost(
    endpoints: dict[str, Endpoint],
    pixels: np.ndarray,
    levels: list[int],
    duration_s: float,
    rounds: int,
    prefix: str,
    on_slot: Callable[[], None] = lambda: None,
) -> list[CostLevel]:
    """``pixels``: uint8 [N, H, W, C] benign images to cycle through."""
    return asyncio.run(_measure(endpoints, pixels, levels, duration_s, rounds, prefix, on_slot))
