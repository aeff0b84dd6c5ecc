"""Triton's per-model inference statistics (the ModelStatistics call): counts and times, nothing per client.

``success`` and ``fail`` time whole requests from admission to answer; ``queue`` is the wait for a
pipeline worker and ``compute_infer`` the worker's time (decode, stages, prediction) of answered
requests. ``inference_count`` counts images, ``execution_count`` requests. Everything is updated
on the event loop, so no lock is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from firewall.protocol import pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class ModelStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)

    def answered(self, images: int, total_ns: int, queue_ns: int, compute_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += images
        self.execution_count += 1
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_infer.add(compute_ns)

    def failed(self, total_ns: int) -> None:
        self.fail.add(total_ns)

    def message(self, name: str) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=name,
            version="1",
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.message(),
                fail=self.fail.message(),
                queue=self.queue.message(),
                compute_input=pb.StatisticDuration(),
                compute_infer=self.compute_infer.message(),
                compute_output=pb.StatisticDuration(),
            ),
        )
