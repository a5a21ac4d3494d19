"""Port mapping for one node: the client wired to the reactor, the default gateway and the mesh.

The mesh hears of the mapping as one more endpoint of ours (``on_change`` gives the list to
advertise, see docs/portmapping.md); the mapping hears from the mesh when peers see us at a new
public address, which is when a gateway may have changed its address or started to offer
mapping.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from meshguard.adapters.portmap.announcements import GatewayAnnouncements
from meshguard.adapters.portmap.client import Mapping, PortMapper
from meshguard.adapters.portmap.methods import Method, NatPmpMethod, PcpMethod
from meshguard.adapters.portmap.upnp import UpnpMethod, reactor_threads
from meshguard.core.interfaces import Endpoint
from meshguard.portmap import natpmp

log = Logger()

#: An external address in these ranges is itself behind another NAT (or not routable at all):
#: such a mapping reaches no one outside, so it is shown in status but not advertised.
NOT_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/3",
    )
)


def is_public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6:
        return ip.is_global
    return not any(ip in network for network in NOT_PUBLIC)


def default_gateway(path: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this network namespace (Linux's routing table as text)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[1] != "00000000":
            continue
        try:
            flags = int(fields[3], 16)
            gateway = int(fields[2], 16)
        except ValueError:
            continue
        if flags & 0x2 and gateway:  # RTF_GATEWAY
            return str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
    return None


def standard_methods(
    reactor: Any,
    gateway: Callable[[], str | None] = default_gateway,
    random: Callable[[int], bytes] = os.urandom,
) -> list[Method]:
    """PCP, NAT-PMP, then UPnP-IGD, on the real reactor."""

    def listen_udp(protocol: DatagramProtocol) -> Any:
        return reactor.listenUDP(0, protocol)

    return [
        PcpMethod(reactor, listen_udp, gateway, random),
        NatPmpMethod(reactor, listen_udp, gateway),
        UpnpMethod(reactor_threads(reactor)),
    ]


def listen_announcements(reactor: Any) -> Callable[[DatagramProtocol], Any]:
    """Opens 0.0.0.0:5350 for the gateway's multicast announcements, shared with other
    listeners on the host (``listenMultiple``)."""

    def listen(protocol: DatagramProtocol) -> Any:
        return reactor.listenMulticast(natpmp.CLIENT_PORT, protocol, listenMultiple=True)

    return listen


class PortMapping:
    """Keeps our UDP port mapped and tells the mesh which endpoint to advertise."""

    def __init__(
        self,
        clock: Any,
        methods: Sequence[Method],
        internal_port: Callable[[], int],
        advertise: Callable[[list[Endpoint]], None],
        random: Callable[[int], bytes] = os.urandom,
        *,
        gateway: Callable[[], str | None] = default_gateway,
        listen_announcements: Callable[[DatagramProtocol], Any] | None = None,
    ) -> None:
        self.advertise = advertise
        self.gateway = gateway
        self.listen_announcements = listen_announcements
        self.announcements: GatewayAnnouncements | None = None
        self._announcement_port: Any = None
        self.mapper = PortMapper(
            clock,
            methods,
            internal_port,
            self._changed,
            lambda: int.from_bytes(random(2), "little") / 65536.0,
        )
        self.advertised: list[Endpoint] = []
        self._public_seen: str | None = None

    def start(self) -> None:
        if self.listen_announcements is not None and self._announcement_port is None:
            self.announcements = GatewayAnnouncements(self.gateway, self.mapper.gateway_announced)
            try:
                self._announcement_port = self.listen_announcements(self.announcements)
            except Exception as e:
                # Renewals still keep the mapping; only a restart goes unnoticed longer.
                log.info("port mapping: not listening for gateway announcements ({e})", e=e)
        self.mapper.start()

    def stop(self) -> Deferred[None]:
        port, self._announcement_port = self._announcement_port, None
        if port is not None:
            port.stopListening()
        return self.mapper.stop()

    def _changed(self, mapping: Mapping | None) -> None:
        endpoints = (
            [mapping.external]
            if mapping is not None and is_public(mapping.external_address)
            else []
        )
        if endpoints != self.advertised:
            self.advertised = endpoints
            self.advertise(list(endpoints))

    def observed(self, peer: object, endpoint: Endpoint, now: float) -> None:
        """A peer reports where it sees us (``MeshAgent.observed_listeners``): a new public
        address means a new uplink or a rebooted router; ask the gateway again."""
        address = endpoint[0]
        if not is_public(address) or address == self._public_seen:
            return
        first = self._public_seen is None
        self._public_seen = address
        if not first:
            self.mapper.public_address_changed()

    def status(self) -> dict[str, Any]:
        status = self.mapper.status()
        if self.mapper.mapping is not None:
            status["advertised"] = bool(self.advertised)
        if self.announcements is not None and self.announcements.heard:
            status["announcements"] = self.announcements.heard
        return status
