"""Evidence that accrues per client (or per source address) over a sequence of queries.

Detection is a decision over sequences, not over one query: a single near neighbour, or a single
image a per-image detector flags at its calibrated 5 % rate, says little; many of them from one
client say a lot.

- ``DecayingCount``: a count of observations that halves every ``half_life_s`` (exponentially
  weighted), for the probing detector's evidence (queries next to one the model labelled
  otherwise). An attacker's evidence does not wait for a window to fill, and a benign client's
  rare hit fades.
- ``Cusum``: Page's cumulative-sum test ("Continuous Inspection Schemes", Biometrika 1954) over
  Bernoulli observations, for the per-image detectors. Under H0 a client's images are flagged at the
  calibrated benign rate ``p0``; under H1 at ``p1``. Each image adds its log-likelihood ratio,
  log(p1/p0) when flagged and log((1-p1)/(1-p0)) when not; the sum is floored at 0, so a long
  benign past banks no credit for a later attack, and the client is flagged while it is at least
  ``h``. With p0 = 0.05, p1 = 0.5 and h = 13.8 (log 1e6), six flagged images in a row cross it,
  a benign client at 5 % almost never does, and a client whose images are flagged at 90 % (feature
  squeezing on FGSM and PGD examples transferred from a surrogate) crosses it in about seven. At
  h = 11.5 (five in a row) a benign client whose few hard digits came close together was alerted
  (the benign-patterns test, about one run in ten).

Both keep at most ``max_keys`` keys, least recently updated forgotten first, so a flood of fresh
ids costs bounded memory (and an id that is forgotten had little evidence or was idle).

Several replicas: a per-image stage's ``share`` takes its CUSUM from the shared state
(``detectors.shared``), one statistic per client for every replica, so a client spreading its
images over replicas is tested on all of them in order. The probing counts stay a local
``DecayingCount`` on each replica, fed with every replica's evidence by the query exchange.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from detectors.shared import ClientTest, SharedState
from firewall.stage import Finding, RequestContext


class _Bounded:
    def __init__(self, max_keys: int):
        self.max_keys = max_keys
        self.values: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (value, time)
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.values)

    def forget(self, key: str) -> None:
        with self.lock:
            self.values.pop(key, None)

    def _store(self, key: str, value: float, now: float) -> None:
        self.values[key] = (value, now)
        self.values.move_to_end(key)
        while len(self.values) > self.max_keys:
            self.values.popitem(last=False)


class DecayingCount(_Bounded):
    def __init__(self, half_life_s: float, max_keys: int):
        super().__init__(max_keys)
        self.rate = math.log(2) / half_life_s

    def add(self, key: str, count: float, now: float) -> float:
        """Add ``count`` observations made at ``now``; return the key's decayed count. An observation
        older than the key's last one (another replica's, arriving late) is decayed to that time."""
        with self.lock:
            value, then = self.values.get(key, (0.0, now))
            if now >= then:
                value = value * math.exp(-self.rate * (now - then)) + count
            else:
                value, now = value + count * math.exp(-self.rate * (then - now)), then
            self._store(key, value, now)
            return value

    def current(self, key: str, now: float) -> float:
        """The key's decayed count now, without adding to it."""
        with self.lock:
            value, then = self.values.get(key, (0.0, now))
            return value * math.exp(-self.rate * max(now - then, 0.0))


def cusum_steps(p0: float, p1: float) -> tuple[float, float]:
    """The log-likelihood ratio a flagged and a clean image add."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


class Cusum(_Bounded):
    def __init__(self, p0: float, p1: float, threshold: float, max_keys: int):
        super().__init__(max_keys)
        self.flagged_step, self.clean_step = cusum_steps(p0, p1)
        self.threshold = threshold

    def add(self, key: str, flags: list[bool], now: float) -> float:
        """Observe a client's images in order; return the statistic after the largest of them."""
        with self.lock:
            value, _ = self.values.get(key, (0.0, now))
            peak = value
            for flagged in flags:
                value = max(0.0, value + (self.flagged_step if flagged else self.clean_step))
                peak = max(peak, value)
            self._store(key, value, now)
            return peak

    def current(self, key: str) -> float:
        """The key's statistic (0 when it has none)."""
        with self.lock:
            return self.values.get(key, (0.0, 0.0))[0]

    def set(self, key: str, value: float, now: float) -> None:
        """Take a statistic computed elsewhere (a shared store's)."""
        with self.lock:
            self._store(key, value, now)


class ClientRateConfig(BaseModel):
    """When a per-image detector flags a client: its flagged share far above the benign rate (CUSUM)."""

    model_config = ConfigDict(extra="forbid")

    benign_rate: float = Field(0.05, gt=0, lt=1, description="p0: share of benign images flagged (calibrated)")
    attack_rate: float = Field(0.5, gt=0, lt=1, description="p1: share of crafted images flagged")
    threshold: float = Field(13.8, gt=0, description="h: log-likelihood ratio that flags the client")
    max_clients: int = Field(100_000, ge=1, description="clients tracked; least recently seen forgotten")
    keep_s: float = Field(24 * 3600.0, gt=0, description="a shared store forgets a client's statistic this long after its last image")

    def build(self) -> Cusum:
        return Cusum(self.benign_rate, self.attack_rate, self.threshold, self.max_clients)

    def shared(self, state: SharedState, name: str) -> ClientTest:
        return state.cusum(name, self.benign_rate, self.attack_rate, self.threshold, self.max_clients, self.keep_s)


class WithClientRate(Protocol):
    """A per-image stage's configuration: its ``client`` section."""

    client: ClientRateConfig


class ClientRateStage:
    """The per-image stages' per-client evidence, for the operator to read (``client_evidence``) and reset
    (``forget_client``); with several replicas (``share``) one statistic per client for all of them."""

    clients: ClientTest
    config: WithClientRate

    def share(self, state: SharedState, name: str) -> None:
        self.clients = self.config.client.shared(state, name)

    def client_evidence(self, client_id: str) -> dict[str, float]:
        return {"cusum": self.clients.current(client_id), "cusum_threshold": self.clients.threshold}

    def forget_client(self, client_id: str) -> None:
        self.clients.forget(client_id)


def client_rate_findings(
    rule: str, test: ClientTest, ctx: RequestContext, scores: np.ndarray, threshold: float, details: dict
) -> list[Finding]:
    """Feed a request's per-image flags to the client's test; a finding while the client is over it.

    Only new content counts (``ctx.scratch["novel"]``, from the probing stage, when it runs first):
    a flagged image re-sent in a burst or at three JPEG qualities is one observation, not five.
    """
    novel = ctx.scratch.get("novel", [True] * len(scores))
    flags = [bool(score > threshold) for score in scores]
    observed = [flag for flag, new in zip(flags, novel) if new]
    statistic = test.add(ctx.client_id, observed, time.time())
    if statistic < test.threshold:
        return []
    worst = int(np.argmax(scores))
    details = {
        **details,
        "image_score": float(scores[worst]),
        "image_threshold": threshold,
        "flagged_items": sum(flags),
    }
    return [Finding(rule, statistic, test.threshold, item=worst if flags[worst] else None, details=details)]
