"""benchmarks/hops.py's capture parsing on hand-built frames: the veth filter, a ring frame, and
cutting a UDP GSO super-packet into the datagrams it carries.

Under load a tunnel that sends with UDP GSO puts an echo's sealed datagram (156 bytes outer) at
the end of a batch of full-sized ones, or first before a sealed ACK; the hop split finds it
only if these pieces see it. No sockets: the frames are built here byte by byte.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.offload import GSO_NONE, GSO_TCPV4, GSO_UDP_L4, VNET_HDR
from tests import cbpf

PORT = 51820


def _load_hops() -> ModuleType:
    """benchmarks/ is not a package: load hops.py (and through it throughput.py) by path."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "hops.py"
    spec = importlib.util.spec_from_file_location("hops", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hops", module)
    spec.loader.exec_module(module)
    return module


hops = _load_hops()


def vnet(gso_type: int = GSO_NONE, gso_size: int = 0) -> bytes:
    """A virtio_net_hdr as the kernel writes it for a captured frame (checksum left partial)."""
    return VNET_HDR.pack(1 if gso_type else 0, gso_type, 42 if gso_type else 0, gso_size, 34, 6)


def ipv4_udp(
    payload: int,
    sport: int = PORT,
    dport: int = PORT,
    proto: int = 17,
    options: bytes = b"",
    frag: int = 0,
) -> bytes:
    """An IPv4 + UDP header for ``payload`` UDP payload bytes in all (only the headers: a
    capture keeps no more), total length over the whole super-packet as GSO sends it."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + 8 + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        1,
        frag,
        64,
        proto,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return ip + options + struct.pack("!HHHH", sport, dport, (8 + payload) & 0xFFFF, 0)


def ethernet(packet: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + packet


class DatagramLengthsTests(SynchronousTestCase):
    """``datagram_lengths``: the outer IPv4 length of each datagram a frame carries."""

    def test_plain_echo(self) -> None:
        """A frame without GSO is one datagram: an echo sealed alone is 156 bytes."""
        self.assertEqual(hops.datagram_lengths(vnet(), ipv4_udp(128)), [156])

    def test_echo_after_a_bulk_batch(self) -> None:
        """An echo sent last in a batch of full-sized datagrams (gso_size 1452) is the short
        last segment: three of 1480 bytes, then 156."""
        lengths = hops.datagram_lengths(vnet(GSO_UDP_L4, 1452), ipv4_udp(3 * 1452 + 128))
        self.assertEqual(lengths, [1480, 1480, 1480, 156])
        self.assertIn(hops.OUTER_LENGTH, lengths)

    def test_echo_before_an_ack(self) -> None:
        """An echo first and a sealed ACK after it: gso_size is the echo's 128 payload bytes,
        the ACK the shorter last segment (124 bytes outer)."""
        self.assertEqual(
            hops.datagram_lengths(vnet(GSO_UDP_L4, 128), ipv4_udp(128 + 96)), [156, 124]
        )

    def test_equal_segments(self) -> None:
        """Several echo-sized datagrams in one batch: every one is 156 bytes."""
        self.assertEqual(hops.datagram_lengths(vnet(GSO_UDP_L4, 128), ipv4_udp(3 * 128)), [156] * 3)

    def test_no_echo_in_a_bulk_batch(self) -> None:
        """A batch of full-sized datagrams and a shorter last one that is not an echo."""
        lengths = hops.datagram_lengths(vnet(GSO_UDP_L4, 1452), ipv4_udp(2 * 1452 + 96))
        self.assertEqual(lengths, [1480, 1480, 124])
        self.assertNotIn(hops.OUTER_LENGTH, lengths)

    def test_single_segment_gso(self) -> None:
        """A GSO frame no longer than one segment is one datagram of its own length."""
        self.assertEqual(hops.datagram_lengths(vnet(GSO_UDP_L4, 1452), ipv4_udp(128)), [156])

    def test_ecn_flag_ignored(self) -> None:
        """The ECN bit in gso_type does not change how the frame is cut."""
        lengths = hops.datagram_lengths(vnet(GSO_UDP_L4 | 0x80, 128), ipv4_udp(2 * 128))
        self.assertEqual(lengths, [156, 156])

    def test_ip_options_repeat_in_every_datagram(self) -> None:
        """Each datagram carries the IP header again, options included: 24 + 8 + segment."""
        lengths = hops.datagram_lengths(
            vnet(GSO_UDP_L4, 128), ipv4_udp(2 * 128 + 64, options=b"\x01" * 4)
        )
        self.assertEqual(lengths, [160, 160, 96])

    def test_not_matchable(self) -> None:
        """Frames that are not IPv4 UDP, another GSO type, a zero gso_size or cut short hold
        no datagram to match."""
        self.assertEqual(hops.datagram_lengths(vnet(), ipv4_udp(128, proto=6)), [])
        self.assertEqual(hops.datagram_lengths(vnet(GSO_TCPV4, 1448), ipv4_udp(2 * 1448)), [])
        self.assertEqual(hops.datagram_lengths(vnet(GSO_UDP_L4, 0), ipv4_udp(256)), [])
        self.assertEqual(hops.datagram_lengths(vnet()[:9], ipv4_udp(128)), [])
        self.assertEqual(hops.datagram_lengths(vnet(), ipv4_udp(128)[:19]), [])
        v6 = bytes([0x60]) + ipv4_udp(128)[1:]
        self.assertEqual(hops.datagram_lengths(vnet(), v6), [])
        short = bytearray(ipv4_udp(128))
        short[2:4] = (20).to_bytes(2, "big")  # total length below the headers
        self.assertEqual(hops.datagram_lengths(vnet(), bytes(short)), [])


def ring_frame(
    packet: bytes, gso: bytes, *, outgoing: bool, sec: int, nsec: int, stamped: bool = True
) -> bytes:
    """A filled TPACKET_V2 frame laid out as the kernel lays it out for a raw socket with a
    virtio_net_hdr: header, sockaddr_ll at 32, the virtio_net_hdr just before the Ethernet
    frame at tp_mac 76, the IP header at tp_net 90; the rest of the frame stays unused."""
    mac, frame = 76, ethernet(packet)
    status = 1 | (1 << 29 if stamped else 0)
    buf = bytearray(hops.RING_FRAME)
    struct.pack_into("=IIIHHII", buf, 0, status, len(frame), len(frame), mac, mac + 14, sec, nsec)
    sll = struct.pack("=HHiHBB8s", 17, 0x0008, 2, 1, 4 if outgoing else 0, 6, b"")
    buf[32 : 32 + len(sll)] = sll
    buf[mac - 10 : mac] = gso
    buf[mac : mac + len(frame)] = frame
    return bytes(buf)


class RingFrameTests(SynchronousTestCase):
    """``ring_frame``: time, direction and datagrams from one ring slot."""

    def test_outgoing_batch(self) -> None:
        """An outgoing bulk batch with an echo last: the frame's time, outgoing, the echo."""
        frame = ring_frame(
            ipv4_udp(2 * 1452 + 128),
            vnet(GSO_UDP_L4, 1452),
            outgoing=True,
            sec=1_700_000_000,
            nsec=250_000_000,
        )
        self.assertEqual(
            hops.ring_frame(frame), (1_700_000_000.25, True, [1480, 1480, hops.OUTER_LENGTH])
        )

    def test_incoming_plain(self) -> None:
        """An incoming echo sealed alone."""
        frame = ring_frame(ipv4_udp(128), vnet(), outgoing=False, sec=5, nsec=500)
        self.assertEqual(hops.ring_frame(frame), (5.0000005, False, [156]))

    def test_unstamped(self) -> None:
        """A frame the kernel could give no software time (a coarse clock) is not used."""
        frame = ring_frame(ipv4_udp(128), vnet(), outgoing=True, sec=5, nsec=0, stamped=False)
        self.assertIsNone(hops.ring_frame(frame))


class SealedUdpFilterTests(SynchronousTestCase):
    """``sealed_udp``: the veth filter keeps IPv4 UDP from or to the tunnel port that could hold
    an echo's datagram, and nothing else."""

    program = hops.sealed_udp(PORT)

    def verdict(self, packet: bytes, ethertype: int = 0x0800) -> int:
        return cbpf.run(self.program, ethernet(packet, ethertype), protocol=ethertype)

    def test_keeps(self) -> None:
        """An echo alone, a bulk batch and an echo with an ACK, either port the tunnel's."""
        self.assertTrue(self.verdict(ipv4_udp(128)))
        self.assertTrue(self.verdict(ipv4_udp(40 * 1452 + 128, dport=40000)))
        self.assertTrue(self.verdict(ipv4_udp(128 + 96, sport=40000)))
        self.assertTrue(self.verdict(ipv4_udp(128, options=b"\x01" * 8, sport=1)))

    def test_drops(self) -> None:
        """Too short for an echo (a lone sealed ACK), other ports, TCP, a later fragment, and
        frames that are not IPv4."""
        self.assertFalse(self.verdict(ipv4_udp(96)))
        self.assertFalse(self.verdict(ipv4_udp(127)))
        self.assertFalse(self.verdict(ipv4_udp(128, sport=1, dport=2)))
        self.assertFalse(self.verdict(ipv4_udp(128, proto=6)))
        self.assertFalse(self.verdict(ipv4_udp(128, frag=185)))
        self.assertFalse(self.verdict(ipv4_udp(128), ethertype=0x86DD))
        self.assertFalse(self.verdict(ipv4_udp(128), ethertype=0x0806))


class TcpOnlyRoundTests(SynchronousTestCase):
    """throughput.py's ``--tcp-only`` round: the two TCP phases and CPU per GB, nothing else
    (no UDP search, no pings), so trees can be compared over more rounds."""

    def test_round_measures_tcp_only(self) -> None:
        throughput = sys.modules["throughput"]
        called: list[str] = []

        def tcp(c: object, seconds: float, streams: int, phase: str) -> float:
            called.append(phase)
            return 800.0 if streams == 1 else 900.0

        def refused(*args: object) -> None:
            raise AssertionError("measured more than TCP")

        self.patch(throughput, "tcp_mbits", tcp)
        self.patch(throughput, "cpu", lambda c: 2.0 + len(called))
        for name in ("udp_pps", "ping_ms", "loaded_ping_ms"):
            self.patch(throughput, name, refused)
        config = throughput.Config("t", None, None, "b", "a", procs=[object()])
        args = throughput.argparse.Namespace(
            seconds=5.0, tcp_only=True, udp_size=1000, udp_seconds=3.0, pings=50
        )
        throughput.measure_round(config, args, 1)
        self.assertEqual(called, ["tcp1", "tcp4"])
        self.assertEqual(config.values["tcp1"], [800.0])
        self.assertEqual(config.values["tcp4"], [900.0])
        self.assertEqual(config.values["cpu_per_gb"], [1.0 / (800.0 * 5.0 / 8 / 1000)])
        self.assertNotIn("udp_pps", config.values)
