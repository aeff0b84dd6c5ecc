"""The client's address behind trusted reverse proxies (firewall/forwarded.py), through the real
server with tritonclient over gRPC and HTTP: headers from untrusted peers are ignored, and behind a
trusted proxy each forwarded address has its own bucket."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from firewall.forwarded import ForwardedAddress
from tests.conftest import address, make_settings, running_firewall
from tests.stages import Flagger, Recorder, marked, with_stage

PROXY = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "values", "client"),
    [
        ("192.0.2.7", ["203.0.113.9"], "192.0.2.7"),  # not a trusted proxy: its header is ignored
        ("10.0.0.1", [], "10.0.0.1"),  # a trusted proxy that forwards nothing is the client
        ("10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.1", ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),  # the left entry is the client's own claim
        ("10.0.0.1", ["198.51.100.1, 203.0.113.9, 10.0.0.2"], "203.0.113.9"),  # two proxies
        ("10.0.0.1", ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),  # repeated headers, in order
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # every hop trusted: the left-most
        ("10.0.0.1", ["203.0.113.9:4711"], "203.0.113.9"),
        ("10.0.0.1", ["[2001:db8::1]:4711"], "2001:db8::1"),
        ("10.0.0.1", ["203.0.113.9, unknown"], "10.0.0.1"),  # an opaque hop ends the walk at its proxy
        ("10.0.0.1", ["not an address"], "10.0.0.1"),
    ],
)
def test_x_forwarded_for_takes_the_right_most_untrusted_hop(peer, values, client):
    assert ForwardedAddress(PROXY, "x-forwarded-for").client(peer, values) == client


@pytest.mark.parametrize(
    ("values", "client"),
    [
        (['for=198.51.100.1, for=203.0.113.9;proto=https;by=10.0.0.1'], "203.0.113.9"),
        (['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        (['For="198.51.100.1:80", for=_hidden'], "10.0.0.1"),
        (["proto=https"], "10.0.0.1"),  # an element without a node
    ],
)
def test_forwarded_reads_the_for_nodes(values, client):
    assert ForwardedAddress(PROXY, "forwarded").client("10.0.0.1", values) == client


def test_without_trusted_proxies_headers_are_ignored():
    assert ForwardedAddress([], "x-forwarded-for").client("10.0.0.1", ["203.0.113.9"]) == "10.0.0.1"


Send = Callable[[str, dict[str, str]], str]  # (client id, headers) -> "OK" or the error's status


def sender(triton, url: str, pixels: np.ndarray) -> Send:
    """``triton``: tritonclient's gRPC or HTTP module, the same calls on either binding."""
    client = triton.InferenceServerClient(url)
    tensor = triton.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)

    def send(client_id: str, headers: dict[str, str]) -> str:
        try:
            client.infer("mnist", [tensor], headers={"x-client-id": client_id, **headers})
        except InferenceServerException as error:
            return error.status()
        return "OK"

    return send


def grpc_sender(firewall, pixels: np.ndarray) -> Send:
    return sender(triton_grpc, address(firewall), pixels)


def http_sender(firewall, pixels: np.ndarray) -> Send:
    return sender(triton_http, f"127.0.0.1:{firewall.http_port}", pixels)


THROTTLED = {"grpc": "StatusCode.RESOURCE_EXHAUSTED", "http": "429"}
SENDERS = {"grpc": grpc_sender, "http": http_sender}
# Fresh ids on every call, so only the address's bucket (3 images, no refill to speak of) binds.
THROTTLE = {"rate": 0.001, "burst": 1, "address_rate": 0.001, "address_burst": 3}


@pytest.mark.parametrize("binding", ["grpc", "http"])
def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(binding, mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(throttle=THROTTLE, forwarded={"trusted_proxies": ["10.0.0.0/8"]})
    with running_firewall(settings) as firewall, with_stage(firewall, Recorder()) as recorder:
        send = SENDERS[binding](firewall, images[:1])
        codes = [send(f"id-{n}", {"x-forwarded-for": f"203.0.113.{n}"}) for n in range(6)]
    assert codes == ["OK"] * 3 + [THROTTLED[binding]] * 3  # one address: 127.0.0.1, whatever the header says
    assert recorder.peers == ["127.0.0.1"] * 3


@pytest.mark.parametrize(("binding", "header"), [("grpc", "x-forwarded-for"), ("http", "x-forwarded-for"), ("grpc", "forwarded"), ("http", "forwarded")])
def test_behind_a_trusted_proxy_each_forwarded_address_has_its_own_bucket(binding, header, mnist_heldout):
    images, _ = mnist_heldout
    settings = make_settings(throttle=THROTTLE, forwarded={"trusted_proxies": ["127.0.0.1/32"], "header": header})
    hop = (lambda ip: ip) if header == "x-forwarded-for" else (lambda ip: f"for={ip};proto=http")
    with running_firewall(settings) as firewall, with_stage(firewall, Recorder()) as recorder:
        send = SENDERS[binding](firewall, images[:1])
        first = [send(f"a-{n}", {header: hop("203.0.113.1")}) for n in range(4)]
        # The client behind the proxy prepends a made-up hop: the proxy appended the real one.
        spoofed = send("a-spoof", {header: f"{hop('198.51.100.77')}, {hop('203.0.113.1')}"})
        second = [send(f"b-{n}", {header: hop("203.0.113.2")}) for n in range(3)]
    assert first == ["OK"] * 3 + [THROTTLED[binding]]
    assert spoofed == THROTTLED[binding]
    assert second == ["OK"] * 3  # another address behind the same proxy is not throttled by the first
    assert recorder.peers == ["203.0.113.1"] * 3 + ["203.0.113.2"] * 3


def test_refusal_budgets_and_alerts_follow_the_forwarded_address(mnist_heldout, log_lines):
    images, _ = mnist_heldout
    settings = make_settings(
        throttle={"address_refusals": 2, "refusal_window_s": 600, "address_cooldown_s": 600},
        forwarded={"trusted_proxies": ["127.0.0.1/32"]},
        models={"mnist": {"policy": {"action": "reject"}}},
    )
    with running_firewall(settings) as firewall, with_stage(firewall, Flagger()):
        send = grpc_sender(firewall, images[:1])
        probe = grpc_sender(firewall, marked(images[:1]))
        attacker, neighbour = {"x-forwarded-for": "203.0.113.1"}, {"x-forwarded-for": "203.0.113.2"}
        refused = [probe(f"probe-{n}", attacker) for n in range(3)]
        after = send("fresh", attacker)
        beside = send("neighbour", neighbour)
    assert refused == ["StatusCode.PERMISSION_DENIED"] * 3
    assert after == "StatusCode.PERMISSION_DENIED"  # the address spent its refusal budget
    assert beside == "OK"  # the proxy's other clients are not refused with it
    alerts = [line for line in log_lines() if line.get("event.kind") == "alert"]
    assert alerts and {line["source.ip"] for line in alerts} == {"203.0.113.1"}
