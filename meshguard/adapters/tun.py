"""The TUN device as a reactor read descriptor: the inner end of the data path.

This is one half of the hot loop (TUN read -> device -> sendto), so it is written for
per-packet cost: one ``read`` system call and one receiver call per packet, no Deferreds, no
per-packet logging or counters, and a batch drained until EAGAIN (bounded by a packet budget so
the reactor still serves the UDP socket and timers).

``TunDevice`` implements ``IReadDescriptor`` directly instead of subclassing
``abstract.FileDescriptor`` as ``twisted.pair.tuntap.TuntapPort`` does: a TUN fd never needs
Twisted's write buffering or producer machinery (a packet that does not fit is dropped, as a
router would), and keeping the object small keeps ``doRead`` simple to reason about.

System calls go through an injected *system* object compatible with
``twisted.pair.testing.MemoryIOSystem`` (``open``, ``ioctl``, ``read``, ``write``, ``close`` and
the ``O_*`` constants), so unit tests run without privileges against the in-memory fake.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import interfaces
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshguard.adapters.hot_reactor import add_reader
from meshguard.adapters.idle_gap import IdleGap
from meshguard.core.offload import (
    GSO_UDP_L4,
    NEEDS_CSUM,
    PLAIN_HEADER,
    VNET_HDR,
    VNET_HDR_LEN,
    CutArena,
    OffloadError,
    coalesce,
    finish_checksums,
    split,
)

__all__ = [
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_VNET_HDR",
    "TUNSETIFF",
    "TUNSETOFFLOAD",
    "FDReactor",
    "TunDevice",
    "TunError",
    "TunSystem",
]

log = Logger()

#: ``_IOW('T', 202, int)`` on x86, ARM and most other Linux architectures.
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: Every read and write starts with a ``virtio_net_hdr`` (meshguard.core.offload).
IFF_VNET_HDR = 0x4000
#: ``_IOW('T', 208, unsigned int)``: which offloads the kernel may hand us.
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
#: Offload sets tried in order (USO needs Linux 6.2); the first the kernel takes is kept.
OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
)
#: Switch for the TUN offloads, on by default where the node asks for them: False opens the
#: device without a virtio-net header, one packet per read and write, as before they existed.
USE_TUN_OFFLOAD = True
#: Bytes of single packets read one after another before they are handed on together (their
#: partial checksums finished in one call); the read buffer is this plus one largest frame.
_SPAN = 1 << 18
#: The largest TUN read: a virtio-net header and a 64 KiB super-packet.
_FRAME_MAX = VNET_HDR_LEN + 65535
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH")
TUN_PATH = b"/dev/net/tun"

#: Read errors that mean the interface was deleted under us (``ip link del``); checked on this
#: kernel: after deletion the fd polls readable and ``read`` fails with EBADFD.
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF})

#: Write errors that are back-pressure or a packet the kernel refuses: drop and count.
_WRITE_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EINTR})


class TunError(Exception):
    """The TUN device could not be opened; the message is one line fit for an operator."""


class FDReactor(Protocol):
    """The part of ``IReactorFDSet`` the adapters use.

    A structural type because zope interfaces do not type-check without the mypy-zope plugin.
    """

    def addReader(self, reader: Any) -> None: ...

    def removeReader(self, reader: Any) -> None: ...


class TunSystem(Protocol):
    """The system calls ``TunDevice`` makes; ``os``/``fcntl`` for real, a fake in tests."""

    O_RDWR: int
    O_NONBLOCK: int
    O_CLOEXEC: int

    def open(self, name: bytes, flags: int, mode: int = ...) -> int: ...

    def ioctl(self, fd: int, request: int, arg: bytes | int) -> bytes: ...

    def read(self, fd: int, limit: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def close(self, fd: int) -> None: ...


class _RealSystem:
    """The operating system, with the same shape as ``MemoryIOSystem``."""

    O_RDWR = os.O_RDWR
    O_NONBLOCK = os.O_NONBLOCK
    O_CLOEXEC = os.O_CLOEXEC

    open = staticmethod(os.open)
    read = staticmethod(os.read)
    write = staticmethod(os.write)
    readv = staticmethod(os.readv)
    writev = staticmethod(os.writev)
    close = staticmethod(os.close)

    @staticmethod
    def ioctl(fd: int, request: int, arg: bytes | int) -> bytes:
        result = fcntl.ioctl(fd, request, arg)
        if isinstance(arg, int):
            return b""  # a by-value argument (TUNSETOFFLOAD): nothing to read back
        assert isinstance(result, bytes)
        return result


def _open_hint(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return "run as root or with CAP_NET_ADMIN"
    if err.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ENOSYS):
        return "this kernel or container has no TUN device; load the tun module or pass it in"
    if err.errno == errno.EBUSY:
        return "another process owns this interface"
    return "run as root or with CAP_NET_ADMIN"


@implementer(interfaces.IReadDescriptor)
class TunDevice:
    """A Linux TUN interface in IFF_TUN | IFF_NO_PI mode: raw IP packets in and out.

    ``receiver(packet, now)`` is called for every packet read, ``now`` being the batch's time
    (``IdleGap.now``, the clock read at its start); the optional ``on_batch_start()`` is
    called once per batch and after its last packet the optional ``on_batch_end()``, so the
    node can hold the datagrams a batch produces for one GSO send, flush queued work and
    reschedule its single timer per batch instead of per packet. After an idle moment of the
    node (``IdleGap``, shared with the UDP transport) a first single packet is handed on
    alone, without the start hook, and the batch ends there: a lone packet is sent at once
    rather than after the read that finds the queue empty and the flush (see
    docs/datapath.md, "Latency"); what else was queued comes as the next, busy, batch, where
    the start hook comes first and the batch stays whole. A
    super-packet read first is held as a whole. When the interface disappears
    (``ip link del``) reading stops and ``on_gone(error)`` is called, so the node can exit the way
    wireguard-go does.
    """

    #: Packets read per reactor event before yielding to other descriptors and timers. With
    #: offloads a batch ends after the super-packet that spends it (about six of a bulk flow's
    #: 45-segment frames). 64 was tried for the round trip under load (an echo reply waits in
    #: the UDP socket while a batch is sealed): it cost 2-9 % of throughput, and once OpenSSL's
    #: AVX2 code made batches faster 256 kept the loaded round trip below wireguard-go's
    #: anyway (docs/datapath.md, "The TUN read budget").
    batch_packets = 256
    #: Packets held for coalescing before they are written anyway.
    hold_packets = 512
    #: ``read_replies`` reads only after at most this many packets were written.
    reply_read_max = 4

    def __init__(
        self,
        name: str,
        receiver: Callable[[bytes, float], None],
        reactor: FDReactor,
        system: TunSystem | None = None,
        max_packet: int = 65535,
        on_gone: Callable[[OSError], None] | None = None,
        on_batch_end: Callable[[], None] | None = None,
        on_batch_start: Callable[[], None] | None = None,
        offload: bool = False,
        batch_receiver: Callable[[list[bytes | memoryview], float], None] | None = None,
        idle: IdleGap | None = None,
    ) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise TunError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        self.name = name
        #: ``receiver(packet, now)``: every packet read (the node wires the engine's entry
        #: point straight here).
        self.receiver = receiver
        self._reactor = reactor
        self._system: TunSystem = system if system is not None else _RealSystem()
        #: Read size; a TUN read returns at most one packet, truncated to this size, so it must
        #: cover the largest MTU the interface can be given (65535 by default).
        self.max_packet = max_packet
        self.on_gone = on_gone
        self.on_batch_end = on_batch_end
        self.on_batch_start = on_batch_start
        #: Called instead of ``receiver`` with the segments of one super-packet (all to the
        #: same destination), so they can be routed once.
        self.batch_receiver = batch_receiver
        #: The arrays super-packets are cut into for the batch receiver, reused: it seals the
        #: segments (views of them) before the next cut overwrites them.
        self._arena = CutArena()
        #: Whether a read batch follows an idle moment of the node (shared with the UDP
        #: transport): only then is its first packet handed on alone.
        self.idle = idle if idle is not None else IdleGap()
        self._fd = -1
        self._reading = False
        #: Packets dropped on write because the kernel queue was full (EAGAIN/ENOBUFS).
        self.write_drops = 0
        #: Packets the kernel refused on write for another reason (EINVAL: not IP, EIO: gone).
        self.write_errors = 0
        #: Exceptions raised by the receiver (each is logged, rate-limited).
        self.receiver_errors = 0
        #: Whether to ask for the virtio-net header and TSO/USO (needs ``readv``/``writev``
        #: on the system object; the in-memory fake has neither and stays on plain packets).
        self.offload = offload and USE_TUN_OFFLOAD
        #: Whether the open device carries a virtio-net header, and the ``TUN_F_*`` offloads
        #: the kernel accepted (0: none, every read is one packet).
        self.vnet = False
        self.offloads = 0
        #: Super-packets read and the segments cut from them; frames that could not be cut.
        self.gso_reads = 0
        self.gso_segments = 0
        self.offload_errors = 0
        #: Coalesced TCP writes and the segments they carried.
        self.gro_writes = 0
        self.gro_packets = 0
        #: Coalesced UDP writes (``GSO_UDP_L4``, only where USO was granted) and the
        #: datagrams they carried.
        self.gro_udp_writes = 0
        self.gro_udp_packets = 0
        #: Between ``hold()`` and ``flush()`` (a UDP read batch) written packets wait here to
        #: be coalesced; with a virtio-net header only.
        self._holding = False
        self._held: list[bytes] = []
        #: Packets written since the last read (see :meth:`read_replies`).
        self._wrote = 0
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        #: The first read of a batch goes to the buffer's start (a ready ``readv`` list).
        self._at_start: list[memoryview] = []
        #: Single packets read and not yet handed on: [start, end) in the buffer, and the
        #: checksums to finish (sum from, field, packet end). Empty between batches.
        self._bounds: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._fields: list[int] = []
        self._ends: list[int] = []
        self._readv: Callable[[int, list[memoryview]], int] | None = None
        self._writev: Callable[[int, list[Any]], int] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> str:
        """Create or attach the interface and return its real name (the kernel's, if ``""``)."""
        if self._fd >= 0:
            return self.name
        system = self._system
        flags = system.O_RDWR | system.O_NONBLOCK | system.O_CLOEXEC
        try:
            fd = system.open(TUN_PATH, flags)
        except OSError as e:
            raise TunError(f"cannot open /dev/net/tun: {e.strerror or e} ({_open_hint(e)})") from e
        readv = getattr(system, "readv", None)
        writev = getattr(system, "writev", None)
        vnet = self.offload and readv is not None and writev is not None
        try:
            try:
                flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
                result = system.ioctl(fd, TUNSETIFF, _IFREQ.pack(self.name.encode(), flags))
            except OSError as e:
                if not vnet or e.errno != errno.EINVAL:
                    raise
                # A kernel without the header: plain packets, as before.
                vnet = False
                flags = IFF_TUN | IFF_NO_PI
                result = system.ioctl(fd, TUNSETIFF, _IFREQ.pack(self.name.encode(), flags))
        except OSError as e:
            system.close(fd)
            label = f"interface {self.name!r}" if self.name else "a new interface"
            raise TunError(
                f"cannot open /dev/net/tun for {label}: {e.strerror or e} ({_open_hint(e)})"
            ) from e
        self.name = result[:IFNAMSIZ].split(b"\x00", 1)[0].decode()
        self._fd = fd
        self.vnet = vnet
        self.offloads = 0
        if vnet:
            self._readv, self._writev = readv, writev
            self._buffer = bytearray(_SPAN + _FRAME_MAX + 2)
            self._view = memoryview(self._buffer)
            self._at_start = [self._view[:_FRAME_MAX]]
            for choice in OFFLOAD_CHOICES:
                try:
                    system.ioctl(fd, TUNSETOFFLOAD, choice)
                except OSError:
                    continue
                self.offloads = choice
                break
        return self.name

    def start_reading(self) -> None:
        """Register with the reactor; packets flow to the receiver from the next iteration."""
        if self._fd < 0:
            raise TunError("TUN device is not open")
        if not self._reading:
            self._reading = True
            add_reader(self._reactor, self)

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def close(self) -> None:
        """Stop reading and close the fd; the kernel deletes a non-persistent interface."""
        self.stop_reading()
        self._holding = False
        self._held = []
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                self._system.close(fd)
            except OSError:
                pass

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    # -- data path ----------------------------------------------------------------------------

    def write(self, packet: bytes) -> None:
        """Hand one IP packet to the kernel; a full queue or a refused packet drops it.

        With a virtio-net header and inside ``hold()``, the packet waits for ``flush()`` to be
        coalesced with the rest of its TCP flow (or UDP flow, where USO was granted).
        """
        self._wrote += 1
        try:
            if self.vnet:
                if self._holding:
                    held = self._held
                    held.append(packet)
                    if len(held) >= self.hold_packets:
                        self._write_held()
                    return
                assert self._writev is not None
                self._writev(self._fd, [PLAIN_HEADER, packet])
            else:
                self._system.write(self._fd, packet)
        except OSError as e:
            if e.errno in _WRITE_DROP_ERRNOS:
                self.write_drops += 1
            else:
                self.write_errors += 1

    def write_packets(self, packets: list[bytes]) -> None:
        """:meth:`write` for each of ``packets``, in order, in one call: while held (a UDP read
        batch) they join the held packets at once; the list is not kept."""
        if self.vnet and self._holding:
            self._wrote += len(packets)
            held = self._held
            held.extend(packets)
            if len(held) >= self.hold_packets:
                try:
                    self._write_held()
                except OSError as e:
                    if e.errno in _WRITE_DROP_ERRNOS:
                        self.write_drops += 1
                    else:
                        self.write_errors += 1
            return
        write = self.write
        for packet in packets:
            write(packet)

    def read_replies(self) -> bool:
        """Read now what the kernel queued since a lone write, without waiting for the reactor.

        The kernel handles a packet written to the TUN device inside the write call, so an
        echo reply or a TCP acknowledgement it provokes is usually queued for reading before
        the call returns. The node calls this after each UDP read batch: after one that wrote
        a few packets (an idle ping, an interactive flow) the reply leaves without a trip
        through the reactor (its timers, the poll and its dispatch). After a bulk batch it does
        nothing: the replies (ACKs) are left to accumulate and leave together, in fewer sends.
        Nothing queued costs one read. The reply is a lone packet whatever the idle rule says
        (the node is in the middle of a batch): it goes at once.

        True when it read (a batch ran, with its end hook).
        """
        if 0 < self._wrote <= self.reply_read_max and self._reading:
            self._read_batch(True)
            return True
        return False

    def hold(self) -> None:
        """Keep written packets until :meth:`flush` (the node brackets each UDP read batch)."""
        if self.vnet:
            self._holding = True

    def flush(self) -> None:
        """Write the held packets, each TCP flow's consecutive segments as one super-packet
        (and each UDP flow's consecutive datagrams, where the kernel granted USO)."""
        self._holding = False
        if self._held:
            self._write_held()

    def _write_held(self) -> None:
        held, self._held = self._held, []
        writev = self._writev
        assert writev is not None
        fd = self._fd
        offloads = self.offloads
        for bufs in coalesce(held, bool(offloads & TUN_F_USO4), bool(offloads & TUN_F_USO6)):
            count = len(bufs) - 2
            try:
                writev(fd, bufs)
            except OSError as e:
                if e.errno in _WRITE_DROP_ERRNOS:
                    self.write_drops += max(1, count)
                else:
                    self.write_errors += max(1, count)
                continue
            if count > 1:
                if bufs[0][1] == GSO_UDP_L4:
                    self.gro_udp_writes += 1
                    self.gro_udp_packets += count
                else:
                    self.gro_writes += 1
                    self.gro_packets += count

    def offload_status(self) -> dict[str, Any]:
        """What the TUN offloads did, for ``meshguard status`` and the benchmarks."""
        names = [
            name
            for bit, name in (
                (TUN_F_TSO4, "tso4"),
                (TUN_F_TSO6, "tso6"),
                (TUN_F_USO4, "uso4"),
                (TUN_F_USO6, "uso6"),
            )
            if self.offloads & bit
        ]
        return {
            "vnet_header": self.vnet,
            "offloads": ",".join(names) or "off",
            "gso_reads": self.gso_reads,
            "gso_segments": self.gso_segments,
            "offload_errors": self.offload_errors,
            "gro_writes": self.gro_writes,
            "gro_packets": self.gro_packets,
            "gro_udp_writes": self.gro_udp_writes,
            "gro_udp_packets": self.gro_udp_packets,
        }

    # Also satisfies meshguard.core.interfaces.DeviceIO.write_packet when bound directly.
    write_packet = write

    def doRead(self) -> None:
        """Drain up to ``batch_packets`` packets, then end the batch (after an idle moment
        of the node: hand on a first single packet alone and end there)."""
        idle = self.idle
        lone = idle.batch_begins(self)
        if lone and self.vnet:
            # The lone frame without the ``_read_batch`` frame (cold code, docs/datapath.md,
            # "Latency"); the same steps as there.
            self._wrote = 0
            self._read_lone_frame()
            idle.batch_ended()
            return
        self._read_batch(lone)

    def _read_batch(self, lone_first: bool) -> None:
        self._wrote = 0
        if lone_first:
            if self.vnet:
                self._read_lone_frame()
            else:
                self._read_packets(False)
        else:
            self._hook(self.on_batch_start)
            if self.vnet:
                self._read_frames(True)
            else:
                self._read_packets(True)
        self.idle.batch_ended()

    def _read_lone_frame(self) -> None:
        """A lone batch with a virtio-net header: one read, and a plain packet (no
        segmentation, no checksum left to finish: an echo request, most packets but TCP and
        UDP) goes straight to the receiver, then the batch ends.

        After an idle moment every step costs several microseconds of cold interpreter
        (docs/datapath.md, "Latency"), so the lone packet skips the batch loop's set-up and
        hand-on. Anything else read first (a super-packet, a checksum to finish, a runt) is
        passed to :meth:`_read_frames`, already read, which handles it as before.
        """
        readv = self._readv
        assert readv is not None
        try:
            n = readv(self._fd, self._at_start)
        except BlockingIOError:
            self._hook(self.on_batch_end)
            return
        except OSError:
            # Interrupted, or the device gone: the batch loop reads again and handles either.
            self._read_frames(False)
            return
        buffer = self._buffer
        # The header's first two bytes: flags (NEEDS_CSUM) and the segmentation type.
        if n > VNET_HDR_LEN and not buffer[1] and not buffer[0] & NEEDS_CSUM:
            try:
                self.receiver(self._view[VNET_HDR_LEN:n].tobytes(), self.idle.now)
            except Exception:
                self._receiver_failed()
            # ``_hook`` inline: one call fewer on the lone packet's way.
            end = self.on_batch_end
            if end is not None:
                try:
                    end()
                except Exception:
                    self._receiver_failed()
            return
        self._read_frames(False, n)

    def _read_packets(self, started: bool) -> None:
        """The batch without a virtio-net header: one packet per read.

        Locals instead of attribute lookups and a zero-cost ``try`` (3.11) keep the loop tight;
        EAGAIN ends the batch early, which costs one exception per batch, not per packet.
        """
        read = self._system.read
        fd = self._fd
        size = self.max_packet
        receiver = self.receiver
        now = self.idle.now
        for _ in range(self.batch_packets):
            try:
                packet = read(fd, size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                self._gone(e)
                return
            try:
                receiver(packet, now)
            except Exception:
                self._receiver_failed()
            if not started:
                # After an idle gap the first packet went on alone; the rest, if any, is a
                # busy batch the reactor reports next (level-triggered), so a lone packet
                # costs no read that finds the queue empty.
                break
        self._hook(self.on_batch_end)

    def _read_frames(self, started: bool, first: int = 0) -> None:
        """``doRead`` with a virtio-net header: super-packets cut into segments; the budget
        counts packets handed on, so a batch stays as long as without.

        Single packets are read one after another into one buffer (``_SPAN`` bytes, each read
        at the next even offset) and handed on together when the span is full, a super-packet
        comes or the batch ends: with ``TUN_F_CSUM`` on nearly every one carries a partial
        checksum, and :func:`finish_checksums` completes them all in one numpy call instead of
        one big-integer sum each (the UDP packet rate fell to about half without this).

        ``first``: the length of a frame already read into the buffer's start (by
        :meth:`_read_lone_frame`), handled before any read.
        """
        readv = self._readv
        assert readv is not None
        fd = self._fd
        buffer = self._buffer
        view = self._view
        receiver = self.receiver
        now = self.idle.now
        budget = self.batch_packets
        frame_max = _FRAME_MAX
        span = len(buffer) - frame_max - 2
        unpack = VNET_HDR.unpack_from
        at_start = self._at_start
        bounds, starts, fields, ends = self._bounds, self._starts, self._fields, self._ends
        arena = self._arena
        offset = 0
        while budget > 0:
            if offset > span:
                self._hand_on(buffer, view, bounds, starts, ends, fields)
                offset = 0
            if first:
                n, first = first, 0
            else:
                try:
                    n = readv(fd, at_start if not offset else [view[offset : offset + frame_max]])
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as e:
                    self._hand_on(buffer, view, bounds, starts, ends, fields)
                    self._gone(e)
                    return
            if n <= VNET_HDR_LEN:
                continue
            flags, gso_type, _h, _g, csum_start, csum_offset = unpack(buffer, offset)
            packet = offset + VNET_HDR_LEN
            length = n - VNET_HDR_LEN
            if not gso_type:
                single = True
                if not flags & NEEDS_CSUM:
                    bounds.append((packet, offset + n))
                else:
                    field = csum_start + csum_offset
                    if (
                        csum_start < length
                        and field + 2 <= length
                        and not (csum_start | csum_offset) & 1
                    ):
                        bounds.append((packet, offset + n))
                        starts.append(packet + csum_start)
                        fields.append(packet + field)
                        ends.append(offset + n)
                    else:
                        single = False
                if single:
                    budget -= 1
                    if started:
                        offset = (offset + n + 1) & ~1
                        continue
                    # After an idle gap the first packet goes on at once and alone, unheld:
                    # a lone packet (an idle ping, an ACK) leaves without waiting for a read
                    # that finds the queue empty or for a flush. What else is queued is a
                    # busy batch the reactor reports next.
                    self._hand_on(buffer, view, bounds, starts, ends, fields)
                    break
            # A super-packet (or a checksum this path does not take): what is pending
            # goes first, so that the order of packets stays as read.
            self._hand_on(buffer, view, bounds, starts, ends, fields)
            if not started:
                started = True
                self._hook(self.on_batch_start)
            frame = view[offset : offset + n]
            offset = 0
            try:
                # Views of the arena's arrays only for the batch receiver, which seals them
                # before the next cut.
                packets = split(frame, arena if self.batch_receiver is not None else False)
            except OffloadError:
                self.offload_errors += 1
                continue
            except Exception:
                # A bug in the cutter must not take the device off the reactor.
                self.offload_errors += 1
                self._receiver_failed()
                continue
            finally:
                frame.release()
            if gso_type:
                self.gso_reads += 1
                self.gso_segments += len(packets)
            budget -= len(packets)
            batch_receiver = self.batch_receiver
            if batch_receiver is not None and len(packets) > 1:
                try:
                    batch_receiver(packets, now)
                except Exception:
                    self._receiver_failed()
                continue
            for one in packets:
                try:
                    receiver(bytes(one), now)
                except Exception:
                    self._receiver_failed()
        self._hand_on(buffer, view, bounds, starts, ends, fields)
        self._hook(self.on_batch_end)

    def _hand_on(
        self,
        buffer: bytearray,
        view: memoryview,
        bounds: list[tuple[int, int]],
        starts: list[int],
        ends: list[int],
        fields: list[int],
    ) -> None:
        """Finish the pending packets' checksums and hand each on as its own bytes; empties
        the lists."""
        if not bounds:
            return
        if starts:
            try:
                finish_checksums(view, starts, ends, fields)
            except Exception:
                # Never seen; the packets would go out with wrong checksums, so drop them.
                self.offload_errors += len(bounds)
                self._receiver_failed()
                bounds.clear()
            starts.clear()
            ends.clear()
            fields.clear()
        receiver = self.receiver
        now = self.idle.now
        for start, end in bounds:
            try:
                receiver(view[start:end].tobytes(), now)
            except Exception:
                self._receiver_failed()
        bounds.clear()

    def _hook(self, hook: Callable[[], None] | None) -> None:
        """Run a batch hook; its bug is counted like a receiver's, never raised."""
        if hook is not None:
            try:
                hook()
            except Exception:
                self._receiver_failed()

    def _receiver_failed(self) -> None:
        """Log a receiver bug without letting one bad packet stall the device or flood logs."""
        self.receiver_errors += 1
        n = self.receiver_errors
        if n <= 10 or n % 1000 == 0:
            log.failure("TUN {name}: packet handler raised (error #{n})", name=self.name, n=n)

    def _gone(self, error: OSError) -> None:
        if error.errno not in _GONE_ERRNOS:
            log.error(
                "TUN {name}: read failed: {error}; treating the interface as gone",
                name=self.name,
                error=error,
            )
        else:
            log.info("TUN {name}: interface is gone ({error})", name=self.name, error=error)
        self.close()
        if self.on_gone is not None:
            self.on_gone(error)

    # -- IReadDescriptor ----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw HUP/ERR on the fd: the interface went away without a read error."""
        if self._fd >= 0:
            self._reading = False
            err = (
                reason.value
                if isinstance(reason.value, OSError)
                else OSError(errno.EBADFD, os.strerror(errno.EBADFD))
            )
            self._gone(err)

    def logPrefix(self) -> str:
        return f"TunDevice({self.name})"
