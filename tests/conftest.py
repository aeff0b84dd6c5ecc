"""Shared test fixtures: held-out images, and a real firewall served on a loopback port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest
import structlog
import tritonclient.grpc as triton

from firewall.config import Settings
from firewall.logs import logging_config
from firewall.server import Firewall
from models.runtime import OnnxClassifier, bundled_model_path

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def mnist_heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FIXTURES / "mnist_heldout.npz")
    return data["images"], data["labels"]


@pytest.fixture(scope="session")
def mnist_model() -> OnnxClassifier:
    return OnnxClassifier(bundled_model_path("mnist"))


def _loopback(overrides: dict) -> dict:
    """Every listener on a free loopback port, embedded MNIST, then the test's own settings."""
    values = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "models": {"mnist": {}},
    }
    values.update(overrides)
    return values


def make_settings(**overrides) -> Settings:
    """Embedded MNIST with no detectors (pass-through) unless the test configures some."""
    values = _loopback(overrides)
    values["models"] = {name: {"detectors": [], **model} for name, model in values["models"].items()}
    return Settings(**values)


def calibrated_settings(**overrides) -> Settings:
    """The zero-configuration firewall (the bundled model's calibrated detectors, the default
    policy) on loopback ports, with the test's own settings."""
    return Settings(**_loopback(overrides))


@contextmanager
def running_firewall(settings: Settings) -> Iterator[Firewall]:
    """Serve ``settings`` on its own event loop thread; yields the started Firewall."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Firewall:
        firewall = Firewall(settings)
        await firewall.start()
        return firewall

    firewall = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    try:
        yield firewall
    finally:
        asyncio.run_coroutine_threadsafe(firewall.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class FakeClock:
    """A monotonic clock that moves only when the test advances it (starts at a power of two, so
    binary fractions of a second add up exactly)."""

    def __init__(self, now: float = 1024.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drive_clock(firewall: Firewall, clock: FakeClock) -> None:
    """Run the firewall's time-based state (token buckets, bans, suspects, alert intervals) on ``clock``."""
    firewall.state.clock = clock
    firewall.bans.clock = clock
    firewall.service.admission.clock = clock
    firewall.service.policy.clock = clock
    firewall.alerts.clock = clock


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition``; the bound only stops a hung test (no test asserts how long it took)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def pixel_bomb(ext: str, side: int = 5000) -> bytes:
    """A well-formed black grey-scale PNG or JPEG of ``side`` x ``side`` pixels: a few kilobytes
    that OpenCV decodes to the full size (5000 x 5000 is 25 Mpixels, over the default 16.7 M)."""
    ok, buffer = cv2.imencode(ext, np.zeros((side, side), np.uint8))
    assert ok
    return buffer.tobytes()


def address(firewall: Firewall) -> str:
    return f"127.0.0.1:{firewall.port}"


def uint8_input(images: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


@pytest.fixture(scope="module")
def firewall() -> Iterator[Firewall]:
    with running_firewall(make_settings()) as running:
        yield running


@pytest.fixture
def client(firewall: Firewall) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(address(firewall)) as connected:
        yield connected


@pytest.fixture
def log_lines(tmp_path):
    """Route structlog (with the service's configuration) to a file; yield a reader of its lines."""
    path = tmp_path / "stdout.jsonl"
    with path.open("w", buffering=1) as stream:
        structlog.configure(**logging_config("INFO", stream))
        try:
            yield lambda: [json.loads(line) for line in path.read_text().splitlines()]
        finally:
            structlog.reset_defaults()
