"""Hole punching's primers, with a hop limit that leaves every NAT of ours and goes no further.

A primer (docs/nat-matrix.md) is an empty datagram that must pass all of our own NATs, so that
each holds our mapping toward the peer before the peer's ping arrives, and must die before the
peer's NAT, where an unsolicited packet would leave a conntrack entry that clashes with the
peer's own mapping. A fixed hop limit of 2 leaves one NAT: a home behind a carrier-grade NAT
as well opens only its inner NAT, the peer's first ping then reaches the carrier unsolicited,
and on a carrier that does not drop such input it clashes there. Linux masquerade then gives
the home's flows another port and reuses that newest port for its later flows, so the port
the introducer saw is wrong toward everyone after it, birthday sprays included.

So the node traces its own NAT depth once (and again every :data:`RETRACE` seconds): probes
with hop limits 1, 2, ... toward a public endpoint, one at a time, each waiting for the ICMP
time-exceeded that names the router where it died, stopping at the first router with a public
address: that hop limit leaves our NATs (whose inner sides have private or carrier-grade
addresses) and dies at the first router outside them, before any peer's NAT. Nothing goes
further than that router; a silent hop ends the trace and the default stays.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from meshguard.adapters.probe_sockets import SO_MARK
from meshguard.core.interfaces import Endpoint
from meshguard.mesh.paths import PRIME_TTL

log = Logger()

#: The deepest we look: a home behind this many NATs is not expected.
MAX_TTL = 6
#: How long one hop's ICMP answer is awaited.
HOP_WAIT = 0.5
#: How often the trace is made again (a moved laptop, a carrier that added a layer).
RETRACE = 600.0

IP_RECVERR = 11
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11

_NOT_PUBLIC = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3")
)  # fmt: skip


def is_public(address: str) -> bool:
    """An IPv4 address outside private, carrier-grade NAT, loopback, link-local and multicast
    space: what the outside of a NAT has."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return parsed.version == 4 and not any(parsed in n for n in _NOT_PUBLIC)


def primer_ttl(offenders: Sequence[str | None]) -> int | None:
    """The hop limit a primer needs, from a trace: ``offenders[i]`` is the router that answered
    the probe with hop limit ``i + 1`` (None: no answer). The first public one's hop limit,
    if every hop before it answered; else None (keep the default)."""
    for index, offender in enumerate(offenders):
        if offender is None:
            return None
        if is_public(offender):
            return index + 1
    return None


def parse_time_exceeded(ancillary: Iterable[tuple[int, int, bytes]]) -> str | None:
    """The router that sent an ICMP time-exceeded, from ``recvmsg(MSG_ERRQUEUE)``'s ancillary
    data (``struct sock_extended_err`` then the offender's ``sockaddr_in``); None for any
    other error or a short record."""
    for level, kind, data in ancillary:
        if level != socket.IPPROTO_IP or kind != IP_RECVERR or len(data) < 16 + 8:
            continue
        _errno, origin, icmp_type = struct.unpack_from("=IBB", data, 0)
        if origin != SO_EE_ORIGIN_ICMP or icmp_type != ICMP_TIME_EXCEEDED:
            continue
        family = struct.unpack_from("=H", data, 16)[0]
        if family != socket.AF_INET:
            continue
        return socket.inet_ntoa(data[20:24])
    return None


def trace(
    toward: Endpoint, *, fwmark: int = 0, max_ttl: int = MAX_TTL, wait: float = HOP_WAIT
) -> list[str | None]:
    """Blocking (run it in a thread): probe ``toward`` with hop limits 1, 2, ... from a
    throw-away socket, one probe at a time, until a router with a public address answers or
    one stays silent; the answering routers in order (None for the silent one)."""
    offenders: list[str | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLERR)
        for ttl in range(1, max_ttl + 1):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            try:
                sock.sendto(bytes([ttl]), toward)
            except OSError:
                offenders.append(None)
                break
            offender = _await_hop(sock, poller, ttl, wait)
            offenders.append(offender)
            if offender is None or is_public(offender):
                break
    return offenders


def _await_hop(sock: socket.socket, poller: Any, ttl: int, wait: float) -> str | None:
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            return None
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(16, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return None
        if data[:1] == bytes([ttl]):
            offender = parse_time_exceeded(ancillary)
            if offender is not None:
                return offender
    return None


class Primer:
    """Sends the node's primers (``Paths.primer``) with the traced hop limit, tracing toward
    the first public IPv4 endpoint it is given or asked to prime, in a thread."""

    def __init__(
        self,
        reactor: Any,
        send: Callable[[bytes, Endpoint, int], None],
        *,
        fwmark: Callable[[], int] = lambda: 0,
        tracer: Callable[..., list[str | None]] = trace,
        in_thread: Callable[..., Deferred[list[str | None]]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.send = send
        self.fwmark = fwmark
        self.tracer = tracer
        #: Runs the blocking trace off the reactor thread (tests run it in place).
        self.in_thread = in_thread or (
            lambda f, *args, **kwargs: deferToThreadPool(
                reactor, reactor.getThreadPool(), f, *args, **kwargs
            )
        )
        #: The hop limit of IPv4 primers (IPv6 has no NAT to leave: the default).
        self.ttl = PRIME_TTL
        #: The last trace's routers, for status.
        self.offenders: list[str | None] = []
        self._traced_at: float | None = None
        self._tracing = False

    def prepare(self, endpoints: Iterable[Endpoint | None]) -> None:
        """Trace now toward the first public IPv4 endpoint (the node's introducers at start),
        so the first punch round already has the right hop limit."""
        for endpoint in endpoints:
            if endpoint is not None and is_public(endpoint[0]):
                self._maybe_trace(endpoint)
                return

    def __call__(self, endpoint: Endpoint) -> None:
        v6 = ":" in endpoint[0]
        if not v6 and is_public(endpoint[0]):
            self._maybe_trace(endpoint)
        self.send(b"", endpoint, PRIME_TTL if v6 else self.ttl)

    def status(self) -> dict[str, Any]:
        return {"primer_ttl": self.ttl, "primer_trace": list(self.offenders)}

    def _maybe_trace(self, toward: Endpoint) -> None:
        now = self.reactor.seconds()
        if self._tracing or (self._traced_at is not None and now - self._traced_at < RETRACE):
            return
        self._tracing = True
        self._traced_at = now
        mark = self.fwmark()
        d = self.in_thread(self.tracer, toward, fwmark=mark)
        d.addCallbacks(self._traced, self._failed)

    def _traced(self, offenders: list[str | None]) -> None:
        self._tracing = False
        self.offenders = offenders
        ttl = primer_ttl(offenders)
        if ttl is not None and ttl != self.ttl:
            log.info(
                "primers leave our NATs with hop limit {ttl} (routers: {routers})",
                ttl=ttl,
                routers=", ".join(o or "?" for o in offenders),
            )
            self.ttl = ttl

    def _failed(self, failure: Any) -> None:
        self._tracing = False
        log.warn("tracing our NAT depth failed: {error}", error=failure.getErrorMessage())
