"""Test-only pipeline stages that raise findings on a condition the test controls."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from firewall.server import Firewall
from firewall.stage import Finding, RequestContext


def marked(images: np.ndarray) -> np.ndarray:
    """Copies of uint8 images with the top-left pixel set to 255: what ``Flagger`` flags."""
    flagged = images.copy()
    flagged[:, 0, 0] = 255
    return flagged


class Flagger:
    """Flags every image whose top-left pixel (as received) is at full intensity."""

    def __init__(
        self,
        name: str = "flagger",
        rule: str = "test.flagger",
        score: float = 0.9,
        threshold: float = 0.5,
        answer: int | None = None,
        about: str = "client",
    ):
        self.name = name
        self.about = about  # whom its findings accuse: the client, or its address
        self.rule = rule
        self.score = score
        self.threshold = threshold
        self.answer = answer  # the decoy label its findings carry, as a probed region's do
        self.flagged = 0

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        findings = [
            Finding(self.rule, self.score, self.threshold, item=index, answer=self.answer, about=self.about)
            for index, image in enumerate(ctx.images)
            if np.max(image[0, 0]) >= (255 if image.dtype == np.uint8 else 1.0)
        ]
        self.flagged += len(findings)
        return findings

    def stats(self) -> dict[str, float]:
        return {"flagged_images": self.flagged}


class Slow:
    """Holds every request for ``seconds`` (a lower bound on how long a decided request takes)."""

    name = "slow"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        time.sleep(self.seconds)
        return []


class Gate:
    """Holds every request until ``release()``, so a test knows exactly which calls are in flight."""

    name = "gate"

    def __init__(self):
        self.entered = 0
        self.released = False
        self._changed = threading.Condition()

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        with self._changed:
            self.entered += 1
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.released, timeout=120)  # a guard against a hung test only
        return []

    def wait_entered(self, count: int) -> None:
        """Block until ``count`` requests are held (no timing is asserted: the bound only stops a hang)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.entered >= count, timeout=120), self.entered

    def release(self) -> None:
        with self._changed:
            self.released = True
            self._changed.notify_all()


class Recorder:
    """Records the client id and source address of every request (to observe identification)."""

    name = "recorder"

    def __init__(self):
        self.client_ids: list[str] = []
        self.peers: list[str] = []

    def __call__(self, ctx: RequestContext) -> list[Finding]:
        self.client_ids.append(ctx.client_id)
        self.peers.append(ctx.peer)
        return []


@contextmanager
def with_stage(firewall: Firewall, stage, models: list[str] | None = None) -> Iterator:
    """Append ``stage`` to the pipelines of ``models`` (default: all) for the duration of the block."""
    pipelines = [firewall.service.pipelines[name] for name in models or firewall.service.pipelines]
    for pipeline in pipelines:
        pipeline.chain.append(stage)
        pipeline.arrange(pipeline.policy)
    try:
        yield stage
    finally:
        for pipeline in pipelines:
            pipeline.chain.remove(stage)
            pipeline.arrange(pipeline.policy)
