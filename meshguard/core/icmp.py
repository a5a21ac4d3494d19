"""ICMP "too big" errors and IPv4 fragmentation for packets larger than a peer's path carries.

When the path to a peer carries less than the interface MTU, the sender inside the tunnel must
hear so the way a router would tell it: ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6
"packet too big", written back into the TUN device. The kernel then lowers its path MTU for that
destination and TCP shrinks its segments. An IPv4 packet without DF may be fragmented by any
router, so we do that instead (:func:`fragment_ipv4`).

The error's source address is the original packet's destination: it is routed through the
tunnel, so reverse-path filtering accepts it, and the kernel only reads the quoted header.

Pure functions over bytes: they never raise on malformed input (they return ``None`` / ``[]``),
because the packets come from local applications we do not trust to be well formed.
"""

from __future__ import annotations

import struct
from typing import Final

#: IPv4 fragmentation needed (type 3, code 4) carries at most this much of the original, so the
#: whole error fits the IPv4 minimum reassembly size (RFC 1812 4.3.2.3).
ICMP4_MAX_ERROR: Final = 576
#: An ICMPv6 error must fit the IPv6 minimum MTU (RFC 4443 2.4 (c)).
ICMP6_MAX_ERROR: Final = 1280
#: Smallest MTU we report: IPv4's minimum (RFC 791) and IPv6's (RFC 8200).
MIN_MTU4: Final = 68
MIN_MTU6: Final = 1280

_ICMP4_ERRORS: Final = frozenset({3, 4, 5, 11, 12})


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``, folded, complemented."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(memoryview(data).cast("H"))
    # Summing native-order words and swapping once at the end equals the network-order sum.
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ((total & 0xFF) << 8) | (total >> 8) if _LITTLE else total
    return ~total & 0xFFFF


_LITTLE: Final = struct.pack("=H", 1) == b"\x01\x00"


def _unicast4(address: bytes) -> bool:
    first = address[0]
    return first != 0 and first < 224 and address != b"\xff\xff\xff\xff"


def is_dont_fragment(packet: bytes) -> bool:
    """Whether an IPv4 packet has DF set (callers have checked it is IPv4, >= 20 bytes)."""
    return bool(packet[6] & 0x40)


def frag_needed_v4(packet: bytes, mtu: int) -> bytes | None:
    """ICMP "fragmentation needed, DF set" with next-hop MTU ``mtu`` answering ``packet``.

    None when no error may be sent: malformed packet, a non-first fragment, an ICMP error (errors
    about errors cause storms, RFC 1122 3.2.2), or a source that is not a unicast host.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 15) * 4
    if ihl < 20 or len(packet) < ihl:
        return None
    if (packet[6] & 0x1F) or packet[7]:
        return None  # not the first fragment
    if packet[9] == 1 and len(packet) > ihl and packet[ihl] in _ICMP4_ERRORS:
        return None
    source, destination = packet[12:16], packet[16:20]
    if not _unicast4(source):
        return None
    quoted = packet[: ICMP4_MAX_ERROR - 28]
    mtu = max(MIN_MTU4, min(mtu, 0xFFFF))
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    tos = (packet[1] & 0x1E) | 0xC0  # internetwork control, as Linux sends its own errors
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, tos, 20 + len(icmp), 0, 0, 64, 1, 0, destination, source
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def packet_too_big_v6(packet: bytes, mtu: int) -> bytes | None:
    """ICMPv6 "packet too big" with ``mtu`` answering ``packet`` (None: must not answer).

    The reported MTU is never below 1280 (IPv6's minimum link MTU). ICMPv6 errors, unspecified
    or multicast sources are not answered.
    """
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return None
    source, destination = packet[8:24], packet[24:40]
    if source[0] == 0xFF or source == bytes(16):
        return None
    if packet[6] == 58 and len(packet) > 40 and packet[40] < 128:
        return None
    quoted = packet[: ICMP6_MAX_ERROR - 48]
    mtu = max(MIN_MTU6, min(mtu, 0xFFFFFFFF))
    body = struct.pack("!BBHI", 2, 0, 0, mtu) + quoted
    pseudo = destination + source + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + destination + source
    return header + body


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """Split an IPv4 packet (DF clear) into fragments of at most ``mtu`` bytes (RFC 791).

    Non-first fragments carry a plain 20-byte header (options are not copied). An already
    fragmented packet is fragmented further with the right offsets. ``[]`` for a packet that
    cannot be fragmented (malformed, DF set, or ``mtu`` too small for 8 data bytes).
    """
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[6] & 0x40:
        return []
    ihl = (packet[0] & 15) * 4
    total = (packet[2] << 8) | packet[3]
    if ihl < 20 or total < ihl or total > len(packet):
        return []
    flags_offset = (packet[6] << 8) | packet[7]
    more = flags_offset & 0x2000
    base = flags_offset & 0x1FFF
    payload = packet[ihl:total]
    fragments: list[bytes] = []
    position = 0
    header = packet[:ihl]
    while True:
        room = (mtu - len(header)) & ~7
        if room <= 0:
            return []
        chunk = payload[position : position + room]
        last = position + len(chunk) >= len(payload)
        offset_field = (base + position // 8) | (more if last else 0x2000)
        head = bytearray(header)
        struct.pack_into("!H", head, 2, len(head) + len(chunk))
        struct.pack_into("!H", head, 6, offset_field)
        struct.pack_into("!H", head, 10, 0)
        struct.pack_into("!H", head, 10, checksum(bytes(head)))
        fragments.append(bytes(head) + chunk)
        position += len(chunk)
        if last:
            return fragments
        if len(header) != 20:
            header = bytes([0x45]) + packet[1:20]


def echo_request(source: bytes, destination: bytes, ident: int, payload: bytes) -> bytes:
    """An ICMP (IPv4, 4-byte addresses) or ICMPv6 (16-byte) echo request with DF (IPv4).

    Path MTU probes toward stock WireGuard peers: the peer's host answers it with a reply of the
    same size, so an answer proves the size passed both ways.
    """
    if len(source) == 4:
        icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 0) + payload
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, source, destination
        )
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return header + icmp
    body = struct.pack("!BBHHH", 128, 0, 0, ident, 0) + payload
    pseudo = source + destination + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + source + destination + body


def echo_reply(packet: bytes) -> bytes | None:
    """The reply a host sends to an echo request (None: not an unfragmented echo request).

    Used by the in-memory network to answer pings the way an operating system does.
    """
    if len(packet) >= 28 and packet[0] == 0x45 and packet[9] == 1 and packet[20] == 8:
        if (packet[6] & 0x3F) or packet[7]:
            return None
        return _reply4(packet)
    if len(packet) >= 48 and packet[0] >> 4 == 6 and packet[6] == 58 and packet[40] == 128:
        source, destination = packet[24:40], packet[8:24]
        body = b"\x81\x00\x00\x00" + packet[44:]
        pseudo = source + destination + struct.pack("!I3xB", len(body), 58)
        body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
        return packet[:8] + source + destination + body
    return None


def _reply4(packet: bytes) -> bytes:
    icmp = b"\x00\x00\x00\x00" + packet[24:]
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = packet[:10] + b"\x00\x00" + packet[16:20] + packet[12:16]
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp
