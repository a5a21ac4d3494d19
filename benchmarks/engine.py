"""Per-packet cost of the protocol engine, and handshakes per second.

Measures the whole engine path, not just the cipher: ``Device.packet_from_tun`` (route, pad,
seal, header) and ``Device.datagram_received`` (index lookup, open, replay window, roaming,
timers, inner-source check), with an I/O stub that only keeps the last output.

    python3 benchmarks/engine.py [--packets 200000] [--size 1420]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from meshguard.core.crypto import TransportCipher, generate_private_key, public_key
from meshguard.core.device import Device
from tests.packets import ipv4


class Sink:
    def __init__(self) -> None:
        self.last: bytes = b""
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self.keep = True

    def send_datagram(self, data: bytes, endpoint: tuple[str, int]) -> None:
        self.last = data
        if self.keep:
            self.datagrams.append((data, endpoint))

    def write_packet(self, packet: bytes) -> None:
        self.last = packet


def pair() -> tuple[Device, Sink, Device, Sink]:
    sa, sb = Sink(), Sink()
    a, b = Device(sa, os.urandom), Device(sb, os.urandom)
    ka, kb = generate_private_key(os.urandom), generate_private_key(os.urandom)
    a.set_private_key(ka, 0.0)
    b.set_private_key(kb, 0.0)
    pa, pb = a.add_peer(public_key(kb)), b.add_peer(public_key(ka))
    assert pa is not None and pb is not None
    a.set_endpoint(pa, ("192.0.2.2", 51820))
    a.replace_allowed_ips(pa, [ipaddress.ip_network("10.0.0.2/32")])
    b.replace_allowed_ips(pb, [ipaddress.ip_network("10.0.0.1/32")])
    return a, sa, b, sb


def handshake(a: Device, sa: Sink, b: Device, sb: Sink, now: float) -> None:
    a.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", b"x"), now)
    init = sa.datagrams.pop()
    b.datagram_received(init[0], ("192.0.2.1", 51820), now)
    resp = sb.datagrams.pop()
    a.datagram_received(resp[0], ("192.0.2.2", 51820), now)
    for data, _ in sa.datagrams:
        b.datagram_received(data, ("192.0.2.1", 51820), now)
    sa.datagrams.clear()
    sb.datagrams.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1420)
    parser.add_argument("--handshakes", type=int, default=2000)
    args = parser.parse_args()

    now = 1_700_000_000.0
    a, sa, b, sb = pair()
    handshake(a, sa, b, sb, now)
    sa.keep = sb.keep = False
    packet = ipv4("10.0.0.1", "10.0.0.2", bytes(args.size - 20))

    n = args.packets
    start = time.perf_counter()
    for _ in range(n):
        a.packet_from_tun(packet, now)
    seal = (time.perf_counter() - start) / n * 1e6

    sealed: list[bytes] = []
    sa.send_datagram = lambda data, endpoint: sealed.append(data)  # type: ignore[method-assign]
    for _ in range(n):
        a.packet_from_tun(packet, now)
    source = ("192.0.2.1", 51820)
    start = time.perf_counter()
    for data in sealed:
        b.datagram_received(data, source, now)
    open_ = (time.perf_counter() - start) / n * 1e6

    cipher = TransportCipher(os.urandom(32))
    start = time.perf_counter()
    for i in range(n):
        cipher.seal(i, packet)
    bare = (time.perf_counter() - start) / n * 1e6

    a2, sa2, b2, sb2 = pair()
    peer = next(iter(a2.peers.values()))
    start = time.perf_counter()
    for i in range(args.handshakes):
        t = now + i * 6.0
        a2.send_initiation(peer, t, retry=False)
        init = sa2.datagrams.pop()
        b2.datagram_received(init[0], ("192.0.2.1", 51820), t)
        resp = sb2.datagrams.pop()
        a2.datagram_received(resp[0], ("192.0.2.2", 51820), t)
        for data, _ in sa2.datagrams:
            b2.datagram_received(data, ("192.0.2.1", 51820), t)
        sa2.datagrams.clear()
        sb2.datagrams.clear()
    rate = args.handshakes / (time.perf_counter() - start)

    tso, gro, per_packet_send, per_packet_receive, cut, join = offload_paths(now)

    print(f"packet size            {args.size} bytes, {n} packets")
    print(f"seal through engine    {seal:6.2f} us/packet  ({args.size * 8 / seal:7.0f} Mbit/s)")
    print(f"open through engine    {open_:6.2f} us/packet  ({args.size * 8 / open_:7.0f} Mbit/s)")
    print(f"bare AEAD seal         {bare:6.2f} us/packet")
    print(f"full handshakes        {rate:6.0f} /s (initiation + response + confirmation)")
    print("TUN offload paths, 45 segments of 1368 bytes of one TCP flow (CPU time, best of 7):")
    print(f"  send, per packet:    {per_packet_send:6.2f} us/segment (packet_from_tun each)")
    print(f"  send, TSO:           {tso:6.2f} us/segment (split + packets_from_tun)")
    print(f"  receive, per packet: {per_packet_receive:6.2f} us/segment (datagram_received each)")
    print(f"  receive, GRO:        {gro:6.2f} us/segment (transport_batch_received + coalesce)")
    print(f"  of which split:      {cut:6.2f} us/segment")
    print(f"  of which coalesce:   {join:6.2f} us/segment")


def offload_paths(now: float) -> tuple[float, float, float, float, float, float]:
    """Per segment: a TSO super-packet cut and sealed as a batch against the same segments
    sealed one by one; a UDP GRO read opened as a batch and coalesced against one by one."""
    from meshguard.adapters.udp import split_datagrams
    from meshguard.core.offload import CutArena, coalesce, split
    from tests.test_offload import super_frame

    a, sa, b, sb = pair()
    handshake(a, sa, b, sb, now)
    sa.keep = sb.keep = False
    options = b"\x01\x01\x08\x0a" + bytes(8)
    frame = bytearray(super_frame(True, True, bytes(1368 * 45), 1368, 0x10, options))
    # super_frame's addresses are 10.1.0.1 -> 10.1.0.2; the pair routes 10.0.0.2.
    frame[10 + 12 : 10 + 20] = bytes([10, 0, 0, 1, 10, 0, 0, 2])
    segments = split(bytes(frame))
    sealed: list[bytes] = []

    def send_datagrams(datagrams: list[bytes], endpoint: tuple[str, int]) -> None:
        sealed.extend(datagrams)

    sa.send_datagrams = send_datagrams  # type: ignore[attr-defined]
    written: list[bytes] = []
    sb.write_packet = written.append  # type: ignore[method-assign]

    def best(run: Callable[[], None], count: int) -> float:
        times = []
        for _ in range(7):
            # CPU time, not wall time: on a shared machine preemption would count otherwise.
            start = time.process_time()
            for _ in range(40):
                run()
            times.append((time.process_time() - start) / 40 / count * 1e6)
        return min(times)

    # As the adapters hand them over: the TUN device's segments are views of its arena's
    # arrays; the UDP port's GRO datagrams views of its reused receive buffer.
    arena = CutArena()
    whole = bytes(frame)

    def tso() -> None:
        sealed.clear()
        a.packets_from_tun(split(whole, arena), now)

    def one_by_one() -> None:
        for segment in segments:
            a.packet_from_tun(segment, now)

    source = ("192.0.2.1", 51820)
    tso_us = best(tso, len(segments))
    send_us = best(one_by_one, len(segments))
    batches: list[list[bytes]] = []
    for _ in range(7 * 40 * 2):
        sealed.clear()
        a.packets_from_tun(segments, now)
        batches.append(list(sealed))
    # Each measurement opens its own messages (a message opened twice is a replay).
    reads = iter([b"".join(batch) for batch in batches[: 7 * 40]])
    queue = iter(batches[7 * 40 :])
    size = len(batches[0][0])
    buffer = bytearray(65535)
    view = memoryview(buffer)

    def gro() -> None:
        data = next(reads)
        buffer[: len(data)] = data  # stands for the kernel's copy into the reused buffer
        written.clear()
        b.transport_batch_received(split_datagrams(view[: len(data)], size), source, now)
        coalesce(written)

    def receive_one_by_one() -> None:
        for data in next(queue):
            b.datagram_received(data, source, now)

    gro_us = best(gro, len(segments))
    receive_us = best(receive_one_by_one, len(segments))
    split_us = best(lambda: split(whole, arena), len(segments))
    opened = written[-len(segments) :]
    coalesce_us = best(lambda: coalesce(opened), len(segments))
    return tso_us, gro_us, send_us, receive_us, split_us, coalesce_us


if __name__ == "__main__":
    main()
