"""CPU cost of the TUN read path per small packet, with checksum offload on.

With ``TUN_F_CSUM`` (which TSO needs) the kernel hands every small UDP or TCP packet over with
its checksum left to the node (``NEEDS_CSUM``). This measures ``TunDevice.doRead`` on such
packets with an in-memory system whose ``readv`` copies prepared frames into the node's buffer
(the kernel's copy, without the system call), and a receiver that only keeps the packet: the
node's own work per packet read, for any source tree, so trees can be compared side by side:

    python3 benchmarks/tun_read.py [--tree PATH] [--size 1000] [--batch 64]

Reports the best of ``--repeat`` rounds in CPU time (preemption on a shared machine does not
count) and checks one packet's checksum.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from typing import Any


def frame(size: int, index: int) -> bytes:
    """A virtio-net header with NEEDS_CSUM and an IPv4 UDP packet of ``size`` payload bytes
    whose checksum field holds the pseudo-header sum, as the kernel hands it over."""
    payload = bytes((index + i) & 0xFF for i in range(size))
    length = 28 + size
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, length, index & 0xFFFF, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2"
        )
    )
    pseudo = sum(struct.unpack("!4H", ip[12:20])) + 17 + (8 + size)
    while pseudo >> 16:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    udp = struct.pack("!HHHH", 4000, 5000, 8 + size, pseudo)
    return struct.pack("=BBHHHH", 1, 0, 0, 0, 20, 6) + bytes(ip) + udp + payload


class FakeSystem:
    """Enough of ``meshguard.adapters.tun``'s system interface for ``open`` and ``readv``."""

    O_RDWR = os.O_RDWR
    O_NONBLOCK = os.O_NONBLOCK
    O_CLOEXEC = os.O_CLOEXEC

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.left = 0

    def open(self, name: bytes, flags: int, mode: int = 0) -> int:
        return 99

    def ioctl(self, fd: int, request: int, arg: bytes | int) -> bytes:
        return arg if isinstance(arg, bytes) else b""

    def readv(self, fd: int, bufs: list[Any]) -> int:
        if not self.left:
            raise BlockingIOError
        self.left -= 1
        data = self.frames[self.left]
        bufs[0][: len(data)] = data
        return len(data)

    def writev(self, fd: int, bufs: list[Any]) -> int:
        return sum(len(b) for b in bufs)

    def read(self, fd: int, limit: int) -> bytes:
        raise BlockingIOError

    def write(self, fd: int, data: bytes) -> int:
        return len(data)

    def close(self, fd: int) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=os.path.join(os.path.dirname(__file__), ".."))
    parser.add_argument("--size", type=int, default=1000, help="UDP payload bytes")
    parser.add_argument("--batch", type=int, default=64, help="packets ready per doRead")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    from meshguard.adapters import tun

    frames = [frame(args.size, i) for i in range(args.batch)]
    system = FakeSystem(frames)
    last: list[bytes] = []
    device = tun.TunDevice(
        "bench0",
        lambda p, *now: last.append(p),  # older trees pass no time
        reactor=None,  # type: ignore[arg-type]
        system=system,
        offload=True,
    )
    device.open()
    assert device.vnet, "this tree does not open the device with a virtio-net header"
    best = float("inf")
    for _ in range(args.repeat):
        start = time.process_time()
        for _ in range(args.rounds):
            system.left = args.batch
            last.clear()
            device.doRead()
        best = min(best, time.process_time() - start)
    packet = last[-1]
    data = packet[12:20] + bytes([0, 17]) + packet[24:26] + packet[20:]
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF, "the packet handed on has a wrong UDP checksum"
    assert len(last) == args.batch
    per = best / (args.rounds * args.batch) * 1e6
    print(
        f"{args.tree}: {per:.2f} us per {args.size}-byte UDP packet read, batches of {args.batch}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
