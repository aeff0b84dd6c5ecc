"""`firewall evaluate` options, and the command: a one-line error and exit status 2 for what the user can fix.

Imports only the standard library and the firewall's own core dependencies at first, so a missing
``[eval]`` extra is reported, not raised.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from firewall.evaluate.patterns import PATTERNS  # core dependencies only (NumPy, OpenCV), no [eval] extra

EXIT_ERROR = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def _name_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part and part != "none"]


def configure_cli(parser: argparse.ArgumentParser) -> None:
    endpoints = parser.add_argument_group("endpoints")
    endpoints.add_argument("--target", required=True, metavar="HOST:PORT", help="the endpoint under test")
    endpoints.add_argument("--model", default="mnist", help="model name at the target (default: %(default)s)")
    endpoints.add_argument(
        "--target-kind",
        choices=("auto", "firewall", "model"),
        default="auto",
        help="auto: a firewall when ModelMetadata lists an input named 'image', else a bare model server (default: %(default)s)",
    )
    endpoints.add_argument("--baseline", metavar="HOST:PORT", help="the bare model server, for comparison")
    endpoints.add_argument("--baseline-model", help="model name at the baseline (default: --model)")
    endpoints.add_argument(
        "--baseline-kind",
        choices=("auto", "firewall", "model"),
        default="auto",
        help="as --target-kind, for the baseline (default: %(default)s)",
    )
    endpoints.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", required=True, type=Path, help="MNIST folder, CIFAR-10 zip, .npz or class folders")
    data.add_argument("--classes", type=_positive_int, default=10, help="number of classes (default: %(default)s)")
    data.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder (default: %(default)s)")
    data.add_argument("--alerts", type=Path, help="the firewall's alert log (JSON lines), read after the run")
    data.add_argument("--run-id", help="tag in every client id (default: random)")
    data.add_argument(
        "--seed", type=int, default=0, help="seed of the attacks and of the benign pacing (default: %(default)s)"
    )
    attacks = parser.add_argument_group("attacks")
    attacks.add_argument(
        "--attacks",
        type=_name_list,
        default=["hopskipjump", "boundary", "signopt", "geoda"],
        help="label-only attacks, comma-separated, or none (default: all four)",
    )
    attacks.add_argument("--score-attack", type=_name_list, default=["simba"], help="simba or none (default: simba)")
    attacks.add_argument(
        "--sybil-attack",
        type=_name_list,
        default=["hopskipjump"],
        help="attack spread over many client ids, or none (default: hopskipjump)",
    )
    attacks.add_argument(
        "--sybil-clients", type=_positive_int, default=8, help="client ids of the Sybil attacker (default: %(default)s)"
    )
    attacks.add_argument(
        "--attack-images", type=_positive_int, default=2, help="images per scenario (default: %(default)s)"
    )
    attacks.add_argument(
        "--queries", type=_positive_int, default=300, help="query budget per attack (default: %(default)s)"
    )
    attacks.add_argument("--max-l2", type=float, help="largest L2 distortion counted as success (default: by data)")
    adaptive = parser.add_argument_group("adaptive attacker (OARS-style: refusal-aware, a fresh client id per refusal)")
    adaptive.add_argument(
        "--adaptive-attack",
        type=_name_list,
        default=["adaptive-hsja", "adaptive-boundary"],
        help="adaptive attacks, comma-separated, or none (default: adaptive-hsja,adaptive-boundary)",
    )
    adaptive.add_argument(
        "--adaptive-images", type=_positive_int, default=2, help="images per adaptive attack (default: %(default)s)"
    )
    adaptive.add_argument(
        "--adaptive-queries",
        type=_positive_int,
        default=5000,
        help="query budget per image, refused queries included (default: %(default)s)",
    )
    adaptive.add_argument(
        "--adaptive-ids", type=_positive_int, default=400, help="client ids per image (default: %(default)s)"
    )
    adaptive.add_argument(
        "--judge-onnx",
        type=Path,
        help="the bare model (ONNX) that judges adaptive successes (default: the bundled model named by --model)",
    )
    benign = parser.add_argument_group("benign traffic")
    benign.add_argument(
        "--benign-images",
        type=_non_negative_int,
        default=200,
        help="images sent; 0: all those the attacks leave (default: %(default)s)",
    )
    benign.add_argument(
        "--benign-clients", type=_positive_int, default=20, help="simulated benign clients (default: %(default)s)"
    )
    benign.add_argument(
        "--benign-interval",
        type=float,
        default=0.1,
        help="mean seconds between a client's queries (default: %(default)s)",
    )
    benign.add_argument(
        "--retry-rate",
        type=float,
        default=0.05,
        help="share of requests sent twice, byte-identical (default: %(default)s)",
    )
    patterns = parser.add_argument_group("benign traffic patterns (issue 11)")
    patterns.add_argument(
        "--benign-patterns",
        type=_name_list,
        default=list(PATTERNS),
        help=f"comma-separated, or none (default: all: {','.join(PATTERNS)})",
    )
    patterns.add_argument(
        "--pattern-clients", type=_positive_int, default=20, help="client ids per pattern (default: %(default)s)"
    )
    patterns.add_argument(
        "--pattern-images",
        type=_positive_int,
        default=10,
        help="source images per client (popular: 50 shared images) (default: %(default)s)",
    )
    patterns.add_argument(
        "--distinct-ids",
        type=_non_negative_int,
        default=0,
        help="one-off ids sending 1-2 (re-encoded) held-out images each; 0: skip (default: %(default)s)",
    )
    cost = parser.add_argument_group("cost")
    cost.add_argument(
        "--concurrency", type=_int_list, default=[1, 16, 64], help="concurrent callers per level (default: 1,16,64)"
    )
    cost.add_argument(
        "--cost-seconds",
        type=float,
        default=2.0,
        help="seconds per level, endpoint and round; 0: skip (default: %(default)s)",
    )
    cost.add_argument(
        "--cost-rounds", type=_positive_int, default=2, help="alternating rounds per level (default: %(default)s)"
    )


def run_cli(args: argparse.Namespace) -> int:
    try:
        from firewall.evaluate.errors import EvaluationError
        from firewall.evaluate.runner import Evaluation
    except ImportError as error:
        return _fail(f"{error.name} is missing; install the extra: pip install 'inference-firewall[eval]'")
    try:
        written = Evaluation(args).run()
    except EvaluationError as error:
        return _fail(str(error))
    print(f"firewall evaluate: wrote {', '.join(str(path) for path in written)}")
    return 0


def _fail(message: str) -> int:
    print(f"firewall evaluate: error: {message}", file=sys.stderr)
    return EXIT_ERROR
