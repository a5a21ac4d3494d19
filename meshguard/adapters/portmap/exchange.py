"""One request to the gateway's NAT-PMP/PCP port, retransmitted until an answer or a timeout.

The Twisted edge of the two codecs: a connected UDP socket (so only the gateway's datagrams
reach us and the kernel tells us our source address, which PCP must put in its request), a
retransmission schedule on an injected clock, and a Deferred for the first well-formed answer.
Garbage from the gateway is counted and ignored; it never ends the exchange early.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from meshguard.portmap.natpmp import SERVER_PORT

T = TypeVar("T")

#: Seconds to wait after each send: RFC 6886's 250 ms doubling, cut to four sends (3.75 s in
#: all) so a node that starts behind a silent gateway moves on to the next protocol quickly.
RETRANSMIT: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


class GatewayTimeoutError(Exception):
    """The gateway did not answer."""

    def __str__(self) -> str:
        return "no answer"


class GatewayRefusedError(Exception):
    """The gateway's port is closed (ICMP port unreachable): it does not speak the protocol."""

    def __str__(self) -> str:
        return "port closed"


#: Opens a UDP socket for a protocol (``reactor.listenUDP(0, protocol)`` in production).
ListenUDP = Callable[[DatagramProtocol], Any]


class GatewayExchange(DatagramProtocol, Generic[T]):
    """Sends ``request(local_address)`` to ``gateway:port`` and fires ``done`` with the first
    answer ``accept`` turns into a value (``accept`` returns None for anything else)."""

    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        gateway: str,
        request: Callable[[str], bytes],
        accept: Callable[[bytes], T | None],
        *,
        port: int = SERVER_PORT,
        schedule: Sequence[float] = RETRANSMIT,
    ) -> None:
        self.clock = clock
        self.gateway = gateway
        self.port = port
        self.request = request
        self.accept = accept
        self.schedule = tuple(schedule)
        self.done: Deferred[T] = Deferred()
        self.sent = 0
        self.garbage = 0
        self._payload = b""
        self._timer: IDelayedCall | None = None
        self._finished = False

    def startProtocol(self) -> None:
        assert self.transport is not None
        try:
            self.transport.connect(self.gateway, self.port)
            self._payload = self.request(self.transport.getHost().host)
        except Exception as e:
            self._finish(e)
            return
        self._send()

    def _send(self) -> None:
        self._timer = None
        if self._finished:
            return
        if self.sent >= len(self.schedule):
            self._finish(GatewayTimeoutError())
            return
        assert self.transport is not None
        try:
            self.transport.write(self._payload, None)
        except OSError:
            pass  # no route yet: the next send (or the timeout) decides
        if self._finished:
            return  # the write reported the port closed (connectionRefused)
        self._timer = self.clock.callLater(self.schedule[self.sent], self._send)
        self.sent += 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self._finished:
            return
        try:
            value = self.accept(datagram)
        except Exception:
            value = None  # a codec bug must not let a gateway's datagram end us
        if value is None:
            self.garbage += 1
            return
        self._finish(value)

    def connectionRefused(self) -> None:
        self._finish(GatewayRefusedError())

    def stopProtocol(self) -> None:
        # epoll reports the ICMP error of a connected UDP socket as a hang-up, and the reactor
        # closes the port without calling connectionRefused: the same answer.
        self._finish(GatewayRefusedError())

    def cancel(self) -> None:
        """Stop retransmitting and close the socket; ``done`` fails with CancelledError."""
        if not self._finished:
            self.done.cancel()
            self._finish(None)

    def _finish(self, result: T | Exception | None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None:
            self.transport.stopListening()
        if result is None or self.done.called:
            return
        if isinstance(result, Exception):
            self.done.errback(result)
        else:
            self.done.callback(result)


def exchange(
    listen_udp: ListenUDP,
    clock: IReactorTime,
    gateway: str,
    request: Callable[[str], bytes],
    accept: Callable[[bytes], T | None],
    schedule: Sequence[float] = RETRANSMIT,
) -> Deferred[T]:
    """Run one :class:`GatewayExchange`; cancelling the Deferred closes its socket."""
    protocol: GatewayExchange[T] = GatewayExchange(
        clock, gateway, request, accept, schedule=schedule
    )
    try:
        listen_udp(protocol)
    except Exception:
        return fail()
    done: Deferred[T] = Deferred(lambda d: protocol.cancel())
    protocol.done.chainDeferred(done)
    return done
