"""Secondary UDP sockets for the NAT lifetime probe (the adapter behind
:class:`meshguard.mesh.lifetime_measurement.ProbeSocketOpener`).

Each probe gets its own ephemeral socket, hence its own NAT mapping, so measuring a mapping never
refreshes the one the tunnel uses. Few and short-lived (at most 37 per measurement, most closed
within about 1.15 times the NAT's lifetime), so plain ``listenUDP`` is enough; the data path's
socket code is not involved.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from meshguard.core.interfaces import Endpoint

log = Logger()

SO_MARK = 36


class _ProbeProtocol(DatagramProtocol):
    noisy = False

    def __init__(
        self,
        receive: Callable[[bytes, Endpoint, float], None],
        seconds: Callable[[], float],
        after: Callable[[], None] | None,
    ) -> None:
        self.receive = receive
        self.seconds = seconds
        self.after = after

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        host = str(addr[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self.receive(datagram, (host, int(addr[1])), self.seconds())
        if self.after is not None:
            self.after()


class ProbeSocket:
    """One secondary socket; sends never raise (a lost probe is only an unanswered probe)."""

    def __init__(self, port: IListeningPort, protocol: _ProbeProtocol) -> None:
        self.port = port
        self.protocol = protocol

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        transport = self.protocol.transport
        if transport is None:
            return
        try:
            transport.write(data, endpoint)  # type: ignore[attr-defined]
        except OSError:
            pass

    def close(self) -> None:
        self.port.stopListening()


class ProbeSockets:
    """Opens secondary sockets on the reactor, marked like the node's own (``fwmark``)."""

    def __init__(
        self,
        reactor: Any,
        *,
        fwmark: Callable[[], int] = lambda: 0,
        after_receive: Callable[[], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.fwmark = fwmark
        self.after_receive = after_receive

    def open(
        self, toward: Endpoint, receive: Callable[[bytes, Endpoint, float], None]
    ) -> ProbeSocket | None:
        protocol = _ProbeProtocol(receive, self.reactor.seconds, self.after_receive)
        interface = "::" if ":" in toward[0] else "0.0.0.0"
        try:
            port = self.reactor.listenUDP(0, protocol, interface=interface)
        except Exception as e:
            log.warn("cannot open a NAT probe socket: {error}", error=str(e))
            return None
        mark = self.fwmark()
        if mark:
            try:
                port.socket.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except (AttributeError, OSError):
                pass
        return ProbeSocket(port, protocol)
