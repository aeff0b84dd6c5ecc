"""The benign-pattern phase of ``firewall evaluate``: every pattern of ``firewall.evaluate.patterns``
through the target, each from its own client ids and its own slice of the held-out images.

``--benign-patterns`` names the patterns (default: all), ``--pattern-clients`` and
``--pattern-images`` size them, and ``--distinct-ids N`` adds the large run of N one-off ids (off by
default). The slices lie just before the attacks' images, one after the other, so the plain benign
phase keeps the first images; ``distinct-ids`` draws from every image the attacks leave (it must
reuse images anyway, see ``patterns.distinct_ids``), and runs after the other patterns. Client ids:
``<prefix>-pattern-<name>-<k>`` and ``<prefix>-ids-<k>``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from tqdm import tqdm

from firewall.evaluate.alerts import Alert
from firewall.evaluate.benign import DistinctIdsResult, PatternResult, run_distinct_ids, run_pattern
from firewall.evaluate.data import Dataset
from firewall.evaluate.endpoint import Endpoint
from firewall.evaluate.errors import EvaluationError
from firewall.evaluate.patterns import DISTINCT_IDS, PATTERNS, PatternOptions, distinct_ids, generate, images_needed


class BenignPatterns:
    def __init__(self, args: argparse.Namespace, dataset: Dataset):
        for name in args.benign_patterns:
            if name not in PATTERNS:
                known = ", ".join(PATTERNS)
                raise EvaluationError(f"--benign-patterns: unknown pattern {name!r} (choose from {known})")
        self.args, self.dataset, self.options = args, dataset, PatternOptions()
        self.names: list[str] = list(dict.fromkeys(args.benign_patterns))
        self.needed = {n: images_needed(n, args.pattern_clients, args.pattern_images, self.options) for n in self.names}
        self.slices: dict[str, tuple[int, int]] = {}
        self.pool_end = len(dataset.images)
        self.shortage: str | None = None
        self.streams: dict = {}
        self.ids: dict[str, list[str]] = {}
        self.results: list[PatternResult] = []
        self.distinct_ids: DistinctIdsResult | None = None
        self.prefix = ""

    def place(self, end: int, keep: int) -> int:
        """Lay the slices out just before image ``end``, leaving at least ``keep`` images before them;
        returns where they start. A shortage is reported when the phase is planned, not here."""
        self.pool_end = end
        start = end - sum(self.needed.values())
        if start < keep:
            self.shortage = (
                f"{end} images left by the attacks are too few for the benign patterns "
                f"({sum(self.needed.values())} images) and {keep} benign clients: lower --pattern-clients "
                "or --pattern-images, or name fewer --benign-patterns"
            )
            return end
        position = start
        for name in self.names:
            self.slices[name] = (position, position + self.needed[name])
            position += self.needed[name]
        return start

    @property
    def steps(self) -> int:
        queries = sum(len(stream.queries) for streams in self.streams.values() for stream in streams)
        return queries + self.args.distinct_ids

    def plan(self, prefix: str, roles: dict[str, str]) -> None:
        if self.shortage and self.names:
            raise EvaluationError(self.shortage)
        args, images, labels = self.args, self.dataset.images, self.dataset.labels
        self.prefix = prefix
        for name in self.names:
            first, last = self.slices[name]
            self.streams[name] = generate(
                name, images[first:last], labels[first:last], clients=args.pattern_clients,
                images_per_client=args.pattern_images, seed=args.seed, options=self.options,
            )  # fmt: skip
            self.ids[name] = [f"{prefix}-pattern-{name}-{k}" for k in range(args.pattern_clients)]
            roles.update(dict.fromkeys(self.ids[name], "benign"))
        roles.update(dict.fromkeys((f"{prefix}-ids-{k}" for k in range(args.distinct_ids)), "benign"))

    def run(self, endpoints: dict[str, Endpoint], progress: tqdm) -> None:
        args, size = self.args, self.dataset.images.shape[1:3]
        for name in self.names:
            progress.set_description(f"benign {name}")
            self.results.append(
                run_pattern(
                    endpoints["target"], self.streams[name], self.ids[name], args.benign_interval, args.seed,
                    baseline=endpoints.get("baseline"), size=size, on_query=lambda: progress.update(1),
                )  # fmt: skip
            )
        if args.distinct_ids:
            progress.set_description(DISTINCT_IDS)
            pool = slice(0, self.pool_end)
            images, labels = self.dataset.images[pool], self.dataset.labels[pool]
            streams = distinct_ids(images, labels, ids=args.distinct_ids, seed=args.seed)
            self.distinct_ids = run_distinct_ids(
                endpoints["target"], streams, f"{self.prefix}-ids", on_client=lambda: progress.update(1)
            )

    def report(self, alerts: list[Alert] | None) -> list[dict]:
        entries = [result.summary(alerts) for result in self.results]
        if self.distinct_ids is not None:
            entries.append(self.distinct_ids.summary(alerts))
        return entries

    def setup(self) -> dict:
        return {
            "patterns": self.names,
            "clients": self.args.pattern_clients,
            "images_per_client": self.args.pattern_images,
            "slices": {name: list(bounds) for name, bounds in self.slices.items()},
            "distinct_ids": self.args.distinct_ids,
            "distinct_ids_pool": self.pool_end if self.args.distinct_ids else None,
            "options": asdict(self.options),
        }
