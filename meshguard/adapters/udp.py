"""The WireGuard UDP port as reactor read descriptors: the outer end of the data path.

One IPv4 socket and one IPv6-only socket share the port, as wireguard-go does. Both are read with
``recvmsg`` and packet-info ancillary data, so every datagram tells us the local address it
reached; replies to that peer leave from the same address ("sticky sockets"), which keeps a
multi-homed node answering from the address its peer knows.

Per-packet cost decides the shape (the figures are in docs/datapath.md):

- ``recvmsg`` with packet info costs a little more than ``recvfrom``. We pay it on every read:
  it is the only way to learn the local address.
- ``sendmsg`` with an ``IP_PKTINFO`` control message costs more than ``sendto``. So the source
  learned for an endpoint is compared, once, with the source the kernel's route would pick
  anyway (a connected probe socket, carrying the fwmark); only when they differ does that
  endpoint's traffic use ``sendmsg``. On a single-homed host every send is a plain ``sendto``.

Even so, the per-call cost dominates, so the sockets use the kernel's UDP offloads (Linux 4.18+
for GSO, 5.0+ for GRO; both probed per socket and each off where missing): one GSO ``sendmsg``
of a few dozen datagrams costs a fraction of as many ``sendto`` calls per datagram.

- Send (UDP GSO, ``UDP_SEGMENT``): between ``hold()`` and ``flush()`` (the node brackets each TUN
  read batch) datagrams to one endpoint are queued as a *run* and leave as one ``sendmsg`` whose
  buffer the kernel cuts into datagrams. The kernel's rule is that all segments but the last have
  the same size and the last is not larger, so a datagram that would break it flushes the run
  first; runs are also cut at ``GSO_MAX_SEGMENTS`` and ``GSO_MAX_BYTES``. A run never
  overtakes or is overtaken by another datagram to the same endpoint. Outside a hold (timers,
  handshakes answered from the UDP side) a send goes out at once, as before.
- Receive (UDP GRO, ``UDP_GRO``): the kernel may hand ``recvmsg`` several same-size datagrams from
  one source as one buffer with the segment size in a control message; ``doRead`` cuts it back
  into datagrams (``split_datagrams``). The receive size (``max_datagram``, 65535) covers the
  largest coalesced buffer, which the kernel keeps within one IP packet's 64 KiB. A busy batch
  reads with ``recvmsg_into`` into one buffer per socket, reused: a GRO read's datagrams go to
  the batch receiver as views of it (no 64 KiB allocation a read, no copy a datagram); a plain
  datagram, which the receiver may keep, is copied out.

Sends never raise: a full queue or an unreachable network drops the datagram and bumps a counter,
as a router would; WireGuard's own timers recover. A kernel or device that cannot do GSO (EIO: no
checksum offload) turns it off for that socket for good; a single refused run (EINVAL, EMSGSIZE)
is resent as separate datagrams and its endpoint stays on separate datagrams.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshguard.adapters import socket_filter
from meshguard.adapters.hot_reactor import add_reader
from meshguard.adapters.idle_gap import IdleGap
from meshguard.adapters.tun import FDReactor

if TYPE_CHECKING:
    from meshguard.core.peer import Peer

__all__ = ["UDPBindError", "UDPError", "UDPTransport", "split_datagrams"]

log = Logger()

Endpoint = tuple[str, int]

IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# Path MTU discovery: PROBE sets DF and ignores the kernel's cached path MTU; WANT is the default.
IP_MTU_DISCOVER = 10
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
PMTUDISC_WANT = 1
PMTUDISC_PROBE = 3

# UDP offloads (linux/udp.h); Python 3.11's socket module does not name them.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104

#: Switches for the UDP offloads, on by default: set to False to send and read one datagram per
#: system call, as before they existed (the same effect as a kernel without them).
USE_GSO = True
USE_GRO = True
#: Most datagrams in one GSO send: the kernel's UDP_MAX_SEGMENTS (64 before Linux 6.x, 128 since).
GSO_MAX_SEGMENTS = 64
#: Most bytes in one GSO send: the buffer must fit one IP packet (65507 bytes of UDP payload).
GSO_MAX_BYTES = 65000

#: Attach the kernel filter (meshguard/adapters/socket_filter.py) that drops what cannot be a
#: message of ours; False leaves every datagram to Python (for measuring what the filter is worth).
USE_SOCKET_FILTER = True

#: Socket buffer size asked for; large buffers absorb bursts between reactor iterations.
SOCKET_BUFFER = 4 << 20

_IN_PKTINFO = struct.Struct("=I4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("=16sI")  # ipi6_addr, ipi6_ifindex
_SEGMENT_SIZE = struct.Struct("=H")  # UDP_SEGMENT: a u16
_GRO_SIZE = struct.Struct("=i")  # UDP_GRO: a native int
_ANC_SIZE = socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_GRO_SIZE.size)

#: Errors after which the datagram is simply lost (queue full, no route, firewall, ...).
_SEND_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EINTR})
#: A sticky source that no longer works: the address is gone or moved.
_STICKY_FAILED_ERRNOS = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})
#: The socket can never send GSO: the device has no checksum offload (EIO, udp(7)), or the kernel
#: does not know the option.
_GSO_UNSUPPORTED_ERRNOS = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
#: This GSO send was refused (too many segments, a segment above the path MTU, too big in all);
#: the same datagrams sent one by one may pass (the kernel fragments what separate sends carry).
_GSO_REFUSED_ERRNOS = frozenset({errno.EINVAL, errno.EMSGSIZE})

#: Bound on remembered (endpoint -> local source) entries. Sources are learned only from
#: datagrams that authenticate (:meth:`UDPTransport.confirm_source`), so this bounds the number
#: of live peers' endpoints; on overflow we forget everything and relearn from the next datagram.
MAX_SOURCES = 4096

_UNDECIDED: Any = object()


class UDPError(Exception):
    """A socket operation failed in a way the operator must see."""


class UDPBindError(UDPError):
    """The port could not be bound; the message is one line fit for an operator."""


#: (raw packet info as received, decision). The decision is ``_UNDECIDED`` until the first send,
#: then ``None`` (the route's default source is right: plain ``sendto``) or the ancillary data
#: list for ``sendmsg``.
_Source = tuple[bytes, Any]


class _Run:
    """Datagrams held for one endpoint, to leave as one GSO send: ``segment`` is the first
    datagram's size, which all but the last must match and the last must not exceed."""

    __slots__ = ("parts", "segment", "total")

    def __init__(self, data: bytes) -> None:
        self.parts = [data]
        self.segment = self.total = len(data)


def split_datagrams(data: bytes | memoryview, segment: int) -> list[bytes | memoryview]:
    """Cut a GRO buffer back into its datagrams: ``segment`` bytes each, the last may be shorter
    (slices of ``data``: views of a view, no copy).

    A segment size that makes no sense (0 or less) leaves the buffer whole rather than lose it.
    """
    if segment <= 0 or len(data) <= segment:
        return [data]
    return [data[i : i + segment] for i in range(0, len(data), segment)]


def _ancillary(anc: list[tuple[int, int, bytes]]) -> tuple[bytes | None, int]:
    """(packet info, GRO segment size or 0) from ``recvmsg``'s control messages in any order.

    The common case (packet info alone) is read inline by ``doRead``; this is the general one.
    """
    info = None
    segment = 0
    for level, kind, value in anc:
        if level == SOL_UDP:
            if kind == UDP_GRO and len(value) >= _GRO_SIZE.size:
                segment = _GRO_SIZE.unpack_from(value)[0]
        else:
            info = value
    return info, segment


def _is_v6(host: str) -> bool:
    return ":" in host


def _set_buffer(sock: socket.socket, force: int, plain: int) -> None:
    """Ask for ``SOCKET_BUFFER``, past ``rmem_max`` when we may (root), else what is allowed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        except OSError:
            pass


def _enable_offloads(sock: socket.socket) -> tuple[bool, bool]:
    """Turn on GRO and probe GSO (as wireguard-go does); (GSO usable, GRO on).

    Reading ``UDP_SEGMENT`` fails on a kernel without GSO, which would ignore the control
    message and send the whole buffer as one datagram, so GSO is never tried without this probe.
    """
    gso = gro = False
    if USE_GSO:
        try:
            sock.getsockopt(SOL_UDP, UDP_SEGMENT)
            gso = True
        except OSError:
            pass
    if USE_GRO:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            gro = True
        except OSError:
            pass
    return gso, gro


def _bind_error(port: int, family: str, e: OSError) -> UDPBindError:
    if e.errno == errno.EADDRINUSE:
        return UDPBindError(f"UDP port {port} is already in use")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UDPBindError(f"cannot bind UDP port {port} ({family}): {e.strerror}")
    return UDPBindError(f"cannot bind UDP port {port} ({family}): {e.strerror or e}")


@implementer(interfaces.IReadDescriptor)
class _Reader:
    """One socket registered with the reactor; the read loop lives here to keep it local."""

    def __init__(self, transport: UDPTransport, sock: socket.socket, v6: bool) -> None:
        self.transport = transport
        self.sock = sock
        self.v6 = v6
        self._fd = sock.fileno()
        #: The busy batch's receive buffer, reused by every ``recvmsg_into``: a GRO read's
        #: datagrams are views of it (no allocation of ``max_datagram`` bytes a read, no copy
        #: a datagram), valid until the next read; a plain datagram is copied out of it.
        self._buffer = bytearray(transport.max_datagram)
        self._view = memoryview(self._buffer)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "UDPTransport(v6)" if self.v6 else "UDPTransport(v4)"

    def connectionLost(self, reason: Failure) -> None:
        log.error("UDP socket lost: {reason}", reason=reason.value)

    def doRead(self) -> None:
        """Drain up to ``batch_packets`` reads, learning each one's local address and cutting
        GRO buffers back into datagrams (all from the same source to the same address).

        After an idle gap a lone batch reads here: one ``recvmsg``, and a plain datagram with
        at most its packet info goes straight to the receiver, alone, before the batch hook
        (the node holds TUN writes for coalescing), and ends the batch: a lone datagram is
        written out at once, without a read that finds the queue empty; the reactor reports
        what else is queued as the next, busy, batch. After an idle moment every step costs
        several microseconds of cold interpreter (docs/datapath.md, "Latency"), so this path
        has no call or set-up it can do without. Anything else (a GRO buffer, other control
        messages, an interrupted read) goes to :meth:`_read_batch` (already read, if it was),
        as does a busy batch, which runs the hook first and stays whole.
        """
        t = self.transport
        idle = t.idle
        if not idle.batch_begins(self):
            self._read_batch(False, None)
            return
        try:
            first = self.sock.recvmsg(t.max_datagram, _ANC_SIZE)
        except BlockingIOError:
            self._end(t, 0)
            return
        except InterruptedError:
            self._read_batch(True, None)
            return
        except OSError:
            t.receive_errors += 1
            self._end(t, 0)
            return
        data, anc, _flags, addr = first
        if anc and (len(anc) != 1 or anc[0][0] == SOL_UDP):
            self._read_batch(True, first)
            return
        if self.v6:
            host = addr[0]
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
            addr = (host, addr[1])
        if anc:
            info = anc[0][2]
            entry = t._sources.get(addr)
            if entry is None or entry[0] != info:
                # New or changed: remembered only if the datagram authenticates.
                t._pending_source = (addr, info)
        try:
            t.receiver(data, addr, idle.now)
        except Exception:
            t._receiver_failed()
        t._pending_source = None
        t.reads += 1
        end = t.on_batch_end
        if end is not None:
            # :meth:`_end` inline: one call fewer on the lone datagram's way.
            try:
                end()
            except Exception:
                t._receiver_failed()
        idle.batch_ended()

    @staticmethod
    def _end(t: UDPTransport, reads: int) -> None:
        """The batch end: counts, the end hook, the idle clock (``doRead``'s lone datagram
        carries these lines inline)."""
        t.reads += reads
        end = t.on_batch_end
        if end is not None:
            try:
                end()
            except Exception:
                t._receiver_failed()
        t.idle.batch_ended()

    def _read_batch(self, eager: bool, first: Any) -> None:
        """The read loop; ``eager``: a lone batch (hand a first plain datagram on alone and
        end); ``first``: a ``recvmsg`` result already read, handled before any read."""
        t = self.transport
        recvmsg_into = self.sock.recvmsg_into
        buffers = [self._buffer]
        view = self._view
        receiver = t.receiver
        sources = t._sources
        get = sources.get
        v6 = self.v6
        now = t.idle.now
        reads = gro_reads = gro_datagrams = 0
        start = t.on_batch_start
        if not eager and start is not None:
            t._hook(start)
            start = None
        # The budget counts datagrams, not reads: a GRO read holds dozens, and one batch's
        # worth of held TUN writes and replies should stay as long as without GRO.
        budget = t.batch_packets
        while budget > 0:
            budget -= 1
            data: bytes | memoryview
            if first is not None:
                data, anc, _flags, addr = first
                first = None
            else:
                try:
                    n, anc, _flags, addr = recvmsg_into(buffers, _ANC_SIZE)
                    data = view[:n]
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError:
                    t.receive_errors += 1
                    break
            reads += 1
            if v6:
                host = addr[0]
                if host.startswith("::ffff:") and "." in host:
                    host = host[7:]
                addr = (host, addr[1])
            segment = 0
            info: bytes | None = None
            if anc:
                if len(anc) == 1 and anc[0][0] != SOL_UDP:
                    info = anc[0][2]
                else:
                    info, segment = _ancillary(anc)
                if info is not None:
                    entry = get(addr)
                    if entry is None or entry[0] != info:
                        # New or changed: remembered only if the datagram authenticates.
                        t._pending_source = (addr, info)
            if segment and len(data) > segment:
                eager = False
                if start is not None:
                    t._hook(start)
                    start = None
                parts = split_datagrams(data, segment)
                gro_reads += 1
                gro_datagrams += len(parts)
                budget -= len(parts) - 1
                batch_receiver = t.batch_receiver
                if batch_receiver is not None:
                    try:
                        batch_receiver(parts, addr, now)
                    except Exception:
                        t._receiver_failed()
                    t._pending_source = None
                    continue
                for part in parts:
                    if info is not None and t._pending_source is None:
                        entry = get(addr)
                        if entry is None or entry[0] != info:
                            t._pending_source = (addr, info)
                    try:
                        receiver(bytes(part), addr, now)
                    except Exception:
                        t._receiver_failed()
                t._pending_source = None
                continue
            try:
                # A plain datagram may be kept (a handshake's backlog, a relay): a copy.
                receiver(bytes(data), addr, now)
            except Exception:
                t._receiver_failed()
            t._pending_source = None
            if eager:
                break
        if gro_reads:
            t.gro_reads += gro_reads
            t.gro_datagrams += gro_datagrams
        self._end(t, reads)


def _no_socket(data: bytes, address: Any) -> int:
    raise OSError(errno.EAFNOSUPPORT, "no socket for this address family")


def _no_socket_msg(buffers: Any, anc: Any, flags: int, address: Any) -> int:
    raise OSError(errno.EAFNOSUPPORT, "no socket for this address family")


class UDPTransport:
    """The node's UDP port: an IPv4 and an IPv6 socket on one port number.

    ``receiver(data, (host, port), now)`` gets every datagram (``now``: the read batch's time,
    ``IdleGap.now``); ``host`` is numeric, IPv4-mapped IPv6
    addresses come out as plain IPv4, and an IPv6 scope stays in the host (``fe80::1%eth0``), so
    the endpoint can be handed straight back to ``send``.
    """

    #: Datagrams read per reactor event per socket before yielding.
    batch_packets = 256
    #: Receive size: the largest UDP payload, so nothing is ever truncated.
    max_datagram = 65535

    def __init__(
        self,
        receiver: Callable[[bytes, Endpoint, float], None],
        reactor: FDReactor,
        port: int,
        fwmark: int = 0,
        on_batch_end: Callable[[], None] | None = None,
        on_batch_start: Callable[[], None] | None = None,
        batch_receiver: Callable[[list[bytes | memoryview], Endpoint, float], None] | None = None,
        *,
        wireguard_filter: bool = False,
        idle: IdleGap | None = None,
    ) -> None:
        #: ``receiver(data, source, now)``: every datagram read (the node wires the engine's
        #: entry point straight here).
        self.receiver = receiver
        #: Whether a read batch follows an idle moment of the node (shared with the TUN
        #: device): only then is its first datagram handled alone.
        self.idle = idle if idle is not None else IdleGap()
        #: Called instead of ``receiver`` with the datagrams of one GRO read (one source):
        #: views of the reader's buffer, which the next read overwrites, so whatever it keeps
        #: beyond the call must be a copy (``receiver`` always gets ``bytes``).
        self.batch_receiver = batch_receiver
        #: Whether the sockets carry the kernel filter for WireGuard's port (the node's do;
        #: a generic datagram transport does not).
        self._wireguard_filter = wireguard_filter
        self._reactor = reactor
        self._requested_port = port
        self._fwmark = fwmark
        self.on_batch_end = on_batch_end
        #: Called before each read batch (the node holds TUN writes for coalescing).
        self.on_batch_start = on_batch_start
        self._sock4: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._readers: list[_Reader] = []
        self._reading = False
        self._port = 0
        self._sources: dict[Endpoint, _Source] = {}
        #: Endpoints another socket carries (the birthday technique's winning socket,
        #: meshguard/adapters/birthday_sockets.py): everything to them goes out there.
        self._steered: dict[Endpoint, Callable[[bytes, Endpoint], None]] = {}
        #: (endpoint, packet info) of the datagram being handed to the receiver when that info
        #: is new for the endpoint; installed by :meth:`confirm_source` if it authenticates.
        self._pending_source: tuple[Endpoint, bytes] | None = None
        self._v6_addresses: dict[Endpoint, tuple[Any, ...]] = {}
        self._sendto4: Callable[[bytes, Any], int] = _no_socket
        self._sendto6: Callable[[bytes, Any], int] = _no_socket
        self._sendmsg4: Callable[[Any, Any, int, Any], int] = _no_socket_msg
        self._sendmsg6: Callable[[Any, Any, int, Any], int] = _no_socket_msg
        #: Between ``hold()`` and ``flush()``: sends queue up in ``_runs`` for GSO.
        self._holding = False
        self._runs: dict[Endpoint, _Run] = {}
        #: Whether each socket sends GSO and reads GRO (probed when it is installed).
        self._gso4 = self._gso6 = False
        self._gro4 = self._gro6 = False
        #: Endpoints whose GSO send the kernel refused (EINVAL/EMSGSIZE: e.g. a learned path MTU
        #: below the segment size); they stay on separate datagrams. Bounded like the sources.
        self._gso_refused: set[Endpoint] = set()
        #: GSO sends made, and the datagrams they carried.
        self.gso_sends = 0
        self.gso_datagrams = 0
        #: Datagrams queued while held (by GSO or, in a run of one, alone).
        self.held_datagrams = 0
        #: GSO sends the kernel refused, resent as separate datagrams.
        self.gso_refused = 0
        #: Sockets that turned GSO off for good (EIO: a device without checksum offload).
        self.gso_disabled = 0
        #: ``recvmsg`` calls that returned data; of those, GRO buffers holding several datagrams,
        #: and the datagrams in them.
        self.reads = 0
        self.gro_reads = 0
        self.gro_datagrams = 0
        #: Datagrams dropped because the send queue was full (EAGAIN/ENOBUFS).
        self.send_drops = 0
        #: Datagrams not sent for another reason (no route, EPERM from a firewall, ...).
        self.send_errors = 0
        #: Unexpected errors from ``recvmsg``.
        self.receive_errors = 0
        #: Exceptions raised by the receiver (each is logged, rate-limited).
        self.receiver_errors = 0
        #: The kernel filter's flood shedding in force (None: the plain filter), and failures
        #: to attach it.
        self._shedding: socket_filter.Shedding | None = None
        self.filter_errors = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def local_port(self) -> int:
        return self._port

    @property
    def fwmark(self) -> int:
        return self._fwmark

    def bind(self) -> int:
        """Open and bind both sockets; return the port (the kernel's choice when 0)."""
        if self._sock4 is not None:
            return self._port
        self._install(*self._open_pair(self._requested_port))
        return self._port

    def start_reading(self) -> None:
        if self._sock4 is None:
            raise UDPError("UDP transport is not bound")
        if not self._reading:
            self._reading = True
            for reader in self._readers:
                add_reader(self._reactor, reader)

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            for reader in self._readers:
                self._reactor.removeReader(reader)

    def rebind(self, port: int) -> int:
        """Move to ``port`` (``wg set listen-port``): bind the new sockets, then swap.

        On failure the old sockets stay in service and ``UDPBindError`` is raised.
        """
        if self._sock4 is not None and port != 0 and port == self._port:
            return port
        new = self._open_pair(port)
        reading = self._reading
        self._uninstall()
        self._requested_port = port
        self._install(*new)
        if reading:
            self.start_reading()
        return self._port

    def set_fwmark(self, mark: int) -> None:
        """Mark outgoing datagrams (policy routing keeps them out of the tunnel)."""
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                self._apply_fwmark(sock, mark)
        self._fwmark = mark
        # The mark changes which route, hence which default source (and MTU), applies.
        self.forget_sources()

    def close(self) -> None:
        self._uninstall()

    def set_shedding(self, shedding: socket_filter.Shedding | None) -> None:
        """Install the port's kernel filter on both sockets: the plain one (None) or the one
        that sheds a flood (the flood guard decides). A kernel that refuses it leaves the
        sockets unfiltered, with one warning."""
        self._shedding = shedding
        if not (USE_SOCKET_FILTER and self._wireguard_filter):
            return
        for sock, v6 in ((self._sock4, False), (self._sock6, True)):
            if sock is None:
                continue
            try:
                socket_filter.attach(sock, socket_filter.port_filter(v6=v6, shedding=shedding))
            except (OSError, ValueError) as e:
                self.filter_errors += 1
                if self.filter_errors == 1:
                    log.warn("cannot attach the UDP socket filter: {error}", error=str(e))

    def confirm_source(self, endpoint: Endpoint) -> None:
        """The datagram being received from ``endpoint`` authenticated: answer that endpoint
        from the local address it reached.

        Called before the device sends any reply to it, so a handshake response already leaves
        from the right address. A datagram that does not authenticate changes nothing here: a
        spoofed one cannot move a peer's replies to another local address."""
        self.source_authenticated(None, endpoint, 0.0)

    def source_authenticated(self, peer: Peer | None, source: Endpoint, now: float) -> None:
        """:meth:`confirm_source` in the device's source listener form
        (``Device.add_source_listener``), registered as it is: one call on every received
        packet's way instead of two (cold code after an idle moment costs several
        microseconds a call; docs/datapath.md, "Latency")."""
        pending = self._pending_source
        if pending is None or pending[0] != source:
            return
        self._pending_source = None
        sources = self._sources
        if len(sources) >= MAX_SOURCES:
            sources.clear()
        sources[source] = (pending[1], _UNDECIDED)

    def forget_sources(self) -> None:
        """Drop learned sticky sources, e.g. after local addresses or routes changed."""
        self._sources.clear()
        self._gso_refused.clear()

    def offload_status(self) -> dict[str, Any]:
        """The UDP offloads in use and how much they batch, for ``meshguard status``."""
        gso = [name for name, on in (("ipv4", self._gso4), ("ipv6", self._gso6)) if on]
        gro = [name for name, on in (("ipv4", self._gro4), ("ipv6", self._gro6)) if on]
        return {
            "gso": " ".join(gso) or "off",
            "gro": " ".join(gro) or "off",
            "gso_sends": self.gso_sends,
            "gso_datagrams": self.gso_datagrams,
            "held_datagrams": self.held_datagrams,
            "gso_refused": self.gso_refused,
            "gso_disabled": self.gso_disabled,
            "reads": self.reads,
            "gro_reads": self.gro_reads,
            "gro_datagrams": self.gro_datagrams,
        }

    # -- data path ----------------------------------------------------------------------------

    def hold(self) -> None:
        """Queue datagrams from now on, to send them in GSO runs at ``flush()``.

        The caller must flush soon (the node brackets each TUN read batch): held datagrams wait
        until then. Without GSO on either socket this does nothing.
        """
        if self._gso4 or self._gso6:
            self._holding = True

    def flush(self) -> None:
        """Send everything held and go back to sending at once."""
        self._holding = False
        if self._runs:
            self._flush_runs()

    def steer(self, endpoint: Endpoint, send: Callable[[bytes, Endpoint], None] | None) -> None:
        """From now on send everything to ``endpoint`` through ``send`` (another socket, whose
        NAT mapping is the one the peer lets in), or again through ours (None)."""
        if send is None:
            self._steered.pop(endpoint, None)
        else:
            self._steered[endpoint] = send

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        """Send one datagram, or while held queue it in its endpoint's run; never raises for
        network conditions (they are counted)."""
        if self._steered:
            steered = self._steered.get(endpoint)
            if steered is not None:
                steered(data, endpoint)
                return
        if self._holding:
            runs = self._runs
            run = runs.get(endpoint)
            if run is not None:
                size = len(data)
                segment = run.segment
                parts = run.parts
                if (
                    size <= segment
                    and len(parts) < GSO_MAX_SEGMENTS
                    and run.total + size <= GSO_MAX_BYTES
                ):
                    parts.append(data)
                    run.total += size
                    if size == segment:
                        return
                    # Only the last segment may be shorter: this one ends the run.
                    del runs[endpoint]
                    self._flush_run(endpoint, run)
                    return
                # Larger, or the run is full: it leaves first, so order toward the peer holds.
                del runs[endpoint]
                self._flush_run(endpoint, run)
            if (
                self._gso6 if ":" in endpoint[0] else self._gso4
            ) and endpoint not in self._gso_refused:
                runs[endpoint] = _Run(data)
                return
        # ``_send_now`` inline: a lone packet's send is one call (cold code after an idle
        # moment costs several microseconds a call, docs/datapath.md, "Latency").
        try:
            if ":" in endpoint[0]:
                self._send6(data, endpoint)
                return
            entry = self._sources.get(endpoint)
            if entry is None or entry[1] is None:
                self._sendto4(data, endpoint)
            else:
                self._send_sticky(data, endpoint, endpoint, entry, False)
        except OSError as e:
            if e.errno in _SEND_DROP_ERRNOS:
                self.send_drops += 1
            else:
                self.send_errors += 1

    def send_datagrams(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        """Send several datagrams to one endpoint, in order (the sealed segments of one TUN
        super-packet). While held, runs of equal-size datagrams join the endpoint's GSO run
        in bulk instead of one :meth:`send` each; the rules are :meth:`send`'s."""
        if (
            not self._holding
            or not (self._gso6 if ":" in endpoint[0] else self._gso4)
            or endpoint in self._gso_refused
            or endpoint in self._steered
        ):
            for data in datagrams:
                self.send(data, endpoint)
            return
        runs = self._runs
        i, n = 0, len(datagrams)
        while i < n:
            run = runs.get(endpoint)
            if run is None:
                runs[endpoint] = _Run(datagrams[i])
                i += 1
                continue
            segment = run.segment
            parts = run.parts
            room = min(GSO_MAX_SEGMENTS - len(parts), (GSO_MAX_BYTES - run.total) // segment)
            j = i
            while j < n and j - i < room and len(datagrams[j]) == segment:
                j += 1
            taken = j - i
            if taken:
                parts.extend(datagrams[i:j])
                run.total += taken * segment
                i = j
                if i == n:
                    return
            size = len(datagrams[i])
            if (
                size < segment
                and len(parts) < GSO_MAX_SEGMENTS
                and run.total + size <= GSO_MAX_BYTES
            ):
                # A shorter one may end the run (the byte limit can leave room for it when
                # there is none for another full segment, as in ``send``).
                parts.append(datagrams[i])
                run.total += size
                i += 1
            # Full, ended by a shorter one, or the next is larger: it leaves now.
            del runs[endpoint]
            self._flush_run(endpoint, run)

    def _send_now(self, data: bytes, endpoint: Endpoint) -> None:
        """Send one datagram at once (``send`` holds this inline: keep the two alike)."""
        try:
            if ":" in endpoint[0]:
                self._send6(data, endpoint)
                return
            entry = self._sources.get(endpoint)
            if entry is None or entry[1] is None:
                self._sendto4(data, endpoint)
            else:
                self._send_sticky(data, endpoint, endpoint, entry, False)
        except OSError as e:
            if e.errno in _SEND_DROP_ERRNOS:
                self.send_drops += 1
            else:
                self.send_errors += 1

    # Also satisfies meshguard.core.interfaces.DeviceIO.send_datagram when bound directly.
    send_datagram = send

    def _flush_runs(self) -> None:
        runs = self._runs
        self._runs = {}
        for endpoint, run in runs.items():
            self._flush_run(endpoint, run)

    def _flush_run(self, endpoint: Endpoint, run: _Run) -> None:
        parts = run.parts
        self.held_datagrams += len(parts)
        v6 = ":" in endpoint[0]
        if len(parts) == 1 or not (self._gso6 if v6 else self._gso4):
            for part in parts:
                self._send_now(part, endpoint)
            return
        anc: Any = None
        try:
            address: Any = endpoint
            if v6 and "%" in endpoint[0]:
                address = self._v6_addresses.get(endpoint) or self._resolve_scoped(endpoint)
            anc = self._source_control(endpoint, address, v6)
            control = (SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(run.segment))
            sendmsg = self._sendmsg6 if v6 else self._sendmsg4
            sendmsg(parts, [control] if anc is None else [*anc, control], 0, address)
        except OSError as e:
            self._gso_failed(e, endpoint, parts, anc, v6)
            return
        self.gso_sends += 1
        self.gso_datagrams += len(parts)

    def _gso_failed(
        self, error: OSError, endpoint: Endpoint, parts: list[bytes], anc: Any, v6: bool
    ) -> None:
        """Drop the run on back-pressure; otherwise resend it one datagram at a time, turning
        GSO off for the socket (it can never work) or for the endpoint (this size cannot)."""
        code = error.errno
        if code in _SEND_DROP_ERRNOS:
            self.send_drops += len(parts)
            return
        if code in _GSO_UNSUPPORTED_ERRNOS:
            self._disable_gso(v6, error)
        elif code in _GSO_REFUSED_ERRNOS:
            self.gso_refused += 1
        elif anc is None or code not in _STICKY_FAILED_ERRNOS:
            self.send_errors += len(parts)
            return
        # One by one; a sticky source that stopped working is dropped there, as for any send.
        for part in parts:
            self._send_now(part, endpoint)
        if code in _GSO_REFUSED_ERRNOS:
            entry = self._sources.get(endpoint)
            if (entry[1] if entry is not None else None) is anc:
                # Not the sticky source's fault (unchanged): this endpoint cannot take GSO.
                if len(self._gso_refused) >= MAX_SOURCES:
                    self._gso_refused.clear()
                self._gso_refused.add(endpoint)

    def _disable_gso(self, v6: bool, error: OSError) -> None:
        if v6:
            self._gso6 = False
        else:
            self._gso4 = False
        self.gso_disabled += 1
        log.warn(
            "UDP GSO refused on the {family} socket ({error}); sending one datagram per call",
            family="IPv6" if v6 else "IPv4",
            error=error.strerror or str(error),
        )

    def send_probe(self, data: bytes, endpoint: Endpoint) -> bool:
        """Send a path MTU probe with Don't-Fragment, ignoring the kernel's cached path MTU.

        DF is set for this one datagram only (IP_PMTUDISC_PROBE, then back to the default
        WANT): data keeps the kernel's behaviour, which fragments locally once ICMP taught it a
        smaller path MTU, so a path with working ICMP never loses data while probing runs.
        Returns False when the local stack refuses the size (EMSGSIZE); other errors count as
        sent-and-lost, as for data.
        """
        if self._runs:
            self._flush_runs()  # held datagrams first: the probe must not overtake them
        steered = self._steered.get(endpoint)
        if steered is not None:
            steered(data, endpoint)  # that socket's own path MTU discovery applies
            return True
        v6 = ":" in endpoint[0]
        sock = self._sock6 if v6 else self._sock4
        if sock is None:
            return True
        level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
        option = IPV6_MTU_DISCOVER if v6 else IP_MTU_DISCOVER
        try:
            sock.setsockopt(level, option, PMTUDISC_PROBE)
        except OSError:
            pass
        try:
            if v6:
                self._send6(data, endpoint)
            else:
                entry = self._sources.get(endpoint)
                if entry is None or entry[1] is None:
                    self._sendto4(data, endpoint)
                else:
                    self._send_sticky(data, endpoint, endpoint, entry, False)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                return False
            self.send_errors += 1
        finally:
            try:
                sock.setsockopt(level, option, PMTUDISC_WANT)
            except OSError:
                pass
        return True

    def send_primer(self, data: bytes, endpoint: Endpoint, ttl: int) -> None:
        """Send one datagram with a small TTL (hop limit), for hole punching.

        It opens our own NAT's mapping toward ``endpoint`` and dies a hop or two later,
        before it reaches the peer's NAT: a punch that reached a NAT before its own home had
        sent would become a conntrack entry that clashes with the home's mapping
        (docs/nat-matrix.md). The TTL is set for this datagram only and restored at once.
        """
        if self._runs:
            self._flush_runs()
        v6 = ":" in endpoint[0]
        sock = self._sock6 if v6 else self._sock4
        if sock is None:
            return
        level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
        option = socket.IPV6_UNICAST_HOPS if v6 else socket.IP_TTL
        try:
            previous = sock.getsockopt(level, option)
            sock.setsockopt(level, option, ttl)
        except OSError:
            return
        try:
            if v6:
                self._send6(data, endpoint)
            else:
                self._sendto4(data, endpoint)
        except OSError:
            self.send_drops += 1
        finally:
            try:
                sock.setsockopt(level, option, previous)
            except OSError:
                pass

    def route_mtu(self, endpoint: Endpoint) -> int | None:
        """The MTU the local stack would use toward ``endpoint`` (route or cached path MTU),
        from a connected socket's ``IP_MTU``/``IPV6_MTU``, as tinc guesses its start; None
        when there is no route."""
        v6 = ":" in endpoint[0]
        family = socket.AF_INET6 if v6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                if self._fwmark:
                    probe.setsockopt(socket.SOL_SOCKET, SO_MARK, self._fwmark)
                probe.connect(endpoint)
                if v6:
                    return probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
                return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
        except OSError:
            return None

    def _send6(self, data: bytes, endpoint: Endpoint) -> None:
        address: Any = endpoint
        if "%" in endpoint[0]:
            # CPython resolves a scoped address with getaddrinfo (and if_nametoindex) on every
            # call; resolve once.
            address = self._v6_addresses.get(endpoint) or self._resolve_scoped(endpoint)
        entry = self._sources.get(endpoint)
        if entry is None or entry[1] is None:
            self._sendto6(data, address)
        else:
            self._send_sticky(data, endpoint, address, entry, True)

    def _resolve_scoped(self, endpoint: Endpoint) -> tuple[Any, ...]:
        info = socket.getaddrinfo(
            endpoint[0], endpoint[1], socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
        )
        address = info[0][4]
        if len(self._v6_addresses) >= MAX_SOURCES:
            self._v6_addresses.clear()
        self._v6_addresses[endpoint] = address
        return address

    def _send_sticky(
        self, data: bytes, endpoint: Endpoint, address: Any, entry: _Source, v6: bool
    ) -> None:
        """Send from the learned local source; the first call decides whether that is needed."""
        anc = entry[1]
        if anc is _UNDECIDED:
            anc = self._decide(address, entry[0], v6)
            self._sources[endpoint] = (entry[0], anc)
        sendto = self._sendto6 if v6 else self._sendto4
        if anc is None:
            sendto(data, address)
            return
        sendmsg = self._sendmsg6 if v6 else self._sendmsg4
        try:
            sendmsg([data], anc, 0, address)
        except OSError as e:
            if e.errno not in _STICKY_FAILED_ERRNOS:
                raise
            # The address is gone: forget it (until the peer reaches us on another one).
            self._sources[endpoint] = (entry[0], None)
            sendto(data, address)

    def _source_control(self, endpoint: Endpoint, address: Any, v6: bool) -> Any:
        """The ancillary data that sends from ``endpoint``'s learned source, or None."""
        entry = self._sources.get(endpoint)
        if entry is None:
            return None
        anc = entry[1]
        if anc is _UNDECIDED:
            anc = self._decide(address, entry[0], v6)
            self._sources[endpoint] = (entry[0], anc)
        return anc

    def _decide(self, address: Any, info: bytes, v6: bool) -> list[tuple[int, int, bytes]] | None:
        """Compare the learned source with the route's; ancillary data only when they differ."""
        if len(info) != (_IN6_PKTINFO.size if v6 else _IN_PKTINFO.size):
            return None  # not the packet info we asked for: use the default route
        if v6:
            local, ifindex = _IN6_PKTINFO.unpack(info)
            if local[:2] != b"\xfe\x80":
                ifindex = 0  # a global source: let routing pick the interface
            control = (socket.IPPROTO_IPV6, IPV6_PKTINFO, _IN6_PKTINFO.pack(local, ifindex))
            family = socket.AF_INET6
        else:
            _ifindex, local, _dst = _IN_PKTINFO.unpack(info)
            control = (socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, local, b"\0" * 4))
            family = socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                if self._fwmark:
                    probe.setsockopt(socket.SOL_SOCKET, SO_MARK, self._fwmark)
                probe.connect(address)
                default = socket.inet_pton(family, probe.getsockname()[0].split("%", 1)[0])
        except OSError:
            return [control]
        return None if default == local else [control]

    def _hook(self, hook: Callable[[], None]) -> None:
        """Run a batch hook; its bug is counted like a receiver's, never raised."""
        try:
            hook()
        except Exception:
            self._receiver_failed()

    def _receiver_failed(self) -> None:
        """Log a receiver bug without letting one datagram stall the port or flood logs."""
        self.receiver_errors += 1
        n = self.receiver_errors
        if n <= 10 or n % 1000 == 0:
            log.failure("UDP datagram handler raised (error #{n})", n=n)

    # -- sockets ------------------------------------------------------------------------------

    def _apply_fwmark(self, sock: socket.socket, mark: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            raise UDPError(
                f"cannot set fwmark {mark:#x}: {e.strerror} (needs root or CAP_NET_ADMIN)"
            ) from e

    def _new_socket(self, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if self._fwmark:
                self._apply_fwmark(sock, self._fwmark)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_pair(self, port: int) -> tuple[socket.socket, socket.socket | None, int]:
        """Bind v4 then v6 to the same port; with port 0, retry when v6 finds it taken."""
        attempts = 16 if port == 0 else 1
        for _ in range(attempts):
            s4 = self._new_socket(socket.AF_INET)
            try:
                s4.bind(("0.0.0.0", port))
            except OSError as e:
                s4.close()
                raise _bind_error(port, "IPv4", e) from e
            actual: int = s4.getsockname()[1]
            try:
                s6 = self._new_socket(socket.AF_INET6)
            except OSError as e:
                if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                    return s4, None, actual  # no IPv6 on this host
                s4.close()
                raise
            try:
                s6.bind(("::", actual))
            except OSError as e:
                s6.close()
                if e.errno == errno.EADDRNOTAVAIL:
                    return s4, None, actual  # IPv6 disabled
                s4.close()
                if e.errno == errno.EADDRINUSE and port == 0:
                    continue
                raise _bind_error(actual, "IPv6", e) from e
            return s4, s6, actual
        raise UDPBindError(f"no UDP port free for both IPv4 and IPv6 after {attempts} tries")

    def _install(self, s4: socket.socket, s6: socket.socket | None, port: int) -> None:
        self._sock4, self._sock6, self._port = s4, s6, port
        self._sendto4 = s4.sendto
        self._sendmsg4 = s4.sendmsg
        self._gso4, self._gro4 = _enable_offloads(s4)
        self._readers = [_Reader(self, s4, False)]
        if s6 is not None:
            self._sendto6 = s6.sendto
            self._sendmsg6 = s6.sendmsg
            self._gso6, self._gro6 = _enable_offloads(s6)
            self._readers.append(_Reader(self, s6, True))
        else:
            self._sendto6, self._sendmsg6 = _no_socket, _no_socket_msg
        self._gso_refused.clear()
        self.set_shedding(self._shedding)

    def _uninstall(self) -> None:
        self._holding = False
        if self._runs:
            self._flush_runs()
        self.stop_reading()
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                sock.close()
        self._sock4 = self._sock6 = None
        self._gso4 = self._gso6 = self._gro4 = self._gro6 = False
        self._readers = []
        self._sendto4 = self._sendto6 = _no_socket
        self._sendmsg4 = self._sendmsg6 = _no_socket_msg
