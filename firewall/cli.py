"""`firewall` command line: one subcommand per module, imported only when used.

Each module named below provides ``configure_cli(parser)`` and ``run_cli(args) -> int``, so a
command's code lives beside the feature it drives and `firewall serve` never imports training or
evaluation dependencies. A command line the parser refuses is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

DESCRIPTION = (
    "An inference firewall: a sidecar that protects image classifiers served over the Open Inference "
    "Protocol against adversarial use. `firewall serve` starts it with the bundled MNIST model."
)

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("firewall.server", "run the firewall in front of the configured models"),
    "admin": ("firewall.admin_cli", "list clients and bans, inspect or reset a client, lift a ban, reload"),
    "config": ("firewall.reference", "check a configuration and print it as it would run, or the reference of every field"),
    "calibrate": ("detectors.calibration", "calibrate detector thresholds on benign data"),
    "evaluate": ("firewall.evaluate", "red-team and cost report against a live endpoint"),
    "accuracy": ("models.accuracy", "measure a model file's accuracy on held-out data"),
    "mc-dropout": ("models.mc_dropout", "make an ONNX model's Dropout active at inference"),
    "distill": ("models.distill", "train a defensively distilled student of an MNIST or CIFAR-10 model"),
    "train-detector": ("models.train_detector", "train an adversarial-example detector for a model (FGSM, PGD, CW from ART)"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"firewall: {message} (see {self.prog} --help)\n")


def package_version() -> str:
    try:
        return version("inference-firewall")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="firewall", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = Parser(prog=f"firewall {argv[0]}", description=COMMANDS[argv[0]][1])
    module.configure_cli(command_parser)
    return int(module.run_cli(command_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
