"""The WireGuard port's kernel filter: what it drops, and that no message of ours is ever dropped.

The programs run twice: in a Python interpreter of classic BPF (tests/cbpf.py) over generated
packets, checked against a naive reference of what may pass; and attached to real loopback
sockets, where what arrives is compared with the same reference (including a UDP GSO bundle
read by a GRO socket, which the filter sees as one buffer).
"""

from __future__ import annotations

import select
import socket
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from meshguard.adapters import socket_filter as sf
from meshguard.adapters import udp
from tests import cbpf

UDP_HEADER = bytes(8)
MESH = dict(sf.MESH_DATAGRAMS)
HANDSHAKE_SIZES = {1: 148, 2: 92, 3: 64}


def header(kind: int) -> bytes:
    return bytes([kind, 0, 0, 0])


def reference(payload: bytes) -> bool:
    """Whether a datagram (or GRO bundle) with this payload may be a message of ours: the rules
    of meshguard/adapters/socket_filter.py, written the obvious way."""
    if len(payload) < 4:
        return False
    head, size = payload[:4], len(payload)
    if head in MESH:
        return size >= MESH[head] and size % MESH[head] == 0
    if head[1:] != b"\0\0\0" or head[0] not in (1, 2, 3, 4):
        return False
    if head[0] == 4:
        return size >= 32
    wanted = HANDSHAKE_SIZES[head[0]]
    return size == wanted or size >= wanted + 20


def passes(program: list[sf.Instruction], payload: bytes, **kw: object) -> bool:
    return cbpf.run(program, UDP_HEADER + payload, **kw) != 0  # type: ignore[arg-type]


# Messages of ours, any type and size; and GRO bundles of them. A transport message is 32 bytes
# plus its padded plaintext, and padding stops at the MTU: any length from 32 on (MTU 1420 makes
# full-size messages of 1452 bytes, 12 more than a multiple of 16).
transport = st.builds(
    lambda index, n, rest: header(4) + index.to_bytes(4, "little") + rest.ljust(24 + n, b"\0"),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 65000), st.sampled_from([1420, 1280, 9000])),
    st.binary(max_size=24),
)
handshake = st.builds(
    lambda kind, body: (
        header(kind) + body.ljust(HANDSHAKE_SIZES[kind] - 4, b"\0")[: HANDSHAKE_SIZES[kind] - 4]
    ),
    st.sampled_from([1, 2, 3]),
    st.binary(max_size=160),
)
mesh = st.builds(
    lambda pair, body: pair[0] + body.ljust(pair[1] - 4, b"\0")[: pair[1] - 4],
    st.sampled_from(sf.MESH_DATAGRAMS),
    st.binary(max_size=32),
)
message = st.one_of(transport, handshake, mesh)


@st.composite
def gro_bundle(draw: st.DrawFn) -> bytes:
    """What a GRO socket may read at once: segments the size of the first, the last no larger."""
    first = draw(message.filter(lambda m: len(m) <= 2000))
    same = draw(st.lists(st.just(first), max_size=3))
    last = draw(message.filter(lambda m: len(m) <= len(first)))
    return b"".join([first, *same, last])


class ProgramTests(SynchronousTestCase):
    """The program in the interpreter."""

    program = sf.port_filter()

    @settings(max_examples=500, deadline=None)
    @given(message)
    def test_every_message_passes(self, payload: bytes) -> None:
        """Any message of ours, of any type and size, passes the plain filter."""
        self.assertTrue(passes(self.program, payload))

    @settings(max_examples=300, deadline=None)
    @given(gro_bundle())
    def test_every_gro_bundle_passes(self, payload: bytes) -> None:
        """A GRO read of several of our datagrams passes (the filter sees its first header)."""
        self.assertTrue(passes(self.program, payload))

    @settings(max_examples=1000, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda kind, rest: header(kind) + rest, st.integers(0, 6), st.binary(max_size=300)
            ),
        )
    )
    def test_matches_reference(self, payload: bytes) -> None:
        """On anything at all, the program decides as the naive reference does."""
        self.assertEqual(passes(self.program, payload), reference(payload))

    def test_drops(self) -> None:
        """What is dropped: too short, unknown type, reserved bytes set, impossible sizes."""
        for payload in (
            b"",
            b"\x01\0\0",
            header(5) + bytes(60),
            header(0) + bytes(60),
            b"\x01\0\x01\0" + bytes(144),
            header(1) + bytes(143),
            header(1) + bytes(145),
            header(1) + bytes(144 + 19),
            header(2) + bytes(89),
            header(3) + bytes(61),
            header(4) + bytes(27),
            b"MGn\x01" + bytes(17),
            b"MGn\x01" + bytes(30),
            b"MGn\x09" + bytes(16),
        ):
            self.assertFalse(passes(self.program, payload), payload[:8])

    def test_v6_program_is_the_same_without_shedding(self) -> None:
        self.assertEqual(sf.port_filter(v6=True), self.program)


class SheddingTests(SynchronousTestCase):
    """While shedding: data only for live receivers; handshakes from known sources, others by
    random sample."""

    known = socket.inet_aton("10.0.0.1")
    other = socket.inet_aton("10.0.1.1")

    def network(self, source: bytes) -> bytes:
        return bytes(12) + source + bytes(4)

    def test_transport_needs_a_live_index(self) -> None:
        program = sf.port_filter(shedding=sf.Shedding((), (7, 0xDEADBEEF), 0))
        for index, expected in ((7, True), (0xDEADBEEF, True), (8, False), (0, False)):
            payload = header(4) + index.to_bytes(4, "little") + bytes(24)
            self.assertEqual(passes(program, payload), expected, index)

    def test_no_index_check_when_none(self) -> None:
        program = sf.port_filter(shedding=sf.Shedding((), None, 0xFF))
        self.assertTrue(passes(program, header(4) + bytes(28)))

    def test_handshakes_from_known_sources_always_pass(self) -> None:
        program = sf.port_filter(shedding=sf.Shedding((self.known,), (), 0xFFFF))
        init = header(1) + bytes(144)
        self.assertTrue(passes(program, init, network=self.network(self.known), random=lambda: 1))
        self.assertFalse(passes(program, init, network=self.network(self.other), random=lambda: 1))
        self.assertTrue(passes(program, init, network=self.network(self.other), random=lambda: 0))
        # A sample that passes still needs the right shape.
        self.assertFalse(passes(program, header(1) + bytes(140), network=self.network(self.known)))

    def test_v6_sources(self) -> None:
        known = socket.inet_pton(socket.AF_INET6, "fd00::1")
        other = socket.inet_pton(socket.AF_INET6, "fd00::2")
        program = sf.port_filter(v6=True, shedding=sf.Shedding((known, self.known), (), 3))
        init = header(2) + bytes(88)
        net = bytes(8)
        self.assertTrue(passes(program, init, network=net + known + bytes(16), random=lambda: 1))
        self.assertFalse(passes(program, init, network=net + other + bytes(16), random=lambda: 1))
        self.assertTrue(passes(program, init, network=net + other + bytes(16), random=lambda: 4))

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(st.integers(1, 2**32 - 1), max_size=3000, unique=True),
        st.lists(st.binary(min_size=4, max_size=4), max_size=512),
        st.data(),
    )
    def test_large_programs_build_and_keep_live_indices(
        self, indices: list[int], sources: list[bytes], data: st.DataObject
    ) -> None:
        """Up to the flood guard's limits the program fits the kernel's and every live index
        and known source still passes."""
        program = sf.port_filter(shedding=sf.Shedding(tuple(sources), tuple(indices), 0xFFFF))
        self.assertLessEqual(len(program), sf.MAX_INSTRUCTIONS)
        if indices:
            index = data.draw(st.sampled_from(indices))
            self.assertTrue(passes(program, header(4) + index.to_bytes(4, "little") + bytes(24)))
        if sources:
            source = data.draw(st.sampled_from(sources))
            self.assertTrue(
                passes(
                    program, header(1) + bytes(144), network=self.network(source), random=lambda: 1
                )
            )


class RealSocketTests(SynchronousTestCase):
    """The programs attached to real loopback sockets: the kernel agrees with the reference."""

    def pair(self, family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket]:
        receiver = socket.socket(family, socket.SOCK_DGRAM)
        sender = socket.socket(family, socket.SOCK_DGRAM)
        for s in (receiver, sender):
            self.addCleanup(s.close)
        try:
            receiver.bind((host, 0))
        except OSError:
            raise SkipTest(f"no {host}") from None
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        return receiver, sender

    def drain(self, receiver: socket.socket, expected: int) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + 2
        receiver.setblocking(False)
        while time.monotonic() < deadline:
            select.select([receiver], [], [], 0.05)
            try:
                while True:
                    got.append(receiver.recv(70000))
            except BlockingIOError:
                pass
            if len(got) >= expected and not select.select([receiver], [], [], 0.05)[0]:
                break
        return got

    def samples(self) -> list[bytes]:
        return [
            header(1) + bytes(144),
            header(2) + bytes(88),
            header(3) + bytes(60),
            header(4) + bytes(28),
            header(4) + bytes(1436),
            *(magic + bytes(size - 4) for magic, size in sf.MESH_DATAGRAMS),
            header(1) + bytes(145),
            header(4) + bytes(1448),
            header(5) + bytes(60),
            b"\x01\x01\0\0" + bytes(144),
            b"hello",
        ]

    def check(self, family: socket.AddressFamily, host: str) -> None:
        receiver, sender = self.pair(family, host)
        sf.attach(receiver, sf.port_filter(v6=family == socket.AF_INET6))
        for payload in self.samples():
            sender.sendto(payload, receiver.getsockname()[:2])
        wanted = [p for p in self.samples() if reference(p)]
        self.assertEqual(self.drain(receiver, len(wanted)), wanted)

    def test_v4(self) -> None:
        self.check(socket.AF_INET, "127.0.0.1")

    def test_v6(self) -> None:
        self.check(socket.AF_INET6, "::1")

    def test_shedding_on_a_real_socket(self) -> None:
        """Live index and known source pass; unknown index and unknown source (never sampled:
        mask 0xFFFF would pass one in 65536) are dropped by the kernel."""
        receiver, sender = self.pair(socket.AF_INET, "127.0.0.1")
        known = sf.Shedding((socket.inet_aton("127.0.0.1"),), (0x01020304,), 0xFFFF)
        data_live = header(4) + (0x01020304).to_bytes(4, "little") + bytes(24)
        data_dead = header(4) + (0x01020305).to_bytes(4, "little") + bytes(24)
        init = header(1) + bytes(144)
        sf.attach(receiver, sf.port_filter(shedding=known))
        for payload in (data_live, data_dead, init):
            sender.sendto(payload, receiver.getsockname())
        self.assertEqual(self.drain(receiver, 2), [data_live, init])
        unknown = sf.Shedding((socket.inet_aton("127.0.0.9"),), (0x01020304,), 0xFFFF)
        sf.attach(receiver, sf.port_filter(shedding=unknown))
        for payload in (init, init, data_live):
            sender.sendto(payload, receiver.getsockname())
        self.assertEqual(self.drain(receiver, 1), [data_live])

    def test_full_size_packets_at_mtu_1420_pass(self) -> None:
        """1420 bytes of plaintext cannot be padded to 1424 within the MTU: the message is
        1452 bytes, and a GSO bundle of two is 2904, neither a multiple of 16."""
        receiver, sender = self.pair(socket.AF_INET, "127.0.0.1")
        try:
            receiver.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
            sender.getsockopt(udp.SOL_UDP, udp.UDP_SEGMENT)
        except OSError:
            raise SkipTest("no UDP GSO/GRO") from None
        sf.attach(receiver, sf.port_filter())
        single = header(4) + bytes(1448)
        sender.sendto(single, receiver.getsockname())
        self.assertEqual(self.drain(receiver, 1), [single])
        control = [(udp.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", 1452))]
        sender.sendmsg([single, single], control, 0, receiver.getsockname())
        self.assertEqual(b"".join(self.drain(receiver, 1)), single * 2)

    def test_gro_bundle_of_data_and_an_initiation_passes(self) -> None:
        """A GSO send of two transport messages and an initiation (a rekey in one batch) reaches
        a GRO socket as one 3048-byte buffer: 3048 is no multiple of 16, and it still passes."""
        receiver, sender = self.pair(socket.AF_INET, "127.0.0.1")
        try:
            receiver.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
            sender.getsockopt(udp.SOL_UDP, udp.UDP_SEGMENT)
        except OSError:
            raise SkipTest("no UDP GSO/GRO") from None
        sf.attach(receiver, sf.port_filter())
        parts = [header(4) + bytes(1448), header(4) + bytes(1448), header(1) + bytes(144)]
        control = [(udp.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", 1452))]
        sender.sendmsg(parts, control, 0, receiver.getsockname())
        got = self.drain(receiver, 1)
        self.assertEqual(b"".join(got), b"".join(parts))
