"""Two firewall replicas (own gRPC and metrics ports) on one real redis-server (issue 17): bans,
buckets, refusal budgets and probing evidence are shared; Redis killed mid-traffic leaves open mode
answering (degraded metric and alert, then resynchronised) and closed mode answering UNAVAILABLE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Iterator

import grpc
import numpy as np
import pytest
import yaml

from detectors.evidence import ClientRateConfig, ClientRateStage, client_rate_findings
from firewall.config import Settings
from firewall.evaluate.adaptive import onnx_judge, run_adaptive_attack
from firewall.evaluate.attacks import ATTACKS, run_attack
from firewall.evaluate.endpoint import Endpoint, RoundRobin
from firewall.protocol import pb, pb_grpc
from firewall.server import Firewall
from models.runtime import OnnxClassifier, bundled_model_path
from tests.conftest import address, make_settings, running_firewall
from tests.redis_server import RedisServer
from tests.stages import Flagger, marked, with_stage
from tests.test_probing import MNIST_THRESHOLDS, noise_blend
from tests.upstream import free_port, wait_model_ready

OK, DENIED, THROTTLED, UNAVAILABLE = (
    grpc.StatusCode.OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
)
WAIT_S = 60.0  # a condition that needs a background task (stream reader, reconnection) is polled up to this long


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from tests.conftest import FIXTURES

    return np.load(FIXTURES / "mnist_heldout.npz")["images"]


@contextmanager
def replicas(server: RedisServer, count: int = 2, state: dict | None = None, **overrides) -> Iterator[list[Firewall]]:
    # A generous deadline: on a loaded machine a call may wait long for the CPU, and a slow call
    # would count as Redis failing. A killed Redis refuses connections at once.
    state = {"backend": "redis", "url": server.url, "timeout_s": 5.0, "retry_s": 0.05, "max_retry_s": 0.2, **(state or {})}
    settings = make_settings(state=state, **overrides)
    with ExitStack() as stack:
        yield [stack.enter_context(running_firewall(settings)) for _ in range(count)]


def infer(firewall: Firewall, pixels: np.ndarray, client_id: str, datatype: str = "UINT8") -> grpc.StatusCode:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=list(pixels.shape))
    message = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[pixels.tobytes()])
    with grpc.insecure_channel(address(firewall)) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, metadata=[("x-client-id", client_id)], timeout=30)
        except grpc.RpcError as error:
            return error.code()
    return OK


def scrape(firewall: Firewall, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{firewall.metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {WAIT_S}s: {what}")
        time.sleep(0.05)


# -- shared decisions --------------------------------------------------------------------------------


def test_a_client_banned_on_one_replica_is_refused_by_the_other(redis_server, images):
    with replicas(redis_server, models={"mnist": {"policy": {"action": "ban"}}}) as (first, second):
        with with_stage(first, Flagger()):
            assert infer(first, marked(images[:1]), "attacker") == DENIED
        assert infer(second, images[:1], "attacker") == DENIED
        assert infer(second, images[:1], "bystander") == OK
        assert scrape(second, "firewall_bans_active") == 1  # the replica mirrors the ban it saw


def test_an_operator_on_one_replica_reads_and_lifts_a_ban_another_started(redis_server, images):
    with replicas(redis_server, models={"mnist": {"policy": {"action": "ban"}}}) as (first, second):
        with with_stage(first, Flagger()):
            assert infer(first, marked(images[:1]), "attacker") == DENIED
        record = second.state.get("attacker")  # what `firewall admin show` reads
        assert record.offences == 1 and record.banned_until > time.monotonic()
        second.state.lift("attacker")  # what `firewall admin lift` does
        assert infer(first, images[:1], "attacker") == OK
        assert second.state.get("attacker").offences == 1  # a repeat still escalates


def test_a_bucket_is_shared_by_the_replicas(redis_server, images):
    # A slow refill, so that a loaded machine cannot refill the bucket between two calls.
    throttle = {"rate": 0.01, "burst": 4}
    with replicas(redis_server, throttle=throttle) as (first, second):
        assert [infer(replica, images[:1], "c") for replica in (first, second, first, second)] == [OK] * 4
        assert infer(first, images[:1], "c") == THROTTLED
        assert infer(second, images[:1], "c") == THROTTLED
        assert infer(second, images[:1], "other") == OK


def answer(firewall: Firewall, pixels: np.ndarray, client_id: str) -> int:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=list(pixels.shape))
    message = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[pixels.tobytes()])
    with grpc.insecure_channel(address(firewall)) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, metadata=[("x-client-id", client_id)], timeout=30)
    return int(np.frombuffer(reply.raw_output_contents[0], np.int64)[0])


def test_decoys_agree_across_replicas(redis_server, images):
    """A decoy is the first label the client was answered, else a label from a secret: both shared."""
    with replicas(redis_server, models={"mnist": {"policy": {"action": "decoy"}}}) as (first, second):
        with with_stage(first, Flagger()), with_stage(second, Flagger()):
            for n in range(5):  # new clients: no genuine label yet, the secret decides
                decoys = {answer(replica, marked(images[n : n + 1]), f"new-{n}") for replica in (first, second)}
                assert len(decoys) == 1
            genuine = answer(first, images[7:8], "known")
            store = redis_server.client()
            wait_for(lambda: store.hget("firewall:l:known", "mnist") is not None, "the label is written")
            assert answer(second, marked(images[20:21]), "known") == genuine


def test_an_address_refusal_budget_is_shared(redis_server, images):
    throttle = {"address_refusals": 2}
    with replicas(redis_server, throttle=throttle, models={"mnist": {"policy": {"action": "reject"}}}) as (first, second):
        with with_stage(first, Flagger()), with_stage(second, Flagger()):
            codes = [infer(replica, marked(images[:1]), f"id-{n}") for n, replica in enumerate((first, second, first))]
        assert codes == [DENIED] * 3  # the third refusal exceeds the budget of two: the address is refused
        assert infer(second, images[:1], "fresh") == DENIED
        assert infer(first, images[:1], "fresh-too") == DENIED


def test_an_attack_spread_over_two_replicas_is_seen_as_one(redis_server, images, mnist_model: OnnxClassifier):
    """Each replica sees the other's queries (stream) and both count one client's evidence (Redis).

    Evidence is a query next to an earlier one labelled otherwise: each blend goes to the replica
    that did not see its original, and the client is flagged at its third piece of evidence, of
    which no single replica has more than two."""
    from detectors.sanitizer import Sanitizer, SanitizerConfig
    from models.runtime import InputSpec

    document = yaml.safe_load(MNIST_THRESHOLDS.read_text())
    probing = next(d for d in document["detectors"] if d["kind"] == "probing") | {"client_threshold": 2.5}
    sanitizer = Sanitizer(SanitizerConfig(**document["sanitizer"]), InputSpec("input", 1, 28, 28))
    model = {
        "sanitizer": document["sanitizer"],
        "detectors": [probing],
        "policy": {"action": "decoy", "rules": {"probing.client": "reject", "probing.address": "monitor"}},
    }
    targets = [image for image in images[10:40] if mnist_model.predict(sanitizer([image[:, :, None]]))[0] != 8][:3]
    blends = [noise_blend(image, mnist_model, sanitizer)[None] for image in targets]
    with replicas(redis_server, models={"mnist": model}) as pair:
        stages = [replica.service.pipelines["mnist"].stages[-1] for replica in pair]
        codes = []
        for n, (image, blend) in enumerate(zip(targets, blends)):
            owner, prober = pair[n % 2], pair[1 - n % 2]
            assert infer(owner, image[None], f"owner-{n}") == OK
            wait_for(lambda: stages[1 - n % 2].history.total >= 2 * n + 1, "the original reaches the other replica")
            codes.append(infer(prober, blend.astype(np.float32), "prober", datatype="FP32"))
            wait_for(lambda: stages[n % 2].history.total >= 2 * n + 2, "the blend reaches the other replica")
        assert codes == [OK, OK, DENIED]  # decoys, then the shared evidence crosses the threshold
        assert infer(pair[0], images[100:101], "prober") == DENIED  # on both replicas, while it lasts
        assert infer(pair[1], images[101:102], "prober") == DENIED
        pair[0].state.remove("prober")  # what `firewall admin reset` on the first does, with:
        stages[0].forget_client("prober")
        wait_for(lambda: stages[1].clients.current("prober", time.time()) == 0.0, "the reset reaches the other replica's counts")
        assert infer(pair[1], images[102:103], "prober") == OK


def listeners(metrics_port: int, http_port: int, admin_port: int) -> dict[str, str]:
    return {
        "FIREWALL_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "FIREWALL_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "FIREWALL_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
    }


def test_two_serve_processes_configured_from_the_environment_share_a_bucket_and_their_queries(redis_server, images):
    """``firewall serve`` twice, the bundled configuration, the state and ports from FIREWALL_* variables."""
    ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(2)]  # gRPC, metrics, HTTP, admin
    base = {k: v for k, v in os.environ.items() if not k.startswith("FIREWALL_")}
    shared = {"FIREWALL_STATE__BACKEND": "redis", "FIREWALL_STATE__URL": redis_server.url, "FIREWALL_STATE__TIMEOUT_S": "5"}
    shared |= {"FIREWALL_THROTTLE__RATE": "0.01", "FIREWALL_THROTTLE__BURST": "4"}  # a slow refill: no timing
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "firewall", "serve", "--listen", f"127.0.0.1:{grpc_port}"],
            env=base | shared | listeners(metrics_port, http_port, admin_port),
            stdout=subprocess.DEVNULL,
        )
        for grpc_port, metrics_port, http_port, admin_port in ports
    ]
    try:
        targets = [f"127.0.0.1:{grpc_port}" for grpc_port, *_ in ports]
        for target in targets:
            wait_model_ready(target, "mnist")

        def call(target: str, n: int) -> grpc.StatusCode:
            tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 28, 28])
            message = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[images[n].tobytes()])
            with grpc.insecure_channel(target) as channel:
                try:
                    pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, metadata=[("x-client-id", "c")], timeout=30)
                except grpc.RpcError as error:
                    return error.code()
            return OK

        assert [call(targets[n % 2], n) for n in range(4)] == [OK] * 4
        assert [call(target, 4) for target in targets] == [THROTTLED] * 2

        def history(metrics_port: int) -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                lines = reply.read().decode().splitlines()
            return float(next(line for line in lines if 'stat="history_queries"' in line).split()[-1])

        for _, metrics_port, *_ in ports:  # two queries placed here, two received from the other process
            wait_for(lambda: history(metrics_port) == 4, "each history holds all four queries")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


# -- three replicas behind a round-robin client (tritonclient) ---------------------------------------------


@contextmanager
def round_robin(group: list[Firewall]) -> Iterator[RoundRobin]:
    endpoint = RoundRobin([address(replica) for replica in group], "mnist")
    try:
        yield endpoint
    finally:
        endpoint.close()


def test_a_ban_raised_on_one_of_three_replicas_refuses_the_client_on_the_next_two(redis_server, images):
    policy = {"mnist": {"policy": {"action": "ban"}}}
    with replicas(redis_server, count=3, models=policy) as group, round_robin(group) as endpoint, with_stage(group[0], Flagger()):
        assert endpoint.outcome(marked(images[:1]), "attacker") == "PERMISSION_DENIED"  # banned on the first
        assert [endpoint.outcome(images[:1], "attacker") for _ in range(3)] == ["PERMISSION_DENIED"] * 3
        assert [endpoint.outcome(images[:1], "bystander") for _ in range(3)] == ["OK"] * 3


def test_a_bucket_holds_across_three_replicas(redis_server, images):
    """Nine tokens (a refill too slow to matter) spent round-robin over three replicas, then none left anywhere."""
    with replicas(redis_server, count=3, throttle={"rate": 0.01, "burst": 9}) as group, round_robin(group) as endpoint:
        assert [endpoint.outcome(images[:1], "c") for _ in range(9)] == ["OK"] * 9
        assert [endpoint.outcome(images[:1], "c") for _ in range(3)] == ["RESOURCE_EXHAUSTED"] * 3


class MarkedRate(ClientRateStage):
    """A per-image stage whose images are flagged when marked (``tests.stages.marked``): the CUSUM of
    ``detectors.evidence`` over them, shared like the uncertainty and squeeze stages'."""

    name = "marked"
    rules = ("marked",)

    def __init__(self):
        self.config = SimpleNamespace(client=ClientRateConfig())
        self.clients = self.config.client.build()

    def __call__(self, ctx) -> list:
        scores = np.array([float(image[0, 0].max() >= 255) for image in ctx.images])
        return client_rate_findings("marked", self.clients, ctx, scores, 0.5, {})


@contextmanager
def marked_rate(group: list[Firewall]) -> Iterator[None]:
    with ExitStack() as stack:
        for replica in group:
            stage = stack.enter_context(with_stage(replica, MarkedRate()))
            stage.share(replica.state, "mnist.marked")
        yield


def test_a_client_spreading_flagged_images_over_three_replicas_is_refused_as_soon_as_on_one(redis_server, images):
    """p0 = 0.05, p1 = 0.5, h = 13.8: the sixth flagged image in a row crosses it, on one replica or spread over three."""
    expected = ["OK"] * 5 + ["PERMISSION_DENIED"]
    policy = {"mnist": {"policy": {"action": "reject"}}}
    with replicas(redis_server, count=3, models=policy) as group, round_robin(group) as endpoint, marked_rate(group):
        assert [endpoint.outcome(marked(images[n : n + 1]), "spread") for n in range(6)] == expected
        assert scrape(group[1], "firewall_shared_state_up") == 1
    with running_firewall(make_settings(models=policy)) as alone, round_robin([alone]) as endpoint, marked_rate([alone]):
        assert [endpoint.outcome(marked(images[n : n + 1]), "alone") for n in range(6)] == expected


def calibrated(state: dict | None, action: str = "reject") -> Settings:
    """The bundled model's calibrated detectors (no ``detectors`` key), refusing what they find."""
    listeners = {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}}
    return Settings(**listeners, throttle={"enabled": False}, state=state or {}, models={"mnist": {"policy": {"action": action}}})


@contextmanager
def attacked(redis_server: RedisServer | None, action: str) -> Iterator[Endpoint]:
    """The calibrated firewall as one replica (memory state), or as three on ``redis_server``, behind
    a round-robin client. Nothing waits for the query exchange: each request finds the queries
    answered before it was sent, whichever replica answered them."""
    with ExitStack() as stack:
        state = None if redis_server is None else {"backend": "redis", "url": redis_server.url, "timeout_s": 5.0}
        group = [stack.enter_context(running_firewall(calibrated(state, action))) for _ in range(1 if state is None else 3)]
        endpoint = stack.enter_context(round_robin(group))
        yield endpoint


def test_hopskipjump_over_three_replicas_and_20_ids_is_refused_as_soon_as_against_one(redis_server, mnist_heldout):
    images, labels = mnist_heldout
    runs = []
    for server in (None, redis_server):
        np.random.seed(0)  # ART's steps draw from NumPy's global generator; its start from an unseeded one
        with attacked(server, "reject") as endpoint:
            ids = [f"hsja-{n}" for n in range(20)]
            runs.append(run_attack(ATTACKS["hopskipjump"], endpoint, "target", images[5][:, :, None], 5, int(labels[5]), ids, "verifier", 60, 10, 3.0))
    one, three = runs
    assert one.ended == three.ended == "refused" and one.refused_ids == three.refused_ids == 20, (one.summary(), three.summary())
    # the unseeded start moves the first refusal by a query either way (5 or 6 here, on one replica or three)
    assert three.first_refusal <= one.first_refusal + 1 and three.queries <= one.queries + 1, (one.summary(), three.summary())


def test_the_adaptive_attacker_does_no_better_against_three_replicas(redis_server, mnist_heldout):
    """The default policy (decoys), the OARS-style Boundary attacker (the one that won against three
    replicas while they exchanged queries asynchronously, in benchmarks/replicas.py)."""
    images, labels = mnist_heldout
    judge = onnx_judge(bundled_model_path("mnist"))
    runs = []
    for server in (None, redis_server):
        with attacked(server, "decoy") as endpoint:
            attack = partial(run_adaptive_attack, "adaptive-boundary", endpoint, judge, max_l2=2.0, query_budget=150)
            runs.append(attack(images[0][..., None], 0, int(labels[0]), id_prefix="oars"))
    one, three = runs
    assert three.success <= one.success
    assert three.best_l2 is None or (one.best_l2 is not None and three.best_l2 >= one.best_l2 * 0.99), (one.summary(), three.summary())


# -- failure -------------------------------------------------------------------------------------------



def test_redis_killed_in_open_mode_answers_on_then_resynchronises(redis_server, images, log_lines):
    with replicas(redis_server, models={"mnist": {"policy": {"action": "ban"}}}) as (first, second):
        assert scrape(first, "firewall_shared_state_up") == 1
        redis_server.kill()
        codes = [infer(replica, images[n : n + 1], f"c{n}") for n in range(6) for replica in (first, second)]
        assert codes == [OK] * 12
        assert scrape(first, "firewall_shared_state_up") == 0 and scrape(second, "firewall_shared_state_up") == 0
        assert scrape(first, "firewall_shared_state_errors_total") >= 1
        degraded = [line for line in log_lines() if line.get("event.action") == "shared-state-degraded"]
        assert len(degraded) == 2 and all(line["event.kind"] == "alert" for line in degraded)  # one per replica
        with with_stage(first, Flagger()):
            assert infer(first, marked(images[:1]), "attacker") == DENIED  # banned in the first's memory only
        assert infer(second, images[:1], "attacker") == OK

        redis_server.start()  # empty: everything it held is lost
        wait_for(lambda: all(scrape(replica, "firewall_shared_state_up") == 1 for replica in (first, second)), "reconnected")
        assert infer(second, images[:1], "attacker") == DENIED  # the first wrote its ban back
        recovered = [line for line in log_lines() if line.get("event.action") == "shared-state-recovered"]
        assert len(recovered) == 2


def test_what_one_replica_counted_while_redis_was_away_is_merged_back(redis_server, images):
    """Redis lost everything (killed, restarted empty); the bucket the first replica drew from while
    it was away, its ban, offence and CUSUM come back: the second replica decides with them."""
    policy = {"mnist": {"policy": {"action": "reject", "rules": {"test.flagger": "ban"}}}}
    with replicas(redis_server, throttle={"rate": 0.01, "burst": 8}, models=policy) as (first, second), marked_rate([first, second]):
        assert [infer(first, images[:1], "c") for _ in range(2)] == [OK] * 2  # in Redis: 6 tokens left
        redis_server.kill()
        assert [infer(first, images[:1], "c") for _ in range(3)] == [OK] * 3  # locally: the bucket starts full, 5 left
        assert [infer(first, marked(images[n : n + 1]), "tester") for n in range(3)] == [OK] * 3  # CUSUM 6.9 locally
        with with_stage(first, Flagger(rule="test.flagger")):
            assert infer(first, marked(images[:1]), "attacker") == DENIED  # a ban and its offence, locally
        redis_server.start()
        wait_for(lambda: all(scrape(replica, "firewall_shared_state_up") == 1 for replica in (first, second)), "reconnected")
        # 8 - 3 spent while away: 5 left (without the merge, 8)
        assert [infer(second, images[:1], "c") for _ in range(6)] == [OK] * 5 + [THROTTLED]
        assert infer(second, images[:1], "attacker") == DENIED and second.state.get("attacker").offences == 1
        # three flagged images more, on the second replica: the sixth in a row crosses h = 13.8
        assert [infer(second, marked(images[n : n + 1]), "tester") for n in range(3, 6)] == [OK, OK, DENIED]


def test_a_lift_reaches_the_other_replicas_memory_and_every_replica_lists_every_record(redis_server, images, capsys):
    from firewall.cli import main

    with replicas(redis_server, count=3, models={"mnist": {"policy": {"action": "ban"}}}) as group:
        first, second, third = group
        with with_stage(first, Flagger()):
            assert infer(first, marked(images[:1]), "attacker") == DENIED
        assert infer(second, images[:1], "attacker") == DENIED  # the second now holds a copy of the ban
        assert infer(third, images[:1], "visitor") == OK
        capsys.readouterr()
        assert main(["admin", "--admin", f"127.0.0.1:{second.admin_port}", "--json", "list"]) == 0
        lines = capsys.readouterr().out.splitlines()  # log lines may come before the document
        listed = {row["key"]: row for row in json.loads("\n".join(lines[lines.index("{") :]))["clients"]}
        assert {"attacker", "visitor"} <= set(listed) and listed["attacker"]["banned_s"] > 0  # not only its own

        first.state.lift("attacker")  # what `firewall admin lift` on the first does
        wait_for(lambda: second.state.local.get("attacker").banned_until == 0.0, "the lift reaches the second's memory")
        redis_server.kill()  # the second now decides from its memory alone
        assert infer(second, images[:1], "attacker") == OK


def test_redis_down_in_closed_mode_answers_unavailable(redis_server, images):
    with replicas(redis_server, count=1, state={"fail_mode": "closed"}) as (firewall,):
        assert infer(firewall, images[:1], "c") == OK
        redis_server.kill()
        assert [infer(firewall, images[:1], "c") for _ in range(3)] == [UNAVAILABLE] * 3
        redis_server.start()
        wait_for(lambda: scrape(firewall, "firewall_shared_state_up") == 1, "reconnected")
        assert infer(firewall, images[:1], "c") == OK


# -- memory in Redis -------------------------------------------------------------------------------------


def test_every_key_expires_and_the_query_stream_is_trimmed(redis_server, images):
    document = yaml.safe_load(MNIST_THRESHOLDS.read_text())
    probing = next(d for d in document["detectors"] if d["kind"] == "probing")
    model = {"sanitizer": document["sanitizer"], "detectors": [probing]}
    model["policy"] = {"action": "ban"}
    with replicas(redis_server, count=1, state={"stream_length": 10}, models={"mnist": model}) as (firewall,):
        for n in range(150):
            assert infer(firewall, images[n : n + 1], f"client-{n % 30}") == OK
        with with_stage(firewall, Flagger()):
            assert infer(firewall, marked(images[:1]), "attacker") == DENIED
        store = redis_server.client()
        keys = list(store.scan_iter("firewall:*"))
        streams = [key for key in keys if store.type(key) == b"stream"]
        assert len(streams) == 1 and store.xlen(streams[0]) < 150  # trimmed (approximately, by whole nodes)
        expiring = [key for key in keys if key not in streams and key != b"firewall:secret"]
        assert all(store.ttl(key) != -1 for key in expiring)  # every record, label and count expires (-2: already gone)
        assert any(key.startswith(b"firewall:c:attacker") for key in keys)


def test_tls_to_redis_with_a_client_certificate(tmp_path, images):
    import ipaddress

    from cryptography import x509

    from tests.test_tls import Authority

    authority = Authority(tmp_path)
    server_cert, server_key = authority.issue("redis", "redis", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = authority.issue("firewall", "firewall")
    server = RedisServer(tls=(server_cert, server_key, authority.ca))
    server.start()
    tls = {"ca": str(authority.ca), "cert": str(client_cert), "key": str(client_key)}
    try:
        with replicas(server, state={"tls": tls}, models={"mnist": {"policy": {"action": "ban"}}}) as (first, second):
            assert scrape(first, "firewall_shared_state_up") == 1
            with with_stage(first, Flagger()):
                assert infer(first, marked(images[:1]), "attacker") == DENIED
            assert infer(second, images[:1], "attacker") == DENIED
        with replicas(server, count=1, state={"tls": {"ca": str(authority.ca)}}) as (anonymous,):  # no client certificate
            assert scrape(anonymous, "firewall_shared_state_up") == 0
            assert infer(anonymous, images[:1], "c") == OK  # open mode: answered from memory
    finally:
        server.close()
