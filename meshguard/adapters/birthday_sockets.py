"""The hard side's extra sockets for the birthday technique (the adapter behind
:class:`meshguard.mesh.birthday.BirthdayIO`).

Each socket gets its own NAT mapping toward the easy side's endpoint (a NAT that maps per
destination gives each flow a new port); a primer with hop limit 2 opens it. The first datagram
from that endpoint on one of them is a hit: that socket then carries everything the node sends
to the endpoint (:meth:`meshguard.adapters.udp.UDPTransport.steer`), the others close. Only the
endpoint a socket primed toward can pass our NAT to it, so nothing else is taken as a hit.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from meshguard.adapters.probe_sockets import SO_MARK
from meshguard.core.interfaces import Endpoint
from meshguard.mesh.paths import PRIME_TTL

log = Logger()


class _Extra(DatagramProtocol):
    noisy = False

    def __init__(self, group: _Group) -> None:
        self.group = group
        self.port: IListeningPort | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.group.received(self, datagram, (str(addr[0]), int(addr[1])))

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write(data, endpoint)  # type: ignore[attr-defined]
        except OSError:
            pass

    def prime(self, toward: Endpoint) -> None:
        transport = self.transport
        sock = getattr(transport, "socket", None)
        if sock is None:
            return
        try:
            previous = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, PRIME_TTL)
            try:
                sock.sendto(b"", toward)
            finally:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, previous)
        except OSError:
            pass

    def close(self) -> None:
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class _Group:
    """The sockets opened toward one endpoint, until one is hit (then only that one)."""

    def __init__(self, owner: BirthdaySockets, toward: Endpoint) -> None:
        self.owner = owner
        self.toward = toward
        self.sockets: list[_Extra] = []
        self.winner: _Extra | None = None
        self.expiry: IDelayedCall | None = None

    def received(self, extra: _Extra, datagram: bytes, source: Endpoint) -> None:
        if source != self.toward:
            return
        if self.winner is None:
            # The NAT should let only the peer in, but nothing unauthenticated may change
            # state: the socket wins only once a datagram through it authenticates.
            if not self.owner.deliver(datagram, source):
                return
            self.winner = extra
            for other in self.sockets:
                if other is not extra:
                    other.close()
            self.sockets = [extra]
            if self.expiry is not None and self.expiry.active():
                self.expiry.cancel()
            self.expiry = None
            self.owner.steer(self.toward, extra.send)
            self.owner.on_hit(self.toward)
            return
        if extra is self.winner:
            self.owner.deliver(datagram, source)

    def expire(self) -> None:
        self.expiry = None
        if self.winner is None:
            self.owner.release(self.toward)

    def close(self) -> None:
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None
        for extra in self.sockets:
            extra.close()
        self.sockets = []


class BirthdaySockets:
    """Opens the groups of extra sockets on the reactor, marked like the node's own."""

    def __init__(
        self,
        reactor: Any,
        *,
        steer: Callable[[Endpoint, Callable[[bytes, Endpoint], None] | None], None],
        deliver: Callable[[bytes, Endpoint], bool],
        on_hit: Callable[[Endpoint], None],
        fwmark: Callable[[], int] = lambda: 0,
    ) -> None:
        self.reactor = reactor
        self.steer = steer
        self.deliver = deliver
        self.on_hit = on_hit
        self.fwmark = fwmark
        self.groups: dict[Endpoint, _Group] = {}
        self.opened = 0

    def open(self, toward: Endpoint, count: int, hold: float) -> bool:
        if ":" in toward[0]:
            return False
        self.release(toward)
        group = _Group(self, toward)
        mark = self.fwmark()
        for _ in range(count):
            extra = _Extra(group)
            try:
                extra.port = self.reactor.listenUDP(0, extra, interface="0.0.0.0")
            except Exception as e:
                log.warn("cannot open a birthday socket: {error}", error=str(e))
                break
            if mark:
                try:
                    extra.port.socket.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)  # type: ignore[union-attr]
                except (AttributeError, OSError):
                    pass
            group.sockets.append(extra)
        if not group.sockets:
            return False
        for extra in group.sockets:
            extra.prime(toward)
        self.opened += len(group.sockets)
        self.groups[toward] = group
        group.expiry = self.reactor.callLater(hold, group.expire)
        return True

    def release(self, toward: Endpoint) -> None:
        group = self.groups.pop(toward, None)
        if group is None:
            return
        if group.winner is not None:
            self.steer(toward, None)
        group.close()

    def close(self) -> None:
        for toward in list(self.groups):
            self.release(toward)
