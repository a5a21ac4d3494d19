"""meshguard.core.offload in memory: cutting super-packets and joining segments.

The checks use a naive word-by-word checksum as the reference, build super-packets the way the
kernel hands them over (virtio-net header, the pseudo-header sum in the checksum field), and
check every segment on its own and the segments together against the original stream.
Hypothesis varies sizes, segment sizes, TCP options and flags; garbage never raises anything
but ``OffloadError``.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core import offload
from meshguard.core.offload import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    NEEDS_CSUM,
    PLAIN_HEADER,
    VNET_HDR,
    VNET_HDR_LEN,
    CutArena,
    OffloadError,
    checksum,
    coalesce,
    finish_checksums,
    split,
)

SRC4, DST4 = ipaddress.IPv4Address("10.1.0.1").packed, ipaddress.IPv4Address("10.1.0.2").packed
SRC6, DST6 = ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed
FIN, PSH, ACK = 0x01, 0x08, 0x10
#: One arena for every example of the vectorised cut's property test: reused across them.
_ARENA = CutArena()


def naive_sum(data: bytes) -> int:
    """The RFC 1071 sum, word by word, folded (the reference for the fast one)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(v4: bool, proto: int, length: int, src: bytes, dst: bytes) -> bytes:
    if v4:
        return src + dst + bytes([0, proto]) + struct.pack("!H", length)
    return src + dst + struct.pack("!I", length) + bytes([0, 0, 0, proto])


def ip_header(v4: bool, proto: int, l4_length: int, ident: int = 0x1234) -> bytes:
    if v4:
        head = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + l4_length, ident, 0x4000, 64, proto, 0, SRC4, DST4
            )
        )
        head[10:12] = struct.pack("!H", 0xFFFF - naive_sum(bytes(head)))
        return bytes(head)
    return struct.pack("!IHBB16s16s", 0x60000000, l4_length, proto, 64, SRC6, DST6)


def tcp_header(seq: int, flags: int, options: bytes = b"", ack: int = 99) -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 1000, 2000, seq, ack, offset << 4, flags, 512, 0, 0) + options


def tcp_packet(v4: bool, seq: int, flags: int, payload: bytes, options: bytes = b"") -> bytes:
    """One ordinary TCP packet with every checksum right."""
    tcp = bytearray(tcp_header(seq, flags, options) + payload)
    src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
    tcp[16:18] = struct.pack("!H", 0xFFFF - naive_sum(pseudo(v4, 6, len(tcp), src, dst) + tcp))
    return ip_header(v4, 6, len(tcp)) + bytes(tcp)


def super_frame(
    v4: bool, tcp: bool, payload: bytes, gso_size: int, flags: int = ACK, options: bytes = b""
) -> bytes:
    """What a TUN read with TSO/USO returns: header, then one packet whose transport
    checksum field holds only the pseudo-header sum (NEEDS_CSUM)."""
    src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
    if tcp:
        l4 = bytearray(tcp_header(1_000_000, flags, options) + payload)
        at, proto = 16, 6
    else:
        l4 = bytearray(struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload)
        at, proto = 6, 17
    l4[at : at + 2] = struct.pack("!H", naive_sum(pseudo(v4, proto, len(l4), src, dst)))
    iphl = 20 if v4 else 40
    gso_type = (GSO_TCPV4 if v4 else GSO_TCPV6) if tcp else GSO_UDP_L4
    header = VNET_HDR.pack(NEEDS_CSUM, gso_type, iphl + len(l4) - len(payload), gso_size, iphl, at)
    return header + ip_header(v4, proto, len(l4)) + bytes(l4)


def problem(packet: bytes) -> str | None:
    """Why ``packet`` is not a well-formed packet with right checksums, or None."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        if struct.unpack_from("!H", packet, 2)[0] != len(packet):
            return "IPv4 total length"
        if naive_sum(packet[:ihl]) != 0xFFFF:
            return "IPv4 header checksum"
        proto, l4 = packet[9], packet[ihl:]
        ph = pseudo(True, proto, len(l4), packet[12:16], packet[16:20])
    else:
        if struct.unpack_from("!H", packet, 4)[0] + 40 != len(packet):
            return "IPv6 payload length"
        proto, l4 = packet[6], packet[40:]
        ph = pseudo(False, proto, len(l4), packet[8:24], packet[24:40])
    if proto == 17 and struct.unpack_from("!H", l4, 4)[0] != len(l4):
        return "UDP length"
    if naive_sum(ph + l4) != 0xFFFF:
        return "transport checksum"
    return None


def unwrap(write: list[bytes | memoryview]) -> tuple[tuple[int, ...], bytes]:
    """A coalesced write as (virtio-net header fields, the packet)."""
    return VNET_HDR.unpack(bytes(write[0])), b"".join(bytes(b) for b in write[1:])


class ChecksumTests(SynchronousTestCase):
    @given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
    def test_matches_naive_sum(self, data: bytes, initial: int) -> None:
        """The big-integer checksum is the RFC 1071 one (0 and 0xFFFF are the same zero)."""
        want = 0xFFFF - naive_sum(struct.pack("!H", initial) + data)
        got = checksum(data, initial)
        self.assertIn(got, (want, 0xFFFF) if want == 0 else (want,))
        self.assertNotEqual(got, 0, "never the UDP 'no checksum' value")


class SplitTests(SynchronousTestCase):
    def test_plain_frame_is_the_packet(self) -> None:
        packet = tcp_packet(True, 1, ACK, b"hello")
        self.assertEqual(split(PLAIN_HEADER + packet), [packet])

    def test_partial_checksum_completed(self) -> None:
        """GSO_NONE with NEEDS_CSUM (a small packet): the checksum is finished."""
        frame = bytearray(super_frame(True, True, b"abc", 1400))
        frame[1] = GSO_NONE
        (packet,) = split(bytes(frame))
        self.assertIsNone(problem(packet))
        self.assertEqual(packet[40:], b"abc")

    @settings(max_examples=150, deadline=None)
    @given(
        v4=st.booleans(),
        tcp=st.booleans(),
        size=st.integers(1, 65535 - 60 - 40),
        gso_size=st.integers(1, 1500),
        flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | FIN]),
        options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), bytes(40)]),
        data=st.data(),
    )
    def test_segments(
        self,
        v4: bool,
        tcp: bool,
        size: int,
        gso_size: int,
        flags: int,
        options: bytes,
        data: st.DataObject,
    ) -> None:
        """Each segment is a well-formed packet of at most gso_size payload bytes; the payloads
        in order are the original; sequence numbers follow, FIN/PSH only on the last, IPv4
        identification counts up; the segments coalesce back into the original stream."""
        if size // gso_size > 300:
            gso_size = size // 300 + 1  # keep the example fast; the cut is the same code
        payload = (
            data.draw(st.binary(min_size=size, max_size=size))
            if size < 64
            else bytes((i * 31 + 7) & 0xFF for i in range(size))
        )
        frame = super_frame(v4, tcp, payload, gso_size, flags, options if tcp else b"")
        segments = split(frame)
        self.assertEqual(len(segments), -(-size // gso_size))
        iphl = 20 if v4 else 40
        hl = iphl + (20 + len(options) if tcp else 8)
        joined = b""
        for i, segment in enumerate(segments):
            self.assertIsNone(problem(segment), f"segment {i}")
            body = segment[hl:]
            self.assertLessEqual(len(body), gso_size)
            if i < len(segments) - 1:
                self.assertEqual(len(body), gso_size)
            joined += body
            if v4:
                self.assertEqual(struct.unpack_from("!H", segment, 4)[0], (0x1234 + i) & 0xFFFF)
            if tcp:
                seq = struct.unpack_from("!I", segment, iphl + 4)[0]
                self.assertEqual(seq, 1_000_000 + i * gso_size)
                seg_flags = segment[iphl + 13]
                last = i == len(segments) - 1
                self.assertEqual(seg_flags, flags if last else flags & ~(FIN | PSH))
                self.assertEqual(segment[iphl + 20 : hl], options)
        self.assertEqual(joined, payload)
        if not tcp or flags & FIN:
            return
        writes = coalesce(segments)
        for write in writes:
            fields, packet = unwrap(write)
            if fields[1] == GSO_NONE:
                self.assertIsNone(problem(packet))
        rebuilt = b"".join(unwrap(w)[1][hl:] for w in writes)
        self.assertEqual(rebuilt, payload)
        if len(segments) > 1 and size <= 60000:
            self.assertEqual(len(writes), 1, "one flow in order coalesces into one write")
            fields, packet = unwrap(writes[0])
            self.assertEqual(
                fields, (NEEDS_CSUM, GSO_TCPV4 if v4 else GSO_TCPV6, hl, gso_size, iphl, 16)
            )
            self.assertEqual(packet[iphl + 13], flags)
            if v4:
                self.assertEqual(naive_sum(packet[:20]), 0xFFFF, "IPv4 header checksum")
                self.assertEqual(struct.unpack_from("!H", packet, 2)[0], len(packet))
            else:
                self.assertEqual(struct.unpack_from("!H", packet, 4)[0] + 40, len(packet))
            src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
            want = naive_sum(pseudo(v4, 6, len(packet) - iphl, src, dst))
            self.assertEqual(struct.unpack_from("!H", packet, iphl + 16)[0], want)

    @settings(max_examples=50, deadline=None)
    @given(
        v4=st.booleans(),
        tcp=st.booleans(),
        size=st.integers(1, 20000),
        gso_size=st.integers(1, 1500),
    )
    def test_without_numpy_the_same(self, v4: bool, tcp: bool, size: int, gso_size: int) -> None:
        """The pure-Python sums give byte for byte what the numpy path gives."""
        payload = bytes((i * 13 + 5) & 0xFF for i in range(size))
        frame = super_frame(v4, tcp, payload, gso_size)
        fast = split(frame)
        self.patch(offload, "_np", None)
        self.assertEqual(split(frame), fast)

    @settings(max_examples=60, deadline=None)
    @given(
        v4=st.booleans(),
        tcp=st.booleans(),
        size=st.integers(1, 65535 - 60 - 40),
        gso_size=st.integers(1, 1500),
        seq=st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0xFFFF0000, 0xFFFFFFFF)),
        ident=st.integers(0, 0xFFFF),
        flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN]),
        options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
    )
    def test_vectorised_cut_matches_the_loop(
        self,
        v4: bool,
        tcp: bool,
        size: int,
        gso_size: int,
        seq: int,
        ident: int,
        flags: int,
        options: bytes,
    ) -> None:
        """The numpy cut of the full segments gives byte for byte what the one-by-one loop
        gives, with sequence numbers and IPv4 identifications that wrap inside the frame,
        odd and even segment sizes and a last segment of any length."""
        if size // gso_size > 300:
            gso_size = size // 300 + 1
        payload = bytes((i * 29 + 3) & 0xFF for i in range(size))
        frame = bytearray(super_frame(v4, tcp, payload, gso_size, flags, options if tcp else b""))
        iphl = 20 if v4 else 40
        if tcp:  # neither field is in the pseudo-header sum the frame carries
            frame[VNET_HDR_LEN + iphl + 4 : VNET_HDR_LEN + iphl + 8] = seq.to_bytes(4, "big")
        if v4:
            frame[VNET_HDR_LEN + 4 : VNET_HDR_LEN + 6] = ident.to_bytes(2, "big")
        fast = split(bytes(frame))
        for segment in fast:
            self.assertIsInstance(segment, bytes)
            self.assertIsNone(problem(segment))
        # As views: the same bytes, read-only views where cut; into an arena (the TUN batch
        # receiver's) shared by every example, so its arrays are reused across shapes,
        # sizes and contents (and cleared when full), every field written again each time.
        for views in (True, _ARENA):
            viewed = split(bytes(frame), views)
            self.assertEqual([bytes(segment) for segment in viewed], fast)
            for segment in viewed:
                if isinstance(segment, memoryview):
                    self.assertTrue(segment.readonly)
        self.patch(offload, "_np", None)
        self.assertEqual(split(bytes(frame)), fast)

    def test_vectorised_cut_is_taken(self) -> None:
        """A 45-segment frame goes through the numpy cut (not only the loop the tests compare
        it with)."""
        calls: list[int] = []
        cut = offload._cut_vectorised

        def counted(*args: object, **kwargs: object) -> list[bytes]:
            calls.append(1)
            return cut(*args, **kwargs)  # type: ignore[arg-type]

        self.patch(offload, "_cut_vectorised", counted)
        segments = split(super_frame(True, True, bytes(1368 * 45), 1368))
        self.assertEqual((len(segments), calls), (45, [1]))
        # Asked for views, the 44 full segments are views of one array, the last is bytes.
        viewed = split(super_frame(True, True, bytes(1368 * 45), 1368), True)
        self.assertEqual([type(s) for s in viewed], [memoryview] * 44 + [bytes])
        self.assertEqual([bytes(s) for s in viewed], segments)
        # Into an arena: the same, and the next cut of that shape reuses the same views (the
        # first cut's segments now hold the second's bytes).
        arena = CutArena()
        first = split(super_frame(True, True, bytes(1368 * 45), 1368), arena)
        self.assertEqual([bytes(s) for s in first], segments)
        other = split(super_frame(True, True, b"\x07" * (1368 * 45), 1368), arena)
        self.assertEqual([id(s) for s in other[:44]], [id(s) for s in first[:44]])
        self.assertEqual([bytes(s) for s in first[:44]], [bytes(s) for s in other[:44]])
        self.assertNotEqual(bytes(other[0]), segments[0])
        self.assertEqual(len(calls), 4)

    @given(st.binary(max_size=200))
    def test_garbage_raises_only_offload_error(self, frame: bytes) -> None:
        try:
            split(frame)
        except OffloadError:
            pass

    @given(
        st.sampled_from([GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, 2, 3, 0x81]),
        st.integers(0, 0xFFFF),
        st.integers(0, 200),
        st.binary(min_size=0, max_size=300),
    )
    def test_lying_headers_raise_only_offload_error(
        self, gso_type: int, gso_size: int, csum_start: int, body: bytes
    ) -> None:
        """A header that does not fit its packet is refused, never an IndexError."""
        real = tcp_packet(gso_type != GSO_TCPV6, 5, ACK, body)
        frame = VNET_HDR.pack(NEEDS_CSUM, gso_type, 40, gso_size, csum_start, 16) + real
        try:
            for segment in split(frame):
                self.assertLessEqual(len(segment), len(real) + 60 * 300)
        except OffloadError:
            pass


def small_frame(v4: bool, tcp: bool, payload: bytes) -> bytes:
    """A TUN read of one small packet with its checksum left to us (GSO_NONE + NEEDS_CSUM)."""
    frame = bytearray(super_frame(v4, tcp, payload, 65535))
    frame[1] = GSO_NONE
    return bytes(frame)


class FinishChecksumsTests(SynchronousTestCase):
    """A read batch of small packets laid out as ``TunDevice`` reads them: one buffer, each
    frame at the next even offset, garbage around them."""

    @settings(max_examples=150, deadline=None)
    @given(
        shapes=st.lists(
            st.tuples(st.booleans(), st.booleans(), st.integers(0, 1400)), min_size=1, max_size=24
        ),
        numpy=st.booleans(),
        fill=st.integers(0, 255),
    )
    def test_batch_matches_split(
        self, shapes: list[tuple[bool, bool, int]], numpy: bool, fill: int
    ) -> None:
        """Every packet gets the checksum ``split`` gives it alone, with numpy (one call for
        the batch, when it is large enough) and without; nothing else in a packet changes."""
        if numpy and sum(size + 60 for _v, _t, size in shapes) > 4000:
            self.assertIsNotNone(offload._np, "numpy is a dependency")
        frames = [
            small_frame(v4, tcp, bytes((i * 31 + size) & 0xFF for i in range(size)))
            for v4, tcp, size in shapes
        ]
        buffer = bytearray([fill]) * (sum(len(f) + 1 for f in frames) + 2)
        starts: list[int] = []
        ends: list[int] = []
        fields: list[int] = []
        places: list[tuple[int, int]] = []
        offset = 0
        for frame in frames:
            buffer[offset : offset + len(frame)] = frame
            _f, _g, _h, _s, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
            packet = offset + len(PLAIN_HEADER)
            starts.append(packet + csum_start)
            fields.append(packet + csum_start + csum_offset)
            ends.append(offset + len(frame))
            places.append((packet, offset + len(frame)))
            offset = (offset + len(frame) + 1) & ~1
        finish_checksums(buffer, starts, ends, fields, vectorised=numpy)
        for frame, (start, end) in zip(frames, places):
            packet = bytes(buffer[start:end])
            self.assertIsNone(problem(packet))
            self.assertEqual(split(frame), [packet])

    def test_empty_batch(self) -> None:
        buffer = bytearray(b"x" * 10)
        finish_checksums(buffer, [], [], [])
        self.assertEqual(buffer, b"x" * 10)

    def test_zero_sum_gives_ffff(self) -> None:
        """A packet whose words sum to 0 mod 65535 gets 0xFFFF, never 0 (UDP's 'none')."""
        for numpy in (True, False):
            count = 40 if numpy else 1
            buffer = bytearray(4 * count + 2)
            finish_checksums(
                buffer,
                [4 * i for i in range(count)],
                [4 * i + 4 for i in range(count)],
                [4 * i + 2 for i in range(count)],
                vectorised=numpy,
            )
            self.assertEqual(buffer[2:4], b"\xff\xff")
            self.assertEqual(buffer[4 * count - 2 : 4 * count], b"\xff\xff")


class CoalesceTests(SynchronousTestCase):
    def flow(self, v4: bool, n: int, size: int = 100, seq: int = 1, **kw: int) -> list[bytes]:
        return [
            tcp_packet(v4, seq + i * size, kw.get("flags", ACK), bytes([i]) * size)
            for i in range(n)
        ]

    def test_interleaved_flows_keep_their_order(self) -> None:
        """Two flows interleaved: each joins into one write; a non-TCP packet stays alone."""
        a = self.flow(True, 5)
        b = self.flow(False, 5)
        other = ip_header(True, 17, 8) + struct.pack("!HHHH", 1, 2, 8, 0)
        mixed = [p for pair in zip(a, b) for p in pair] + [other]
        writes = coalesce(mixed)
        self.assertEqual(len(writes), 3)
        self.assertEqual(unwrap(writes[0])[1][40:], b"".join(p[40:] for p in a))
        self.assertEqual(unwrap(writes[1])[1][60:], b"".join(p[60:] for p in b))
        self.assertEqual(writes[2], [PLAIN_HEADER, other])

    def test_gap_short_segment_and_pure_ack_end_a_run(self) -> None:
        """A sequence gap starts a new run; a short segment is the last of its run; a packet
        that cannot join (a pure ACK) ends the run so that nothing overtakes it."""
        packets = self.flow(True, 3)
        packets.append(tcp_packet(True, 1 + 5 * 100, ACK, b"x" * 100))  # gap
        packets.append(tcp_packet(True, 1 + 6 * 100, ACK, b"y" * 50))  # short: ends
        packets.append(tcp_packet(True, 1 + 6 * 100 + 50, ACK, b"z" * 100))
        packets.append(tcp_packet(True, 1 + 7 * 100 + 50, ACK, b""))  # pure ACK
        packets.append(tcp_packet(True, 1 + 7 * 100 + 50, ACK, b"w" * 100))
        writes = coalesce(packets)
        sizes = [len(unwrap(w)[1]) - 40 for w in writes]
        self.assertEqual(sizes, [300, 150, 100, 0, 100])

    def test_single_packets_are_plain(self) -> None:
        packets = self.flow(True, 1) + self.flow(False, 1)
        self.assertEqual(coalesce(packets), [[PLAIN_HEADER, p] for p in packets])

    def assert_same_writes(self, packets: list[bytes]) -> None:
        """The vectorised check of a bulk batch gives what the loop gives, buffer for buffer."""
        fast = coalesce(packets, udp4=True, udp6=True)
        slow = coalesce(packets, udp4=True, udp6=True, vectorised=False)
        self.assertEqual(
            [[bytes(b) for b in w] for w in fast], [[bytes(b) for b in w] for w in slow]
        )

    def test_a_bulk_batch_is_checked_at_once(self) -> None:
        """45 segments and a shorter last one with PSH (a TSO burst as it arrives): the
        vectorised path takes the 45 and the loop adds the last to their run."""
        packets = self.flow(True, 45, size=1368)
        packets.append(tcp_packet(True, 1 + 45 * 1368, ACK | PSH, b"e" * 500))
        found = offload._uniform_groups(packets[:45], len(packets[0]))
        assert found is not None
        self.assertEqual(found[1], [0, 45])
        writes = coalesce(packets)
        self.assertEqual(len(writes), 1)
        self.assertEqual(unwrap(writes[0])[1][40:], b"".join(p[40:] for p in packets))
        self.assertEqual(unwrap(writes[0])[0][0:2], (NEEDS_CSUM, GSO_TCPV4))
        self.assert_same_writes(packets)
        # Past 64 KiB (47 segments of 1,368 bytes): two runs, the second open for the last.
        more = self.flow(True, 60, size=1368)
        more.append(tcp_packet(True, 1 + 60 * 1368, ACK | PSH, b"e" * 500))
        self.assertEqual(len(coalesce(more)), 2)
        self.assert_same_writes(more)

    @settings(max_examples=300, deadline=None)
    @given(
        st.booleans(),
        st.integers(16, 70),
        st.integers(1, 1400),
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from(["none", "short", "psh", "fin", "udp", "gap"]),
        st.integers(1, 3),
        st.none() | st.tuples(st.integers(0, 250), st.integers(0, 79), st.integers(1, 255)),
        st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
    )
    def test_vectorised_equals_the_loop(
        self,
        v4: bool,
        n: int,
        size: int,
        seq: int,
        last: str,
        bursts: int,
        flip: tuple[int, int, int] | None,
        options: bytes,
    ) -> None:
        """Bulk batches (one to three bursts of a sender, each of ``n`` full segments and an
        ending of every kind) with one byte of any header changed (or none): the vectorised
        path and the loop write the same buffers."""
        packets: list[bytes] = []
        for _ in range(bursts):
            packets += [
                tcp_packet(v4, (seq + i * size) & 0xFFFFFFFF, ACK, bytes([i & 255]) * size, options)
                for i in range(n)
            ]
            seq = end = (seq + n * size) & 0xFFFFFFFF
            if last == "short":
                packets.append(tcp_packet(v4, end, ACK, b"s" * max(1, size // 2), options))
                seq = (seq + max(1, size // 2)) & 0xFFFFFFFF
            elif last in ("psh", "fin"):
                flags = ACK | (PSH if last == "psh" else FIN)
                packets.append(tcp_packet(v4, end, flags, b"p" * size))
                seq = (seq + size) & 0xFFFFFFFF
            elif last == "udp":
                packets.append(ip_header(v4, 17, 8) + struct.pack("!HHHH", 1, 2, 8, 0))
            elif last == "gap":
                packets.append(tcp_packet(v4, end + 1, ACK, b"g" * size, options))
                seq = (seq + 1 + size) & 0xFFFFFFFF
        if flip is not None:
            row, at, bits = flip
            packet = bytearray(packets[row % len(packets)])
            packet[at % len(packet)] ^= bits
            packets[row % len(packets)] = bytes(packet)
        self.assert_same_writes(packets)

    def interleaved_bursts(
        self, v4: bool, size: int, plan: list[tuple[int, int, int, int]]
    ) -> list[bytes]:
        """Bursts of full segments as a bulk batch brings them: each ``(flow, n, stamp,
        ack)`` is ``n`` segments of flow 0 or 1 (its own ports) carrying timestamp option
        ``stamp`` and acknowledgement ``ack``, each flow's sequence running on."""
        iphl = 20 if v4 else 40
        seqs = [7, 0xFFFFFF00]
        packets: list[bytes] = []
        for flow, n, stamp, ack in plan:
            options = b"\x01\x01\x08\x0a" + struct.pack("!II", stamp, 5)
            for _ in range(n):
                packet = bytearray(tcp_packet(v4, seqs[flow], ACK, b"d" * size, options))
                packet[iphl : iphl + 2] = struct.pack("!H", 1000 + flow)
                packet[iphl + 8 : iphl + 12] = struct.pack("!I", ack)
                packets.append(bytes(packet))
                seqs[flow] = (seqs[flow] + size) & 0xFFFFFFFF
        return packets

    def loop_takes(self, packets: list[bytes]) -> int:
        """How many of ``packets`` :func:`coalesce` leaves to its loop."""
        taken: list[int] = []
        loop = offload._coalesce_loop

        def counted(some: list[bytes], *rest: object) -> None:
            taken.append(len(some))
            loop(some, *rest)  # type: ignore[arg-type]

        self.patch(offload, "_coalesce_loop", counted)
        coalesce(packets)
        return sum(taken)

    def test_bursts_of_a_bulk_flow_are_built_at_once(self) -> None:
        """A receiver's batch of one bulk flow: bursts of full segments, each with its own
        timestamp and acknowledgement, then one flow's bursts interleaved with another's
        that continue each flow's open run: all built by the block path, as the loop
        would."""
        one = self.interleaved_bursts(True, 1368, [(0, 30, 1, 99), (0, 45, 2, 99), (0, 44, 2, 150)])
        two = self.interleaved_bursts(False, 1348, [(0, 20, 1, 9), (1, 20, 1, 9), (0, 20, 1, 9)])
        for packets in (one, two):
            self.assert_same_writes(packets)
            self.assertEqual(self.loop_takes(packets), 0)

    @settings(max_examples=300, deadline=None)
    @given(
        st.booleans(),
        st.integers(1, 1400),
        st.lists(
            st.tuples(st.integers(0, 1), st.integers(1, 40), st.integers(0, 2), st.integers(0, 2)),
            min_size=1,
            max_size=6,
        ),
        st.none() | st.tuples(st.integers(0, 250), st.integers(0, 79), st.integers(1, 255)),
    )
    def test_groups_equal_the_loop(
        self,
        v4: bool,
        size: int,
        plan: list[tuple[int, int, int, int]],
        flip: tuple[int, int, int] | None,
    ) -> None:
        """Bursts of two flows, interleaved, each with its own timestamp and acknowledgement
        (or the one before's), one byte of any header changed (or none): the groups built at
        once and the loop write the same buffers."""
        packets = self.interleaved_bursts(v4, size, plan)
        if flip is not None:
            row, at, bits = flip
            packet = bytearray(packets[row % len(packets)])
            packet[at % len(packet)] ^= bits
            packets[row % len(packets)] = bytes(packet)
        self.assert_same_writes(packets)

    def test_64k_limit(self) -> None:
        """A run stops before its IP packet would pass 65,535 bytes."""
        packets = self.flow(True, 60, size=1400)
        writes = coalesce(packets)
        self.assertEqual(len(writes), 2)
        for write in writes:
            self.assertLessEqual(len(unwrap(write)[1]), 65535)

    @given(st.lists(st.binary(min_size=1, max_size=120), max_size=30))
    def test_garbage_never_raises_and_loses_nothing(self, packets: list[bytes]) -> None:
        """Any list of byte strings: every byte is written exactly once (joined runs only
        drop the repeated headers)."""
        for udp in (False, True):
            writes = coalesce(packets, udp4=udp, udp6=udp)
            plain = [bytes(w[1]) for w in writes if w[0] is PLAIN_HEADER]
            joined = sum(len(w) - 2 for w in writes if w[0] is not PLAIN_HEADER)
            self.assertEqual(len(plain) + joined, len(packets))


def udp_packet(
    v4: bool,
    payload: bytes,
    ports: tuple[int, int] = (1000, 2000),
    ident: int = 0x1234,
    tos: int = 0,
    ttl: int = 64,
    frag: int = 0x4000,
) -> bytes:
    """One ordinary UDP datagram with every checksum right (0 sent as 0xFFFF)."""
    src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
    l4 = bytearray(struct.pack("!HHHH", *ports, 8 + len(payload), 0) + payload)
    value = 0xFFFF - naive_sum(pseudo(v4, 17, len(l4), src, dst) + l4)
    l4[6:8] = struct.pack("!H", value or 0xFFFF)
    if v4:
        head = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s", 0x45, tos, 20 + len(l4), ident, frag, ttl, 17, 0, SRC4, DST4
            )
        )
        head[10:12] = struct.pack("!H", 0xFFFF - naive_sum(bytes(head)))
    else:
        label = 0x60000000 | tos << 20 | 0x12345
        head = bytearray(struct.pack("!IHBB16s16s", label, len(l4), 17, ttl, SRC6, DST6))
    return bytes(head) + bytes(l4)


def udp_groups(packets: list[bytes], udp4: bool, udp6: bool) -> list[list[int]]:
    """The naive reference for UDP joining: the indices of the packets each write holds."""
    groups: list[list[int]] = []
    open_runs: dict[bytes, int] = {}
    for i, p in enumerate(packets):
        v4 = p[0] == 0x45
        iphl = 20 if v4 else 40
        if not (udp4 if v4 else udp6) or p[9 if v4 else 6] != 17:
            groups.append([i])
            continue
        key = p[12:24] if v4 else p[8:44]
        shape = (p[1], p[6], p[8]) if v4 else (p[:4], p[7])
        whole = not v4 or struct.unpack_from("!H", p, 6)[0] & 0x3FFF == 0
        size = len(p) - iphl - 8
        at = open_runs.pop(key, None)
        if not whole or size == 0:
            groups.append([i])
            continue
        if at is not None:
            group = groups[at]
            first = packets[group[0]]
            gso = len(first) - iphl - 8
            f_shape = (first[1], first[6], first[8]) if v4 else (first[:4], first[7])
            total = iphl + 8 + sum(len(packets[j]) - iphl - 8 for j in group) + size
            if size <= gso and len(group) < 64 and total <= 65535 and shape == f_shape:
                group.append(i)
                if size == gso:
                    open_runs[key] = at
                continue
        groups.append([i])
        open_runs[key] = len(groups) - 1
    # Runs too short to join are written one by one, where they stood.
    return [
        part
        for group in groups
        for part in ([group] if len(group) >= offload._UDP_MIN_JOIN else [[i] for i in group])
    ]


class UdpCoalesceTests(SynchronousTestCase):
    """Joining UDP datagrams into ``GSO_UDP_L4`` writes (only where USO was granted)."""

    def check_joined(self, write: list[bytes | memoryview], group: list[bytes]) -> None:
        """A joined write byte for byte: the virtio-net header, the first datagram's headers
        with the lengths of the whole, a fresh IPv4 header checksum, the UDP checksum field
        holding the folded pseudo-header sum; the payloads in order; and the kernel's cut of it
        (``split`` does what the kernel does) gives back the datagrams exactly."""
        v4 = group[0][0] == 0x45
        iphl = 20 if v4 else 40
        gso = len(group[0]) - iphl - 8
        fields, packet = unwrap(write)
        self.assertEqual(fields, (NEEDS_CSUM, GSO_UDP_L4, iphl + 8, gso, iphl, 6))
        payload = b"".join(p[iphl + 8 :] for p in group)
        l4len = 8 + len(payload)
        head = bytearray(group[0][: iphl + 8])
        if v4:
            head[2:4] = struct.pack("!H", iphl + l4len)
            head[10:12] = b"\0\0"
            head[10:12] = struct.pack("!H", 0xFFFF - naive_sum(bytes(head[:20])))
            ph = pseudo(True, 17, l4len, SRC4, DST4)
        else:
            head[4:6] = struct.pack("!H", l4len)
            ph = pseudo(False, 17, l4len, SRC6, DST6)
        head[iphl + 4 : iphl + 6] = struct.pack("!H", l4len)
        head[iphl + 6 : iphl + 8] = struct.pack("!H", naive_sum(ph))
        self.assertEqual(packet, bytes(head) + payload)
        self.assertEqual(split(b"".join(bytes(b) for b in write)), group)

    def test_one_flow_of_equal_sizes_is_one_write(self) -> None:
        for v4 in (True, False):
            packets = [udp_packet(v4, bytes([i]) * 1000, ident=i) for i in range(40)]
            writes = coalesce(packets, udp4=True, udp6=True)
            self.assertEqual(len(writes), 1)
            self.check_joined(writes[0], packets)

    def test_without_uso_nothing_is_joined(self) -> None:
        """A TSO-only device (or one granted USO for the other IP version only) writes every
        datagram as it is, as before UDP coalescing existed."""
        v4 = [udp_packet(True, b"a" * 100, ident=i) for i in range(6)]
        v6 = [udp_packet(False, b"b" * 100) for _ in range(6)]
        plain = [[PLAIN_HEADER, p] for p in v4 + v6]
        self.assertEqual(coalesce(v4 + v6), plain)
        writes = coalesce(v4 + v6, udp4=True)
        self.assertEqual(writes[1:], plain[6:])
        self.check_joined(writes[0], v4)
        writes = coalesce(v4 + v6, udp6=True)
        self.assertEqual(writes[:6], plain[:6])
        self.check_joined(writes[6], v6)

    def test_last_shorter_ends_a_run_and_larger_starts_one(self) -> None:
        sizes = [500] * 6 + [499] + [500] * 6 + [600] * 5 + [1]
        packets = [udp_packet(True, bytes([i]) * n, ident=i) for i, n in enumerate(sizes)]
        writes = coalesce(packets, udp4=True)
        self.assertEqual([len(w) - 2 for w in writes], [7, 6, 6])
        self.check_joined(writes[0], packets[:7])
        self.check_joined(writes[1], packets[7:13])
        self.check_joined(writes[2], packets[13:])

    def test_short_runs_are_written_alone(self) -> None:
        """Fewer than ``_UDP_MIN_JOIN`` datagrams (a GSO write's fixed cost in the kernel is
        more than they save) are written one by one, where the run stood."""
        least = offload._UDP_MIN_JOIN
        a = [udp_packet(True, b"a" * 100, (1, 2), ident=i) for i in range(least - 1)]
        b = [udp_packet(True, b"b" * 100, (1, 3), ident=i) for i in range(least)]
        mixed = [p for pair in zip(a, b) for p in pair] + b[len(a) :]
        writes = coalesce(mixed, udp4=True)
        self.assertEqual(writes[: len(a)], [[PLAIN_HEADER, p] for p in a])
        self.check_joined(writes[len(a)], b)
        self.assertEqual(len(writes), len(a) + 1)

    def test_ip_fields_must_match(self) -> None:
        """A different TOS, TTL or DF (IPv4), traffic class or hop limit (IPv6) starts a new
        write; a fragment is written alone and ends its flow's run."""
        for v4, changes in (
            (True, [{"tos": 4}, {"ttl": 63}, {"frag": 0}]),
            (False, [{"tos": 4}, {"ttl": 63}]),
        ):
            for change in changes:
                a = [udp_packet(v4, b"x" * 300, ident=i) for i in range(6)]
                b = [udp_packet(v4, b"y" * 300, ident=i, **change) for i in range(6, 12)]
                writes = coalesce(a + b, udp4=True, udp6=True)
                self.assertEqual(len(writes), 2, change)
                self.check_joined(writes[0], a)
                self.check_joined(writes[1], b)
        fragment = udp_packet(True, b"f" * 300, frag=0x2000)
        a = [udp_packet(True, b"x" * 300, ident=i) for i in range(7)]
        writes = coalesce([a[0], fragment, *a[1:]], udp4=True)
        self.assertEqual(writes[:2], [[PLAIN_HEADER, a[0]], [PLAIN_HEADER, fragment]])
        self.check_joined(writes[2], a[1:])

    def test_segment_and_size_limits(self) -> None:
        """At most 64 datagrams (the kernel's UDP_MAX_SEGMENTS) and 65,535 IP bytes a write."""
        small = [udp_packet(False, b"s" * 10) for _ in range(130)]
        self.assertEqual([len(w) - 2 for w in coalesce(small, udp6=True)], [64, 64, 0, 0])
        big = [udp_packet(True, b"b" * 1400, ident=i) for i in range(52)]
        writes = coalesce(big, udp4=True)
        self.assertEqual([len(w) - 2 for w in writes], [46, 6])
        self.assertLessEqual(len(unwrap(writes[0])[1]), 65535)

    def test_interleaved_flows_and_tcp(self) -> None:
        """Flows told apart by ports and version, interleaved with a TCP flow: each joins into
        its own write, placed where its first packet was."""
        a = [udp_packet(True, b"a" * 200, (1, 2), ident=i) for i in range(6)]
        b = [udp_packet(True, b"b" * 200, (1, 3), ident=i) for i in range(6)]
        c = [udp_packet(False, b"c" * 200, (1, 2)) for _ in range(6)]
        t = [tcp_packet(True, 1 + i * 100, ACK, b"t" * 100) for i in range(6)]
        mixed = [p for four in zip(a, b, c, t) for p in four]
        writes = coalesce(mixed, udp4=True, udp6=True)
        self.assertEqual(len(writes), 4)
        for write, group in zip(writes[:3], (a, b, c)):
            self.check_joined(write, group)
        self.assertEqual(unwrap(writes[3])[0][1], GSO_TCPV4)

    def test_empty_payload_and_lying_lengths_are_plain(self) -> None:
        a = [udp_packet(True, b"x" * 100, ident=i) for i in range(13)]
        empty = udp_packet(True, b"")
        lying = bytearray(udp_packet(True, b"y" * 100))
        lying[24:26] = struct.pack("!H", 50)  # UDP length shorter than the packet
        packets = [*a[:6], empty, a[6], bytes(lying), *a[7:]]
        writes = coalesce(packets, udp4=True)
        self.assertEqual(len(writes), 5)
        self.check_joined(writes[0], a[:6])
        self.assertEqual(writes[1:4], [[PLAIN_HEADER, p] for p in packets[6:9]])
        self.check_joined(writes[4], a[7:])

    @settings(max_examples=200, deadline=None)
    @given(
        shapes=st.lists(
            st.tuples(
                st.booleans(),
                st.integers(0, 2),
                st.sampled_from([1, 7, 100, 999, 1000, 1372]),
                st.sampled_from([{}, {}, {}, {"tos": 8}, {"ttl": 3}, {"frag": 0}]),
            ),
            max_size=150,
        ),
        udp4=st.booleans(),
        udp6=st.booleans(),
    )
    def test_matches_the_reference(
        self,
        shapes: list[tuple[bool, int, int, dict[str, int]]],
        udp4: bool,
        udp6: bool,
    ) -> None:
        """Any mix of versions, flows, sizes and IP fields: the writes hold exactly the
        groups the naive reference makes, in its order; each joined write is byte for byte
        right and cuts back into its datagrams; a group of one is the packet as it was."""
        idents: dict[tuple[bool, int], int] = {}
        packets = []
        for v4, flow, size, change in shapes:
            ident = idents.get((v4, flow), 0)
            idents[v4, flow] = ident + 1
            payload = bytes((ident * 7 + j) & 0xFF for j in range(size))
            packets.append(udp_packet(v4, payload, (9, 10 + flow), ident=ident, **change))
        writes = coalesce(packets, udp4=udp4, udp6=udp6)
        groups = udp_groups(packets, udp4, udp6)
        self.assertEqual(len(writes), len(groups))
        for write, group in zip(writes, groups):
            if len(group) == 1:
                self.assertEqual(write, [PLAIN_HEADER, packets[group[0]]])
            else:
                self.check_joined(write, [packets[i] for i in group])
