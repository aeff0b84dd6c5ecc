"""`firewall admin`: the operators' client of the admin endpoint (firewall/admin.py).

    firewall admin list [--banned] [--limit N]      tracked clients and addresses, banned first
    firewall admin show CLIENT | --address IP       state, recent findings (open alert episodes), evidence
    firewall admin lift CLIENT | --address IP       end a ban (and the suspicion after it)
    firewall admin reset CLIENT | --address IP      forget everything about a client
    firewall admin reload                           reload the configuration file (as SIGHUP does)

Output is text for people, or JSON with ``--json``. An unreachable endpoint or a refused call is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from firewall.admin import SERVICE
from firewall.config import AdminConfig

TIMEOUT_S = 10.0


def call(args: argparse.Namespace, method: str, request: dict[str, Any]) -> dict[str, Any]:
    if args.ca or args.cert or args.key:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.ca.read_bytes() if args.ca else None,
            private_key=args.key.read_bytes() if args.key else None,
            certificate_chain=args.cert.read_bytes() if args.cert else None,
        )
        channel = grpc.secure_channel(args.admin, credentials)
    else:
        channel = grpc.insecure_channel(args.admin)
    with channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=lambda doc: json.dumps(doc).encode(), response_deserializer=json.loads
        )
        return stub(request, timeout=TIMEOUT_S)


def target(args: argparse.Namespace) -> dict[str, str]:
    return {"address": args.address} if args.address else {"client": args.client}


def seconds(value: float) -> str:
    return "-" if value <= 0 else f"{value:.0f}s"


def text(command: str, response: dict[str, Any]) -> str:
    if command == "list":
        lines = [f"{response['tracked']} tracked, {response['bans_active']} banned"]
        if response["clients"]:
            width = max(len(row["key"]) for row in response["clients"])
            lines.append(f"{'client':<{width}}  {'banned':>8}  {'suspect':>8}  offences")
            for row in response["clients"]:
                lines.append(f"{row['key']:<{width}}  {seconds(row['banned_s']):>8}  {seconds(row['suspect_s']):>8}  {row['offences']}")
        return "\n".join(lines)
    if command == "show":
        state = response["state"]
        lines = [f"client: {response['key']}"]
        if state is None:
            lines.append("state: not tracked")
        else:
            lines.append(f"banned: {seconds(state['banned_s'])}, suspect: {seconds(state['suspect_s'])}, offences: {state['offences']}")
        lines.append("recent findings (open alert episodes):" if response["findings"] else "recent findings: none")
        for episode in response["findings"]:
            lines.append(
                f"  {episode['model']} {episode['rule']} -> {episode['action']}: {episode['findings']} since {episode['started']}, "
                f"last score {episode['last_score']} (threshold {episode['threshold']}) {episode['last_seen_s_ago']:.0f}s ago"
            )
        lines.append("evidence:")
        for model, stages in response["evidence"].items():
            for stage, values in stages.items():
                lines.append(f"  {model} {stage}: " + ", ".join(f"{name} {value:.3g}" for name, value in values.items()))
        return "\n".join(lines)
    if command == "lift":
        return f"ban lifted: {response['key']}"
    if command == "reset":
        return f"reset: {response['key']}" + ("" if response["was_tracked"] else " (had no state)")
    changed = response["changed"]
    return "reloaded: " + (", ".join(changed) if changed else "nothing changed")


def configure_cli(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("FIREWALL_ADMIN__LISTEN") or AdminConfig().listen
    parser.add_argument(
        "--admin",
        metavar="ADDRESS",
        default=default,
        help="the admin endpoint: HOST:PORT or unix:PATH (default: %(default)s, from FIREWALL_ADMIN__LISTEN when set)",
    )
    parser.add_argument("--ca", type=Path, metavar="PEM", help="with mutual TLS: the CA that signed the firewall's certificate")
    parser.add_argument("--cert", type=Path, metavar="PEM", help="with mutual TLS: the operator's certificate")
    parser.add_argument("--key", type=Path, metavar="PEM", help="with mutual TLS: the operator's private key")
    parser.add_argument("--json", action="store_true", help="print the endpoint's JSON answer instead of text")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="tracked clients and addresses, banned first")
    listing.add_argument("--banned", action="store_true", help="banned ones only")
    listing.add_argument("--limit", type=int, default=100, help="most rows printed (default: %(default)s)")
    for name, help_text in (
        ("show", "a client's state, recent findings and evidence"),
        ("lift", "end a client's ban"),
        ("reset", "forget everything about a client: state, ban, detectors' evidence"),
    ):
        command = commands.add_parser(name, help=help_text)
        who = command.add_mutually_exclusive_group(required=True)
        who.add_argument("client", nargs="?", help="the client id")
        who.add_argument("--address", metavar="IP", help="a source address instead of a client id")
    commands.add_parser("reload", help="reload the configuration file, as SIGHUP does")


def run_cli(args: argparse.Namespace) -> int:
    if args.command == "list":
        request: dict[str, Any] = {"banned": args.banned, "limit": args.limit}
    elif args.command == "reload":
        request = {}
    else:
        request = target(args)
    try:
        response = call(args, args.command.capitalize(), request)
    except grpc.RpcError as error:
        print(f"firewall admin: {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"firewall admin: {error}", file=sys.stderr)
        return 2
    print(json.dumps(response, indent=2) if args.json else text(args.command, response))
    return 0
