"""Transport security on the listener: TLS, mutual TLS, and who may claim another client's identity.

With mutual TLS a client is who its certificate says (the first subject alternative name, else
the common name), and the client id header is honoured only from trusted proxies, matched by peer
address or network, or by certificate identity. Without mutual TLS the header is honoured as sent.
"""

from __future__ import annotations

import ipaddress

import grpc

from firewall.config import AdminTLS, ListenerTLS


def server_credentials(config: ListenerTLS | AdminTLS) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(config.key.read_bytes(), config.cert.read_bytes())],
        root_certificates=config.client_ca.read_bytes() if config.client_ca else None,
        require_client_auth=config.client_ca is not None,
    )


def certificate_identity(context) -> str | None:
    """The verified client certificate's identity (SAN, else CN), or None without one."""
    identities = context.peer_identities()
    return identities[0].decode("utf-8", "replace") if identities else None


class TrustedProxies:
    def __init__(self, entries: list[str]):
        self.networks = []
        self.identities = set()
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.identities.add(entry)

    def trusts(self, peer: str, identity: str) -> bool:
        if identity in self.identities:
            return True
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)
