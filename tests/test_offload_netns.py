"""TUN offloads against the kernel: two real TUN devices with TSO/USO wired back to back.

The test process is the wire between namespace A and namespace B: every frame it reads from A's
TUN device is cut into segments by ``meshguard.core.offload.split`` (through ``TunDevice``),
each segment is checked on its own (IP version, lengths, IPv4 header checksum, TCP/UDP
checksum, size within the MTU) and then written into B's device, held for the read batch so
``coalesce`` joins each flow's segments into super-packets. B's answers travel back the same
way. A TCP transfer with its SHA-256 checked, in both IP versions, proves the kernel accepted
what we cut and what we joined; UDP sent with ``UDP_SEGMENT`` in A proves the USO path.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meshguard.adapters import tun as tun_module
from meshguard.adapters.tun import TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TunDevice
from meshguard.core import offload
from meshguard.core.offload import checksum
from tests.netns import Namespace, Testbed, require_root_netns

MTU = 1420
TCP_BYTES = 20 * 1000 * 1000

#: Sends 40 UDP datagrams of 1000 bytes and a last one of 333 as one UDP_SEGMENT send, then
#: the same again; prints nothing (the receiver counts).
_USO_SENDER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
data = bytes((i * 7 + 3) % 251 for i in range(40 * 1000 + 333))
for _ in range(2):
    s.sendmsg([data], [(17, 103, (1000).to_bytes(2, "little"))], 0, (sys.argv[1], 7008))
"""

#: Receives datagrams for a few seconds and prints how many of each size arrived intact.
_UDP_RECEIVER = """
import socket, sys, collections
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7008))
s.settimeout(3)
data = bytes((i * 7 + 3) % 251 for i in range(40 * 1000 + 333))
sizes = collections.Counter()
try:
    while True:
        d = s.recv(65535)
        if d in (data[i : i + 1000] for i in range(0, len(data), 1000)):
            sizes[len(d)] += 1
except socket.timeout:
    pass
print(sizes[1000], sizes[333], flush=True)
"""

#: Sends 120 single UDP datagrams of varied sizes (odd and even, 1 to 1,372 bytes) as fast as
#: it can, so that the TUN reads come in batches whose checksums are finished together.
_BURST_SENDER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
for i in range(120):
    size = (i * 37) % 1372 + 1
    s.sendto(bytes((size + j) % 251 for j in range(size)), (sys.argv[1], 7009))
"""

#: Receives for a few seconds and prints how many datagrams arrived intact and how many not.
_BURST_RECEIVER = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((sys.argv[1], 7009))
s.settimeout(3)
good = bad = 0
try:
    while True:
        d = s.recv(65535)
        if d == bytes((len(d) + j) % 251 for j in range(len(d))):
            good += 1
        else:
            bad += 1
except socket.timeout:
    pass
print(good, bad, flush=True)
"""


#: Sizes of the datagrams of the joining burst: runs of one size, a last one shorter, odd
#: sizes, a larger size after a smaller (a new run), a lone tiny one at the end.
_JOIN_SIZES = [1000] * 60 + [333] + [777] * 40 + [1001] * 20 + [5]

#: Sends the joining burst: datagram i holds its index and bytes derived from it.
_JOIN_SENDER = f"""
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
for i, size in enumerate({_JOIN_SIZES!r}):
    body = i.to_bytes(4, "big") + bytes((i * 3 + j) % 251 for j in range(size - 4))
    s.sendto(body[:size], (sys.argv[1], 7010))
"""

#: Receives for a few seconds and prints how many datagrams arrived intact, how many not,
#: how many distinct and how many out of order.
_JOIN_RECEIVER = f"""
import socket, sys
sizes = {_JOIN_SIZES!r}
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], 7010))
s.settimeout(3)
good = bad = late = 0
seen = set()
last = -1
try:
    while True:
        d = s.recv(65535)
        i = int.from_bytes(d[:4], "big") if len(d) >= 4 else -1
        want = b""
        if 0 <= i < len(sizes):
            want = i.to_bytes(4, "big") + bytes((i * 3 + j) % 251 for j in range(sizes[i] - 4))
        if d == want[: sizes[i]]:
            good += 1
            seen.add(i)
            late += i < last
            last = max(last, i)
        else:
            bad += 1
except socket.timeout:
    pass
print(good, bad, len(seen), late, flush=True)
"""


def segment_problem(packet: bytes) -> str | None:
    """Why ``packet`` is not a well-formed single IP packet for the wire, or None."""
    if len(packet) > MTU:
        return f"{len(packet)} bytes, above the MTU"
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 15) * 4
        if struct.unpack_from("!H", packet, 2)[0] != len(packet):
            return "IPv4 total length"
        if checksum(packet[:ihl]) not in (0, 0xFFFF):
            return "IPv4 header checksum"
        proto, l4 = packet[9], packet[ihl:]
        pseudo = packet[12:20] + bytes([0, proto]) + struct.pack("!H", len(l4))
    elif version == 6:
        if struct.unpack_from("!H", packet, 4)[0] + 40 != len(packet):
            return "IPv6 payload length"
        proto, l4 = packet[6], packet[40:]
        pseudo = packet[8:40] + struct.pack("!I", len(l4)) + bytes([0, 0, 0, proto])
    else:
        return f"IP version {version}"
    if proto not in (6, 17):
        return None
    if proto == 17 and struct.unpack_from("!H", l4, 4)[0] != len(l4):
        return "UDP length"
    if checksum(pseudo + l4) not in (0, 0xFFFF):
        return f"{'TCP' if proto == 6 else 'UDP'} checksum"
    return None


class Wire:
    """Two TUN devices with offloads, each one's segments written into the other."""

    def __init__(self, tb: Testbed, a: Namespace, b: Namespace) -> None:
        self.problems: list[str] = []
        self.segments = 0
        a_if, b_if = tb.ifname("ta"), tb.ifname("tb")
        self.tun_a = TunDevice(a_if, self._from_a, reactor, offload=True)
        self.tun_b = TunDevice(b_if, self._from_b, reactor, offload=True)
        for tun, ns, own, own6 in (
            (self.tun_a, a, "10.203.0.1", "fd03::1"),
            (self.tun_b, b, "10.203.0.2", "fd03::2"),
        ):
            tun.open()
            tb._host(["ip", "link", "set", "dev", tun.name, "netns", ns.name])
            tb.ip(ns, "link", "set", "dev", tun.name, "mtu", str(MTU))
            tb.addr(ns, tun.name, f"{own}/24")
            tb.ip(ns, "address", "add", f"{own6}/64", "dev", tun.name, "nodad")
            tb.up(ns, tun.name)
        # Each device's read batch is the other's coalescing batch.
        self.tun_a.on_batch_start, self.tun_a.on_batch_end = self.tun_b.hold, self.tun_b.flush
        self.tun_b.on_batch_start, self.tun_b.on_batch_end = self.tun_a.hold, self.tun_a.flush
        self.tun_a.start_reading()
        self.tun_b.start_reading()

    def _check(self, packet: bytes) -> None:
        self.segments += 1
        problem = segment_problem(packet)
        if problem is not None and len(self.problems) < 20:
            self.problems.append(f"{problem}: {packet[:60].hex()}")

    def _from_a(self, packet: bytes, now: float) -> None:
        self._check(packet)
        self.tun_b.write(packet)

    def _from_b(self, packet: bytes, now: float) -> None:
        self._check(packet)
        self.tun_a.write(packet)

    def close(self) -> None:
        self.tun_a.close()
        self.tun_b.close()


class OffloadKernelTests(TestCase):
    """Segments cut from the kernel's super-packets and super-packets we join, end to end."""

    timeout = 120

    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)
        self.a = self.tb.netns("a")
        self.b = self.tb.netns("b")
        self.wire = Wire(self.tb, self.a, self.b)
        self.addCleanup(self.wire.close)

    def assert_clean(self) -> None:
        self.assertEqual(self.wire.problems, [], "malformed segments")

    @defer.inlineCallbacks
    def check_tcp(self, addr: str, flag: int) -> Any:
        wire = self.wire
        if not wire.tun_a.offloads & flag:
            self.skipTest(f"kernel refused TSO ({wire.tun_a.offload_status()['offloads']})")
        built: list[int] = []
        block = offload._block

        def counted(packets: Any, a: int, b: int, *rest: Any) -> bool:
            done: bool = block(packets, a, b, *rest)
            if done:
                built.append(b - a)
            return done

        self.patch(offload, "_block", counted)
        ok = yield threads.deferToThread(
            self.tb.tcp_transfer, self.b, self.a, addr, TCP_BYTES, timeout=60, seed=7
        )
        self.assertTrue(ok, f"TCP transfer failed; see {self.tb.log_dir}")
        self.assert_clean()
        # A bulk flow's bursts run on at one length, each with its own timestamp: most of
        # its segments must be joined by the groups built at once (96 % seen), not the loop.
        self.assertGreater(sum(built), wire.segments // 2, "the groups path joined little")
        status_a, status_b = wire.tun_a.offload_status(), wire.tun_b.offload_status()
        self.assertGreater(status_a["gso_reads"], 0, "A's kernel handed us no super-packet")
        self.assertGreater(
            status_a["gso_segments"], 2 * status_a["gso_reads"], "super-packets of one segment"
        )
        self.assertGreater(status_b["gro_writes"], 0, "no segments were coalesced into B")
        self.assertEqual(status_b["offload_errors"] + status_a["offload_errors"], 0)
        self.assertEqual(wire.tun_b.write_errors, 0, "B's kernel refused a write")

    def test_tcp_v4(self) -> Any:
        """20 MB over IPv4 A -> B: TSO frames split, every segment well formed, coalesced
        writes into B accepted (the data arrives intact), most segments joined by the groups
        built at once."""
        return self.check_tcp("10.203.0.2", TUN_F_TSO4)

    def test_tcp_v6(self) -> Any:
        """The same over IPv6."""
        return self.check_tcp("fd03::2", TUN_F_TSO6)

    @defer.inlineCallbacks
    def test_udp_segmentation_offload(self) -> Any:
        """A UDP_SEGMENT send in A (40 x 1000 bytes + 333) reaches us as USO frames; every
        datagram arrives in B intact, over IPv4 and IPv6."""
        wire = self.wire
        if not wire.tun_a.offloads & TUN_F_USO4:
            self.skipTest("kernel refused USO (Linux 6.2+)")
        for addr in ("10.203.0.2", "fd03::2"):
            before = wire.tun_a.gso_reads
            receiver = self.tb.spawn(self.b, [sys.executable, "-c", _UDP_RECEIVER, addr])
            yield threads.deferToThread(
                self.tb.wait_for,
                lambda: self.tb.listening(self.b, 7008, "udp"),
                timeout=10,
                what="UDP receiver",
            )
            yield threads.deferToThread(
                self.tb.run, self.a, [sys.executable, "-c", _USO_SENDER, addr]
            )
            yield threads.deferToThread(receiver.wait, 15)
            counts = self.tb.log_tail(receiver, 200).split()
            self.assertEqual(counts[-2:], ["80", "2"], f"datagrams received over {addr}")
            self.assertGreater(wire.tun_a.gso_reads, before, f"no USO frame over {addr}")
        self.assert_clean()

    @defer.inlineCallbacks
    def test_small_udp_burst(self) -> Any:
        """120 single UDP datagrams of odd and even sizes, sent back to back over IPv4 and
        IPv6: with checksum offload on the kernel hands each over with a partial checksum,
        the read path finishes them a batch at a time; every one is checked on the wire and
        arrives intact (B's kernel verifies the UDP checksum, so a wrong one is dropped)."""
        wire = self.wire
        for addr in ("10.203.0.2", "fd03::2"):
            receiver = self.tb.spawn(self.b, [sys.executable, "-c", _BURST_RECEIVER, addr])
            yield threads.deferToThread(
                self.tb.wait_for,
                lambda: self.tb.listening(self.b, 7009, "udp"),
                timeout=10,
                what="UDP receiver",
            )
            before = wire.segments
            yield threads.deferToThread(
                self.tb.run, self.a, [sys.executable, "-c", _BURST_SENDER, addr]
            )
            yield threads.deferToThread(receiver.wait, 15)
            counts = self.tb.log_tail(receiver, 200).split()
            self.assertEqual(counts[-2:], ["120", "0"], f"datagrams received over {addr}")
            self.assertGreaterEqual(wire.segments - before, 120)
        self.assert_clean()
        self.assertEqual(wire.tun_a.offload_errors, 0)

    @defer.inlineCallbacks
    def test_udp_burst_joined(self) -> Any:
        """Single UDP datagrams queued in A and read in batches (sizes 1000 x 60, 333, 777 x
        40, 1001 x 20, 5) are joined into GSO_UDP_L4 writes into B, which B's kernel accepts
        and cuts again: every datagram reaches a plain socket in B intact, over IPv4 and
        IPv6."""
        if not self.wire.tun_b.offloads & TUN_F_USO4:
            self.skipTest("kernel refused USO (Linux 6.2+)")
        for addr in ("10.203.0.2", "fd03::2"):
            before = self.wire.tun_b.gro_udp_packets
            yield udp_burst(self, addr)
            joined = self.wire.tun_b.gro_udp_packets - before
            self.assertGreater(joined, len(_JOIN_SIZES) // 2, f"datagrams joined over {addr}")
        self.assertEqual(self.wire.tun_b.gro_writes, 0, "UDP counted as TCP")
        self.assertEqual(self.wire.tun_b.write_errors, 0, "B's kernel refused a joined write")

    @defer.inlineCallbacks
    def test_udp_burst_forwarded(self) -> Any:
        """The joined writes forwarded by B's kernel into a plain TUN device (no offloads, so
        the kernel cuts them and finishes every checksum itself): each datagram comes out
        well formed, its UDP checksum right, over IPv4 and IPv6. A wrong pseudo-header sum in
        a joined write would show here, where local delivery trusts it."""
        wire, tb = self.wire, self.tb
        if not wire.tun_b.offloads & TUN_F_USO4:
            self.skipTest("kernel refused USO (Linux 6.2+)")
        out: list[bytes] = []
        plain = TunDevice(tb.ifname("tc"), lambda packet, now: out.append(packet), reactor)
        plain.open()
        self.addCleanup(plain.close)
        tb._host(["ip", "link", "set", "dev", plain.name, "netns", self.b.name])
        tb.ip(self.b, "link", "set", "dev", plain.name, "mtu", str(MTU))
        tb.up(self.b, plain.name)
        tb.route(self.b, "10.204.0.0/24", dev=plain.name)
        tb.route(self.b, "fd04::/64", dev=plain.name)
        tb.sysctl(self.b, "net.ipv4.ip_forward", 1)
        tb.sysctl(self.b, "net.ipv6.conf.all.forwarding", 1)
        tb.route(self.a, "10.204.0.0/24", dev=wire.tun_a.name)
        tb.route(self.a, "fd04::/64", dev=wire.tun_a.name)
        plain.start_reading()
        for addr in ("10.204.0.9", "fd04::9"):
            out.clear()
            before = wire.tun_b.gro_udp_packets
            wire.tun_a.stop_reading()
            try:
                yield threads.deferToThread(
                    tb.run, self.a, [sys.executable, "-c", _JOIN_SENDER, addr]
                )
            finally:
                wire.tun_a.start_reading()
            deadline = reactor.seconds() + 10  # type: ignore[attr-defined]
            while reactor.seconds() < deadline:  # type: ignore[attr-defined]
                if sum(p[9 if p[0] >> 4 == 4 else 6] == 17 for p in out) >= len(_JOIN_SIZES):
                    break
                yield deferLater(reactor, 0.05, lambda: None)
            self.assertGreater(wire.tun_b.gro_udp_packets - before, len(_JOIN_SIZES) // 2)
            seen = set()
            for packet in out:
                iphl = 20 if packet[0] >> 4 == 4 else 40
                proto = packet[9] if iphl == 20 else packet[6]
                if proto != 17 or packet[iphl + 2 : iphl + 4] != (7010).to_bytes(2, "big"):
                    continue  # the kernel's own (IPv6 router solicitations, MLD reports)
                self.assertIsNone(segment_problem(packet), f"forwarded over {addr}")
                i = int.from_bytes(packet[iphl + 8 : iphl + 12], "big")
                size = _JOIN_SIZES[i]
                want = i.to_bytes(4, "big") + bytes((i * 3 + j) % 251 for j in range(size))
                self.assertEqual(packet[iphl + 8 :], want[:size])
                seen.add(i)
            self.assertEqual(len(seen), len(_JOIN_SIZES), f"datagrams forwarded over {addr}")
        self.assertEqual(wire.tun_b.write_errors, 0)


@defer.inlineCallbacks
def udp_burst(case: Any, addr: str) -> Any:
    """Queue the joining burst in A with A's device not reading (so the reads come in
    batches whatever the machine's speed), then read it; check what B's socket got."""
    tb, wire = case.tb, case.wire
    receiver = tb.spawn(case.b, [sys.executable, "-c", _JOIN_RECEIVER, addr])
    yield threads.deferToThread(
        tb.wait_for, lambda: tb.listening(case.b, 7010, "udp"), timeout=10, what="UDP receiver"
    )
    wire.tun_a.stop_reading()
    try:
        yield threads.deferToThread(tb.run, case.a, [sys.executable, "-c", _JOIN_SENDER, addr])
    finally:
        wire.tun_a.start_reading()
    yield threads.deferToThread(receiver.wait, 15)
    counts = tb.log_tail(receiver, 200).split()
    n = str(len(_JOIN_SIZES))
    case.assertEqual(counts[-4:-1], [n, "0", n], f"good, bad, distinct datagrams over {addr}")
    case.assertEqual(case.wire.problems, [], "malformed segments")


class TsoOnlyKernelTests(TestCase):
    """The same burst through devices that were granted TSO only (a kernel before 6.2):
    nothing is joined, every datagram still arrives."""

    timeout = 60

    def setUp(self) -> None:
        require_root_netns(self)
        self.patch(
            tun_module,
            "OFFLOAD_CHOICES",
            (tun_module.TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,),
        )
        self.tb = Testbed(self)
        self.a = self.tb.netns("a")
        self.b = self.tb.netns("b")
        self.wire = Wire(self.tb, self.a, self.b)
        self.addCleanup(self.wire.close)

    @defer.inlineCallbacks
    def test_udp_burst_not_joined(self) -> Any:
        self.assertEqual(self.wire.tun_b.offload_status()["offloads"], "tso4,tso6")
        for addr in ("10.203.0.2", "fd03::2"):
            yield udp_burst(self, addr)
        self.assertEqual(self.wire.tun_b.gro_udp_writes, 0)
        self.assertEqual(self.wire.tun_b.write_errors, 0)
