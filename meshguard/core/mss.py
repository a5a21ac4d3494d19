"""TCP MSS clamping: a SYN through the tunnel never asks for segments the path cannot carry.

Hosts choose their MSS from their own interface MTU, and a SYN's MSS option tells the other end
how large its segments may be. Rewriting it on SYNs in both directions makes TCP fit the peer's
path from the first segment, even where ICMP "too big" errors never reach the sender.

The device calls :func:`clamp_mss` only for TCP packets with the SYN flag set (it checks the
protocol and flag bytes inline), so the cost stays off ordinary data packets. The checksum is
updated incrementally (RFC 1624), so no payload is summed.
"""

from __future__ import annotations

from typing import Final

#: IPv4 header (no options) + TCP header (no options): MSS = MTU - 40 (RFC 879); IPv6: - 60.
OVERHEAD4: Final = 40
OVERHEAD6: Final = 60


def _fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def update_checksum(checksum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum after one 16-bit word changes from ``old`` to ``new``."""
    return ~_fold((~checksum & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


def _tcp_offset(packet: bytes) -> int:
    """Where the TCP header of a first fragment starts, or -1 (not TCP, a later fragment, or an
    IPv6 packet whose TCP header hides behind extension headers)."""
    version = packet[0] >> 4
    if version == 4:
        if packet[9] != 6 or (packet[6] & 0x1F) or packet[7]:
            return -1
        return (packet[0] & 15) * 4
    if version == 6 and packet[6] == 6:
        return 40
    return -1


def clamp_mss(packet: bytes, mtu: int) -> bytes:
    """``packet`` with its SYN's MSS option lowered to fit an inner ``mtu``, or unchanged.

    Anything that is not a well-formed TCP SYN with an MSS option larger than the limit comes
    back as the same object.
    """
    if len(packet) < 40:
        return packet
    tcp = _tcp_offset(packet)
    if tcp < 20 or len(packet) < tcp + 20 or not packet[tcp + 13] & 0x02:
        return packet
    limit = mtu - (OVERHEAD6 if packet[0] >> 4 == 6 else OVERHEAD4)
    if limit < 1:
        return packet
    end = tcp + (packet[tcp + 12] >> 4) * 4
    if end > len(packet):
        return packet
    i = tcp + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = packet[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == 2 and length == 4:
            old = (packet[i + 2] << 8) | packet[i + 3]
            if old <= limit:
                return packet
            out = bytearray(packet)
            out[i + 2] = limit >> 8
            out[i + 3] = limit & 0xFF
            checksum = (packet[tcp + 16] << 8) | packet[tcp + 17]
            if (i + 2 - tcp) % 2:
                # The value straddles two 16-bit words: sum its byte-swapped form instead.
                old = ((old & 0xFF) << 8) | (old >> 8)
                new = ((limit & 0xFF) << 8) | (limit >> 8)
            else:
                new = limit
            checksum = update_checksum(checksum, old, new)
            out[tcp + 16] = checksum >> 8
            out[tcp + 17] = checksum & 0xFF
            return bytes(out)
        i += length
    return packet


def clamp_if_syn(packet: bytes, mtu: int) -> bytes:
    """``clamp_mss`` for TCP SYNs only; every other packet is returned as it is.

    The data path calls this for every packet to a peer with a known path MTU, so the test is
    three byte reads and the SYN parsing happens only for SYNs.
    """
    first = packet[0]
    if first >> 4 == 4:
        flags_at = ((first & 15) << 2) + 13
        if packet[9] == 6 and len(packet) > flags_at and packet[flags_at] & 2:
            return clamp_mss(packet, mtu)
    elif len(packet) > 53 and packet[6] == 6 and packet[53] & 2:
        return clamp_mss(packet, mtu)
    return packet
