"""Members by name: a small DNS server for ``NAME.MESH`` on the node's tunnel addresses.

Answers come from the roster (verified records only), so a name resolves to the addresses the
authority signed for it, whoever carried the record. Queries for anything outside the mesh's
zone are refused: this is not a recursive resolver, and the docs show how to send only the
mesh's zone to it (systemd-resolved's per-link domains, or a plain resolv.conf line).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError

log = Logger()

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Seconds a resolver may cache an answer: short, so a re-joined member is found again soon.
TTL = 30


class MeshZone(ResolverBase):
    """An authority for the zone ``MESH.``: ``NAME.MESH`` A/AAAA from ``lookup(NAME)``."""

    def __init__(self, mesh: str, lookup: Callable[[str], list[Address]]) -> None:
        ResolverBase.__init__(self)  # type: ignore[no-untyped-call]
        self.mesh = mesh
        self.lookup = lookup

    def _label(self, name: bytes) -> str | None:
        text = name.decode("ascii", "replace").lower().rstrip(".")
        suffix = "." + self.mesh
        if not text.endswith(suffix):
            return None
        label = text[: -len(suffix)]
        return label if label and "." not in label else None

    def _records(self, name: bytes, version: int, kind: int) -> Deferred[Any]:
        label = self._label(name)
        if label is None:
            return defer.fail(DomainError(name))
        known = self.lookup(label)
        if not known:
            return defer.fail(DomainError(name))
        addresses = [a for a in known if a.version == version]
        payload: Any
        answers = []
        for address in addresses:
            if version == 4:
                payload = dns.Record_A(str(address), ttl=TTL)  # type: ignore[no-untyped-call]
            else:
                payload = dns.Record_AAAA(str(address), ttl=TTL)  # type: ignore[no-untyped-call]
            answers.append(dns.RRHeader(name, kind, dns.IN, TTL, payload, auth=True))
        return defer.succeed((answers, [], []))

    def lookupAddress(self, name: bytes, timeout: Any = None) -> Deferred[Any]:
        return self._records(name, 4, dns.A)

    def lookupIPV6Address(self, name: bytes, timeout: Any = None) -> Deferred[Any]:
        return self._records(name, 6, dns.AAAA)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        if self._label(name) is None or not self.lookup(self._label(name) or ""):
            return defer.fail(DomainError(name))
        return defer.succeed(([], [], []))


def listen_names(
    reactor: Any, zone: MeshZone, addresses: list[str], port: int = 53
) -> list[IListeningPort]:
    """Serve the zone over UDP on each address; an address we cannot bind is logged and
    skipped (another resolver may own port 53 there), never fatal."""
    factory = server.DNSServerFactory(authorities=[zone])  # type: ignore[no-untyped-call]
    factory.noisy = False
    ports: list[IListeningPort] = []
    for address in addresses:
        protocol = dns.DNSDatagramProtocol(controller=factory)  # type: ignore[no-untyped-call]
        protocol.noisy = False
        try:
            ports.append(reactor.listenUDP(port, protocol, interface=address))
        except Exception as e:
            log.warn(
                "cannot answer DNS for {zone} on {address}:{port}: {error}",
                zone=zone.mesh,
                address=address,
                port=port,
                error=str(e),
            )
    return ports
