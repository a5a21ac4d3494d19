"""NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs: byte layouts, round trips, hostile input."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.portmap import natpmp, pcp

ports = st.integers(1, 65535)
u32 = st.integers(0, 2**32 - 1)
v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(
    lambda a: a.ipv4_mapped is None
)


def natpmp_address_response(result: int, epoch: int, address: ipaddress.IPv4Address) -> bytes:
    return struct.pack("!BBHI4s", 0, 128, result, epoch, address.packed)


def natpmp_map_response(
    result: int, epoch: int, internal: int, external: int, lifetime: int
) -> bytes:
    return struct.pack("!BBHIHHI", 0, 129, result, epoch, internal, external, lifetime)


def pcp_map_response(
    result: int,
    lifetime: int,
    epoch: int,
    nonce: bytes,
    internal: int,
    external: int,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    protocol: int = pcp.PROTOCOL_UDP,
) -> bytes:
    wire = (
        ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
        if address.version == 4
        else address.packed
    )
    header = struct.pack("!BBBBII12x", 2, 0x81, 0, result, lifetime, epoch)
    return header + struct.pack("!12sB3xHH16s", nonce, protocol, internal, external, wire)


class NatPmpTests(SynchronousTestCase):
    def test_request_layouts(self) -> None:
        """Requests have RFC 6886's layouts: 2-byte address request, 12-byte UDP map request
        (version 0, opcode 1, reserved, internal port, suggested port, lifetime)."""
        self.assertEqual(natpmp.encode_external_address_request(), b"\x00\x00")
        self.assertEqual(
            natpmp.encode_map_request(51820, 51821, 7200),
            bytes.fromhex("0001 0000 ca6c ca6d 00001c20".replace(" ", "")),
        )
        self.assertRaises(ValueError, natpmp.encode_map_request, 0, 1, 1)
        self.assertRaises(ValueError, natpmp.encode_map_request, 1, 1, -1)

    @given(st.integers(0, 65535), u32, v4)
    def test_address_response_round_trip(
        self, result: int, epoch: int, address: ipaddress.IPv4Address
    ) -> None:
        """An external-address response parses to exactly its fields."""
        parsed = natpmp.parse_response(natpmp_address_response(result, epoch, address))
        self.assertEqual(parsed, natpmp.ExternalAddressResponse(result, epoch, address))

    @given(st.integers(1, 65535), u32, ports, ports, u32)
    def test_map_response_round_trip(
        self, result: int, epoch: int, internal: int, external: int, lifetime: int
    ) -> None:
        """A map response (any result) parses to exactly its fields."""
        data = natpmp_map_response(result, epoch, internal, external, lifetime)
        self.assertEqual(
            natpmp.parse_response(data),
            natpmp.MapResponse(1, result, epoch, internal, external, lifetime),
        )

    def test_incomplete_success_and_wrong_version_are_rejected(self) -> None:
        """A success without its fields, a request echoed back, another version or a grant of
        port 0 is no answer; a short error answer still says its result."""
        self.assertIsNone(natpmp.parse_response(natpmp_map_response(0, 1, 5, 6, 7)[:12]))
        self.assertIsNone(natpmp.parse_response(natpmp.encode_map_request(5, 6, 7)))
        self.assertIsNone(natpmp.parse_response(b"\x02" + natpmp_map_response(0, 1, 5, 6, 7)[1:]))
        self.assertIsNone(natpmp.parse_response(natpmp_map_response(0, 1, 5, 0, 7)))
        short = natpmp.parse_response(struct.pack("!BBHI", 0, 129, 3, 9))
        self.assertEqual(short, natpmp.MapResponse(1, 3, 9, 0, 0, 0))

    @given(st.binary(max_size=64))
    def test_garbage_never_raises(self, data: bytes) -> None:
        """Any bytes from the gateway parse to None or a response; nothing raises."""
        parsed = natpmp.parse_response(data)
        self.assertIn(
            type(parsed), (type(None), natpmp.ExternalAddressResponse, natpmp.MapResponse)
        )


class PcpTests(SynchronousTestCase):
    def test_map_request_layout(self) -> None:
        """A MAP request is RFC 6887's 24-byte header (version 2, opcode 1, lifetime, client
        address as IPv4-mapped IPv6) and 36-byte MAP body (nonce, protocol 17, ports, the
        all-zero suggested IPv4 address)."""
        request = pcp.encode_map_request(
            client=ipaddress.IPv4Address("192.168.1.2"),
            nonce=b"N" * 12,
            internal_port=51820,
            lifetime=7200,
            suggested_port=51820,
        )
        expected = (
            bytes.fromhex("02010000" "00001c20")
            + b"\0" * 10 + b"\xff\xff" + bytes([192, 168, 1, 2])
            + b"N" * 12 + bytes([17, 0, 0, 0]) + bytes.fromhex("ca6cca6c")
            + b"\0" * 10 + b"\xff\xff" + b"\0" * 4
        )  # fmt: skip
        self.assertEqual(request, expected)
        self.assertEqual(len(request), 60)
        self.assertRaises(
            ValueError,
            pcp.encode_map_request,
            client=ipaddress.IPv4Address("192.168.1.2"),
            nonce=b"short",
            internal_port=1,
            lifetime=1,
        )

    @given(
        st.integers(0, 255),
        u32.filter(bool),
        u32,
        st.binary(min_size=12, max_size=12),
        ports,
        ports,
        st.one_of(v4, v6),
    )
    def test_map_response_round_trip(
        self,
        result: int,
        lifetime: int,
        epoch: int,
        nonce: bytes,
        internal: int,
        external: int,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ) -> None:
        """A MAP response parses to exactly its fields, IPv4 addresses unmapped again; options
        after the body are ignored."""
        data = pcp_map_response(result, lifetime, epoch, nonce, internal, external, address)
        expected = pcp.MapResponse(
            result, lifetime, epoch, nonce, pcp.PROTOCOL_UDP, internal, external, address
        )
        self.assertEqual(pcp.parse_response(data), expected)
        option = bytes([0x80, 0, 0, 4]) + b"\0" * 4
        self.assertEqual(pcp.parse_response(data + option), expected)

    def test_natpmp_answer_is_other_version(self) -> None:
        """A NAT-PMP-only gateway answers a PCP request with version 0 "unsupported version":
        the client learns to fall back (RFC 6887 section 9)."""
        answer = struct.pack("!BBHI", 0, 129, 1, 77)
        self.assertEqual(pcp.parse_response(answer), pcp.OtherVersion(0))
        self.assertIsNone(pcp.parse_response(struct.pack("!BBHI", 0, 129, 0, 77)))

    def test_bad_responses_are_rejected(self) -> None:
        """A request echoed back, a truncated answer, or a success granting port 0 is no
        answer."""
        nonce = b"n" * 12
        address = ipaddress.IPv4Address("203.0.113.5")
        good = pcp_map_response(0, 600, 1, nonce, 51820, 40000, address)
        self.assertIsNone(pcp.parse_response(good[:59]))
        self.assertIsNone(pcp.parse_response(bytes([2, 0x01]) + good[2:]))
        self.assertIsNone(pcp.parse_response(pcp_map_response(0, 600, 1, nonce, 51820, 0, address)))
        deleted = pcp.parse_response(pcp_map_response(0, 0, 1, nonce, 51820, 0, address))
        assert isinstance(deleted, pcp.MapResponse)
        self.assertEqual(deleted.lifetime, 0)

    @given(st.binary(max_size=1200))
    def test_garbage_never_raises(self, data: bytes) -> None:
        """Any bytes from the gateway parse to None, OtherVersion or a MAP response."""
        parsed = pcp.parse_response(data)
        self.assertIn(type(parsed), (type(None), pcp.OtherVersion, pcp.MapResponse))

    @given(st.binary(min_size=60, max_size=60))
    def test_version_two_garbage_never_raises(self, tail: bytes) -> None:
        """Well-sized version-2 garbage with the MAP response opcode parses or is dropped."""
        parsed = pcp.parse_response(bytes([2, 0x81]) + tail[2:])
        self.assertIn(type(parsed), (type(None), pcp.MapResponse))


def pcp_announce(epoch: int, result: int = 0) -> bytes:
    return struct.pack("!BBBBII12x", 2, 0x80, 0, result, 0, epoch)


class AnnounceTests(SynchronousTestCase):
    @given(u32)
    def test_announce_round_trip(self, epoch: int) -> None:
        """A PCP ANNOUNCE (miniupnpd multicasts one at start) gives its epoch; an error
        result, a MAP response or a request does not count."""
        self.assertEqual(pcp.parse_announce(pcp_announce(epoch)), epoch)
        self.assertIsNone(pcp.parse_announce(pcp_announce(epoch, result=1)))
        self.assertIsNone(pcp.parse_announce(bytes([2, 0]) + pcp_announce(epoch)[2:]))
        self.assertIsNone(pcp.parse_announce(pcp_announce(epoch)[:20]))

    @given(st.binary(max_size=1200))
    def test_announce_garbage_never_raises(self, data: bytes) -> None:
        """Any bytes parse to None or an epoch."""
        self.assertIn(type(pcp.parse_announce(data)), (type(None), int))
