"""CPU cost of writing opened UDP datagrams into a real TUN device: joined or one by one.

On receive the node holds what a UDP read batch writes to the TUN device and ``coalesce``
joins consecutive datagrams of one flow into one ``GSO_UDP_L4`` write where the device was
granted USO (docs/datapath.md). This measures, per datagram, the CPU time of the writing
thread (user and system: the kernel runs its receive path, IP, UDP and the socket queue, inside
the ``writev``) for a burst of equal-size datagrams written between ``hold()`` and ``flush()``
into a TUN device in a private network namespace, delivered to a UDP socket there, two ways:

- ``joined``: the device as the node opens it (TSO and USO granted on Linux 6.2+);
- ``single``: the device granted TSO only (what a kernel before 6.2 gets): one write each.

The socket is drained between rounds, outside the timed part, and every datagram is counted
and its payload checked. Best of ``--repeat`` rounds of ``--rounds`` bursts each, the two ways
alternately; CPU time, so preemption on a shared machine does not count. Needs root:

    python3 benchmarks/tun_write.py [--tree PATH] [--size 1000] [--burst 64] [--ipv6]
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any

CLONE_NEWNET = 0x40000000
PORT = 7011


def checksum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total or 0xFFFF


def datagram(v6: bool, src: bytes, dst: bytes, payload: bytes, ident: int) -> bytes:
    """One ordinary UDP datagram with every checksum right, as a peer sealed it."""
    length = 8 + len(payload)
    if v6:
        pseudo = src + dst + struct.pack("!I", length) + b"\0\0\0\x11"
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    udp = struct.pack("!HHHH", 4000, PORT, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp)) + udp[8:]
    if v6:
        return struct.pack("!IHBB16s16s", 0x60000000, length, 17, 64, src, dst) + udp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, ident, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def open_device(tun: Any, name: str, uso: bool, v6: bool, own: str) -> Any:
    """A TUN device in this namespace, up, with ``own`` as its address; TSO only unless
    ``uso``."""
    choices = tun.OFFLOAD_CHOICES
    if not uso:
        tun.OFFLOAD_CHOICES = tuple(c for c in choices if not c & tun.TUN_F_USO4)
    try:
        device = tun.TunDevice(name, lambda p, *now: None, None, offload=True)
        device.open()
    finally:
        tun.OFFLOAD_CHOICES = choices
    prefix = "64" if v6 else "24"
    extra = ["nodad"] if v6 else []
    subprocess.run(["ip", "link", "set", name, "up", "mtu", "1420"], check=True)
    subprocess.run(["ip", "addr", "add", f"{own}/{prefix}", "dev", name, *extra], check=True)
    return device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=os.path.join(os.path.dirname(__file__), ".."))
    parser.add_argument("--size", type=int, default=1000, help="UDP payload bytes")
    parser.add_argument("--burst", type=int, default=64, help="datagrams written per flush")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ipv6", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (a TUN device in a private network namespace)", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.abspath(args.tree))
    from meshguard.adapters import tun

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    v6 = args.ipv6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    ways: dict[str, tuple[Any, socket.socket, list[bytes]]] = {}
    for index, way in enumerate(("joined", "single")):
        if v6:
            own, peer = f"fd77:{index}::1", f"fd77:{index}::2"
        else:
            own, peer = f"10.77.{index}.1", f"10.77.{index}.2"
        device = open_device(tun, f"bench{index}", way == "joined", v6, own)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
        sock.bind((own, PORT))
        sock.setblocking(False)
        src, dst = ipaddress.ip_address(peer).packed, ipaddress.ip_address(own).packed
        burst = [
            datagram(v6, src, dst, bytes((i + j) & 0xFF for j in range(args.size)), i)
            for i in range(args.burst)
        ]
        ways[way] = (device, sock, burst)
    offloads = {way: ways[way][0].offload_status()["offloads"] for way in ways}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(args.repeat):
        for way, (device, sock, burst) in ways.items():
            spent = 0.0
            for _ in range(args.rounds):
                start = time.thread_time()
                device.hold()
                for packet in burst:
                    device.write(packet)
                device.flush()
                spent += time.thread_time() - start
                got = 0
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    if data != burst[got][-args.size :]:
                        raise SystemExit(f"{way}: datagram {got} arrived wrong")
                    got += 1
                if got != len(burst):
                    raise SystemExit(f"{way}: {got} of {len(burst)} datagrams arrived")
            best[way] = min(best[way], spent)
    count = args.rounds * args.burst
    for way, (device, _sock, _burst) in ways.items():
        status = device.offload_status()
        joined = status.get("gro_udp_packets", 0)
        print(
            f"{way:6} ({offloads[way]}): {best[way] / count * 1e6:.2f} us per {args.size}-byte"
            f" IPv{6 if v6 else 4} datagram written, bursts of {args.burst}; {joined} joined"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
