"""Benign traffic patterns (firewall/evaluate/patterns.py): the generators make what they say, and every
pattern, sent through a real firewall with tritonclient, is answered and counted.

Today's detectors ban benign clients on several of these patterns (issue 11), so the end-to-end test
serves the calibrated detectors under ``policy: monitor`` and asserts no refusal there; refusal
counting is checked apart, against a pass-through firewall with a stage that refuses exactly the
images larger than 28 px.
"""

from __future__ import annotations

import numpy as np
import pytest

from firewall.evaluate.benign import run_distinct_ids, run_pattern
from firewall.evaluate.endpoint import Endpoint
from firewall.evaluate.patterns import (
    PATTERNS,
    PatternOptions,
    distinct_ids,
    generate,
    images_needed,
    resize,
    shift_image,
)
from firewall.stage import Finding
from tests.conftest import address, calibrated_settings, make_settings, running_firewall

SMALL = PatternOptions(popular=10, burst=3)


@pytest.fixture(scope="module")
def heldout(mnist_heldout):
    images, labels = mnist_heldout
    return images[..., None], labels


def streams(heldout, name, clients=5, per_client=10, seed=0, options=SMALL, offset=0):
    images, labels = heldout
    count = images_needed(name, clients, per_client, options)
    return generate(
        name, images[offset : offset + count], labels[offset : offset + count],
        clients=clients, images_per_client=per_client, seed=seed, options=options,
    )  # fmt: skip


def queries_of(client_streams):
    return [query for stream in client_streams for query in stream.queries]


def mean_abs_error(query, source) -> float:
    return float(np.abs(resize(query.pixels(), *source.shape[:2]).astype(float) - source).mean())


@pytest.mark.parametrize("name", PATTERNS)
def test_seeded_and_pure(heldout, name):
    first, again = streams(heldout, name), streams(heldout, name)
    assert [q.content() for q in queries_of(first)] == [q.content() for q in queries_of(again)]
    assert all(stream.pattern == name for stream in first) and [s.client for s in first] == list(range(5))
    if name in ("retries", "camera-bursts", "popular", "thumbnail-and-full"):  # the patterns that draw
        other = streams(heldout, name, seed=1)
        assert [q.content() for q in queries_of(first)] != [q.content() for q in queries_of(other)]


def test_distinct_and_one_class(heldout):
    images, labels = heldout
    distinct = streams(heldout, "distinct")
    sources = [q.source for q in queries_of(distinct)]
    assert sorted(sources) == list(range(50))
    assert all(np.array_equal(q.pixels(), images[q.source]) and not q.encoded for q in queries_of(distinct))
    one_class = streams(heldout, "one-class")
    sources = [q.source for q in queries_of(one_class)]
    assert len(sources) == len(set(sources)) == 50  # each client its own images
    for stream in one_class:
        assert len({q.label for q in stream.queries}) == 1 and len(stream.queries) == 10
    assert len({stream.queries[0].label for stream in one_class}) == 5


def test_retries_are_byte_identical(heldout):
    client_streams = streams(heldout, "retries", clients=6)
    for stream in client_streams:
        queries = stream.queries
        assert any(q.retry for q in queries)
        for previous, query in zip(queries, queries[1:]):
            if query.retry:
                assert query.content() == previous.content() and query.follows
        originals = [q for q in queries if not q.retry]
        assert len({q.content() for q in originals}) == len(originals) == 10
    assert {q.fmt for q in queries_of(client_streams)} == {"pixels", "png"}
    png = next(q for q in queries_of(client_streams) if q.encoded)
    assert np.array_equal(png.pixels(), heldout[0][png.source])  # lossless


def test_camera_bursts(heldout):
    images = heldout[0]
    client_streams = streams(heldout, "camera-bursts", options=PatternOptions(burst=4))
    queries = queries_of(client_streams)
    assert len(queries) == 5 * 10 * 4 and not any(q.encoded for q in queries)
    assert len({q.content() for q in queries}) == len(queries)  # every frame differs
    assert any(q.shift != (0, 0) for q in queries)
    for query in queries:
        assert max(abs(query.shift[0]), abs(query.shift[1])) <= 2 and 0.9 <= query.gain <= 1.1
        expected = shift_image(images[query.source], *query.shift).astype(float) * query.gain
        residual = query.pixels().astype(float) - np.clip(expected, 0, 255)
        inside = (expected > 8) & (expected < 247)  # noise is clipped at black and white
        assert 0.5 < residual[inside].std() < 3.5  # sigma 2/255, plus rounding
        wrong = shift_image(images[query.source], query.shift[0] + 1, query.shift[1]).astype(float) * query.gain
        assert np.abs(residual).mean() < np.abs(query.pixels() - np.clip(wrong, 0, 255)).mean()


def test_popular_images_reencoded_by_every_client(heldout):
    images = heldout[0]
    client_streams = streams(heldout, "popular", clients=9)
    for stream in client_streams:
        assert sorted(q.source for q in stream.queries) == list(range(10))
        assert len({(q.fmt, q.quality, q.size) for q in stream.queries}) == 1  # one way per client
    ways = {(s.queries[0].fmt, s.queries[0].quality, s.queries[0].size) for s in client_streams}
    assert len(ways) >= 3 and {size for _, _, size in ways} == {(28, 28), (40, 40), (56, 56)}
    for query in queries_of(client_streams):
        assert query.encoded and query.pixels().shape[:2] == query.size
        assert query.fmt == "png" or 50 <= query.quality <= 95
        assert mean_abs_error(query, images[query.source]) < 0.05 * 255  # the same picture


def test_thumbnail_and_full(heldout):
    images = heldout[0]
    for stream in streams(heldout, "thumbnail-and-full"):
        queries = stream.queries
        assert len(queries) == 20
        for thumbnail, full in zip(queries[::2], queries[1::2]):
            assert thumbnail.source == full.source and full.follows
            assert thumbnail.pixels().shape == (28, 28, 1) and full.pixels().shape == (56, 56, 1)
            assert mean_abs_error(full, images[full.source]) < 0.05 * 255


def test_jpeg_qualities(heldout):
    images = heldout[0]
    for stream in streams(heldout, "jpeg-qualities"):
        queries = stream.queries
        assert [q.quality for q in queries[:3]] == [50, 75, 95] and len(queries) == 30
        for triple in zip(queries[::3], queries[1::3], queries[2::3]):
            assert len({q.source for q in triple}) == 1 and len({q.content() for q in triple}) == 3
            for query in triple:
                assert query.content()[:2] == b"\xff\xd8"  # JPEG
                assert mean_abs_error(query, images[query.source]) < 0.05 * 255


def test_distinct_ids_reuse_images_but_never_bytes(heldout):
    images, labels = heldout
    ids = list(distinct_ids(images[:40], labels[:40], ids=100, seed=3))
    assert [s.client for s in ids] == list(range(100))
    queries = queries_of(ids)
    assert all(1 <= len(s.queries) <= 2 for s in ids) and len(queries) > 100
    assert len({q.content() for q in queries}) == len(queries)  # no two byte-identical
    sources = np.bincount([q.source for q in queries], minlength=40)
    assert sources.max() - sources.min() <= 1  # images spread evenly over the ids
    for stream in ids:
        assert len({q.source for q in stream.queries}) == len(stream.queries)
    for query in queries:
        assert query.label == labels[query.source] and mean_abs_error(query, images[query.source]) < 0.05 * 255
    again = list(distinct_ids(images[:40], labels[:40], ids=100, seed=3))
    assert [q.content() for q in queries_of(again)] == [q.content() for q in queries]
    assert [q.copy for q in queries[:40]] == [0] * 40 and all(q.copy == 1 for q in queries[40:80])


def test_every_pattern_is_answered_by_the_default_firewall_without_refusal_or_warning(heldout):
    """The zero-configuration firewall (calibrated detectors, default policy): every query answered,
    none refused, answers accurate, and no warning-level finding about any benign client."""
    settings = calibrated_settings(throttle={"enabled": False})
    assert settings.models["mnist"].detectors  # the calibrated set
    with running_firewall(settings) as firewall:
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            offset = 0
            for name in PATTERNS:
                client_streams = streams(heldout, name, offset=offset)
                offset += images_needed(name, 5, 10, SMALL)
                ids = [f"pattern-{name}-{k}" for k in range(5)]
                result = run_pattern(endpoint, client_streams, ids, interval_s=0.0, seed=0)
                summary = result.summary()
                assert summary["queries"] == len(queries_of(client_streams)) > 0, name
                assert summary["refused_queries"] == summary["refused_clients"] == 0, name
                assert all(client.answered == client.queries for client in result.clients), name
                assert summary["accuracy"] >= 0.9, name
            ids = run_distinct_ids(endpoint, distinct_ids(*heldout, ids=20, seed=1), "ids", workers=4).summary()
            assert ids["clients"] == 20 and ids["refused_clients"] == 0 and ids["accuracy"] >= 0.9
            assert ids["first_pass_clients"] == 20 and ids["first_pass_refused_share"] == 0.0
            firewall.service.pipelines["mnist"].settle()  # the per-image detectors run after the answer
            registry = firewall.service.metrics.registry
            for rule in ("probing.client", "probing.address", "uncertainty", "squeeze", "adversarial"):
                labels = {"model": "mnist", "rule": rule}
                assert (registry.get_sample_value("firewall_findings_total", labels) or 0.0) == 0.0, rule
        finally:
            endpoint.close()


class RefuseLarge:
    """Flags every image larger than 28 x 28 (the full-size and re-sized copies)."""

    name = "test-large"

    def __call__(self, ctx):
        return [
            Finding(self.name, score=1.0, threshold=0.0, item=item)
            for item, image in enumerate(ctx.images)
            if image.shape[0] * image.shape[1] > 28 * 28
        ]


def test_refusals_are_counted_per_query_and_client(heldout):
    settings = make_settings(throttle={"enabled": False, "address_refusals": 10_000}, models={"mnist": {"policy": {"action": "reject"}}})
    with running_firewall(settings) as firewall:
        firewall.service.pipelines["mnist"].stages.append(RefuseLarge())
        endpoint = Endpoint(address(firewall), "mnist")
        try:
            client_streams = streams(heldout, "thumbnail-and-full")
            ids = [f"refuse-{k}" for k in range(5)]
            result = run_pattern(endpoint, client_streams, ids, 0.0, 0, baseline=endpoint, size=(28, 28))
            summary = result.summary()
            assert summary["queries"] == 100 and summary["refused_queries"] == 50 and summary["refused_clients"] == 5
            assert all(client.answers[1::2] == [-1] * 10 for client in result.clients)  # the full-size ones
            assert summary["accuracy"] >= 0.9 and summary["agreement_with_baseline"] >= 0.9
            popular = streams(heldout, "popular", clients=6, offset=50)
            result = run_pattern(endpoint, popular, [f"popular-{k}" for k in range(6)], 0.0, 0)
            large = [stream.queries[0].size != (28, 28) for stream in popular]
            assert result.summary()["refused_clients"] == sum(large) == 4  # clients 1, 2, 4, 5
            assert result.summary()["refused_queries"] == 10 * sum(large)
        finally:
            endpoint.close()
