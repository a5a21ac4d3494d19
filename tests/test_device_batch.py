"""The device's batch paths give exactly what the per-packet paths give.

``Device.packets_from_tun`` seals the segments of one TUN super-packet with one route lookup
and one round of timer work. Two pairs built from the same seed are driven alike, one packet
by packet and one in batches; the datagrams on the wire (byte for byte), what arrives, the
counters and the timers must be the same, in the fast case and in every case that falls back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core import constants as C
from meshguard.core.crypto import CryptoError
from meshguard.core.peer import Peer
from tests.packets import ipv4, ipv6
from tests.test_device import A_EP, B_EP, Pair


def segments(count: int, size: int = 1400, v6: bool = False) -> list[bytes]:
    """``count`` packets A -> B of one flow, the last one shorter (like a TSO split)."""
    out = []
    for i in range(count):
        body = bytes([i & 0xFF]) * (size if i < count - 1 else size // 3)
        out.append(
            ipv6("fd00::1", "fd00::2", body, 6) if v6 else ipv4("10.0.0.1", "10.0.0.2", body, 6)
        )
    return out


def state(peer: Peer) -> tuple[object, ...]:
    keypair = peer.keypairs.current
    return (
        keypair.send_counter if keypair is not None else None,
        peer.tx_bytes,
        peer.data_packets,
        list(peer.timers.deadlines),
        len(peer.staged),
    )


class PacketsFromTunTests(SynchronousTestCase):
    def run_both(self, batches: list[list[bytes]], prepare: object = None) -> tuple[Pair, Pair]:
        """Drive one pair per packet and one per batch; compare everything. A third pair takes
        each batch as views of one buffer overwritten after the call (the TUN batch receiver
        gets views of a ``CutArena``'s array, which the next cut overwrites; writable ones
        here, so hashing one would fail) and must match too, in the fast path and every
        fallback."""
        one, many, viewed = Pair(seed=7), Pair(seed=7), Pair(seed=7)
        for pair in (one, many, viewed):
            if callable(prepare):
                prepare(pair)
        for batch in batches:
            for packet in batch:
                one.a.device.packet_from_tun(packet, one.net.now)
            many.a.device.packets_from_tun(batch, many.net.now)
            views, next_cut = as_views(batch)
            viewed.a.device.packets_from_tun(views, viewed.net.now)
            next_cut()
            for pair in (one, many, viewed):
                pair.net.flush()
        self.assertEqual(many.a.sent, one.a.sent, "datagrams on the wire")
        self.assertEqual(many.b.written, one.b.written, "packets delivered")
        self.assertEqual(state(many.peer_of_a), state(one.peer_of_a))
        self.assertEqual(viewed.a.sent, one.a.sent, "datagrams on the wire (views)")
        self.assertEqual(viewed.b.written, one.b.written, "packets delivered (views)")
        self.assertEqual(state(viewed.peer_of_a), state(one.peer_of_a))
        for datagram, _ in viewed.a.sent:
            self.assertIs(type(datagram), bytes)
        return one, many

    def test_established_session_batches(self) -> None:
        """With a session up: the fast path, byte for byte the per-packet result; v4 and v6."""
        warm = [[ipv4("10.0.0.1", "10.0.0.2", b"warm")]]
        batches = [*warm, segments(45), segments(3), segments(2, v6=True), segments(1)]

        def ipv6_route(pair: Pair) -> None:
            import ipaddress

            pair.a.device.replace_allowed_ips(
                pair.peer_of_a,
                [ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::2/128")],
            )
            pair.b.device.replace_allowed_ips(
                pair.peer_of_b,
                [ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("fd00::1/128")],
            )

        per_packet: list[bytes] = []

        def prepare(pair: Pair) -> None:
            ipv6_route(pair)
            device = pair.a.device
            single = device.packet_from_tun

            def counted(packet: bytes, now: float) -> None:
                per_packet.append(packet)
                single(packet, now)

            device.packet_from_tun = counted  # type: ignore[method-assign]

        _, many = self.run_both(batches, prepare)
        self.assertEqual(len(many.b.written), 1 + 45 + 3 + 2 + 1)
        # All three pairs count here: the per-packet pair 52 times, the batch pairs (bytes
        # and views) only for the first (no session yet): every later batch took the fast
        # path.
        self.assertEqual(len(per_packet), 52 + 1 + 1)

    def test_no_session_stages_like_single_packets(self) -> None:
        """The first batch finds no session: staged and sent after the handshake, as before."""
        self.run_both([segments(5), segments(4)])

    def test_mss_clamping_and_small_path_mtu_fall_back(self) -> None:
        """A peer with MSS clamping (path MTU discovery sets it for every meshguard peer)
        keeps the batch path for segments that are no SYN; a SYN whose MSS must be clamped
        takes the per-packet path, which clamps it; a smaller path MTU takes it too."""
        per_packet: list[bytes] = []

        def clamp(pair: Pair) -> None:
            pair.peer_of_a.mss_mtu = 1280
            single = pair.a.device.packet_from_tun

            def counted(packet: bytes, now: float) -> None:
                per_packet.append(packet)
                single(packet, now)

            pair.a.device.packet_from_tun = counted  # type: ignore[method-assign]

        def tcp(flags: int, options: bytes = b"") -> bytes:
            offset = (20 + len(options)) // 4 << 4
            header = bytes(12) + bytes([offset, flags]) + bytes([0xFF, 0xFF, 0, 0, 0, 0])
            return ipv4("10.0.0.1", "10.0.0.2", header + options + bytes(100), 6)

        plain = [tcp(0x10), tcp(0x10), tcp(0x18)]
        self.run_both([[ipv4("10.0.0.1", "10.0.0.2", b"warm")], plain], clamp)
        # Per-packet pair: 1 + 3; each batch pair (bytes, views): only the warm-up (no
        # session yet).
        self.assertEqual(len(per_packet), 4 + 1 + 1)
        per_packet.clear()
        syn = [tcp(0x02, b"\x02\x04\x05\xb4"), tcp(0x10)]
        _, many = self.run_both([[ipv4("10.0.0.1", "10.0.0.2", b"warm")], syn], clamp)
        self.assertEqual(len(per_packet), 3 + 3 + 3)
        self.assertNotEqual(many.b.written[1], syn[0], "the SYN's MSS was clamped")

        def small(pair: Pair) -> None:
            pair.peer_of_a.inner_mtu = 1000
            pair.a.device.set_too_big_handler(lambda peer, packet, now: None)

        self.run_both([[ipv4("10.0.0.1", "10.0.0.2", b"warm")], segments(4)], small)

    def test_counter_near_rekey_limit_falls_back(self) -> None:
        """A batch that would pass REKEY_AFTER_MESSAGES goes packet by packet (rekey rules)."""
        warm = [[ipv4("10.0.0.1", "10.0.0.2", b"warm")]]

        def near(pair: Pair) -> None:
            pair.a.device.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", b"x"), pair.net.now)
            pair.net.flush()
            keypair = pair.peer_of_a.keypairs.current
            assert keypair is not None
            keypair.send_counter = C.REKEY_AFTER_MESSAGES - 2

        self.run_both([*warm, segments(5)], near)

    def test_no_route_and_garbage(self) -> None:
        """Unroutable or too short first packets are counted as the per-packet path counts."""
        one, many = self.run_both([[ipv4("10.0.0.1", "10.9.9.9", b"x")] * 3, [b"\x45" * 10]])
        self.assertEqual(many.a.device.counters, one.a.device.counters)
        many.a.device.packets_from_tun([], many.net.now)


def held_to_b(pair: Pair, send: Callable[[], object]) -> list[bytes]:
    """Run ``send`` keeping every transport message to B off the network; those messages,
    in order (for B to receive them as one batch)."""
    held: list[bytes] = []

    def hold(data: bytes, source: object, destination: object) -> bool:
        if destination == B_EP and data[0] == 4:
            held.append(data)
            return False
        return True

    pair.net.filters.append(hold)
    send()
    pair.net.flush()
    pair.net.filters.remove(hold)
    return held


def as_views(batch: list[bytes]) -> tuple[list[bytes | memoryview], Callable[[], None]]:
    """``batch`` as the adapters hand a GRO read or a cut super-packet over: views of one
    reused buffer; and what their next read or cut does to them (overwrite the buffer)."""
    buffer = bytearray(b"".join(batch))
    view = memoryview(buffer)
    views: list[bytes | memoryview] = []
    at = 0
    for data in batch:
        views.append(view[at : at + len(data)])
        at += len(data)

    def next_read() -> None:
        buffer[:] = b"\xa5" * len(buffer)

    return views, next_read


def receive_at_b(pair: Pair, held: list[bytes], batched: bool, views: bool = False) -> None:
    """B receives ``held`` as one batch or one by one (through ``datagram_received``, which a
    test may have wrapped); ``views``: the batch as views of one buffer, overwritten after
    the call as the adapter's next read would."""
    device = pair.b.device
    if batched:
        if views:
            batch, next_read = as_views(held)
            device.transport_batch_received(batch, A_EP, pair.net.now)
            next_read()
        else:
            device.transport_batch_received(held, A_EP, pair.net.now)
    else:
        for data in held:
            device.datagram_received(data, A_EP, pair.net.now)


def send_data_a_to_b(pair: Pair, packets: list[bytes]) -> None:
    for packet in packets:
        pair.a.device.send_data(pair.peer_of_a, packet, pair.net.now)


def transports_a_to_b(pair: Pair, payloads: int, step: int = 1, base: int = 100) -> list[bytes]:
    """Run a handshake and seal ``payloads`` packets A -> B (of ``base``, ``base + step``,
    ... payload bytes), keeping every transport message to B off the network (returned, in
    order), so B sees the first one in a batch."""

    def send() -> None:
        for i in range(payloads):
            pair.a_to_b(bytes([i]) * (base + i * step))
        pair.a.device.send_keepalive(pair.peer_of_a, pair.net.now)
        pair.a_to_b(b"after the keepalive")

    return held_to_b(pair, send)


class TransportBatchTests(SynchronousTestCase):
    def receive_both(self, mangle: object = None, views: bool = False) -> tuple[Pair, Pair, int]:
        """B receives A's held messages one by one (``one``) and as one batch (``many``;
        ``views``: of one buffer, overwritten after the call)."""
        one, many = Pair(seed=11), Pair(seed=11)
        batches = [transports_a_to_b(pair, 8) for pair in (one, many)]
        self.assertEqual(batches[0], batches[1])
        batch = batches[0]
        if callable(mangle):
            batch = mangle(batch)
        for data in batch:
            one.b.device.datagram_received(data, A_EP, one.net.now)
        slow: list[bytes] = []
        device = many.b.device
        single = device.datagram_received

        def counted(data: bytes, source: tuple[str, int], now: float) -> None:
            self.assertIs(type(data), bytes, "the full path may keep it: a copy")
            slow.append(data)
            single(data, source, now)

        device.datagram_received = counted  # type: ignore[method-assign]
        receive_at_b(many, batch, True, views)
        self.assertEqual(many.b.written, one.b.written, "packets delivered")
        self.assertEqual(many.b.sent, one.b.sent, "what B sent (key confirmation, ...)")
        self.assertEqual(many.b.device.counters, one.b.device.counters)
        for pair in (one, many):
            self.assertEqual(pair.peer_of_b.endpoint, A_EP)
        self.assertEqual(
            (state(many.peer_of_b), many.peer_of_b.rx_bytes, many.peer_of_b.need_another_keepalive),
            (state(one.peer_of_b), one.peer_of_b.rx_bytes, one.peer_of_b.need_another_keepalive),
        )
        return one, many, len(slow)

    def test_first_message_confirms_the_key_rest_fast(self) -> None:
        """The batch starts with the session's first message (key confirmation on B's side);
        it takes the full path, the other nine the fast one; a keepalive is not written.
        The same as views of one buffer that the next read overwrites."""
        for views in (False, True):
            one, _, slow = self.receive_both(views=views)
            self.assertEqual(len(one.b.written), 9)
            self.assertEqual(slow, 1)

    def test_replays_forgeries_and_strangers_in_the_batch(self) -> None:
        """Replayed, forged and unknown-index messages and garbage inside a batch are
        dropped and counted exactly as one by one."""

        def mangle(batch: list[bytes]) -> list[bytes]:
            forged = batch[3][:-1] + bytes([batch[3][-1] ^ 1])
            stranger = batch[2][:4] + b"\x99\x99\x99\x99" + batch[2][8:]
            return [*batch[:4], batch[1], forged, stranger, b"\x04junk", *batch[4:], batch[0]]

        for views in (False, True):
            one, _, slow = self.receive_both(mangle, views)
            counters = one.b.device.counters
            self.assertEqual(counters.replayed, 2)
            self.assertEqual(counters.decrypt_failed, 1)
            self.assertEqual(counters.unknown_index, 1)
            self.assertEqual(counters.malformed, 1)
            self.assertLess(slow, 6)

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.tuples(st.integers(0, 9), st.integers(0, 200), st.integers(1, 255)), max_size=6
        ),
        st.lists(st.tuples(st.integers(0, 10), st.binary(max_size=80)), max_size=3),
        st.booleans(),
    )
    def test_hostile_batches_as_one_by_one(
        self, flips: list[tuple[int, int, int]], junk: list[tuple[int, bytes]], views: bool
    ) -> None:
        """Bytes flipped anywhere in a batch's messages and junk between them (as views of
        one buffer or as ``bytes``): nothing raises, and what B delivers, sends, counts and
        keeps is what it does one by one (``receive_both`` compares)."""

        def mangle(batch: list[bytes]) -> list[bytes]:
            out = [bytearray(data) for data in batch]
            for index, at, xor in flips:
                data = out[index % len(out)]
                data[at % len(data)] ^= xor
            mangled = [bytes(data) for data in out]
            for at, data in junk:
                mangled.insert(at % (len(mangled) + 1), data)
            return mangled

        self.receive_both(mangle, views)

    def test_inner_packets_checked_in_the_fast_path(self) -> None:
        """A packet whose inner source B does not allow from A is dropped on the fast path
        too (the checks after decryption are shared with the full path)."""
        pair = Pair(seed=3)
        pair.a_to_b(b"first")  # the session, delivered
        packets = [ipv4(s, "10.0.0.2", b"x") for s in ("10.0.0.1", "10.0.0.99", "10.0.0.1")]
        held = held_to_b(
            pair, lambda: [pair.a.device.packet_from_tun(p, pair.net.now) for p in packets]
        )
        self.assertEqual(len(held), 3)
        written = len(pair.b.written)
        pair.b.device.transport_batch_received(held, A_EP, pair.net.now)
        self.assertEqual(len(pair.b.written) - written, 2)
        self.assertEqual(pair.b.device.counters.source_not_allowed, 1)


def inner_packets() -> list[bytes]:
    """Every kind of inner packet the batch receive path treats apart: plain IPv4 and IPv6,
    trailing bytes, a length past the end, a source B does not allow, a SYN to clamp and a
    plain segment beside it, marked and unmarked echo replies, too short, an unknown
    version, and control-sized garbage."""
    syn = b"\x30\x39\x00\x50" + bytes(8) + b"\x60\x02\xff\xff" + bytes(4) + b"\x02\x04\x05\xb4"
    ack = b"\x30\x39\x00\x50" + bytes(8) + b"\x50\x10\xff\xff" + bytes(4) + b"data" * 30
    echo = b"\x00\x00\x00\x00" + b"MG" + b"\x00\x01" + b"probe"
    plain = ipv4("10.0.0.1", "10.0.0.2", b"plain" * 40)
    long_claim = bytearray(ipv4("10.0.0.1", "10.0.0.2", b"x" * 40))
    long_claim[2:4] = (len(long_claim) + 8).to_bytes(2, "big")
    return [
        plain,
        plain + b"trailing bytes",
        bytes(long_claim),
        ipv4("10.0.0.99", "10.0.0.2", b"not allowed"),
        ipv4("10.0.0.1", "10.0.0.2", syn, 6),
        ipv4("10.0.0.1", "10.0.0.2", ack, 6),
        ipv4("10.0.0.1", "10.0.0.2", echo, 1),
        ipv4("10.0.0.1", "10.0.0.2", b"\x00\x00\x00\x00XY\x00\x01", 1),
        ipv6("fd00::1", "fd00::2", b"six" * 30),
        ipv6("fd00::1", "fd00::2", syn, 6),
        ipv6("fd00::1", "fd00::2", b"six" * 30) + b"tail",
        ipv6("fd00::99", "fd00::2", b"not allowed"),
        ipv4("10.0.0.1", "10.0.0.2", b"plain again"),
        b"\x45" + bytes(9),
        b"\x55" + bytes(59),
        plain,
    ]


class InnerPacketBatchTests(SynchronousTestCase):
    def open_inner_packets(
        self, batched: bool, bulk: bool = False, views: bool = False
    ) -> tuple[Any, ...]:
        """B opens A's sealed inner_packets() one by one or as one batch; what it wrote,
        the echo replies consumed, counters, the peer's state and how many messages took
        the full path. ``bulk``: B's adapter takes opened packets in one call
        (``write_packets``), whose sizes go to ``self.bulk_calls``."""
        pair = Pair(seed=5)
        self.bulk_calls: list[int] = []
        if bulk:
            node = pair.b

            def write_packets(packets: list[bytes]) -> None:
                self.bulk_calls.append(len(packets))
                for packet in packets:
                    node.write_packet(packet)

            node.write_packets = write_packets  # type: ignore[attr-defined]
        pair.a_to_b(b"session")
        held = held_to_b(pair, lambda: send_data_a_to_b(pair, inner_packets()))
        device = pair.b.device
        pair.peer_of_b.mss_mtu = 1280
        echoes: list[bytes] = []

        def on_echo(peer: Peer, packet: bytes, now: float) -> bool:
            echoes.append(packet)
            return True

        device.set_echo_handler(b"MG", on_echo)
        slow: list[bytes] = []
        single = device.datagram_received

        def counted(data: bytes, source: tuple[str, int], now: float) -> None:
            self.assertIs(type(data), bytes, "the full path may keep it: a copy")
            slow.append(data)
            single(data, source, now)

        device.datagram_received = counted  # type: ignore[method-assign]
        written = len(pair.b.written)
        receive_at_b(pair, held, batched, views)
        peer = pair.peer_of_b
        return (
            pair.b.written[written:],
            echoes,
            device.counters.as_dict(),
            state(peer),
            peer.rx_bytes,
            peer.need_another_keepalive,
            len(slow),
        )

    def test_inner_packets_batch_equals_one_by_one(self) -> None:
        """B opens the same sealed messages one by one and as one batch, with the path MTU
        clamp and the echo handler set: the packets written (clamped and truncated alike),
        the echo replies consumed, the counters and the peer's state are identical, and the
        batch took the full path only for its first message."""
        one, many = self.open_inner_packets(False), self.open_inner_packets(True)
        self.assertEqual(many[:-1], one[:-1])
        self.assertEqual(many[-1], 1, "only the first message took the full path")
        self.assertEqual(self.open_inner_packets(True, views=True), many, "as views")
        self.assertEqual(len(one[1]), 1, "the marked echo reply went to the handler")
        delivered = one[0]
        self.assertIn(inner_packets()[0], delivered)
        self.assertNotIn(inner_packets()[4], delivered, "the SYN was clamped")
        self.assertEqual(len(delivered), 10)
        self.assertEqual(one[2]["source_not_allowed"], 2)
        self.assertEqual(one[2]["bad_inner_packet"], 3)

    def test_bulk_writes_keep_the_order(self) -> None:
        """With an adapter that takes opened packets in one call, the batch hands over runs
        of fast-path packets, each run before whatever takes the full path (a SYN clamped,
        an echo reply for the prober, a refused source): what is written, and in what order,
        is what one by one writes."""
        one = self.open_inner_packets(False)
        many = self.open_inner_packets(True, bulk=True)
        self.assertEqual(many[:-1], one[:-1])
        self.assertEqual(self.open_inner_packets(True, bulk=True, views=True), many)
        self.assertTrue(self.bulk_calls)
        self.assertLess(sum(self.bulk_calls), len(one[0]), "the full path wrote some itself")

    def test_bulk_writes_of_a_plain_batch(self) -> None:
        """A batch of ordinary data (the first message takes the full path: key confirmation)
        reaches such an adapter in one call for all the rest, after the first's own write.
        (Packets of 16n bytes: a padded one takes the full path, which trims it.)"""
        pair = Pair(seed=11)
        batch = transports_a_to_b(pair, 8, step=16, base=108)
        calls: list[list[bytes]] = []
        node = pair.b

        def write_packets(packets: list[bytes]) -> None:
            calls.append(list(packets))
            for packet in packets:
                node.write_packet(packet)

        node.write_packets = write_packets  # type: ignore[attr-defined]
        pair.b.device.transport_batch_received(batch, A_EP, pair.net.now)
        self.assertEqual(len(pair.b.written), 9)
        # The last (19 bytes, padded) takes the full path: the run before it goes first.
        self.assertEqual(calls, [pair.b.written[1:8]])


class ZeroedKeypairBatchTests(SynchronousTestCase):
    """The batch paths reach the AEAD through ``Keypair.encrypt``/``decrypt`` as the lone
    paths do, so a zeroed keypair refuses them all the same way."""

    def test_batch_seal_refused_after_zeroing(self) -> None:
        """``_seal`` with a zeroed keypair raises (local misuse) before the counter moves or
        anything is sent."""
        pair = Pair(seed=13)
        pair.a_to_b(b"session")
        keypair = pair.peer_of_a.keypairs.current
        assert keypair is not None
        keypair.zero()
        counter, sent = keypair.send_counter, len(pair.a.sent)
        device = pair.a.device
        self.assertRaises(CryptoError, device._seal, keypair, segments(3), device.mtu)
        self.assertEqual(keypair.send_counter, counter)
        self.assertEqual(len(pair.a.sent), sent)

    def test_batch_open_after_zeroing_counted_like_one_by_one(self) -> None:
        """A batch under a keypair zeroed before it arrives opens nothing and counts each
        message as a decrypt failure, as one by one, without raising."""

        def receive(batched: bool) -> tuple[object, ...]:
            pair = Pair(seed=11)
            held = transports_a_to_b(pair, 8)
            keypair = pair.peer_of_b.keypairs.next
            assert keypair is not None
            keypair.zero()
            receive_at_b(pair, held, batched)
            return pair.b.written, pair.b.device.counters.as_dict(), len(held)

        one, many = receive(False), receive(True)
        self.assertEqual(many, one)
        written, counters, held = one
        self.assertEqual(written, [])
        self.assertEqual(counters["decrypt_failed"], held)

    def test_keypair_zeroed_during_a_batch(self) -> None:
        """A handler called from inside the batch (here the echo handler) zeroes the keypair
        the batch is opening: the batch looks the decrypt call up again, finds none, and
        the rest of the batch is counted as one by one (decrypt failures), not opened. The
        echo reply first (zeroed during the full path) or later (during the fast path)."""
        echo = ipv4("10.0.0.1", "10.0.0.2", b"\x00\x00\x00\x00MG\x00\x01probe", 1)
        plain = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * 50) for i in range(4)]

        def receive(inner: list[bytes], batched: bool) -> tuple[object, ...]:
            pair = Pair(seed=5)
            pair.a_to_b(b"session")
            held = held_to_b(pair, lambda: send_data_a_to_b(pair, inner))
            device = pair.b.device

            def on_echo(peer: Peer, packet: bytes, now: float) -> bool:
                keypair = peer.keypairs.current
                assert keypair is not None
                keypair.zero()
                return True

            device.set_echo_handler(b"MG", on_echo)
            written = len(pair.b.written)
            receive_at_b(pair, held, batched)
            return pair.b.written[written:], device.counters.as_dict()

        for at in (0, 2):
            inner = [*plain[:at], echo, *plain[at:]]
            one, many = receive(inner, False), receive(inner, True)
            self.assertEqual(many, one)
            self.assertEqual(one[0], plain[:at])
            self.assertEqual(one[1]["decrypt_failed"], len(plain) - at)
