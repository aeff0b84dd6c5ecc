"""Three firewall replicas on one real redis-server against one replica, through a client that sends
its requests round-robin (``firewall.evaluate.endpoint.RoundRobin``, tritonclient.grpc).

    python benchmarks/replicas.py [--trials 20] [--seconds 5] [--images 3] [--budget 200] [--adaptive-budget 500]

Every replica is a ``firewall.server.Firewall`` in this process (its own event loop thread, gRPC
port and worker threads), as the tests run them; Redis is a real ``redis-server`` on loopback.
Nothing waits for the query exchange here: the replicas run as they would in production.

(a) ban: a test stage on the first replica bans a client; that client's next request goes to the
    second replica. Time from the banning answer to the second replica's refusal, over ``--trials``
    fresh clients (the issue's goal: within 100 ms).
(b) bucket: rate 50/s, burst 50, one client id, four concurrent callers on one replica (memory
    state, then Redis state), then round-robin over three replicas, for ``--seconds``: requests allowed against burst + rate x seconds (the
    figure means something only while the callers send more than the rate: "sent").
(c) HopSkipJump (ART) over 20 client ids on ``--images`` held-out digits, budget ``--budget``,
    against the calibrated detectors with the ``reject`` policy (refusals are visible, so "how fast"
    is the first refused query): one replica (memory state), then three (Redis state).
(d) the adaptive attackers (OARS-style, ``firewall.evaluate.adaptive``) under the default policy
    (decoys) with the calibrated detectors, one replica then three, ``--adaptive-budget`` queries per
    image, L2 bound 2.0: successes, queries to the first refusal, best L2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firewall.config import Settings  # noqa: E402
from firewall.evaluate.adaptive import ADAPTIVE_ATTACKS, onnx_judge, run_adaptive_attack  # noqa: E402
from firewall.evaluate.attacks import ATTACKS, run_attack  # noqa: E402
from firewall.evaluate.endpoint import RoundRobin  # noqa: E402
from firewall.logs import configure_logging  # noqa: E402
from firewall.server import Firewall  # noqa: E402
from models.runtime import bundled_model_path  # noqa: E402
from tests.conftest import address, running_firewall  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.stages import Flagger, marked, with_stage  # noqa: E402

HELDOUT = np.load(ROOT / "tests" / "fixtures" / "mnist_heldout.npz")
IMAGES, LABELS = HELDOUT["images"], HELDOUT["labels"]
LISTENERS = {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}}


def settings(state: dict, calibrated: bool, **overrides) -> Settings:
    model = overrides.pop("model", {})
    if not calibrated:
        model = {"detectors": [], **model}
    return Settings(**LISTENERS, state=state, models={"mnist": model}, **overrides)


@contextmanager
def group(server: RedisServer | None, count: int, calibrated: bool, **overrides) -> Iterator[tuple[list[Firewall], RoundRobin]]:
    """``count`` replicas on ``server`` (None: one replica, memory state) and a round-robin client."""
    state = {} if server is None else {"backend": "redis", "url": server.url}
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_firewall(settings(state, calibrated, **overrides))) for _ in range(count)]
        endpoint = RoundRobin([address(replica) for replica in replicas], "mnist")
        stack.callback(endpoint.close)
        yield replicas, endpoint


def ban_delay(server: RedisServer, trials: int) -> None:
    with group(server, 3, False, throttle={"enabled": False}, model={"policy": {"action": "ban"}}) as (replicas, endpoint):
        delays, refused_first = [], 0
        with with_stage(replicas[0], Flagger()):
            for n in range(trials):
                endpoint.turn = 0  # the marked request goes to the first replica, the next to the second
                assert endpoint.outcome(marked(IMAGES[n : n + 1]), f"banned-{n}") == "PERMISSION_DENIED"
                banned_at = time.perf_counter()
                answer = endpoint.outcome(IMAGES[n : n + 1], f"banned-{n}")
                delays.append(time.perf_counter() - banned_at)
                refused_first += answer == "PERMISSION_DENIED"
    print(f"(a) ban raised on replica 1, next request on replica 2: refused {refused_first} of {trials}; "
          f"time from the ban to that refusal: median {statistics.median(delays) * 1000:.2f} ms, max {max(delays) * 1000:.2f} ms")


def one_caller(addresses: list[str], turn: int, deadline: float) -> tuple[int, int]:
    """One of several callers of one client id, round-robin from replica ``turn``: (sent, allowed)."""
    endpoint = RoundRobin(addresses, "mnist")
    endpoint.turn = turn
    sent = allowed = 0
    while time.perf_counter() < deadline:
        allowed += endpoint.outcome(IMAGES[:1], "one-client") == "OK"
        sent += 1
    endpoint.close()
    return sent, allowed


def bucket_rate(server: RedisServer, seconds: float) -> None:
    rate, burst, callers = 50.0, 50, 4  # a burst of a second: a caller stalled by the loaded machine loses no tokens
    for count, store in ((1, None), (1, server), (3, server)):
        with group(store, count, False, throttle={"rate": rate, "burst": burst}) as (replicas, _):
            addresses = [address(replica) for replica in replicas]
            started = time.perf_counter()
            with ThreadPoolExecutor(callers) as pool:
                counts = list(pool.map(one_caller, [addresses] * callers, range(callers), [started + seconds] * callers))
            elapsed = time.perf_counter() - started
            sent, allowed = (sum(column) for column in zip(*counts))
            expected = burst + rate * elapsed
            where = f"{count} replica(s), {'memory' if store is None else 'Redis'}"
            print(f"(b) bucket {rate:.0f}/s burst {burst}, {callers} callers, {where}, {elapsed:.1f} s: {sent} sent, "
                  f"{allowed} allowed, burst + rate x time = {expected:.0f} ({allowed / expected - 1:+.1%})")
        server.client().flushall()


def hopskipjump(server: RedisServer, images: int, budget: int) -> None:
    print(f"(c) HopSkipJump, 20 ids, budget {budget}, calibrated detectors, policy reject:")
    print("| replicas | image | queries | first refused query | ids refused | success |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for count, store in ((1, None), (3, server)):
        with group(store, count, True, throttle={"enabled": False}, model={"policy": {"action": "reject"}}) as (_, endpoint):
            for index in range(images):
                np.random.seed(index)
                ids = [f"hsja-{index}-{n}" for n in range(20)]
                run = run_attack(ATTACKS["hopskipjump"], endpoint, "target", IMAGES[index][:, :, None], index,
                                 int(LABELS[index]), ids, f"verifier-{index}", budget, 10, 3.0)
                print(f"| {count} | {index} | {run.queries} | {run.first_refusal} | {run.refused_ids} | {run.success} |")
        server.client().flushall()


def adaptive(server: RedisServer, images: int, budget: int) -> None:
    judge = onnx_judge(bundled_model_path("mnist"))
    print(f"(d) adaptive attackers, budget {budget}, L2 2.0, calibrated detectors, default policy (decoys):")
    print("| attack | replicas | image | success | best L2 | refused | first refused query | ids |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name in ADAPTIVE_ATTACKS:
        for count, store in ((1, None), (3, server)):
            with group(store, count, True, throttle={"enabled": False}) as (_, endpoint):
                for index in range(images):
                    run = run_adaptive_attack(name, endpoint, judge, IMAGES[index][..., None], index, int(LABELS[index]),
                                              max_l2=2.0, id_prefix=f"{name}-{index}", query_budget=budget)
                    best = "-" if run.best_l2 is None else f"{run.best_l2:.2f}"
                    print(f"| {name} | {count} | {index} | {run.success} | {best} | {run.refused} | {run.first_refusal} | {run.ids_used} |")
            server.client().flushall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--adaptive-budget", type=int, default=500)
    args = parser.parse_args()
    configure_logging("CRITICAL")  # the replicas' alerts would bury the figures
    server = RedisServer()
    server.start()
    try:
        ban_delay(server, args.trials)
        bucket_rate(server, args.seconds)
        hopskipjump(server, args.images, args.budget)
        adaptive(server, args.images, args.adaptive_budget)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
