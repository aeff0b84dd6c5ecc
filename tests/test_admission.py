"""Admission and the in-flight shares in process, on a fake clock: which bucket a request draws
from with what parameters, the address's refusal budget, each concurrency share at its boundary,
and a request's cost.

``test_throttle.py`` shows the same behaviour through a real server; these tests call
``firewall.throttle`` directly, so that mutation testing can run them in forked processes, which
gRPC does not survive."""

from __future__ import annotations

import asyncio

import pytest

from firewall.bans import BanLog, peer_key
from firewall.config import BanConfig, ThrottleConfig
from firewall.errors import Banned, Throttled
from firewall.protocol import pb
from firewall.state import Bucket, MemoryClientState
from firewall.throttle import Admission, InFlight, Ticket, request_cost
from tests.conftest import FakeClock

PEER = "10.0.0.7"
CONFIG = ThrottleConfig(
    rate=2.0,
    burst=3,
    suspect_rate=0.5,
    suspect_burst=2,
    address_rate=4.0,
    address_burst=5,
    address_refusals=2,
    refusal_window_s=60.0,
    address_cooldown_s=30.0,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def admission(clock) -> Admission:
    state = MemoryClientState(16, clock=clock)
    return Admission(state, CONFIG, BanLog(state, clock))


def admitted(call) -> bool:
    try:
        asyncio.run(call)
    except Throttled:
        return False
    return True


def test_the_buckets_come_from_the_configuration(admission):
    assert admission.buckets() == (Bucket(4.0, 5), Bucket(2.0, 3), Bucket(0.5, 2))
    admission.config = CONFIG.model_copy(update={"enabled": False})
    assert admission.buckets() == (None, None, Bucket(0.5, 2))  # the suspect bucket is kept for a later reload


def test_the_address_bucket_is_shared_by_every_id_and_creates_no_client_record(admission, clock):
    assert [admitted(admission.admit_address(f"id{n}", PEER, 2)) for n in range(3)] == [True, True, False]  # 5 - 2 - 2 = 1 < 2
    assert admitted(admission.admit_address("id9", PEER, 1))
    assert admission.state.get("id0") is None and admission.state.get(peer_key(PEER)).tokens == 0.0
    assert admitted(admission.admit_address("id0", "10.0.0.8", 5))  # another address has a bucket of its own
    clock.advance(0.5)  # 4 per second: two tokens
    assert [admitted(admission.admit_address("id0", PEER, 1)) for _ in range(3)] == [True, True, False]


def test_a_banned_client_or_address_is_refused_before_any_bucket(admission):
    admission.state.ban("convict", BanConfig(first_s=10.0), 0.0)
    admission.state.ban(peer_key("10.0.0.9"), BanConfig(first_s=10.0), 0.0)
    with pytest.raises(Banned):
        asyncio.run(admission.admit_address("convict", PEER, 1))
    with pytest.raises(Banned):
        asyncio.run(admission.admit_address("anyone", "10.0.0.9", 1))
    assert admission.state.get(peer_key(PEER)) is None  # nothing was spent
    admission.config = CONFIG.model_copy(update={"enabled": False})
    with pytest.raises(Banned):  # also with throttling off
        asyncio.run(admission.admit_address("convict", PEER, 1))
    assert admitted(admission.admit_address("anyone", PEER, 10_000))


def test_a_client_draws_from_its_own_bucket_and_a_suspect_from_the_tighter_one(admission, clock):
    assert asyncio.run(admission.charge_client("c1", 2)) is True  # a new record
    assert asyncio.run(admission.charge_client("c1", 1)) is False
    assert not admitted(admission.charge_client("c1", 1))  # 3 - 2 - 1 = 0
    clock.advance(0.5)  # 2 per second: one token
    assert admitted(admission.charge_client("c1", 1)) and not admitted(admission.charge_client("c1", 1))
    admission.state.suspect("c2", 600.0)
    assert [admitted(admission.charge_client("c2", 1)) for _ in range(3)] == [True, True, False]  # suspect burst 2
    clock.advance(2.0)  # 0.5 per second: one token
    assert [admitted(admission.charge_client("c2", 1)) for _ in range(2)] == [True, False]
    admission.config = CONFIG.model_copy(update={"enabled": False})
    assert all(admitted(admission.charge_client("c2", 100)) for _ in range(3))


def test_past_its_refusal_budget_an_address_is_refused_for_the_cooldown(admission, clock, log_lines):
    for _ in range(2):  # the budget: two refusals
        asyncio.run(admission.count_refusal(PEER))
    assert admission.state.get(peer_key(PEER)).banned_until == 0.0 and len(admission.bans) == 0
    asyncio.run(admission.count_refusal(PEER))
    assert admission.state.get(peer_key(PEER)).banned_until == clock() + 30.0
    started = [line for line in log_lines() if line["message"] == "ban.started"]
    assert [(line["source.ip"], line["firewall.ban_s"], line["event.reason"]) for line in started] == [
        (PEER, 30.0, "address refusal budget spent")
    ]


def test_refusals_further_apart_than_the_window_do_not_add_up(admission, clock):
    for _ in range(4):
        asyncio.run(admission.count_refusal(PEER))
        clock.advance(40.0)  # two refusals per 60 s window at most
    assert admission.state.get(peer_key(PEER)).banned_until == 0.0


def shares(per_client: int = 2, per_address: int = 3, max_decoding_bytes: int = 100, max_new: int = 4) -> InFlight:
    return InFlight(
        total=4,
        per_client=per_client,
        per_address=per_address,
        max_decoding_bytes=max_decoding_bytes,
        heavy_request_bytes=40,
        max_heavy=1,
        max_new=max_new,
    )


def refused(in_flight: InFlight, client: str, peer: str, decoded: int, new: bool = False) -> str | None:
    """The operator's reason (the log's) when the share refuses; the client sees only RESOURCE_EXHAUSTED."""
    try:
        in_flight.enter(client, peer, decoded, new)
    except Throttled as error:
        assert error.public_message == "too many requests"
        return error.detail
    return None


def test_each_share_holds_at_its_boundary():
    in_flight = shares()
    assert in_flight.enter("a", "p1", 10, False) == Ticket("a", "p1", 10, False, False, (0, 1))
    assert not refused(in_flight, "a", "p1", 10)
    assert refused(in_flight, "a", "p2", 1) == "client concurrency share reached"  # 2
    assert not refused(in_flight, "b", "p1", 10)
    assert refused(in_flight, "c", "p1", 1) == "address concurrency share reached"  # 3
    assert not refused(in_flight, "c", "p2", 10)
    assert refused(in_flight, "d", "p3", 1) == "global concurrency cap reached"  # 4
    assert (in_flight.count, in_flight.decoding_bytes, in_flight.clients, in_flight.addresses) == (
        4,
        40,
        {"a": 2, "b": 1, "c": 1},
        {"p1": 3, "p2": 1},
    )


def test_new_clients_hold_at_most_their_share_and_run_after_established_ones():
    in_flight = shares(max_new=1)
    first = in_flight.enter("fresh-1", "p1", 1, True)
    assert first.new and first.priority == (1, 1)
    assert refused(in_flight, "fresh-2", "p2", 1, new=True) == "share of new clients reached"
    assert in_flight.enter("known", "p2", 1, False).priority == (0, 1)  # established: still admitted, first
    in_flight.leave(first)
    assert in_flight.new == 0 and not refused(in_flight, "fresh-2", "p2", 1, new=True)


def test_a_share_of_one_admits_one():
    in_flight = shares(per_client=1, per_address=1)
    assert not refused(in_flight, "a", "p1", 1) and not refused(in_flight, "b", "p2", 1)
    assert refused(in_flight, "a", "p3", 1) and refused(in_flight, "c", "p1", 1)


def test_heavy_requests_take_the_heavy_slots():
    in_flight = shares(max_decoding_bytes=1000)
    assert not in_flight.enter("a", "p1", 40, False).heavy  # at the threshold: not heavy
    heavy = in_flight.enter("b", "p2", 41, False)
    assert heavy.heavy and in_flight.heavy == 1
    assert refused(in_flight, "c", "p3", 41) == "heavy request slots taken"  # one
    in_flight.leave(heavy)
    assert in_flight.heavy == 0 and not refused(in_flight, "c", "p3", 41)


def test_the_decoding_budget_admits_up_to_its_bytes():
    in_flight = shares(max_decoding_bytes=100)
    in_flight.enter("a", "p1", 40, False)
    assert refused(in_flight, "b", "p2", 61) == "decoding budget spent"
    assert not refused(in_flight, "b", "p2", 60)  # 40 + 60: the budget, not beyond
    assert in_flight.decoding_bytes == 100


def test_leaving_returns_every_share():
    in_flight = shares(per_client=3, per_address=3)
    tickets = [in_flight.enter("a", "p1", 30, False), in_flight.enter("a", "p1", 50, False), in_flight.enter("a", "p1", 10, False)]
    in_flight.leave(tickets[0])
    assert (in_flight.count, in_flight.decoding_bytes, in_flight.heavy, in_flight.clients, in_flight.addresses) == (
        2,
        60,
        1,
        {"a": 2},
        {"p1": 2},
    )
    for ticket in tickets[1:]:
        in_flight.leave(ticket)
    assert (in_flight.count, in_flight.decoding_bytes, in_flight.heavy, in_flight.clients, in_flight.addresses) == (0, 0, 0, {}, {})


def test_a_request_costs_its_declared_batch_within_one_and_the_maximum():
    def cost(*shape: int, inputs: bool = True) -> int:
        tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(shape))
        return request_cost(pb.ModelInferRequest(inputs=[tensor] if inputs else []), max_batch=8)

    assert [cost(3, 28, 28), cost(8), cost(9, 28, 28), cost(0, 28), cost(), cost(inputs=False)] == [3, 8, 8, 1, 1, 1]
