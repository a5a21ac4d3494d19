"""Listening for the gateway's multicast announcements (224.0.0.1:5350).

A gateway that restarts forgets its mappings; one whose public address changes invalidates them.
PCP gateways then multicast an ANNOUNCE (RFC 6887 section 14.1.3) and NAT-PMP gateways their new
public address (RFC 6886 section 3.2.1). Either makes the client ask again at once instead of at
the next renewal, up to an hour later. Only datagrams from the default gateway that parse as one
of the two count; anyone on the LAN can forge that, so the client limits how often it reacts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from meshguard.portmap import natpmp, pcp


def is_announcement(data: bytes) -> bool:
    if pcp.parse_announce(data) is not None:
        return True
    answer = natpmp.parse_response(data)
    return isinstance(answer, natpmp.ExternalAddressResponse) and answer.result == natpmp.SUCCESS


class GatewayAnnouncements(DatagramProtocol):
    """Calls ``announced()`` for each announcement the default gateway multicasts."""

    noisy = False

    def __init__(self, gateway: Callable[[], str | None], announced: Callable[[], None]) -> None:
        self.gateway = gateway
        self.announced = announced
        self.heard = 0
        self.ignored = 0

    def startProtocol(self) -> None:
        transport: Any = self.transport  # a multicast port (IMulticastTransport)
        joined = transport.joinGroup(natpmp.ALL_HOSTS)
        if joined is not None:
            joined.addErrback(lambda failure: None)  # already a member: the kernel's own

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            ours = addr[0] == self.gateway() and is_announcement(datagram)
        except Exception:
            ours = False
        if not ours:
            self.ignored += 1
            return
        self.heard += 1
        self.announced()
