"""TunDevice: against twisted.pair's in-memory system, then a real TUN in a namespace."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.pair.testing import MemoryIOSystem, Tunnel
from twisted.pair.tuntap import _TUNSETIFF
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from meshguard.adapters.idle_gap import IdleGap
from meshguard.adapters.tun import (
    IFF_NO_PI,
    IFF_TUN,
    TUN_F_USO4,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TunDevice,
    TunError,
)
from meshguard.core.offload import GSO_UDP_L4, PLAIN_HEADER, VNET_HDR, VNET_HDR_LEN, split
from tests.test_offload import udp_packet


def require_root() -> None:
    """Skip a real-device test unless root; with CI=true a missing privilege is a failure."""
    missing = None
    if os.geteuid() != 0:
        missing = "root"
    elif shutil.which("ip") is None or shutil.which("ping") is None:
        missing = "ip and ping"
    elif not os.path.exists("/dev/net/tun"):
        missing = "/dev/net/tun"
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"real-device test needs {missing} (CI=true)")
    raise SkipTest(f"needs {missing}")


class FakeReactor:
    """Records which descriptors are registered for reading."""

    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


class MemoryTunTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.system = MemoryIOSystem()
        self.system.registerSpecialDevice(Tunnel._DEVICE_NAME, Tunnel)
        self.reactor = FakeReactor()
        self.packets: list[bytes] = []
        self.batches = 0
        self.gone: list[OSError] = []
        #: Never advanced unless a test says so: every batch is busy (within ``IdleGap.gap`` of
        #: the previous one or of the device's creation) and drains the queue.
        self.clock = Clock()
        self.tun = TunDevice(
            "mg0",
            lambda packet, now: self.packets.append(packet),
            self.reactor,
            system=self.system,
            on_gone=self.gone.append,
            on_batch_end=self._batch_end,
            idle=IdleGap(self.clock.seconds),
        )

    def _batch_end(self) -> None:
        self.batches += 1

    def tunnel(self) -> Tunnel:
        return self.system._openFiles[self.tun.fileno()]

    def test_ioctl_request_matches_twisted(self) -> None:
        """Our TUNSETIFF constant is the one twisted.pair (and the fake) use."""
        self.assertEqual(TUNSETIFF, _TUNSETIFF)

    def test_open_configures_tun_without_packet_info(self) -> None:
        """open() asks for IFF_TUN | IFF_NO_PI, non-blocking and close-on-exec, and returns
        the name the kernel reports."""
        self.assertEqual(self.tun.open(), "mg0")
        tunnel = self.tunnel()
        self.assertEqual(tunnel.tunnelMode, IFF_TUN | IFF_NO_PI)
        self.assertFalse(tunnel.blocking)
        self.assertTrue(tunnel.closeOnExec)
        self.assertEqual(tunnel.requestedName.rstrip(b"\0"), b"mg0")

    def test_open_reads_back_kernel_chosen_name(self) -> None:
        """With an empty name the kernel picks one; open() returns it."""

        class System(MemoryIOSystem):
            def ioctl(self, fd: int, request: int, args: bytes) -> bytes:
                super().ioctl(fd, request, args)
                return struct.pack("16sH", b"tun7", IFF_TUN | IFF_NO_PI)

        system = System()
        system.registerSpecialDevice(Tunnel._DEVICE_NAME, Tunnel)
        tun = TunDevice("", lambda p, now: self.packets.append(p), self.reactor, system=system)
        self.assertEqual(tun.open(), "tun7")
        self.assertEqual(tun.name, "tun7")

    def test_open_without_privilege(self) -> None:
        """EPERM names the device and tells the operator what to do."""
        self.system.permissions.discard("ioctl")
        with self.assertRaises(TunError) as cm:
            self.tun.open()
        message = str(cm.exception)
        self.assertIn("cannot open /dev/net/tun", message)
        self.assertIn("run as root or with CAP_NET_ADMIN", message)
        self.assertEqual(self.system._openFiles, {}, "the fd must not leak")

    def test_open_without_tun_device(self) -> None:
        """A missing /dev/net/tun is one clear line, not a traceback."""
        self.system._devices.clear()
        with self.assertRaises(TunError) as cm:
            self.tun.open()
        self.assertIn("cannot open /dev/net/tun", str(cm.exception))

    def test_name_too_long(self) -> None:
        """Interface names longer than 15 bytes are refused before any system call."""
        self.assertRaises(TunError, TunDevice, "x" * 16, self.packets.append, self.reactor)

    def test_start_and_stop_reading(self) -> None:
        """start_reading registers once; close unregisters and closes the fd."""
        self.assertRaises(TunError, self.tun.start_reading)
        self.tun.open()
        self.tun.start_reading()
        self.tun.start_reading()
        self.assertEqual(self.reactor.readers, [self.tun])
        fd = self.tun.fileno()
        self.tun.close()
        self.assertEqual(self.reactor.readers, [])
        self.assertNotIn(fd, self.system._openFiles)
        self.tun.close()

    def test_read_drains_batch_in_order(self) -> None:
        """One reactor event delivers every queued packet in order, then ends the batch once."""
        self.tun.open()
        queued = [bytes([0x45, i]) * 10 for i in range(5)]
        for packet in queued:
            self.tunnel().addToReadBuffer(packet)
        self.tun.doRead()
        self.assertEqual(self.packets, queued)
        self.assertEqual(self.batches, 1)

    def test_batch_is_bracketed(self) -> None:
        """A busy batch runs ``on_batch_start`` once before its first packet and
        ``on_batch_end`` once after its last, so the node can hold the datagrams it produces
        (UDP GSO). After an idle gap the first packet goes on alone, never held, and ends its
        batch without a further read; the rest come as the next (busy) batch."""
        events: list[object] = []
        self.tun.on_batch_start = lambda: events.append("start")
        self.tun.on_batch_end = lambda: events.append("end")
        self.tun.receiver = lambda packet, now: events.append(packet)
        self.tun.open()
        for i in range(2):
            self.tunnel().addToReadBuffer(bytes([0x45, i]))
        self.tun.doRead()
        self.assertEqual(events, ["start", b"\x45\x00", b"\x45\x01", "end"])
        events.clear()
        self.clock.advance(self.tun.idle.gap)
        for i in range(2):
            self.tunnel().addToReadBuffer(bytes([0x45, i]))
        self.tun.doRead()
        self.assertEqual(events, [b"\x45\x00", "end"])
        self.assertEqual(len(self.tunnel().readBuffer), 1, "no read after the lone packet")
        events.clear()
        self.tun.doRead()
        self.assertEqual(events, ["start", b"\x45\x01", "end"])

    def test_read_budget(self) -> None:
        """A batch stops at batch_packets so other descriptors get a turn; the rest follow on
        the next event."""
        self.tun.open()
        self.tun.batch_packets = 2
        for i in range(3):
            self.tunnel().addToReadBuffer(bytes([0x45, i]))
        self.tun.doRead()
        self.assertEqual(len(self.packets), 2)
        self.tun.doRead()
        self.assertEqual(len(self.packets), 3)
        self.assertEqual(self.batches, 2)

    def test_receiver_exception_is_logged_and_reading_continues(self) -> None:
        """A bug in the packet handler is logged and counted; later packets still arrive."""

        def receiver(packet: bytes, now: float) -> None:
            if packet == b"bad":
                raise ValueError("boom")
            self.packets.append(packet)

        tun = TunDevice(
            "mg1", receiver, self.reactor, system=self.system, idle=IdleGap(self.clock.seconds)
        )
        tun.open()
        tunnel = self.system._openFiles[tun.fileno()]
        for packet in (b"bad", b"good"):
            tunnel.addToReadBuffer(packet)
        tun.doRead()
        self.assertEqual(self.packets, [b"good"])
        self.assertEqual(tun.receiver_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_write(self) -> None:
        """write() hands the packet to the device as is."""
        self.tun.open()
        self.tun.write(b"\x45" * 40)
        self.assertEqual(list(self.tunnel().writeBuffer), [b"\x45" * 40])

    def test_write_drops_when_full(self) -> None:
        """ENOBUFS (queue full) drops the packet, counts it and never raises."""
        self.tun.open()
        self.tun.write(b"\x45" * (Tunnel.SEND_BUFFER_SIZE + 1))
        self.assertEqual(self.tun.write_drops, 1)
        self.assertEqual(list(self.tunnel().writeBuffer), [])

    def test_write_other_errors_counted(self) -> None:
        """Other write errors (EBADF, EINVAL...) are counted apart from drops and not raised."""
        self.tun.write(b"\x45")
        self.assertEqual(self.tun.write_errors, 1)
        self.assertEqual(self.tun.write_drops, 0)

    def test_interface_deleted(self) -> None:
        """EBADFD from read (the interface was deleted) stops reading, closes the fd and calls
        on_gone once."""
        self.tun.open()
        self.tun.start_reading()
        fd = self.tun.fileno()

        def read(limit: int) -> bytes:
            raise OSError(errno.EBADFD, os.strerror(errno.EBADFD))

        self.tunnel().addToReadBuffer(b"\x45first")
        tunnel = self.tunnel()
        original = tunnel.read
        calls = iter([original, read])
        tunnel.read = lambda limit: next(calls)(limit)
        self.tun.doRead()
        self.assertEqual(self.packets, [b"\x45first"])
        self.assertEqual([e.errno for e in self.gone], [errno.EBADFD])
        self.assertEqual(self.reactor.readers, [])
        self.assertNotIn(fd, self.system._openFiles)
        self.assertFalse(self.tun.is_open)

    def test_connection_lost_from_reactor(self) -> None:
        """HUP seen by the reactor (connectionLost) also means the interface is gone."""
        self.tun.open()
        self.tun.start_reading()
        self.reactor.readers.remove(self.tun)  # the reactor removes before connectionLost
        self.tun.connectionLost(Failure(ConnectionError()))
        self.assertEqual(len(self.gone), 1)
        self.assertFalse(self.tun.is_open)
        self.tun.connectionLost(Failure(ConnectionError()))
        self.assertEqual(len(self.gone), 1)


def _icmp_echo_reply(packet: bytes) -> bytes | None:
    """Turn an IPv4 ICMP echo request into its reply, or None for anything else."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if packet[ihl] != 8:
        return None
    icmp = bytearray(packet[ihl:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", _checksum(bytes(icmp)))
    header = bytearray(packet[:ihl])
    header[12:16], header[16:20] = packet[16:20], packet[12:16]
    header[10:12] = b"\0\0"
    header[10:12] = struct.pack("!H", _checksum(bytes(header)))
    return bytes(header + icmp)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class _VnetSystem:
    """A TUN device with a virtio-net header in memory: ``readv`` hands out queued frames
    (header + packet), ``writev`` records what is written."""

    O_RDWR = os.O_RDWR
    O_NONBLOCK = os.O_NONBLOCK
    O_CLOEXEC = os.O_CLOEXEC

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.written: list[bytes] = []
        self.reads = 0
        #: Reads that fail with EINTR before the next one goes through.
        self.interrupts = 0

    def open(self, name: bytes, flags: int, mode: int = 0) -> int:
        return 7

    def ioctl(self, fd: int, request: int, arg: bytes | int) -> bytes:
        return arg if isinstance(arg, bytes) else b""

    def readv(self, fd: int, bufs: list[Any]) -> int:
        self.reads += 1
        if self.interrupts:
            self.interrupts -= 1
            raise InterruptedError(errno.EINTR, "interrupted")
        if not self.frames:
            raise BlockingIOError(errno.EAGAIN, "again")
        frame = self.frames.pop(0)
        bufs[0][: len(frame)] = frame
        return len(frame)

    def writev(self, fd: int, bufs: list[Any]) -> int:
        self.written.append(b"".join(bytes(b) for b in bufs))
        return len(self.written[-1])

    def read(self, fd: int, limit: int) -> bytes:
        raise BlockingIOError(errno.EAGAIN, "again")

    def write(self, fd: int, data: bytes) -> int:
        return len(data)

    def close(self, fd: int) -> None:
        pass


class VnetReadTests(SynchronousTestCase):
    """The read path with a virtio-net header: when the batch hooks run, and reading the
    replies a write provoked."""

    def setUp(self) -> None:
        self.system = _VnetSystem()
        self.events: list[object] = []
        self.reactor = FakeReactor()
        self.clock = Clock()
        self.tun = TunDevice(
            "mg0",
            lambda packet, now: self.events.append(packet),
            self.reactor,
            system=self.system,  # type: ignore[arg-type]
            on_batch_start=lambda: self.events.append("start"),
            on_batch_end=lambda: self.events.append("end"),
            offload=True,
            idle=IdleGap(self.clock.seconds),
        )
        self.tun.open()
        self.assertTrue(self.tun.vnet)

    def queue(self, *packets: bytes) -> None:
        self.system.frames.extend(PLAIN_HEADER + p for p in packets)

    def test_lone_packet_goes_before_the_batch_hook(self) -> None:
        """After an idle gap the first packet of a batch is handed on alone, without
        ``on_batch_start`` (so the node sends it at once, unheld), and the batch ends there;
        the rest follow as the next batch, after the hook, in order."""
        packets = [bytes([0x45, i]) * 20 for i in range(3)]
        self.clock.advance(self.tun.idle.gap)
        self.queue(packets[0])
        self.tun.doRead()
        self.assertEqual(self.events, [packets[0], "end"])
        self.assertEqual(self.system.reads, 1, "no read that finds the queue empty")
        self.events.clear()
        self.clock.advance(self.tun.idle.gap)
        self.queue(*packets)
        self.tun.doRead()
        self.assertEqual(self.events, [packets[0], "end"])
        self.events.clear()
        self.tun.doRead()
        self.assertEqual(self.events, ["start", packets[1], packets[2], "end"])

    def test_lone_packet_end_hook_that_raises(self) -> None:
        """The lone path runs the end hook itself (no ``_hook`` call): a hook that raises is
        counted and logged like a receiver's bug, never raised, and the batch still ends (a
        read at once after it is a busy batch)."""
        packet = bytes([0x45, 1]) * 20

        def end() -> None:
            self.events.append("end")
            raise ZeroDivisionError("end hook")

        self.tun.on_batch_end = end
        self.clock.advance(self.tun.idle.gap)
        self.queue(packet)
        self.tun.doRead()
        self.assertEqual(self.events, [packet, "end"])
        self.assertEqual(self.tun.receiver_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.events.clear()
        self.tun.doRead()
        self.assertEqual(self.events, ["start", "end"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_busy_batch_stays_whole(self) -> None:
        """A batch that starts less than ``IdleGap.gap`` after the previous busy one ended
        runs ``on_batch_start`` before its first packet, so every packet of it is held (one
        GSO send under load); an empty batch counts as a batch."""
        packets = [bytes([0x45, i]) * 20 for i in range(3)]
        self.clock.advance(self.tun.idle.gap)
        self.queue(packets[0])
        self.tun.doRead()
        self.tun.doRead()  # at once after the lone batch: busy, and empty
        self.assertEqual(self.events, [packets[0], "end", "start", "end"])
        self.events.clear()
        self.clock.advance(self.tun.idle.gap / 2)
        self.queue(*packets)
        self.tun.doRead()
        self.assertEqual(self.events, ["start", *packets, "end"])
        self.events.clear()
        self.clock.advance(self.tun.idle.gap / 2)
        self.tun.doRead()  # an empty batch is still a batch: the device was just busy
        self.assertEqual(self.events, ["start", "end"])
        self.events.clear()
        self.clock.advance(self.tun.idle.gap)
        self.queue(*packets)
        self.tun.doRead()
        self.assertEqual(self.events, [packets[0], "end"])

    def test_read_replies_only_after_a_write(self) -> None:
        """``read_replies`` reads at once what a lone write provoked (and hands it on alone,
        unheld, though the node is in a batch), and does nothing without
        a write since the last read, after a bulk of writes, or while the device is not
        reading."""
        self.tun.start_reading()
        reply = bytes([0x45, 9]) * 20
        self.assertFalse(self.tun.read_replies())
        self.assertEqual(self.system.reads, 0)
        self.tun.write(bytes([0x45, 1]) * 20)
        self.queue(reply)
        # The node is busy (a UDP batch), yet the reply goes alone; True: a batch ran, its
        # end hook included.
        self.assertTrue(self.tun.read_replies())
        self.assertEqual(self.events, [reply, "end"])
        reads = self.system.reads
        self.tun.read_replies()
        self.assertEqual(self.system.reads, reads)
        for _ in range(self.tun.reply_read_max + 1):
            self.tun.write(bytes([0x45, 1]) * 20)
        self.tun.read_replies()
        self.assertEqual(self.system.reads, reads, "a bulk batch leaves its replies to batch")
        self.tun.doRead()
        reads = self.system.reads
        self.tun.write(bytes([0x45, 1]) * 20)
        self.tun.stop_reading()
        self.tun.read_replies()
        self.assertEqual(self.system.reads, reads)

    def test_lone_frame_with_a_checksum_to_finish(self) -> None:
        """A lone batch whose packet carries a partial checksum (a lone TCP or UDP packet)
        takes the batch loop's way: handed on alone with its checksum finished, then the
        batch ends; what is queued behind it is the next, busy, batch."""
        from tests.test_offload import problem, small_frame

        frames = [small_frame(True, True, b"ack"), small_frame(True, False, b"dns")]
        self.clock.advance(self.tun.idle.gap)
        self.system.frames.extend(frames)
        self.tun.doRead()
        self.assertEqual(len(self.events), 2)
        packet, end = self.events
        assert isinstance(packet, bytes)
        self.assertIsNone(problem(packet))
        self.assertEqual((packet[-3:], end), (b"ack", "end"))
        self.assertEqual(self.system.reads, 1)
        self.events.clear()
        self.tun.doRead()
        self.assertEqual(self.events[0], "start")
        self.assertEqual(self.events[-1], "end")
        self.assertEqual([bytes(p)[-3:] for p in self.events[1:-1]], [b"dns"])  # type: ignore[arg-type]

    def test_lone_read_of_a_super_packet_is_a_whole_batch(self) -> None:
        """A super-packet read first after an idle moment is held as a whole: the start hook,
        its segments, and what follows in the same batch, as before the lone path."""
        from tests.test_offload import super_frame

        plain = bytes([0x45, 7]) * 20
        self.clock.advance(self.tun.idle.gap)
        self.system.frames.extend([super_frame(True, True, bytes(3000), 1000)])
        self.queue(plain)
        self.tun.doRead()
        self.assertEqual(self.events[0], "start")
        self.assertEqual(len(self.events), 6)  # start, 3 segments, the plain packet, end
        self.assertEqual(self.events[-2:], [plain, "end"])
        self.assertEqual(self.tun.gso_reads, 1)

    def test_lone_read_finding_nothing_or_interrupted(self) -> None:
        """A lone read that finds nothing ends the batch after one read; one interrupted is
        read again (by the batch loop) and its packet still goes alone."""
        packet = bytes([0x45, 3]) * 20
        self.clock.advance(self.tun.idle.gap)
        self.tun.doRead()
        self.assertEqual((self.events, self.system.reads), (["end"], 1))
        self.events.clear()
        self.clock.advance(self.tun.idle.gap)
        self.system.interrupts = 1
        self.queue(packet, packet)
        self.tun.doRead()
        self.assertEqual(self.events, [packet, "end"])
        self.assertEqual(self.system.reads, 3)


class _TsoOnlySystem(_VnetSystem):
    """A kernel before Linux 6.2: ``TUNSETOFFLOAD`` refuses any set with USO in it."""

    def ioctl(self, fd: int, request: int, arg: bytes | int) -> bytes:
        if request == TUNSETOFFLOAD and isinstance(arg, int) and arg & TUN_F_USO4:
            raise OSError(errno.EINVAL, "invalid")
        return super().ioctl(fd, request, arg)


def vnet_device(system: _VnetSystem) -> TunDevice:
    """An open TUN device with the virtio-net header and offloads on a fake kernel."""
    tun = TunDevice(
        "mg0",
        lambda p, now: None,
        FakeReactor(),
        system=system,  # type: ignore[arg-type]
        offload=True,
    )
    tun.open()
    return tun


class VnetUdpWriteTests(SynchronousTestCase):
    """Held UDP datagrams are joined into one ``GSO_UDP_L4`` write only where the kernel
    granted USO; a TSO-only device writes them one by one, as before."""

    def burst(self, system: _VnetSystem) -> TunDevice:
        tun = vnet_device(system)
        tun.hold()
        for v4 in (True, False):
            for i in range(10):
                tun.write(udp_packet(v4, bytes([i]) * 500, ident=i))
        tun.flush()
        return tun

    def test_joined_with_uso(self) -> None:
        system = _VnetSystem()
        tun = self.burst(system)
        self.assertEqual(tun.offload_status()["offloads"], "tso4,tso6,uso4,uso6")
        self.assertEqual(len(system.written), 2)
        for frame, iphl in zip(system.written, (20, 40)):
            self.assertEqual(VNET_HDR.unpack_from(frame), (1, GSO_UDP_L4, iphl + 8, 500, iphl, 6))
            self.assertEqual(len(split(frame)), 10)
        status = tun.offload_status()
        self.assertEqual((status["gro_udp_writes"], status["gro_udp_packets"]), (2, 20))
        self.assertEqual((status["gro_writes"], status["gro_packets"]), (0, 0))

    def test_plain_without_uso(self) -> None:
        system = _TsoOnlySystem()
        tun = self.burst(system)
        self.assertEqual(tun.offload_status()["offloads"], "tso4,tso6")
        self.assertEqual(len(system.written), 20)
        for frame in system.written:
            self.assertEqual(frame[:VNET_HDR_LEN], PLAIN_HEADER)
        self.assertEqual(tun.offload_status()["gro_udp_writes"], 0)


class WritePacketsTests(SynchronousTestCase):
    """``write_packets`` is ``write`` for each packet, in one call."""

    def device(self) -> tuple[TunDevice, _VnetSystem]:
        system = _VnetSystem()
        return vnet_device(system), system

    def packets(self) -> list[bytes]:
        return [udp_packet(True, bytes([i]) * 500, ident=i) for i in range(10)]

    def test_held_then_written_as_write_would(self) -> None:
        """While held, the packets join the held ones (the list is not kept) and the flush
        writes what ten ``write`` calls would have."""
        one, one_system = self.device()
        many, many_system = self.device()
        packets = self.packets()
        for tun in (one, many):
            tun.hold()
        for packet in packets:
            one.write(packet)
        batch = list(packets)
        many.write_packets(batch)
        batch.clear()
        for tun in (one, many):
            tun.flush()
        self.assertEqual(many_system.written, one_system.written)
        self.assertEqual(len(many_system.written), 1)
        self.assertEqual(many._wrote, one._wrote)
        self.assertEqual(many.offload_status(), one.offload_status())

    def test_not_held_each_goes_at_once(self) -> None:
        tun, system = self.device()
        tun.write_packets(self.packets())
        self.assertEqual(len(system.written), 10)

    def test_the_hold_limit_writes_at_once(self) -> None:
        tun, system = self.device()
        tun.hold_packets = 4
        tun.hold()
        tun.write_packets(self.packets())
        self.assertEqual(len(system.written), 1, "written when the limit was passed")
        tun.flush()
        self.assertEqual(len(system.written), 1)


class RealTunTests(TestCase):
    """A real TUN created here, moved into a test namespace, pinged through, then deleted."""

    timeout = 30

    def setUp(self) -> None:
        require_root()
        tag = f"{os.getpid() % 100000}{id(self) % 1000}"
        self.ifname = f"mgt{tag}"[:15]
        self.ns = f"mgtun{tag}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True, timeout=10)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns], check=False, timeout=10)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, timeout=10)

    @defer.inlineCallbacks
    def test_ping_through_tun_and_delete(self) -> Any:
        """A ping in the namespace is read from our fd and our written echo reply answers it;
        deleting the interface calls on_gone."""
        got_ping: defer.Deferred[None] = defer.Deferred()
        gone: defer.Deferred[OSError] = defer.Deferred()
        tun: TunDevice

        def receiver(packet: bytes, now: float) -> None:
            reply = _icmp_echo_reply(packet)
            if reply is not None:
                tun.write(reply)
                if not got_ping.called:
                    got_ping.callback(None)

        tun = TunDevice(self.ifname, receiver, reactor, on_gone=gone.callback)
        self.assertEqual(tun.open(), self.ifname)
        self.addCleanup(tun.close)
        tun.start_reading()
        subprocess.run(
            ["ip", "link", "set", "dev", self.ifname, "netns", self.ns], check=True, timeout=10
        )
        self.ip("address", "add", "10.201.0.1/24", "dev", self.ifname)
        self.ip("link", "set", "dev", self.ifname, "up")
        ping = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "ping", "-c", "1", "-W", "5", "10.201.0.2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(ping.kill)
        yield got_ping
        # Let ping see our reply without blocking the reactor that delivers it.
        for _ in range(100):
            if ping.poll() is not None:
                break
            yield _sleep(0.05)
        self.assertEqual(ping.wait(timeout=5), 0, "ping got no echo reply written by us")

        self.ip("link", "del", "dev", self.ifname)
        error = yield gone
        self.assertIn(error.errno, (errno.EBADFD, errno.EIO, errno.EBADF, errno.ENXIO))
        self.assertFalse(tun.is_open)


def _sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d
