"""Exit 0 when the firewall answers SERVING on grpc.health.v1, 1 otherwise.

The image's HEALTHCHECK runs it, and so do Kubernetes exec probes when the firewall port speaks TLS
(the kubelet's own ``grpc:`` probe is plaintext only). Options fall back to HEALTHCHECK_* variables
so a probe command stays short:

    python /opt/firewall/healthcheck.py                                  # plaintext, 127.0.0.1:8001, service ""
    python /opt/firewall/healthcheck.py --service liveness               # the process is up
    python /opt/firewall/healthcheck.py --tls-ca /etc/firewall/tls/ca.crt --tls-server-name classifier
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    client_pair = (args.tls_key.read_bytes(), args.tls_cert.read_bytes()) if args.tls_cert else (None, None)
    credentials = grpc.ssl_channel_credentials(args.tls_ca.read_bytes(), *client_pair)
    # The probe dials loopback, so the certificate is checked against the Service name instead.
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def serving(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> bool:
    """True when the health service behind ``channel`` reports ``service`` as SERVING in time."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get

    def optional_path(name: str) -> Path | None:
        return Path(env(name)) if env(name) else None

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=env("HEALTHCHECK_ADDRESS", "127.0.0.1:8001"))
    parser.add_argument("--service", default=env("HEALTHCHECK_SERVICE", ""), help="'' is the whole server")
    parser.add_argument("--timeout", type=float, default=float(env("HEALTHCHECK_TIMEOUT", "2")))
    parser.add_argument("--tls-ca", type=Path, default=optional_path("HEALTHCHECK_TLS_CA"),
                        help="CA bundle that signed the server certificate; enables TLS")
    parser.add_argument("--tls-server-name", default=env("HEALTHCHECK_TLS_SERVER_NAME"),
                        help="name to verify the server certificate against")
    parser.add_argument("--tls-cert", type=Path, default=optional_path("HEALTHCHECK_TLS_CERT"),
                        help="client certificate, when the server requires one")
    parser.add_argument("--tls-key", type=Path, default=optional_path("HEALTHCHECK_TLS_KEY"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("a client certificate needs --tls-ca")
    with _channel(args) as channel:
        return 0 if serving(channel, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
