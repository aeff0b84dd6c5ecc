"""`firewall` command line: one subcommand per module, imported only when used.

Each module named below provides ``configure_cli(parser)`` and ``run_cli(args) -> int``, so a
command's code lives beside the feature it drives and `firewall serve` never imports training or
evaluation dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("firewall.server", "run the firewall in front of the configured models"),
    "mc-dropout": ("models.mc_dropout", "make an ONNX model's Dropout active at inference"),
    "accuracy": ("models.accuracy", "measure a model file's accuracy on held-out data"),
    "calibrate": ("detectors.calibration", "calibrate detector thresholds on benign data"),
    "evaluate": ("firewall.evaluate", "red-team and cost report against a live endpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="firewall", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage and exits
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = argparse.ArgumentParser(prog=f"firewall {argv[0]}", description=COMMANDS[argv[0]][1])
    module.configure_cli(command_parser)
    return int(module.run_cli(command_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
