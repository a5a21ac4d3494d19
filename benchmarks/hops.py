"""Where a ping's round trip goes through a tunnel: the time each tunnel end holds a packet.

Brings up the same pairs as ``throughput.py`` (wireguard-go builds, meshguard, meshguard from
other trees) and pings through each, idle and optionally under a single TCP stream. Packet
sockets (``AF_PACKET`` with kernel timestamps) in both namespaces see every echo request and
reply on the TUN interface and the matching WireGuard datagram on the veth, so the round trip
splits into four hops, each one tunnel process's work plus the wake-up that starts it:

- A send: the echo request queued to A's TUN -> its datagram leaves A's veth;
- B receive: the datagram reaches B's veth -> the request enters B's stack from its TUN;
- B send: the echo reply queued to B's TUN -> its datagram leaves B's veth;
- A receive: the datagram reaches A's veth -> the reply enters A's stack from its TUN.

The sockets are read only after the pings, so they add no wake-ups while they capture (a
classic BPF filter keeps only ICMP on the TUN side). A tunnel that sends with UDP GSO hands the
veth super-packets, several WireGuard datagrams in one frame: under load an echo's datagram
rides at the end of a batch of full-sized ones, or first before a sealed ACK. So the veth
sockets ask for a ``virtio_net_hdr`` with each frame (``PACKET_VNET_HDR``), keep UDP to or from
the tunnel port of at least 156 bytes (the filter), and each frame is cut into its datagrams by
its ``gso_size`` (``datagram_lengths``); a frame holds an echo's datagram when one of them is
156 bytes long, an 84-byte ping sealed, and its kernel time is the frame's. Under load that
filter keeps every bulk frame, which queued on a plain packet socket would hold the whole
payload against the receive buffer (it overflowed within a second), so the veth sockets copy
only each frame's headers into a memory-mapped ring (``PACKET_RX_RING``); frames the ring had
no room for are counted and reported. Each hop is matched to the first datagram of that size in
its direction after the inner packet, so under load a hop can be matched with another small
datagram now and then; the medians stand.

    python3 benchmarks/hops.py [--pings 200] [--loaded] [--wireguard-go PATH ...] \\
        [--meshguard-tree LABEL=PATH ...] [--no-meshguard]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import throughput as tp

from meshguard.core.offload import GSO_NONE, GSO_UDP_L4, VNET_HDR, VNET_HDR_LEN
from tests.netns import Namespace, Testbed, WaitTimeoutError, require_root_netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
CLONE_NEWNET = 0x40000000
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35  # and SCM_TIMESTAMPNS (asm-generic)
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_VNET_HDR = 15
TPACKET_V2 = 1
TP_STATUS_USER = 1
TP_STATUS_TS_SOFTWARE = 1 << 29
#: ``struct tpacket2_hdr`` up to ``tp_nsec``: status, len, snaplen, mac, net, sec, nsec.
TPACKET2_HDR = struct.Struct("=IIIHHII")
#: Where ``struct sockaddr_ll`` starts in a TPACKET_V2 frame, and its ``sll_pkttype`` in it.
TPACKET2_SLL = 32
SLL_PKTTYPE = 10
#: A ring frame holds the tpacket2 header, the address, the virtio_net_hdr and the first 52
#: bytes of the Ethernet frame (the headers up to UDP); 512Ki frames are 64 MiB a socket.
RING_FRAME = 128
RING_FRAMES = 1 << 19
RING_BLOCK = 1 << 16
#: The gso_type flag that says the packet carried ECN (ignored here).
GSO_ECN = 0x80
#: The outer IPv4 length of a sealed 84-byte echo: 20 + 8 + 32 + 96 (padded to 16).
OUTER_LENGTH = 156
HOPS = ("A send", "B receive", "B send", "A receive")

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(code: list[tuple[int, int, int, int]]) -> bytes:
    insns = b"".join(struct.pack("HBBI", *c) for c in code)
    buf = ctypes.create_string_buffer(insns)
    addr = ctypes.addressof(buf)
    _bpf.keep.append(buf)  # type: ignore[attr-defined]
    return struct.pack("HL", len(code), addr)


_bpf.keep = []  # type: ignore[attr-defined]

#: ldb [9]; jeq #1 (ICMP) -> accept; drop.
ICMP_ONLY = [(0x30, 0, 0, 9), (0x15, 0, 1, 1), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]


def sealed_udp(port: int) -> list[tuple[int, int, int, int]]:
    """On an Ethernet frame (a raw packet socket): IPv4, UDP, first fragment, total length at
    least OUTER_LENGTH (a shorter frame cannot hold an echo's datagram), from or to ``port``."""
    return [
        (0x20, 0, 0, 0xFFFFF000),  # ld proto (SKF_AD_PROTOCOL)
        (0x15, 0, 12, ETH_P_IP),  # jeq #IPv4
        (0x30, 0, 0, 23),  # ldb [23] (IP protocol)
        (0x15, 0, 10, 17),  # jeq #UDP
        (0x28, 0, 0, 16),  # ldh [16] (IP total length)
        (0x35, 0, 8, OUTER_LENGTH),  # jge #OUTER_LENGTH
        (0x28, 0, 0, 20),  # ldh [20] (flags, fragment offset)
        (0x45, 6, 0, 0x1FFF),  # jset #0x1fff -> drop
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf)
        (0x48, 0, 0, 14),  # ldh [x+14] (source port)
        (0x15, 2, 0, port),  # jeq #port -> accept
        (0x48, 0, 0, 16),  # ldh [x+16] (destination port)
        (0x15, 0, 1, port),  # jeq #port
        (0x06, 0, 0, 0xFFFF),  # accept
        (0x06, 0, 0, 0),  # drop
    ]


def datagram_lengths(vnet: bytes, packet: bytes) -> list[int]:
    """The outer IPv4 length of each UDP datagram one captured frame carries.

    ``vnet`` is the frame's ``virtio_net_hdr``, ``packet`` its bytes from the IPv4 header on
    (the headers are enough). A UDP GSO super-packet (``GSO_UDP_L4``) is cut as the kernel cuts
    it: ``gso_size`` payload bytes a datagram, the last one shorter, each with the IP and UDP
    headers again, so an echo's datagram inside a batch shows with its own length. A plain
    frame is one datagram; anything else (not IPv4 UDP, another GSO type, cut short) holds none
    this benchmark can match.
    """
    if len(vnet) < VNET_HDR_LEN or len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 17:
        return []
    _flags, gso_type, _hdr_len, gso_size, _start, _offset = VNET_HDR.unpack_from(vnet)
    header = (packet[0] & 15) * 4 + 8
    total = int.from_bytes(packet[2:4], "big")
    if header < 28 or total < header:
        return []
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE or (gso_type == GSO_UDP_L4 and total - header <= gso_size):
        return [total]
    if gso_type != GSO_UDP_L4 or gso_size == 0:
        return []
    full, rest = divmod(total - header, gso_size)
    return [header + gso_size] * full + ([header + rest] if rest else [])


def ring_frame(frame: bytes) -> tuple[float, bool, list[int]] | None:
    """(kernel time in s, outgoing, datagram lengths) of one filled TPACKET_V2 ring frame of a
    raw socket with ``PACKET_VNET_HDR``, or None if the kernel had no software time for it.

    The frame holds the tpacket2 header, the sender's ``sockaddr_ll`` (its packet type says the
    direction), and the captured bytes from ``tp_mac`` with the ``virtio_net_hdr`` just before.
    """
    status, _len, snaplen, mac, net, sec, nsec = TPACKET2_HDR.unpack_from(frame)
    if not status & TP_STATUS_TS_SOFTWARE:
        return None
    outgoing = frame[TPACKET2_SLL + SLL_PKTTYPE] == PACKET_OUTGOING
    lengths = datagram_lengths(frame[mac - VNET_HDR_LEN : mac], frame[net : mac + snaplen])
    return sec + nsec / 1e9, outgoing, lengths


def _in_namespace(ns: Namespace, make: Callable[[], socket.socket]) -> socket.socket:
    """``make()`` run inside ``ns``: the socket it returns stays in that namespace."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            return make()
        finally:
            _libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(target)


def packet_socket(
    ns: Namespace, ifname: str, program: list[tuple[int, int, int, int]]
) -> socket.socket:
    """An AF_PACKET socket on ``ifname`` inside ``ns`` (it stays in that namespace)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _bpf(program))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind((ifname, 0))
        sock.setblocking(False)
        return sock

    return _in_namespace(ns, make)


class FrameRing:
    """A raw packet socket on a veth that copies each kept frame's headers, its
    ``virtio_net_hdr`` and its kernel time into a memory-mapped ring (TPACKET_V2).

    A frame in the ring costs RING_FRAME bytes however large the super-packet it stands for,
    where a plain packet socket would hold each whole super-packet against its receive buffer.
    """

    def __init__(self, ns: Namespace, ifname: str, program: list[tuple[int, int, int, int]]):
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _bpf(program))
            # Kernel times come from skb->tstamp, as on the plain sockets; this makes sure the
            # stack stamps packets (without a stamp the ring falls back to a coarse clock).
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            request = struct.pack(
                "IIII",
                RING_BLOCK,
                RING_FRAMES * RING_FRAME // RING_BLOCK,
                RING_FRAME,
                RING_FRAMES,
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
            sock.bind((ifname, 0))
            return sock

        self.sock = _in_namespace(ns, make)
        self.ring = mmap.mmap(self.sock.fileno(), RING_FRAMES * RING_FRAME)
        self.index = 0
        self.untimed = 0

    def drain(self) -> list[tuple[float, bool, list[int]]]:
        """(kernel time in s, outgoing, datagram lengths) of every frame captured, in order;
        each frame read is handed back to the kernel."""
        out: list[tuple[float, bool, list[int]]] = []
        ring = self.ring
        while True:
            base = self.index * RING_FRAME
            if not TPACKET2_HDR.unpack_from(ring, base)[0] & TP_STATUS_USER:
                return out
            frame = ring_frame(ring[base : base + RING_FRAME])
            if frame is None:
                self.untimed += 1
            else:
                out.append(frame)
            struct.pack_into("I", ring, base, 0)  # TP_STATUS_KERNEL: the slot is free again
            self.index = (self.index + 1) % RING_FRAMES

    def dropped(self) -> int:
        """Frames the filter kept but the ring had no room for, since the last call."""
        stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        return int.from_bytes(stats[4:8], sys.byteorder)  # tpacket_stats: packets, drops

    def close(self) -> None:
        self.ring.close()
        self.sock.close()


def drain(sock: socket.socket) -> list[tuple[float, bool, bytes]]:
    """(kernel time in s, outgoing, first bytes) of every packet captured, in order."""
    out: list[tuple[float, bool, bytes]] = []
    while True:
        try:
            data, anc, _flags, addr = sock.recvmsg(128, socket.CMSG_SPACE(16))
        except BlockingIOError:
            return out
        stamp = 0.0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                stamp = sec + nsec / 1e9
        out.append((stamp, addr[2] == PACKET_OUTGOING, data))


def tunnel_ifname(tb: Testbed, ns: Namespace, address: str) -> str:
    for line in tb.ip(ns, "-o", "-4", "addr", "show").splitlines():
        parts = line.split()
        if f"{address}/" in line:
            return parts[1]
    raise RuntimeError(f"no interface with {address} in {ns}")


def icmp_events(
    packets: list[tuple[float, bool, bytes]], want_type: int, outgoing: bool
) -> dict[int, float]:
    """seq -> time of the first ICMP echo (request 8 / reply 0) seen in that direction."""
    events: dict[int, float] = {}
    for stamp, out, data in packets:
        if out != outgoing or len(data) < 28:
            continue
        header = (data[0] & 15) * 4
        if data[header] != want_type:
            continue
        seq = int.from_bytes(data[header + 6 : header + 8], "big")
        events.setdefault(seq, stamp)
    return events


def first_after(times: list[float], t: float) -> float | None:
    for x in times:
        if x >= t:
            return x
    return None


def measure(
    c: tp.Config, pings: int, loaded: bool
) -> tuple[list[float], dict[str, list[float]], list[list[float]], int]:
    """RTTs from ping, the four hops per matched echo in ms, each matched echo's eight kernel
    times (s), and how many veth frames the capture lost (ring full or no kernel time)."""
    tb = c.tb
    tun_a = tunnel_ifname(tb, c.hosts.a, c.dst_a)
    tun_b = tunnel_ifname(tb, c.hosts.b, c.dst)
    socks = {
        "tun_a": packet_socket(c.hosts.a, tun_a, ICMP_ONLY),
        "tun_b": packet_socket(c.hosts.b, tun_b, ICMP_ONLY),
    }
    rings = {
        "eth_a": FrameRing(c.hosts.a, c.hosts.a_dev, sealed_udp(tp.PORT)),
        "eth_b": FrameRing(c.hosts.b, c.hosts.b_dev, sealed_udp(tp.PORT)),
    }
    server = client = None
    lost = 0
    try:

        def drain_all() -> None:
            for sock in socks.values():
                drain(sock)
            for ring in rings.values():
                ring.drain()
                ring.dropped()
                ring.untimed = 0

        drain_all()
        if loaded:
            server = tb.spawn(c.hosts.b, ["iperf3", "-s", "-1", "-p", "5203"])
            tb.wait_for(lambda: tb.listening(c.hosts.b, 5203), timeout=10, what="iperf3")
            client = tb.spawn(
                c.hosts.a, ["iperf3", "-c", c.dst, "-p", "5203", "-t", f"{pings * 0.02 + 3:g}"]
            )
            time.sleep(1.0)
            drain_all()
        cp = tb.run(
            c.hosts.a,
            ["ping", "-n", "-c", str(pings), "-i", "0.02", "-W", "2", c.dst],
            timeout=pings * 0.05 + 10,
            check=False,
        )
        captured = {name: drain(sock) for name, sock in socks.items()}
        frames = {name: ring.drain() for name, ring in rings.items()}
        lost = sum(ring.dropped() + ring.untimed for ring in rings.values())
    finally:
        for sock in socks.values():
            sock.close()
        for ring in rings.values():
            ring.close()
        if client is not None:
            tb.stop(client)
        if server is not None:
            tb.stop(server)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", cp.stdout)]
    req_a = icmp_events(captured["tun_a"], 8, True)
    rep_a = icmp_events(captured["tun_a"], 0, False)
    req_b = icmp_events(captured["tun_b"], 8, False)
    rep_b = icmp_events(captured["tun_b"], 0, True)

    def sealed(name: str, outgoing: bool) -> list[float]:
        """Times of the frames in one direction that hold an echo-sized datagram."""
        return [
            t for t, out, lengths in frames[name] if out == outgoing and OUTER_LENGTH in lengths
        ]

    out_a, in_a = sealed("eth_a", True), sealed("eth_a", False)
    out_b, in_b = sealed("eth_b", True), sealed("eth_b", False)
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    hops["B stack"] = []
    raw: list[list[float]] = []
    for seq, t1 in req_a.items():
        t8 = rep_a.get(seq)
        t4, t5 = req_b.get(seq), rep_b.get(seq)
        if t8 is None or t4 is None or t5 is None:
            continue
        t2 = first_after(out_a, t1)
        t3 = first_after(in_b, t1)
        t6 = first_after(out_b, t5)
        t7 = first_after(in_a, t5)
        if None in (t2, t3, t6, t7):
            continue
        assert t2 is not None and t3 is not None and t6 is not None and t7 is not None
        if not (t1 <= t2 <= t3 <= t4 <= t5 <= t6 <= t7 <= t8):
            continue
        for name, value in zip((*HOPS, "B stack"), (t2 - t1, t4 - t3, t6 - t5, t8 - t7, t5 - t4)):
            hops[name].append(value * 1000)
        raw.append([t1, t2, t3, t4, t5, t6, t7, t8])
    return rtts, hops, raw, lost


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--loaded", action="store_true", help="also ping under one TCP stream")
    parser.add_argument("--wireguard-go", action="append", metavar="PATH")
    parser.add_argument("--no-meshguard", action="store_true")
    parser.add_argument("--meshguard-tree", action="append", metavar="LABEL=PATH")
    parser.add_argument("--meshguard-cmd", default=tp.DEFAULT_MESHGUARD_CMD)
    parser.add_argument("--meshguard-timeout", type=float, default=15.0)
    parser.add_argument("--mtu", type=int, default=1420)
    parser.add_argument("--dump", metavar="FILE", help="write every matched ping's 8 times (JSON)")
    args = parser.parse_args(argv)
    try:
        require_root_netns(None, binaries=("ip", "wg", "iperf3", "ping", "ss"))
    except Exception as e:
        print(f"cannot build the testbed: {e}", file=sys.stderr)
        return 2
    wanted: list[tuple[str, Callable[[Testbed, argparse.Namespace], tp.Config]]] = []
    for binary in args.wireguard_go or []:
        wanted.append((binary, tp.bring_up_wireguard_go(binary)))
    if not args.no_meshguard:
        wanted.append(("meshguard", tp.bring_up_meshguard))
    for item in args.meshguard_tree or []:
        label, _, tree = item.partition("=")
        wanted.append((f"meshguard {label}", tp.bring_up_meshguard_tree(label, tree)))
    configs: list[tp.Config] = []
    testbeds: list[Testbed] = []
    results: dict[tuple[str, str], tuple[list[float], dict[str, list[float]]]] = {}
    raws: dict[str, list[list[float]]] = {}
    modes = ["idle", "loaded"] if args.loaded else ["idle"]
    try:
        for label, bring_up in wanted:
            tb = Testbed()
            testbeds.append(tb)
            try:
                configs.append(bring_up(tb, args))
            except (tp.UnavailableError, WaitTimeoutError) as e:
                print(f"== {label}: skipped: {e}")
        for rep in range(args.reps):
            # Every other round in reverse order, as in throughput.py: the order moves figures.
            for c in reversed(configs) if rep % 2 else configs:
                for mode in modes:
                    rtts, hops, times, lost = measure(c, args.pings, mode == "loaded")
                    raws.setdefault(f"{c.name} {mode}", []).extend(times)
                    old = results.setdefault((c.name, mode), ([], {}))
                    old[0].extend(rtts)
                    for k, v in hops.items():
                        old[1].setdefault(k, []).extend(v)
                    note = f", capture lost {lost} veth frames" if lost else ""
                    print(f"  {c.name} {mode}: load {os.getloadavg()[0]:.2f}{note}", flush=True)
    finally:
        for tb in testbeds:
            tb.cleanup()
    if args.dump:
        Path(args.dump).write_text(json.dumps(raws))
    print(f"\nmedians in ms (p90 in brackets), load average now {os.getloadavg()[0]:.2f}")
    columns = ("ping RTT", *HOPS, "B stack", "matched")
    print(f"{'':<34}" + "".join(f"{c:>16}" for c in columns))
    for (name, mode), (rtts, hops) in results.items():

        def cell(values: list[float]) -> str:
            if not values:
                return "-"
            values = sorted(values)
            p90 = values[int(len(values) * 0.9)]
            return f"{statistics.median(values):.3f} [{p90:.2f}]"

        cells = [cell(rtts)] + [cell(hops[h]) for h in (*HOPS, "B stack")]
        cells.append(f"{len(hops['A send'])}/{len(rtts)}")
        print(f"{name + ' ' + mode:<34}" + "".join(f"{x:>16}" for x in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
