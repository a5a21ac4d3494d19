"""TUN segmentation and coalescing offloads (virtio-net header), with no I/O.

A TUN device opened with ``IFF_VNET_HDR`` and told ``TUNSETOFFLOAD`` hands us *super-packets*:
one read returns a 10-byte ``virtio_net_hdr`` and up to 64 KiB of one TCP flow (TSO) or one UDP
socket's send (USO), which we must cut into MTU-sized packets before sealing, because every
WireGuard datagram on the wire carries one ordinary IP packet (stock peers and path MTU discovery
never see a super-packet). The other way round, the opened segments of one TCP flow that arrive
in one UDP read batch are joined into one super-packet and written with one ``writev``: the
kernel then runs its TCP receive path once per 64 KiB instead of once per segment, which is the
larger share of the receiving side's CPU. Where the device was granted USO, consecutive UDP
datagrams of one flow are joined the same way into one ``GSO_UDP_L4`` write (the kernel cuts
it again before a socket that did not ask for ``UDP_GRO`` sees it). This module is the pure
part of both directions (bytes in, bytes out); ``meshguard.adapters.tun`` does the reads and
writes.

Checksums: the kernel sends super-packets and small packets with ``NEEDS_CSUM`` (only the
pseudo-header sum in the checksum field), so every segment we cut gets its full TCP/UDP checksum
and, for IPv4, a new header checksum, identification and length. A coalesced write goes out
with ``NEEDS_CSUM`` again (the kernel finishes the checksum). The segments joined that way are
not verified first: they authenticated under the session's AEAD, so they are exactly what the
peer sealed, and the kernel's own WireGuard marks every such packet ``CHECKSUM_UNNECESSARY``
for the same reason.

The one's complement sum is computed as ``int.from_bytes(data) % 0xFFFF``: every 16-bit word
is a base-65536 digit and 65536 is 1 modulo 65535, so the big integer is congruent to the sum of
its words: the fastest way found without a C extension for one packet (numpy has more fixed
cost, folding by shifts is slower; figures in docs/datapath.md).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final, overload

_np: Any
try:  # optional: sums all segments of a super-packet in one call
    import numpy as _np
except ImportError:  # pragma: no cover - the pure path is tested by forcing it
    _np = None

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "NEEDS_CSUM",
    "PLAIN_HEADER",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "CutArena",
    "OffloadError",
    "checksum",
    "coalesce",
    "finish_checksums",
    "split",
]

#: ``struct virtio_net_hdr`` without ``num_buffers``: flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset, in the host's byte order (the TUN device's default, legacy virtio).
VNET_HDR: Final = struct.Struct("=BBHHHH")
VNET_HDR_LEN: Final = VNET_HDR.size
#: ``VIRTIO_NET_HDR_F_NEEDS_CSUM``: the checksum at csum_start + csum_offset is only partial.
NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_UDP_L4: Final = 5
#: ``VIRTIO_NET_HDR_GSO_ECN``: never asked for (no ``TUN_F_TSO_ECN``), refused if seen.
GSO_ECN: Final = 0x80
#: The header of a write that is one ordinary packet.
PLAIN_HEADER: Final = bytes(VNET_HDR_LEN)

_TCP: Final = 6
_UDP: Final = 17
_FIN: Final = 0x01
_PSH: Final = 0x08
_ACK: Final = 0x10
#: Most payload bytes in one coalesced write: its IP packet must stay within 64 KiB.
_MAX_IP: Final = 65535
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_pack16 = _U16.pack_into
_pack32 = _U32.pack_into
_pack16le = struct.Struct("<H").pack_into
_from = int.from_bytes


class OffloadError(ValueError):
    """A frame read from the TUN device that cannot be cut up (counted and dropped)."""


def _sum(data: bytes | bytearray | memoryview) -> int:
    """The one's complement sum of ``data`` as a big integer congruent to it modulo 65535
    (an odd length is padded with a zero byte, as the checksum rules say)."""
    value = _from(data, "big")
    return value << 8 if len(data) & 1 else value


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (RFC 1071) plus ``initial``: the value to store.

    Never 0: a sum that is 0 modulo 65535 gives 0xFFFF, its equal in one's complement, which is
    also what UDP must send instead of 0.
    """
    return 0xFFFF - (initial + _sum(data)) % 0xFFFF


def _fold(value: int) -> int:
    """A sum folded to 16 bits, not inverted (what ``NEEDS_CSUM`` wants in the field)."""
    folded = value % 0xFFFF
    return folded if folded or not value else 0xFFFF


#: A packet the cut hands on: ``bytes``, or with ``views`` a view of the cut's array.
Segment = bytes | memoryview


class _Shape:
    """One segment shape's reused array: rows of ``stride`` bytes, read-only views of each
    row, the strided columns of the fields that differ, and row numbers 0, 1, 2, ..."""

    __slots__ = ("array", "ident", "ip_check", "l4_check", "rows", "seq", "steps")

    def __init__(
        self, rows: int, stride: int, seq_at: int, l4_check_at: int, views: bool = True
    ) -> None:
        np = _np
        self.array = array = np.empty((rows, stride), dtype=np.uint8)
        self.rows: list[Segment] = []
        if views:
            flat = memoryview(array).cast("B").toreadonly()
            self.rows = [flat[at : at + stride] for at in range(0, rows * stride, stride)]
        self.seq = np.ndarray((rows,), ">u4", array, seq_at, (stride,)) if seq_at >= 0 else None
        self.l4_check = np.ndarray((rows,), ">u2", array, l4_check_at, (stride,))
        self.ident = np.ndarray((rows,), ">u2", array, 4, (stride,))
        self.ip_check = np.ndarray((rows,), ">u2", array, 10, (stride,))
        self.steps = np.arange(rows, dtype=np.int64)


class CutArena:
    """Arrays :func:`split` cuts super-packets into and reuses, for a caller that is done
    with the segments before its next cut (the TUN device's batch receiver seals them and
    lets go): the segments are read-only views of them, **valid only until the next cut
    with the same arena**.

    Why: a fresh array per super-packet costs its allocation, the column and row views over
    it and a slice per segment, about 6 us of the cut's 26 for 44 segments (docs/datapath.md);
    reused, those are built once per segment shape (a flow's segment size and header length).
    Shapes are few; the arena keeps at most ``MAX_SHAPES`` (about 64 KiB each) and starts
    over when a new one would pass that.
    """

    MAX_SHAPES: Final = 8

    __slots__ = ("_shapes",)

    def __init__(self) -> None:
        self._shapes: dict[tuple[int, int, int, int], _Shape] = {}

    def shape(
        self, count: int, gso_size: int, stride: int, seq_at: int, l4_check_at: int
    ) -> _Shape | None:
        """The reused array for ``count`` rows of this shape, or None for more rows than a
        64 KiB packet holds (never from a TUN device; the caller allocates its own)."""
        key = (stride, gso_size, seq_at, l4_check_at)
        found = self._shapes.get(key)
        if found is None:
            rows = _MAX_IP // gso_size + 1
            if count > rows:
                return None
            if len(self._shapes) >= self.MAX_SHAPES:
                self._shapes.clear()
            found = self._shapes[key] = _Shape(rows, stride, seq_at, l4_check_at)
        elif count > len(found.rows):
            return None
        return found


@overload
def split(frame: bytes | bytearray | memoryview) -> list[bytes]: ...


@overload
def split(frame: bytes | bytearray | memoryview, views: bool | CutArena) -> list[Segment]: ...


def split(frame: bytes | bytearray | memoryview, views: bool | CutArena = False) -> list[Any]:
    """The IP packets of one TUN read (virtio-net header first), checksums completed.

    A frame without GSO gives one packet; a TSO/USO super-packet gives its segments, each of
    ``gso_size`` payload bytes but the last, with the headers a sender's stack would have
    written (IPv4 identification counting up, lengths, TCP sequence numbers, FIN and PSH only on
    the last segment, full checksums). Raises :class:`OffloadError` for a frame that does not
    hold what its header says.

    ``views``: the full segments of a long super-packet come as read-only views of one array
    (no copy each; the AEAD takes them as they are: 0.05-0.07 us of 2.5 a segment through cut
    and seal with OpenSSL's AVX2 code, docs/datapath.md), for a caller that only seals them
    (``packets_from_tun``), not for one that keeps, hashes or extends a packet. A
    :class:`CutArena` instead of True: views of the arena's reused arrays, valid only until
    the next cut with it.
    """
    view = memoryview(frame)
    if len(view) < VNET_HDR_LEN:
        raise OffloadError("frame shorter than its virtio-net header")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(view)
    packet = view[VNET_HDR_LEN:]
    if gso_type == GSO_NONE:
        if not flags & NEEDS_CSUM:
            return [bytes(packet)]
        at = csum_start + csum_offset
        if csum_start >= len(packet) or at + 2 > len(packet):
            raise OffloadError("checksum offset outside the packet")
        # The field holds the pseudo-header sum; summing the packet with it in place gives the
        # whole sum, and the result goes where it was (one copy of the packet).
        value = _sum(packet[csum_start:]) if not (at - csum_start) & 1 else None
        if value is None:
            raise OffloadError("checksum field at an odd offset")
        return [b"".join((packet[:at], _U16.pack(0xFFFF - value % 0xFFFF), packet[at + 2 :]))]
    if gso_type == GSO_TCPV4 or gso_type == GSO_TCPV6:
        return _segments(packet, gso_type == GSO_TCPV4, True, gso_size, csum_start, views)
    if gso_type == GSO_UDP_L4:
        if not len(packet):
            raise OffloadError("empty UDP super-packet")
        return _segments(packet, packet[0] >> 4 == 4, False, gso_size, csum_start, views)
    raise OffloadError(f"GSO type {gso_type:#x} not asked for")


def _segments(
    packet: memoryview,
    v4: bool,
    tcp: bool,
    gso_size: int,
    iphl: int,
    views: bool | CutArena = False,
) -> list[Segment]:
    """Cut one super-packet whose transport header starts at ``iphl`` (the kernel's
    csum_start) into segments of ``gso_size`` payload bytes.

    The headers' constant parts are summed once; per segment only the changed fields are added
    to those sums. A long frame's full segments are cut by :func:`_cut_vectorised` in a fixed
    number of numpy calls; the rest (a short frame, an odd segment size, the last segment) are
    each one ``struct.pack`` of header pieces plus its payload.
    """
    total = len(packet)
    if gso_size <= 0:
        raise OffloadError("GSO frame with segment size 0")
    version = 4 if v4 else 6
    if total < (20 if v4 else 40) or packet[0] >> 4 != version:
        raise OffloadError("GSO frame does not hold the IP version its type says")
    if iphl < (20 if v4 else 40) or iphl + (20 if tcp else 8) > total:
        raise OffloadError("GSO frame's transport header is outside the packet")
    if v4 and iphl != (packet[0] & 15) * 4:
        raise OffloadError("GSO frame's checksum start is not the IPv4 header's end")
    if (packet[9] if v4 else packet[6]) != (_TCP if tcp else _UDP) and (v4 or iphl == 40):
        raise OffloadError("GSO frame's protocol does not match its type")
    l4hl = (packet[iphl + 12] >> 4) * 4 if tcp else 8
    if l4hl < (20 if tcp else 8):
        raise OffloadError("TCP data offset below 20 bytes")
    hl = iphl + l4hl
    if hl > total:
        raise OffloadError("GSO frame's transport header is longer than the packet")
    header = bytes(packet[:hl])
    # The IP header without its length, identification and checksum fields.
    if v4:
        ip_a, ip_b, ip_c = header[0:2], header[6:10], header[12:iphl]
        ip_sum = _sum(ip_a) + _sum(ip_b) + _sum(ip_c)
        first_id = _from(header[4:6], "big")
        pseudo = _sum(header[12:20])
        ip_format = f"2sHH4sH{iphl - 12}s"
    else:
        ip_a, ip_c = header[0:4], header[6:iphl]
        pseudo = _sum(header[8:40])
        ip_format = f"4sH{iphl - 6}s"
    ports = header[iphl : iphl + 4]
    if tcp:
        # Ports, acknowledgement and data offset, window, urgent pointer and options: the TCP
        # header without sequence number, flags and checksum.
        ack_offset = header[iphl + 8 : iphl + 13]
        window = header[iphl + 14 : iphl + 16]
        rest = header[iphl + 18 : hl]
        l4_sum = pseudo + _TCP + _sum(ports) + _sum(ack_offset) + _sum(window) + _sum(rest)
        first_seq = _from(header[iphl + 4 : iphl + 8], "big")
        flags = header[iphl + 13]
        l4_format = f"4sI5sB2sH{l4hl - 18}s"
    else:
        l4_sum = pseudo + _UDP + _sum(ports)
        l4_format = "4sHH"
    payload_bytes = total - hl
    count = max(1, -(-payload_bytes // gso_size))
    pack = struct.pack
    fmt = f"!{ip_format}{l4_format}"
    out: list[Segment] = []
    first = 0
    if _np is not None and count > _NUMPY_MIN_SEGMENTS and not gso_size & 1:
        # All but the last segment at once (same size, same flags); the last, which may be
        # shorter and carries FIN/PSH, goes through the loop below.
        first = count - 1
        size = gso_size
        if tcp:
            l4_const = l4_sum + l4hl + size + (flags & ~(_FIN | _PSH))
            shared: tuple[object, ...] = (
                ports,
                0,
                ack_offset,
                flags & ~(_FIN | _PSH),
                window,
                0,
                rest,
            )
        else:
            l4_const = l4_sum + 2 * (l4hl + size)
            shared = (ports, l4hl + size, 0)
        if v4:
            template = pack(fmt, ip_a, hl + size, 0, ip_b, 0, ip_c, *shared)
            ip_const = ip_sum + hl + size
        else:
            template = pack(fmt, ip_a, hl - 40 + size, ip_c, *shared)
            ip_const = first_id = 0
        out = _cut_vectorised(
            packet,
            template,
            first,
            gso_size,
            v4,
            ip_const % 0xFFFF,
            first_id,
            iphl + (16 if tcp else 6),
            l4_const % 0xFFFF,
            iphl + 4 if tcp else -1,
            first_seq if tcp else 0,
            views,
        )
    sums = _payload_sums(packet, hl + first * gso_size, gso_size, count - first)
    start = hl + first * gso_size
    for index in range(first, count):
        end = min(start + gso_size, total)
        size = end - start
        last = end == total
        l4len = l4hl + size
        payload = packet[start:end]
        if tcp:
            seq = (first_seq + index * gso_size) & 0xFFFFFFFF
            seg_flags = flags if last else flags & ~(_FIN | _PSH)
            value = l4_sum + l4len + (seq >> 16) + (seq & 0xFFFF) + seg_flags + sums[index - first]
            l4_fields: tuple[object, ...] = (
                ports,
                seq,
                ack_offset,
                seg_flags,
                window,
                0xFFFF - value % 0xFFFF,
                rest,
            )
        else:
            value = l4_sum + l4len + l4len + sums[index - first]
            l4_fields = (ports, l4len, 0xFFFF - value % 0xFFFF)
        if v4:
            ident = (first_id + index) & 0xFFFF
            length = hl + size
            ip_check = 0xFFFF - (ip_sum + length + ident) % 0xFFFF
            out.append(pack(fmt, ip_a, length, ident, ip_b, ip_check, ip_c, *l4_fields) + payload)
        else:
            out.append(pack(fmt, ip_a, hl - 40 + size, ip_c, *l4_fields) + payload)
        start = end
    return out


#: Up to this many segments are cut one by one: about 20 numpy calls of about a microsecond
#: each are the vectorised cut's fixed cost; the two break even at 16-24 segments of 1,368
#: bytes (docs/datapath.md), and a bulk TCP flow's frames hold about 44.
_NUMPY_MIN_SEGMENTS: Final = 16


def _cut_vectorised(
    packet: memoryview,
    template: bytes,
    count: int,
    gso_size: int,
    v4: bool,
    ip_const: int,
    first_id: int,
    l4_check_at: int,
    l4_const: int,
    seq_at: int,
    first_seq: int,
    views: bool | CutArena = False,
) -> list[Segment]:
    """The first ``count`` full segments of a super-packet in a few numpy calls.

    Every segment is ``template`` (the headers with what all of them share, checksums and
    the per-segment fields zero) followed by its payload; the payloads are copied in one
    call, and the fields that differ (IPv4 identification and header checksum, TCP sequence
    number, the transport checksum) are written as strided columns of the output, so the
    per-segment Python cost is one slice. The sums are those of :func:`_segments`' loop, in
    the same modular arithmetic: a 32-bit sequence number is congruent modulo 65535 to the
    sum of its two 16-bit halves, so it is added whole. ``seq_at`` is -1 for UDP.
    """
    np = _np
    hl = len(template)
    stride = hl + gso_size
    body = np.frombuffer(packet, dtype=np.uint8, count=count * gso_size, offset=hl)
    if type(views) is CutArena:
        reused = views.shape(count, gso_size, stride, seq_at, l4_check_at)
        if reused is not None:
            _cut_into(
                reused, body, template, count, gso_size, v4, ip_const, first_id, l4_const, first_seq
            )
            return reused.rows[:count]
    # A fresh array, for this cut only.
    shape = _Shape(count, stride, seq_at, l4_check_at, views is not False)
    _cut_into(shape, body, template, count, gso_size, v4, ip_const, first_id, l4_const, first_seq)
    if views is not False:
        return shape.rows
    data = shape.array.tobytes()
    return [data[at : at + stride] for at in range(0, count * stride, stride)]


def _cut_into(
    shape: _Shape,
    body: Any,
    template: bytes,
    count: int,
    gso_size: int,
    v4: bool,
    ip_const: int,
    first_id: int,
    l4_const: int,
    first_seq: int,
) -> None:
    """Write the first ``count`` rows of ``shape``'s array: :func:`_cut_vectorised`'s
    arithmetic. The payload sums are reduced modulo 65535 once, at the end (a row's sum, times
    256, plus a sequence number and the constants stays far below 2**63)."""
    np = _np
    hl = len(template)
    out = shape.array[:count]
    out[:, :hl] = np.frombuffer(template, dtype=np.uint8)
    out[:, hl:] = body.reshape(count, gso_size)
    # Little-endian words into 32 bits (no overflow below 64 Ki words a row) is the cheapest
    # sum numpy has here (a third of big-endian into 64 bits). Read the other way round, a
    # sum is byte-swapped, and a swap is a multiplication by 256 modulo 65535.
    words = body.view("<u2").reshape(count, gso_size // 2)
    l4 = words.sum(axis=1, dtype=np.uint32).astype(np.int64)
    l4 <<= 8
    l4 += l4_const
    steps = shape.steps[:count]
    if shape.seq is not None:
        seq = steps * gso_size
        seq += first_seq
        if first_seq + count * gso_size > 0xFFFFFFFF:
            seq &= 0xFFFFFFFF  # the sequence number wraps inside this frame
        shape.seq[:count] = seq
        l4 += seq
    l4 %= 0xFFFF
    np.subtract(0xFFFF, l4, out=l4)
    shape.l4_check[:count] = l4
    if v4:
        ident = steps + first_id
        if first_id + count > 0xFFFF:
            ident &= 0xFFFF  # the identification wraps inside this frame
        shape.ident[:count] = ident
        ident += ip_const
        ident %= 0xFFFF
        np.subtract(0xFFFF, ident, out=ident)
        shape.ip_check[:count] = ident


def _payload_sums(packet: memoryview, hl: int, gso_size: int, count: int) -> list[int]:
    """Each segment's payload sum (congruent modulo 65535). With numpy and an even segment
    size, the full segments are summed in one vectorised call (several times cheaper per
    segment than ``int.from_bytes`` and ``%``, docs/datapath.md); the rest one by one."""
    total = len(packet)
    full = (total - hl) // gso_size
    sums: list[int] = []
    if _np is not None and full > 1 and not gso_size & 1:
        words = _np.frombuffer(packet, dtype=">u2", count=full * gso_size // 2, offset=hl)
        sums = words.reshape(full, gso_size // 2).sum(axis=1, dtype=_np.uint64).tolist()
    start = hl + len(sums) * gso_size
    while len(sums) < count:
        end = min(start + gso_size, total)
        sums.append(_sum(packet[start:end]))
        start = end
    return sums


#: Below this many bytes (plus ``_NUMPY_PER_PACKET`` a packet) to sum, a numpy call's fixed
#: cost (about 6 us) is more than ``int.from_bytes`` for each packet (0.4 us + 1.8 us a KB).
_NUMPY_MIN_BYTES: Final = 3600
_NUMPY_PER_PACKET: Final = 150


def finish_checksums(
    buffer: bytearray | memoryview,
    starts: list[int],
    ends: list[int],
    fields: list[int],
    vectorised: bool = True,
) -> None:
    """Complete the partial (``NEEDS_CSUM``) checksums of many small packets read into one
    buffer: packet ``i``'s sum runs from ``starts[i]`` (the kernel's csum_start) to
    ``ends[i]`` (the packet's end) and its result goes in the 16-bit field at ``fields[i]``,
    which holds the pseudo-header sum, as :func:`split` does for one.

    Why: with ``TUN_F_CSUM`` on (TSO needs it) the kernel hands over every small UDP and TCP
    packet with its checksum left to us, and one ``int.from_bytes`` sum per packet costs more
    than the rest of the send path's Python besides the AEAD. A TUN read batch is summed in one
    numpy call (``add.reduceat`` over the buffer read as 16-bit words), a fraction of that per
    packet (docs/datapath.md); small batches, where numpy's fixed cost would dominate, are
    summed one by one.

    The caller guarantees (``TunDevice`` checks it per read): every start and field even (the
    buffer is read as aligned words), ``starts[i] <= fields[i]``, ``fields[i] + 2 <= ends[i]``,
    ``ends`` increasing with each region after the previous one's end rounded up to even, and
    ``ends[-1] < len(buffer)``: the byte after an odd-length packet is zeroed here, as the
    checksum rules pad it. ``buffer`` may be a writable memoryview of bytes;
    ``vectorised=False`` sums one by one whatever the size.
    """
    count = len(starts)
    if not count:
        return
    total = sum(ends) - sum(starts)
    if not vectorised or _np is None or total + _NUMPY_PER_PACKET * count < _NUMPY_MIN_BYTES:
        # Little-endian words, as below: ``from_bytes`` is faster that way round (1.8 against
        # 2.1 us for 1,000 bytes), and an odd last byte is already its word's low half.
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        pack = _pack16le
        for start, end, field in zip(starts, ends, fields):
            pack(view, field, 0xFFFF - _from(view[start:end], "little") % 0xFFFF)
        return
    for end in ends:
        if end & 1:
            buffer[end] = 0
    # Little-endian words: the one's complement sum does not depend on the byte order
    # (RFC 1071), so the native sum stored natively is the same two bytes.
    words = _np.frombuffer(buffer, dtype="<u2", count=(ends[-1] + 1) >> 1)
    bounds = _np.empty(2 * count - 1, dtype=_np.intp)
    bounds[0::2] = starts
    bounds[1::2] = ends[:-1]
    bounds += 1
    bounds >>= 1
    # Sums of [start, end) and of the gaps between packets; the last region runs to the end
    # of ``words``, which stops at the last packet's end.
    sums = _np.add.reduceat(words, bounds, dtype=_np.uint64)[0::2]
    words[_np.array(fields, dtype=_np.intp) >> 1] = (0xFFFF - sums % 0xFFFF).astype(_np.uint16)


#: The first 40 bytes of an IPv4 TCP packet without IP options, in the fields coalescing
#: reads: version/IHL, TOS, total length, flags/fragment (2 bytes), TTL, protocol, addresses
#: and ports, sequence number, acknowledgement and data offset, TCP flags, window, urgent.
_V4_TCP: Final = struct.Struct("!BBHxxBBBBxx12sI5sBH2x2s")
#: The same for IPv6 without extension headers (60 bytes): version/class/label, payload
#: length, next header, hop limit, addresses and ports, then the TCP fields as above.
_V6_TCP: Final = struct.Struct("!4sHBB36sI5sBH2x2s")
#: The first 26 bytes of an IPv4 UDP datagram without IP options: TOS, total length,
#: flags/fragment, TTL, protocol, addresses and ports, UDP length.
_V4_UDP: Final = struct.Struct("!xBH2xHBB2x12sH")
#: The same for IPv6 (46 bytes): version/class/label, payload length, next header, hop
#: limit, addresses and ports, UDP length.
_V6_UDP: Final = struct.Struct("!4sHBB36sH")
#: Most datagrams in one ``GSO_UDP_L4`` write: the kernel refuses a frame of more than
#: ``UDP_MAX_SEGMENTS`` segments (64 on the kernels we know of; newer ones may allow more).
_UDP_MAX_SEGMENTS: Final = 64
#: Fewer datagrams than this are written one by one: a joined write costs about 7 us more
#: than a single one (the kernel's GSO path) and saves about 1.5 us a datagram, so runs of
#: four or five break even at best (benchmarks/tun_write.py, docs/datapath.md).
_UDP_MIN_JOIN: Final = 6


class _Run:
    """Segments of one TCP flow being joined: the write's buffers and what the next must be."""

    __slots__ = ("bufs", "gso", "hl", "iphl", "last_flags", "length", "next_seq", "shape", "v4")

    def __init__(
        self,
        bufs: list[bytes | memoryview],
        iphl: int,
        hl: int,
        gso: int,
        seq: int,
        v4: bool,
        shape: tuple[object, ...],
    ) -> None:
        self.bufs = bufs
        self.iphl = iphl
        self.hl = hl
        self.gso = gso
        self.length = gso
        self.next_seq = (seq + gso) & 0xFFFFFFFF
        self.last_flags = 0
        self.v4 = v4
        self.shape = shape

    def takes(self, seq: int, size: int, hl: int, extra: int, shape: tuple[object, ...]) -> bool:
        """Whether a segment of the run's flow joins it: next in sequence, no larger than its
        segments, the same header length and shape, and the IP packet still within 64 KiB
        (``extra``: the header bytes its length counts, all of them for IPv4, the TCP header
        for IPv6)."""
        return (
            seq == self.next_seq
            and size <= self.gso
            and hl == self.hl
            and self.length + size + extra <= _MAX_IP
            and shape == self.shape
        )


class _UdpRun:
    """Datagrams of one UDP flow being joined: the write (its buffers are filled in at the
    end), the datagrams and what the next must match."""

    __slots__ = ("bufs", "gso", "iphl", "length", "packets", "shape", "v4")

    def __init__(
        self,
        bufs: list[bytes | memoryview],
        packet: bytes,
        iphl: int,
        gso: int,
        v4: bool,
        shape: object,
    ) -> None:
        self.bufs = bufs
        self.packets = [packet]
        self.iphl = iphl
        self.gso = gso
        self.length = gso
        self.v4 = v4
        self.shape = shape


def coalesce(
    packets: Sequence[bytes], udp4: bool = False, udp6: bool = False, vectorised: bool = True
) -> list[list[bytes | memoryview]]:
    """Group ``packets`` into writes: each a list of buffers for one ``writev``, starting
    with a virtio-net header.

    Consecutive TCP segments of one flow (same addresses, ports, acknowledgement, window,
    options and IP fields; in-sequence; all but the last of one size, the last not larger;
    only ACK set, PSH allowed on the last) become one write of a GSO super-packet; every other
    packet is written as it is, in order. Packets of one flow never change order; packets of
    different flows may (as the kernel's GRO does).

    With ``udp4``/``udp6`` (the device was granted ``TUN_F_USO4``/``TUN_F_USO6``; a kernel
    without them refuses ``GSO_UDP_L4`` writes) consecutive UDP datagrams of one flow (same
    addresses and ports; same TOS, DF and TTL, or traffic class, flow label and hop limit; not
    fragments; all but the last of one payload size, the last not larger; at most
    ``_UDP_MAX_SEGMENTS``) are joined the same way, runs of at least ``_UDP_MIN_JOIN``. A
    datagram that cannot join ends its flow's run, so nothing overtakes it.

    Each packet's header is read with one ``struct`` call: this runs once per received packet.
    In a bulk batch, each run of at least ``_NUMPY_MIN_JOIN`` packets of one length (a
    sender's bursts of full segments) is cut into groups that the loop would join in a few
    numpy calls instead (:func:`_uniform_groups`, :func:`_block`), with the same result;
    ``vectorised=False`` takes every packet one by one.
    """
    writes: list[list[bytes | memoryview]] = []
    runs: dict[bytes, _Run] = {}
    joined: list[_Run] = []
    uruns: dict[bytes, _UdpRun] = {}
    ujoined: list[_UdpRun] = []
    count = len(packets)
    if vectorised and _np is not None and count >= _NUMPY_MIN_JOIN:
        # Runs of equal length (a bulk batch: the full segments of each sender's burst, each
        # ended by its shorter last one, or running on into the next burst) are cut into
        # groups at once; each group is built at once where the loop would join it, and the
        # loop takes the rest, in order, on the same state.
        lengths = list(map(len, packets))
        state = (writes, runs, joined, uruns, ujoined)
        done = start = 0
        while start < count:
            length = lengths[start]
            end = start + 1
            while end < count and lengths[end] == length:
                end += 1
            if end - start >= _NUMPY_MIN_JOIN:
                found = _uniform_groups(packets[start:end], length)
                if found is not None:
                    view, bounds, v4, hl = found
                    for g in range(len(bounds) - 1):
                        a, b = start + bounds[g], start + bounds[g + 1]
                        if b - a < 2:
                            continue
                        if done < a:
                            _coalesce_loop(packets[done:a], *state, udp4, udp6)
                            done = a
                        offset = bounds[g] * length
                        if _block(packets, a, b, v4, hl, view, offset, writes, runs, joined):
                            done = b
            start = end
        if done:
            packets = packets[done:]
    _coalesce_loop(packets, writes, runs, joined, uruns, ujoined, udp4, udp6)
    for run in joined:
        _finish(run)
    short: dict[int, list[bytes]] = {}
    for urun in ujoined:
        if len(urun.packets) >= _UDP_MIN_JOIN:
            _finish_udp(urun)
        else:
            short[id(urun.bufs)] = urun.packets
    if short:
        # Too few to be worth a GSO write: each datagram alone, where the run stood.
        expanded: list[list[bytes | memoryview]] = []
        for bufs in writes:
            alone = short.get(id(bufs))
            if alone is None:
                expanded.append(bufs)
            else:
                for one in alone:
                    expanded.append([PLAIN_HEADER, one])
        writes = expanded
    for bufs in writes:
        if len(bufs) == 3:
            del bufs[2]  # a run of one: the packet alone
    return writes


def _coalesce_loop(
    packets: Sequence[bytes],
    writes: list[list[bytes | memoryview]],
    runs: dict[bytes, _Run],
    joined: list[_Run],
    uruns: dict[bytes, _UdpRun],
    ujoined: list[_UdpRun],
    udp4: bool,
    udp6: bool,
) -> None:
    """:func:`coalesce`'s packets one by one, on the state it keeps across calls."""
    unpack4 = _V4_TCP.unpack_from
    unpack6 = _V6_TCP.unpack_from
    unpack4u = _V4_UDP.unpack_from
    unpack6u = _V6_UDP.unpack_from
    bufs: list[bytes | memoryview]
    for packet in packets:
        n = len(packet)
        first = packet[0] if n else 0
        if (udp4 and first == 0x45 and n >= 28 and packet[9] == _UDP) or (
            udp6 and first >> 4 == 6 and n >= 48 and packet[6] == _UDP
        ):
            if first == 0x45:
                tos, total, frag, ttl, _p, key, ulen = unpack4u(packet)
                ok = total == n and not frag & 0x3FFF and ulen == n - 20
                iphl = 20
                ushape: object = (tos, frag, ttl)
            else:
                vcl, plen, _p, hop, key, ulen = unpack6u(packet)
                ok = plen + 40 == n and ulen == plen
                iphl = 40
                ushape = (vcl, hop)
            size = n - iphl - 8
            if not ok or size <= 0:
                uruns.pop(key, None)
                writes.append([PLAIN_HEADER, packet])
                continue
            urun = uruns.get(key)
            if (
                urun is not None
                and size <= urun.gso
                and len(urun.packets) < _UDP_MAX_SEGMENTS
                and urun.length + size + iphl + 8 <= _MAX_IP
                and ushape == urun.shape
            ):
                joining = urun.packets
                if len(joining) == 1:
                    ujoined.append(urun)
                joining.append(packet)
                urun.length += size
                if size < urun.gso:
                    del uruns[key]
                continue
            bufs = [PLAIN_HEADER, packet]
            writes.append(bufs)
            uruns[key] = _UdpRun(bufs, packet, iphl, size, iphl == 20, ushape)
            continue
        if first == 0x45 and n >= 40:
            _vi, tos, total, frag, frag_low, ttl, proto, key, seq, ack, flags, window, urg = (
                unpack4(packet)
            )
            if proto != _TCP or total != n or frag & 0x3F or frag_low:
                writes.append([PLAIN_HEADER, packet])
                continue
            iphl = 20
            v4 = True
            hl = 20 + (ack[4] >> 4) * 4
            shape: tuple[object, ...] = (tos, frag, ttl, window, urg, packet[40:hl])
        elif first >> 4 == 6 and n >= 60:
            vcl, length, proto, hop, key, seq, ack, flags, window, urg = unpack6(packet)
            if proto != _TCP or length + 40 != n:
                writes.append([PLAIN_HEADER, packet])
                continue
            iphl = 40
            v4 = False
            hl = 40 + (ack[4] >> 4) * 4
            shape = (vcl, hop, window, urg, packet[60:hl])
        else:
            writes.append([PLAIN_HEADER, packet])
            continue
        key += ack
        size = n - hl
        if size <= 0 or (flags != _ACK and flags != _ACK | _PSH) or hl < iphl + 20:
            # Not joinable; it also ends its flow's run so that nothing overtakes it.
            runs.pop(key, None)
            writes.append([PLAIN_HEADER, packet])
            continue
        run = runs.get(key)
        if run is not None and run.takes(seq, size, hl, hl if v4 else hl - 40, shape):
            bufs = run.bufs
            if len(bufs) == 3:
                joined.append(run)
            bufs.append(memoryview(packet)[hl:])
            run.length += size
            run.next_seq = (seq + size) & 0xFFFFFFFF
            run.last_flags = flags
            if size < run.gso or flags & _PSH:
                del runs[key]
            continue
        bufs = [PLAIN_HEADER, packet, memoryview(packet)[hl:]]
        writes.append(bufs)
        if flags & _PSH:
            runs.pop(key, None)
        else:
            runs[key] = _Run(bufs, iphl, hl, size, seq, v4, shape)


#: From this many packets in a batch the vectorised check is tried: its fixed cost (about 15
#: numpy calls and a join of the batch) against about 1.1 us a packet for the loop.
_NUMPY_MIN_JOIN: Final = 16
#: The header bytes every segment of one run shares with the first (IPv4, IPv6), past which
#: the options run to the header's end: everything but the lengths (IPv6's payload length is
#: shared, every packet here being as long), identification, checksums and sequence number.
_SHARED_V4: Final = ((0, 4), (6, 10), (12, 24), (28, 36))
_SHARED_V6: Final = ((0, 44), (48, 56))
_shared_columns: dict[tuple[bool, int], Any] = {}


def _columns(v4: bool, hl: int) -> Any:
    """The shared byte columns of a header of ``hl`` bytes, as a numpy index (cached)."""
    columns = _shared_columns.get((v4, hl))
    if columns is None:
        np = _np
        spans = [*(_SHARED_V4 if v4 else _SHARED_V6), (38 if v4 else 58, hl)]
        columns = np.concatenate([np.arange(a, b) for a, b in spans if b > a])
        _shared_columns[(v4, hl)] = columns
    return columns


def _uniform_groups(
    packets: Sequence[bytes], length: int
) -> tuple[memoryview, list[int], bool, int] | None:
    """Cut packets of one ``length`` into groups in a few numpy calls: the joined packets,
    the groups' bounds (0, where each next group starts, the count), and the first packet's
    IP version (``v4``) and header length.

    Within a group each packet continues the one before: the same bytes in every header
    column the loop compares for a segment shaped like the first packet (addresses, ports,
    acknowledgement, flags, window, options, IP fields) and the sequence number one payload
    further. A new group starts wherever that fails: the next burst of the flow (its own
    timestamp option), another flow, a gap, a packet with other flags. None when the first
    packet is no TCP segment of that length (the loop takes them all).
    """
    first = packets[0]
    lead = first[0]
    if lead == 0x45 and length >= 40 and first[9] == _TCP:
        v4 = True
        hl = 20 + (first[32] >> 4) * 4
        seq_at = 24
    elif lead >> 4 == 6 and length >= 60 and first[6] == _TCP:
        v4 = False
        hl = 40 + (first[52] >> 4) * 4
        seq_at = 44
    else:
        return None
    size = length - hl
    if size <= 0:
        return None
    np = _np
    taken = len(packets)
    block = b"".join(packets)
    rows = np.frombuffer(block, dtype=np.uint8, count=taken * length).reshape(taken, length)
    shared = rows[:, _columns(v4, hl)]
    follows = (shared[1:] == shared[:-1]).all(axis=1)
    seqs = np.ndarray((taken,), ">u4", block, seq_at, (length,)).astype(np.int64)
    steps = seqs[1:] - seqs[:-1]
    steps &= 0xFFFFFFFF
    follows &= steps == size
    bounds = [0, *(np.flatnonzero(~follows) + 1).tolist(), taken]
    return memoryview(block), bounds, v4, hl


def _block(
    packets: Sequence[bytes],
    a: int,
    b: int,
    v4_first: bool,
    hl_first: int,
    view: memoryview,
    offset: int,
    writes: list[list[bytes | memoryview]],
    runs: dict[bytes, _Run],
    joined: list[_Run],
) -> bool:
    """Join one group of :func:`_uniform_groups` (``packets[a:b]``, at ``offset`` in the
    joined ``view``) as the loop would, if the loop would join it all; whether it did.

    Taken when its first packet is a segment shaped like the first of the equal-length run
    (so the group's columns were compared in full) with flags ACK alone: then the loop would
    fill its flow's open run where the first packet continues it, and join the rest into
    runs of as many as fit in 64 KiB. That is what is built here, leaving ``writes``,
    ``runs`` and ``joined`` as the loop would, so the loop goes on with what follows.
    Anything else is left to the loop.
    """
    first = packets[a]
    length = len(first)
    if v4_first:
        if first[0] != 0x45:
            return False
        _vi, tos, total, frag, frag_low, ttl, proto, key, seq, ack, flags, window, urg = (
            _V4_TCP.unpack_from(first)
        )
        if proto != _TCP or total != length or frag & 0x3F or frag_low:
            return False
        iphl = 20
        hl = 20 + (ack[4] >> 4) * 4
        shape: tuple[object, ...] = (tos, frag, ttl, window, urg, first[40:hl])
        extra = hl
    else:
        if first[0] >> 4 != 6:
            return False
        vcl, plen, proto, hop, key, seq, ack, flags, window, urg = _V6_TCP.unpack_from(first)
        if proto != _TCP or plen + 40 != length:
            return False
        iphl = 40
        hl = 40 + (ack[4] >> 4) * 4
        shape = (vcl, hop, window, urg, first[60:hl])
        extra = hl - 40
    size = length - hl
    if hl != hl_first or flags != _ACK or size <= 0 or hl < iphl + 20:
        return False
    key += ack
    taken = b - a
    index = 0
    run = runs.get(key)
    if run is not None and run.takes(seq, size, hl, extra, shape):
        # The group continues its flow's open run: fill it as far as 64 KiB allows.
        if size != run.gso:
            return False  # a shorter segment would end that run: the loop's case
        index = min(taken, (_MAX_IP - extra - run.length) // size)
        bufs = run.bufs
        if len(bufs) == 3:
            joined.append(run)
        at = offset + hl
        bufs += [view[at + i * length : at + i * length + size] for i in range(index)]
        run.length += index * size
        run.next_seq = (seq + index * size) & 0xFFFFFFFF
        run.last_flags = flags
    # The rest as the loop makes runs: as many segments as fit in one IP packet of 64 KiB.
    per_run = (_MAX_IP - extra) // size
    for start in range(index, taken, per_run):
        end = min(start + per_run, taken)
        at = offset + start * length
        bufs = [PLAIN_HEADER, packets[a + start]]
        bufs += [view[p : p + size] for p in range(at + hl, offset + end * length, length)]
        writes.append(bufs)
        run = _Run(bufs, iphl, hl, size, (seq + start * size) & 0xFFFFFFFF, v4_first, shape)
        if end - start > 1:
            joined.append(run)
            run.length = size * (end - start)
            run.next_seq = (seq + end * size) & 0xFFFFFFFF
            run.last_flags = flags
    assert run is not None
    runs[key] = run
    return True


def _super_ip_header(head: bytearray, iphl: int, l4len: int, v4: bool) -> int:
    """Set the IP header of a super-packet of ``l4len`` transport bytes (IPv4: total length
    and header checksum; IPv6: payload length) and return its pseudo-header address sum, the
    part of the transport checksum field that ``NEEDS_CSUM`` leaves to the kernel."""
    if v4:
        _pack16(head, 2, iphl + l4len)
        head[10:12] = b"\0\0"
        _pack16(head, 10, 0xFFFF - _from(head[:iphl], "big") % 0xFFFF)
        return _sum(head[12:20])
    _pack16(head, 4, l4len)
    return _sum(head[8:40])


def _finish(run: _Run) -> None:
    """Turn a run's first buffers into the virtio-net header and the super-packet's headers."""
    bufs = run.bufs
    first = bufs[1]
    iphl, hl = run.iphl, run.hl
    head = bytearray(first[:hl])
    if run.last_flags & _PSH:
        head[iphl + 13] |= _PSH
    l4len = hl - iphl + run.length
    pseudo = _super_ip_header(head, iphl, l4len, run.v4)
    gso_type = GSO_TCPV4 if run.v4 else GSO_TCPV6
    _pack16(head, iphl + 16, _fold(pseudo + _TCP + l4len))
    bufs[0] = VNET_HDR.pack(NEEDS_CSUM, gso_type, hl, run.gso, iphl, 16)
    bufs[1] = bytes(head)


def _finish_udp(run: _UdpRun) -> None:
    """Turn a UDP run's first buffers into the virtio-net header and the headers of one
    ``GSO_UDP_L4`` packet, as the kernel's own UDP GSO builds them: IP and UDP lengths of the
    whole, the UDP checksum field holding the pseudo-header sum over that length (the kernel
    swaps each segment's length into it when it cuts), ``NEEDS_CSUM`` from the UDP header."""
    bufs = run.bufs
    iphl = run.iphl
    hl = iphl + 8
    head = bytearray(bufs[1][:hl])
    bufs.extend(memoryview(packet)[hl:] for packet in run.packets)
    l4len = 8 + run.length
    pseudo = _super_ip_header(head, iphl, l4len, run.v4)
    _pack16(head, iphl + 4, l4len)
    _pack16(head, iphl + 6, _fold(pseudo + _UDP + l4len))
    bufs[0] = VNET_HDR.pack(NEEDS_CSUM, GSO_UDP_L4, hl, run.gso, iphl, 6)
    bufs[1] = bytes(head)
