"""ICMP "too big" builders, IPv4 fragmentation and TCP MSS clamping on real packet bytes."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.icmp import (
    checksum,
    frag_needed_v4,
    fragment_ipv4,
    packet_too_big_v6,
)
from meshguard.core.mss import clamp_if_syn, clamp_mss
from tests.packets import _checksum, ipv4, ipv6


def tcp_segment(src: bytes, dst: bytes, options: bytes, flags: int, v6: bool) -> bytes:
    """A TCP header with ``options`` and a correct checksum for the given addresses."""
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", 40000, 443, 7, 0, offset << 4, flags, 65535, 0, 0)
    segment = header + options
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), 6)
    else:
        pseudo = src + dst + struct.pack("!xBH", 6, len(segment))
    value = _checksum(pseudo + segment)
    return segment[:16] + struct.pack("!H", value) + segment[18:]


def tcp_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        seg = packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!xBH", 6, len(seg))
    else:
        seg = packet[40:]
        pseudo = packet[8:40] + struct.pack("!I3xB", len(seg), 6)
    return _checksum(pseudo + seg) == 0


V4S, V4D = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
V6S = bytes.fromhex("fd000000000000000000000000000001")
V6D = bytes.fromhex("fd000000000000000000000000000002")


class ChecksumTests(SynchronousTestCase):
    @given(st.binary(max_size=300))
    def test_matches_reference(self, data: bytes) -> None:
        self.assertEqual(checksum(data), _checksum(data))


class FragNeededTests(SynchronousTestCase):
    def test_well_formed(self) -> None:
        original = ipv4("10.0.0.1", "10.0.0.2", bytes(1400), protocol=6)
        error = frag_needed_v4(original, 1216)
        assert error is not None
        self.assertEqual(_checksum(error[:20]), 0)
        self.assertEqual(_checksum(error[20:]), 0)
        self.assertEqual(error[20:24], b"\x03\x04" + error[22:24])
        self.assertEqual(struct.unpack("!H", error[26:28])[0], 1216)
        self.assertEqual(error[28:48], original[:20])
        self.assertLessEqual(len(error), 576)
        self.assertEqual((error[12:16], error[16:20]), (original[16:20], original[12:16]))

    def test_not_for_icmp_errors_or_later_fragments(self) -> None:
        icmp_error = ipv4("10.0.0.1", "10.0.0.2", b"\x03\x01" + bytes(30), protocol=1)
        self.assertIsNone(frag_needed_v4(icmp_error, 1200))
        echo = ipv4("10.0.0.1", "10.0.0.2", b"\x08\x00" + bytes(30), protocol=1)
        self.assertIsNotNone(frag_needed_v4(echo, 1200))
        later = bytearray(ipv4("10.0.0.1", "10.0.0.2", bytes(100)))
        later[7] = 10
        self.assertIsNone(frag_needed_v4(bytes(later), 1200))
        self.assertIsNone(frag_needed_v4(ipv4("0.0.0.0", "10.0.0.2", bytes(10)), 1200))

    @given(st.binary(max_size=200), st.integers(0, 70000))
    def test_garbage_never_raises(self, data: bytes, mtu: int) -> None:
        frag_needed_v4(data, mtu)
        packet_too_big_v6(data, mtu)
        fragment_ipv4(data, mtu)
        clamp_mss(data, mtu)


class PacketTooBigTests(SynchronousTestCase):
    def test_well_formed(self) -> None:
        original = ipv6("fd00::1", "fd00::2", bytes(1400))
        error = packet_too_big_v6(original, 1300)
        assert error is not None
        self.assertEqual(error[6], 58)
        self.assertEqual(struct.unpack("!H", error[4:6])[0], len(error) - 40)
        pseudo = error[8:40] + struct.pack("!I3xB", len(error) - 40, 58)
        self.assertEqual(_checksum(pseudo + error[40:]), 0)
        self.assertEqual(struct.unpack("!I", error[44:48])[0], 1300)
        self.assertLessEqual(len(error), 1280)
        self.assertEqual(error[48:88], original[:40])

    def test_floor_and_refusals(self) -> None:
        original = ipv6("fd00::1", "fd00::2", bytes(1400))
        error = packet_too_big_v6(original, 1000)
        assert error is not None
        self.assertEqual(struct.unpack("!I", error[44:48])[0], 1280)
        self.assertIsNone(
            packet_too_big_v6(ipv6("fd00::1", "fd00::2", b"\x01" + bytes(20), 58), 1280)
        )
        self.assertIsNone(packet_too_big_v6(ipv6("::", "fd00::2", bytes(20)), 1280))


class FragmentTests(SynchronousTestCase):
    @given(st.integers(0, 3000), st.integers(100, 1500))
    def test_reassembles(self, size: int, mtu: int) -> None:
        payload = bytes(i & 255 for i in range(size))
        packet = bytearray(ipv4("10.0.0.1", "10.0.0.2", payload))
        packet[6] = 0
        fragments = fragment_ipv4(bytes(packet), mtu)
        self.assertTrue(fragments)
        data = bytearray()
        for i, fragment in enumerate(fragments):
            self.assertLessEqual(len(fragment), max(mtu, 28))
            self.assertEqual(_checksum(fragment[:20]), 0)
            flags = struct.unpack("!H", fragment[6:8])[0]
            self.assertEqual((flags & 0x1FFF) * 8, len(data))
            self.assertEqual(bool(flags & 0x2000), i < len(fragments) - 1)
            data += fragment[20:]
        self.assertEqual(bytes(data), payload)

    def test_df_refused(self) -> None:
        self.assertEqual(fragment_ipv4(ipv4("10.0.0.1", "10.0.0.2", bytes(2000)), 1000), [])


class MSSTests(SynchronousTestCase):
    def _syn(self, options: bytes, v6: bool = False, flags: int = 0x02) -> bytes:
        if v6:
            return ipv6("fd00::1", "fd00::2", tcp_segment(V6S, V6D, options, flags, True), 6)
        return ipv4("10.0.0.1", "10.0.0.2", tcp_segment(V4S, V4D, options, flags, False), 6)

    def test_v4_clamped_checksum_valid(self) -> None:
        syn = self._syn(struct.pack("!BBH", 2, 4, 1460) + b"\x01\x03\x03\x07")
        self.assertTrue(tcp_ok(syn))
        out = clamp_mss(syn, 1216)
        self.assertEqual(struct.unpack("!H", out[42:44])[0], 1176)
        self.assertTrue(tcp_ok(out))

    def test_odd_offset_option(self) -> None:
        """MSS after a single NOP sits across 16-bit words; the checksum still comes out right."""
        syn = self._syn(b"\x01" + struct.pack("!BBH", 2, 4, 1460) + b"\x01\x01\x01")
        out = clamp_mss(syn, 1216)
        self.assertEqual(struct.unpack("!H", out[43:45])[0], 1176)
        self.assertTrue(tcp_ok(out))

    def test_v6_clamped(self) -> None:
        syn = self._syn(struct.pack("!BBH", 2, 4, 1440), v6=True)
        out = clamp_mss(syn, 1280)
        self.assertEqual(struct.unpack("!H", out[62:64])[0], 1220)
        self.assertTrue(tcp_ok(out))

    def test_untouched(self) -> None:
        small = self._syn(struct.pack("!BBH", 2, 4, 1000))
        self.assertIs(clamp_mss(small, 1216), small)
        ack = self._syn(struct.pack("!BBH", 2, 4, 1460), flags=0x10)
        self.assertIs(clamp_mss(ack, 1216), ack)
        no_mss = self._syn(b"\x01\x01\x04\x02")
        self.assertIs(clamp_mss(no_mss, 1216), no_mss)

    @given(st.integers(100, 65535), st.integers(0, 3), st.integers(600, 9000))
    def test_any_value_and_alignment(self, mss: int, nops: int, mtu: int) -> None:
        options = b"\x01" * nops + struct.pack("!BBH", 2, 4, mss)
        options += b"\x00" * (-len(options) % 4)
        out = clamp_mss(self._syn(options), mtu)
        self.assertTrue(tcp_ok(out))
        value = struct.unpack("!H", out[40 + nops + 2 : 40 + nops + 4])[0]
        self.assertEqual(value, min(mss, mtu - 40))

    def test_clamp_if_syn_only_touches_syns(self) -> None:
        """The data path's filter: SYNs (v4 and v6) are clamped, anything else passes as is."""
        syn4 = self._syn(struct.pack("!BBH", 2, 4, 1460))
        syn6 = self._syn(struct.pack("!BBH", 2, 4, 1440), v6=True)
        self.assertEqual(clamp_if_syn(syn4, 1216), clamp_mss(syn4, 1216))
        self.assertEqual(clamp_if_syn(syn6, 1280), clamp_mss(syn6, 1280))
        ack = self._syn(struct.pack("!BBH", 2, 4, 1460), flags=0x10)
        udp = ipv4("10.0.0.1", "10.0.0.2", b"x" * 40)
        for packet in (ack, udp, ipv6("fd00::1", "fd00::2", b"y" * 40)):
            self.assertIs(clamp_if_syn(packet, 1216), packet)

    @given(st.binary(min_size=20, max_size=120))
    def test_clamp_if_syn_garbage(self, data: bytes) -> None:
        """Any packet of at least an IPv4 header's length (the device checks that) is safe."""
        out = clamp_if_syn(data, 1216)
        self.assertEqual(len(out), len(data))
