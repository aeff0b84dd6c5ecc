"""The client's address behind reverse proxies and load balancers: ``X-Forwarded-For`` or
``Forwarded`` (RFC 7239), honoured only when the connection comes from a configured trusted proxy.

Each proxy appends the address it received the request from, so only entries written by trusted
proxies can be believed. From the connection's peer the chain is walked leftwards: the first hop
that is not a trusted proxy is the client (the right-most untrusted hop); anything left of it was
written by the client itself and is ignored. A peer that is not a trusted proxy is the client
whatever its headers say. A hop that is no IP address (``unknown``, an obfuscated identifier) ends
the walk at the trusted proxy that wrote it: many clients may then share that proxy's address,
which throttles them more, never less.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ForwardedAddress:
    def __init__(self, trusted_proxies: Sequence[Network], header: str):
        self.trusted_proxies = list(trusted_proxies)
        self.header = header  # lower case: gRPC metadata keys are, and HTTP header lookups ignore case

    def client(self, peer: str, values: Iterable[str]) -> str:
        """The client's address, given the connection's ``peer`` and the header's values in order."""
        address = parse_address(peer)
        if address is None or not self._trusted(address):
            return peer
        hops = [hop for value in values for hop in (forwarded_for(value) if self.header == "forwarded" else value.split(","))]
        for hop in reversed(hops):
            parsed = parse_address(hop)
            if parsed is None:
                break
            address = parsed
            if not self._trusted(address):
                break
        return str(address)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted_proxies)


def forwarded_for(value: str) -> list[str]:
    """The ``for=`` node of each element of an RFC 7239 ``Forwarded`` value (elements without one count as unknown)."""
    nodes = []
    for element in value.split(","):
        pairs = (pair.partition("=") for pair in element.split(";"))
        found = [node.strip().strip('"') for name, _, node in pairs if name.strip().lower() == "for"]
        nodes.append(found[0] if found else "unknown")
    return nodes


def parse_address(hop: str) -> Address | None:
    """'10.0.0.1', '10.0.0.1:5000', '::1', '[::1]:5000' -> the IP address; anything else -> None."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # '::ffff:10.0.0.1' is 10.0.0.1 to the networks
    return mapped or address
