"""The command line as a newcomer meets it: --version, and help with defaults for every option."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from firewall.cli import COMMANDS, Parser


def actions(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS:
            yield prefix, action


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    parser = Parser(prog=f"firewall {command}")
    importlib.import_module(COMMANDS[command][0]).configure_cli(parser)
    for where, action in actions(parser, command):
        name = action.option_strings or action.dest
        assert action.help, (where, name)
        if action.default not in (None, False) and not action.required:
            assert "default" in action.help, (where, name)


def test_version_and_one_line_usage_errors():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "firewall", *args], capture_output=True, text=True)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("firewall 0.")
    bad = run("serve", "--log-level", "LOUD")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("firewall: argument --log-level: invalid choice")
    described = run("--help")
    assert "Open Inference Protocol" in described.stdout and "admin" in described.stdout
    serve = run("serve", "--help").stdout
    assert "metrics_listen" in serve and "FIREWALL_" in serve and "{DEBUG,INFO,WARNING,ERROR,CRITICAL}" in serve
