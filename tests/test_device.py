"""The device engine end to end: two (or three) devices on an in-memory network."""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core import constants as C
from meshguard.core import device as device_module
from meshguard.core.crypto import CryptoError, generate_private_key, public_key
from meshguard.core.device import Device
from meshguard.core.interfaces import AlreadyRegisteredError
from meshguard.core.mss import clamp_if_syn, clamp_mss
from meshguard.core.peer import NEW_HANDSHAKE, PERSISTENT_KEEPALIVE, SEND_KEEPALIVE, Peer
from meshguard.testing.memory import MemoryNetwork, MemoryNode
from tests.packets import ipv4, ipv6
from tests.test_icmp_mss import V4D, V4S, V6D, V6S, tcp_segment

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51820)


def is_keepalive(data: bytes) -> bool:
    return data[:4] == b"\x04\x00\x00\x00" and len(data) == 32


def kinds(sent: list[tuple[bytes, tuple[str, int]]]) -> list[int]:
    return [d[0] for d, _ in sent]


class Pair:
    """Two devices that know each other, A with B's endpoint, B without A's."""

    def __init__(self, seed: int = 1, psk: bytes | None = None, **kwargs: object) -> None:
        rng = random.Random(seed)
        self.net = MemoryNetwork()
        self.a = self.net.add(A_EP, rng.randbytes, **kwargs)
        self.b = self.net.add(B_EP, rng.randbytes, **kwargs)
        self.a_key = generate_private_key(rng.randbytes)
        self.b_key = generate_private_key(rng.randbytes)
        self.a.device.set_private_key(self.a_key, self.net.now)
        self.b.device.set_private_key(self.b_key, self.net.now)
        pa = self.a.device.add_peer(public_key(self.b_key))
        pb = self.b.device.add_peer(public_key(self.a_key))
        assert pa is not None and pb is not None
        self.peer_of_a, self.peer_of_b = pa, pb
        self.a.device.set_endpoint(pa, B_EP)
        self.a.device.replace_allowed_ips(pa, [ipaddress.ip_network("10.0.0.2/32")])
        self.b.device.replace_allowed_ips(
            pb, [ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("fd00::1/128")]
        )
        if psk is not None:
            self.a.device.set_preshared_key(pa, psk)
            self.b.device.set_preshared_key(pb, psk)
        self.a.device.up(self.net.now)
        self.b.device.up(self.net.now)

    def a_to_b(self, payload: bytes = b"hello") -> bytes:
        packet = ipv4("10.0.0.1", "10.0.0.2", payload)
        self.net.send(self.a, packet)
        return packet

    def b_to_a(self, payload: bytes = b"hi") -> bytes:
        packet = ipv4("10.0.0.2", "10.0.0.1", payload)
        self.net.send(self.b, packet)
        return packet


class HandshakeAndDataTests(SynchronousTestCase):
    def test_authenticated_sources_reported_before_any_reply(self) -> None:
        """Initiation, response and data that authenticate tell the source listeners
        their source (before the handshake response goes out, so the UDP layer can answer from
        the right local address); garbage and forged datagrams tell nothing."""
        pair = Pair()
        told: list[tuple[str, tuple[str, int], int]] = []
        pair.a.device.add_source_listener(
            lambda peer, s, now: told.append(("a", s, len(pair.a.sent)))
        )
        pair.b.device.add_source_listener(
            lambda peer, s, now: told.append(("b", s, len(pair.b.sent)))
        )
        pair.a_to_b(b"x")
        # B: the initiation (before its response), then the data; A: the response.
        self.assertEqual(told, [("b", A_EP, 0), ("a", B_EP, 1), ("b", A_EP, 1)])
        told.clear()
        now = pair.net.now
        for junk in (b"\x01" + bytes(147), b"\x04" + bytes(40), b"\x02" + bytes(91), b"x"):
            pair.b.device.datagram_received(junk, ("192.0.2.66", 1), now)
        self.assertEqual(told, [])

    def test_first_packet_starts_handshake_and_is_delivered(self) -> None:
        """A packet with no session is staged, a handshake runs, then it arrives intact."""
        pair = Pair()
        packet = pair.a_to_b(b"x" * 100)
        self.assertEqual(pair.b.written, [packet])
        self.assertEqual(kinds(pair.a.sent), [1, 4])
        self.assertEqual(kinds(pair.b.sent), [2])
        self.assertEqual(pair.peer_of_b.endpoint, A_EP)
        self.assertNotEqual(pair.peer_of_a.last_handshake_time, 0.0)
        self.assertNotEqual(pair.peer_of_b.last_handshake_time, 0.0)

    def test_data_both_ways(self) -> None:
        pair = Pair()
        first = pair.a_to_b()
        reply = pair.b_to_a()
        self.assertEqual(pair.b.written, [first])
        self.assertEqual(pair.a.written, [reply])
        # B used A's keypair (confirmed) and did not handshake again.
        self.assertEqual(kinds(pair.b.sent), [2, 4])

    def test_handshake_from_responder_side(self) -> None:
        """B, which did not know A's endpoint, can initiate once A has reached it."""
        pair = Pair()
        pair.a_to_b()
        pair.net.advance(C.REJECT_AFTER_TIME + 1)
        pair.b.sent.clear()
        reply = pair.b_to_a()
        self.assertEqual(kinds(pair.b.sent)[0], 1)
        self.assertEqual(pair.a.written[-1], reply)

    def test_with_preshared_key(self) -> None:
        pair = Pair(psk=bytes(range(32)))
        packet = pair.a_to_b()
        self.assertEqual(pair.b.written, [packet])

    def test_mismatched_preshared_key_fails(self) -> None:
        pair = Pair()
        pair.b.device.set_preshared_key(pair.peer_of_b, bytes(range(32)))
        pair.a_to_b()
        self.assertEqual(pair.b.written, [])
        self.assertEqual(pair.a.device.counters.handshake_failed, 1)

    def test_ipv6_inner_packets(self) -> None:
        pair = Pair()
        pair.a.device.replace_allowed_ips(pair.peer_of_a, [ipaddress.ip_network("fd00::2/128")])
        pair.b.device.replace_allowed_ips(pair.peer_of_b, [ipaddress.ip_network("fd00::1/128")])
        packet = ipv6("fd00::1", "fd00::2", b"six")
        pair.net.send(pair.a, packet)
        self.assertEqual(pair.b.written, [packet])

    def test_padding_is_removed(self) -> None:
        """Packets are padded to 16 on the wire and trimmed by the IP length on receipt."""
        pair = Pair()
        pair.a_to_b(b"")
        packet = pair.a_to_b(b"abc")
        data = pair.a.sent[-1][0]
        self.assertEqual((len(data) - 32) % 16, 0)
        self.assertEqual(pair.b.written[-1], packet)

    def test_lone_send_inline_matches_send_data(self) -> None:
        """``packet_from_tun`` seals a packet of a ready session inline (one frame, for the
        cold lone packet); two identical pairs, one through it and one through ``send_data``,
        put the same bytes on the wire and leave the same counters and timers, with a
        persistent keepalive and without, for sizes around the padding and the MTU."""
        inline, general = Pair(seed=7), Pair(seed=7)
        for pair in (inline, general):
            pair.a_to_b()
            pair.b_to_a()
            pair.a.sent.clear()
        general_calls: list[object] = []
        device = inline.a.device
        send_data = device.send_data
        device.send_data = lambda *args: (general_calls.append(args), send_data(*args))  # type: ignore[method-assign]
        sizes = [0, 1, 15, 16, 17, 64, inline.a.device.mtu - 29, inline.a.device.mtu - 20]
        for keepalive in (0, 25):
            for pair in (inline, general):
                pair.a.device.set_persistent_keepalive(pair.peer_of_a, keepalive, pair.net.now)
                pair.peer_of_a.timers.deadlines[NEW_HANDSHAKE] = None
            for size in sizes:
                packet = ipv4("10.0.0.1", "10.0.0.2", bytes(size))
                now = inline.net.now
                inline.a.device.packet_from_tun(packet, now)
                general.a.device.send_data(general.peer_of_a, packet, now)
                for pair in (inline, general):
                    pair.net.advance(0.5)
                self.assertEqual(inline.a.sent, general.a.sent)
                self.assertEqual(inline.b.written, general.b.written)
                ours, theirs = inline.peer_of_a, general.peer_of_a
                self.assertEqual(ours.timers.deadlines, theirs.timers.deadlines)
                self.assertEqual(
                    (ours.tx_bytes, ours.data_packets), (theirs.tx_bytes, theirs.data_packets)
                )
        self.assertGreaterEqual(len(inline.a.sent), 2 * len(sizes))
        self.assertEqual(inline.b.written[-1][20:], bytes(sizes[-1]))
        self.assertEqual(general_calls, [])

    def test_no_route_is_dropped(self) -> None:
        pair = Pair()
        pair.net.send(pair.a, ipv4("10.0.0.1", "10.9.9.9"))
        self.assertEqual(pair.a.sent, [])
        self.assertEqual(pair.a.device.counters.no_route, 1)


class RekeyAndExpiryTests(SynchronousTestCase):
    def test_rekey_after_time(self) -> None:
        """The initiator starts a new handshake when it sends on a keypair older than
        REKEY_AFTER_TIME, and traffic continues on the new keypair."""
        pair = Pair()
        pair.a_to_b()
        first = pair.peer_of_a.keypairs.current
        pair.net.advance(C.REKEY_AFTER_TIME - 1)
        pair.a.sent.clear()
        pair.a_to_b()
        self.assertEqual(kinds(pair.a.sent), [4])
        pair.net.advance(2)
        pair.a.sent.clear()
        pair.a_to_b()
        self.assertIn(1, kinds(pair.a.sent))
        self.assertIsNot(pair.peer_of_a.keypairs.current, first)
        packet = pair.a_to_b(b"after")
        self.assertEqual(pair.b.written[-1], packet)

    def test_responder_does_not_rekey_on_time(self) -> None:
        pair = Pair()
        pair.a_to_b()
        pair.b_to_a()
        pair.net.advance(C.REKEY_AFTER_TIME + 1)
        pair.b.sent.clear()
        pair.b_to_a()
        self.assertEqual(kinds(pair.b.sent), [4])

    def test_rekey_after_messages(self) -> None:
        pair = Pair()
        pair.a_to_b()
        keypair = pair.peer_of_a.keypairs.current
        assert keypair is not None
        keypair.send_counter = C.REKEY_AFTER_MESSAGES + 1
        pair.net.advance(C.REKEY_TIMEOUT)
        pair.a.sent.clear()
        pair.a_to_b()
        self.assertEqual(kinds(pair.a.sent)[:2], [4, 1])

    def test_expiry_after_reject_after_time(self) -> None:
        """After REJECT_AFTER_TIME a keypair neither sends nor receives."""
        pair = Pair()
        pair.a_to_b()
        keypair = pair.peer_of_a.keypairs.current
        assert keypair is not None
        pair.net.now += C.REJECT_AFTER_TIME
        self.assertFalse(keypair.can_send(pair.net.now))
        # An old transport message replayed into B after expiry is refused.
        old = [d for d, _ in pair.a.sent if d[0] == 4][-1]
        pair.b.device.datagram_received(old, A_EP, pair.net.now)
        self.assertEqual(pair.b.device.counters.expired_keypair, 1)

    def test_reject_after_messages(self) -> None:
        pair = Pair()
        pair.a_to_b()
        keypair = pair.peer_of_a.keypairs.current
        assert keypair is not None
        keypair.send_counter = C.REJECT_AFTER_MESSAGES
        pair.a.sent.clear()
        pair.net.advance(C.REKEY_TIMEOUT)
        pair.a_to_b()
        self.assertEqual(kinds(pair.a.sent)[0], 1)

    def test_zero_key_material(self) -> None:
        """Keys are erased 3 * REJECT_AFTER_TIME after the last handshake."""
        pair = Pair()
        pair.a_to_b()
        pair.net.advance(C.ZERO_KEY_MATERIAL_AFTER + 1)
        self.assertIsNone(pair.peer_of_a.keypairs.current)
        self.assertIsNone(pair.peer_of_b.keypairs.current)
        self.assertEqual(len(pair.a.device.indices), 0)


class RetransmissionTests(SynchronousTestCase):
    def test_retransmit_under_loss(self) -> None:
        """Lost initiations are retried every REKEY_TIMEOUT (+ jitter) until one gets through."""
        pair = Pair()
        lost = {"count": 0}

        def lose_first_two(data: bytes, src: object, dst: object) -> bool:
            if data[0] == 1 and lost["count"] < 2:
                lost["count"] += 1
                return False
            return True

        pair.net.filters.append(lose_first_two)
        packet = pair.a_to_b()
        self.assertEqual(pair.b.written, [])
        pair.net.advance(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
        self.assertEqual(pair.b.written, [])
        pair.net.advance(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
        self.assertEqual(pair.b.written, [packet])
        initiations = [d for d, _ in pair.a.sent if d[0] == 1]
        self.assertEqual(len(initiations), 3)
        # Every retry uses a fresh sender index.
        self.assertEqual(len({d[4:8] for d in initiations}), 3)

    def test_gives_up_after_rekey_attempt_time(self) -> None:
        pair = Pair()
        pair.net.filters.append(lambda data, src, dst: False)
        pair.a_to_b()
        pair.net.advance(200)
        initiations = [d for d, _ in pair.a.sent if d[0] == 1]
        self.assertEqual(len(initiations), C.MAX_TIMER_HANDSHAKES + 2)
        last_time = pair.net.now
        pair.a.sent.clear()
        pair.net.advance(60)
        self.assertEqual(pair.a.sent, [])
        self.assertEqual(len(pair.peer_of_a.staged), 0)
        self.assertLess(C.REKEY_ATTEMPT_TIME, last_time)

    def test_simultaneous_initiations(self) -> None:
        """Both sides initiate at once; they converge on working sessions both ways."""
        pair = Pair()
        pair.b.device.set_endpoint(pair.peer_of_b, A_EP)
        pair.a.device.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", b"a"), pair.net.now)
        pair.b.device.packet_from_tun(ipv4("10.0.0.2", "10.0.0.1", b"b"), pair.net.now)
        pair.net.flush()
        pair.net.advance(2 * (C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX))
        self.assertEqual(len(pair.b.written), 1)
        self.assertEqual(len(pair.a.written), 1)
        x = pair.a_to_b(b"later")
        y = pair.b_to_a(b"later")
        self.assertEqual(pair.b.written[-1], x)
        self.assertEqual(pair.a.written[-1], y)


class ReplayTests(SynchronousTestCase):
    def test_replayed_transport_dropped(self) -> None:
        pair = Pair()
        pair.a_to_b()
        data = [d for d, _ in pair.a.sent if d[0] == 4][-1]
        before = list(pair.b.written)
        pair.b.device.datagram_received(data, A_EP, pair.net.now)
        self.assertEqual(pair.b.written, before)
        self.assertEqual(pair.b.device.counters.replayed, 1)

    def test_reordered_transport_accepted(self) -> None:
        pair = Pair()
        pair.a_to_b()
        held: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []

        def hold(data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> bool:
            if data[0] == 4 and len(held) < 1:
                held.append((data, src, dst))
                return False
            return True

        pair.net.filters.append(hold)
        first = pair.a_to_b(b"first")
        second = pair.a_to_b(b"second")
        pair.net.filters.clear()
        pair.b.device.datagram_received(held[0][0], A_EP, pair.net.now)
        self.assertEqual(pair.b.written[-2:], [second, first])

    def test_replayed_initiation_is_silent(self) -> None:
        """A replayed initiation gets no response and changes nothing."""
        pair = Pair()
        pair.a_to_b()
        initiation = next(d for d, _ in pair.a.sent if d[0] == 1)
        pair.b.sent.clear()
        keypairs = (pair.peer_of_b.keypairs.current, pair.peer_of_b.keypairs.next)
        pair.net.now += 1
        pair.b.device.datagram_received(initiation, ("198.51.100.7", 1), pair.net.now)
        self.assertEqual(pair.b.sent, [])
        self.assertEqual(pair.peer_of_b.endpoint, A_EP)
        self.assertEqual((pair.peer_of_b.keypairs.current, pair.peer_of_b.keypairs.next), keypairs)
        self.assertEqual(pair.b.device.counters.initiation_replayed, 1)


class SilenceTests(SynchronousTestCase):
    """Garbage, truncation and unknown keys produce no response and no state change."""

    def assertSilent(self, pair: Pair, data: bytes) -> None:
        pair.b.sent.clear()
        endpoint = pair.peer_of_b.endpoint
        indices = len(pair.b.device.indices)
        pair.b.device.datagram_received(data, ("198.51.100.9", 9), pair.net.now)
        self.assertEqual(pair.b.sent, [])
        self.assertEqual(pair.peer_of_b.endpoint, endpoint)
        self.assertEqual(len(pair.b.device.indices), indices)

    def test_garbage(self) -> None:
        pair = Pair()
        pair.a_to_b()
        rng = random.Random(5)
        for size in (0, 1, 3, 4, 31, 32, 64, 92, 148, 200, 1500):
            for first in (1, 2, 3, 4, 5, 0):
                data = bytes([first, 0, 0, 0]) + rng.randbytes(max(0, size - 4))
                self.assertSilent(pair, data[:size])

    def test_truncated_messages(self) -> None:
        pair = Pair()
        pair.a_to_b()
        for data, _ in pair.a.sent:
            for cut in (1, 4, 16, len(data) - 1):
                self.assertSilent(pair, data[:cut])

    def test_initiation_from_unknown_key(self) -> None:
        pair = Pair()
        rng = random.Random(9)
        stranger = MemoryNetwork().add(("192.0.2.9", 1), rng.randbytes)
        stranger.device.set_private_key(generate_private_key(rng.randbytes), 0.0)
        assert pair.b.device.public_key is not None
        peer = stranger.device.add_peer(pair.b.device.public_key)
        assert peer is not None
        stranger.device.set_endpoint(peer, B_EP)
        stranger.device.send_initiation(peer, pair.net.now, retry=False)
        initiation = stranger.sent[0][0]
        self.assertSilent(pair, initiation)
        self.assertEqual(pair.b.device.counters.handshake_failed, 1)

    def test_bit_flips_in_transport(self) -> None:
        pair = Pair()
        pair.a_to_b()
        data = bytearray([d for d, _ in pair.a.sent if d[0] == 4][-1])
        for position in range(4, len(data)):
            flipped = bytearray(data)
            flipped[position] ^= 0x01
            self.assertSilent(pair, bytes(flipped))


class CookieTests(SynchronousTestCase):
    def test_cookie_round_under_load(self) -> None:
        """Under load B answers an initiation without a valid mac2 with a cookie reply; A's
        retry carries mac2 and the handshake completes."""
        pair = Pair()
        pair.b.device.under_load_threshold = 0
        packet = pair.a_to_b()
        self.assertEqual(kinds(pair.b.sent), [3])
        self.assertEqual(pair.b.device.counters.cookie_sent, 1)
        self.assertEqual(pair.b.written, [])
        pair.net.advance(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
        self.assertEqual(pair.b.written, [packet])

    def test_rate_limit_under_load(self) -> None:
        pair = Pair()
        pair.b.device.under_load_threshold = 0
        pair.a_to_b()
        pair.net.advance(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
        initiation = [d for d, _ in pair.a.sent if d[0] == 1][-1]
        for _ in range(30):
            pair.b.device.datagram_received(initiation, A_EP, pair.net.now)
        self.assertGreater(pair.b.device.counters.rate_limited, 0)


class KeepaliveTests(SynchronousTestCase):
    def test_passive_keepalive(self) -> None:
        """B received data and sent nothing: it sends a keepalive KEEPALIVE_TIMEOUT later."""
        pair = Pair()
        pair.a_to_b()
        start = pair.net.now
        pair.b.sent.clear()
        pair.net.advance(C.KEEPALIVE_TIMEOUT - 0.01)
        self.assertEqual(pair.b.sent, [])
        pair.net.advance(0.02)
        self.assertEqual(len(pair.b.sent), 1)
        self.assertTrue(is_keepalive(pair.b.sent[0][0]))
        self.assertLess(abs(pair.net.now - start - C.KEEPALIVE_TIMEOUT), 0.02)

    def test_no_passive_keepalive_when_replying(self) -> None:
        pair = Pair()
        pair.a_to_b()
        pair.b_to_a()
        pair.b.sent.clear()
        pair.net.advance(C.KEEPALIVE_TIMEOUT + 1)
        self.assertEqual([d for d, _ in pair.b.sent if is_keepalive(d)], [])

    def test_new_handshake_when_data_unanswered(self) -> None:
        """Data sent and nothing received for KEEPALIVE + REKEY timeouts: new handshake."""
        pair = Pair()
        pair.a_to_b()
        pair.net.filters.append(lambda data, src, dst: dst != A_EP)
        pair.net.advance(C.KEEPALIVE_TIMEOUT + 1)
        pair.a.sent.clear()
        pair.a_to_b()
        self.assertTrue(pair.a.device.timers.pending(pair.peer_of_a.timers, NEW_HANDSHAKE))
        pair.net.advance(C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
        self.assertIn(1, kinds(pair.a.sent))

    def test_persistent_keepalive_interval(self) -> None:
        """With an interval of 25 s, a keepalive goes out at once and then after every 25 s
        of silence in both directions."""
        pair = Pair()
        pair.a_to_b()
        pair.net.advance(C.KEEPALIVE_TIMEOUT + 1)
        pair.a.sent.clear()
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 25, pair.net.now)
        self.assertEqual(len(pair.a.sent), 1)
        self.assertTrue(is_keepalive(pair.a.sent[0][0]))
        started = pair.net.now
        times: list[float] = []
        original = pair.a.send_datagram

        def record(data: bytes, endpoint: tuple[str, int]) -> None:
            times.append(pair.net.now - started)
            original(data, endpoint)

        pair.a.send_datagram = record  # type: ignore[method-assign]
        pair.net.advance(100)
        keepalive_times = [round(t, 3) for t in times]
        self.assertEqual(keepalive_times[:3], [25.0, 50.0, 75.0])

    def test_persistent_keepalive_reset_by_traffic(self) -> None:
        pair = Pair()
        pair.a_to_b()
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 25, pair.net.now)
        pair.net.advance(20)
        pair.b_to_a()
        deadline = pair.peer_of_a.timers.deadlines[PERSISTENT_KEEPALIVE]
        self.assertEqual(deadline, pair.net.now + 25)

    def test_persistent_keepalive_off(self) -> None:
        pair = Pair()
        pair.a_to_b()
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 25, pair.net.now)
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 0, pair.net.now)
        pair.net.advance(C.KEEPALIVE_TIMEOUT + 1)
        pair.a.sent.clear()
        pair.net.advance(100)
        self.assertEqual(pair.a.sent, [])

    def test_keepalive_on_up(self) -> None:
        rng = random.Random(3)
        net = MemoryNetwork()
        a: MemoryNode = net.add(A_EP, rng.randbytes)
        a.device.set_private_key(generate_private_key(rng.randbytes), net.now)
        peer = a.device.add_peer(public_key(generate_private_key(rng.randbytes)))
        assert peer is not None
        a.device.set_endpoint(peer, B_EP)
        a.device.set_persistent_keepalive(peer, 10, net.now)
        self.assertEqual(a.sent, [])
        a.device.up(net.now)
        self.assertEqual(kinds(a.sent), [1])
        self.assertFalse(a.device.timers.pending(peer.timers, SEND_KEEPALIVE))


class IdleKeepaliveTests(SynchronousTestCase):
    """What an idle tunnel with a persistent keepalive costs (issue 17)."""

    def test_keepalive_on_expired_session_is_the_initiation_alone(self) -> None:
        """Once the session expired, the keepalive's slot carries only the handshake
        initiation (it refreshes the NAT mapping as well): no key-confirmation keepalive
        follows the response. The next keepalive confirms the keypair, and the responder can
        reach us before that by a handshake of its own."""
        pair = Pair()
        pair.peer_of_a.is_meshguard = True
        pair.a_to_b()
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 50, pair.net.now)
        sent = self.record(pair, 2 * C.REJECT_AFTER_TIME + 100)
        # One datagram per slot, 50 s apart: keepalives, and an initiation alone in the slot
        # that found the session expired.
        gaps = {round(b[0] - a[0], 1) for a, b in itertools.pairwise(sent)}
        self.assertEqual(gaps, {50.0})
        self.assertEqual({kind for _, kind in sent}, {"keepalive", "handshake"})
        self.assertEqual(sent[-1][1], "keepalive")
        # The next keepalive confirmed the keypair: B uses it for data at once.
        before = kinds(pair.b.sent)
        packet = pair.b_to_a()
        self.assertEqual(kinds(pair.b.sent)[len(before) :], [4])
        self.assertEqual(pair.a.written[-1], packet)

    def test_unconfirmed_responder_reaches_us_by_its_own_handshake(self) -> None:
        """Right after the quiet handshake (and at any moment until the next keepalive), the
        responder's data still arrives: it starts a handshake of its own, at most
        REKEY_TIMEOUT after its response (it may not sooner)."""
        for after in (0.1, 3.0, 6.0, 30.0):
            pair = Pair()
            pair.peer_of_a.is_meshguard = True
            pair.a_to_b()
            pair.a.device.set_persistent_keepalive(pair.peer_of_a, 50, pair.net.now)
            # Until the first keepalive that finds the session expired: a quiet handshake.
            while pair.peer_of_b.keypairs.next is None:
                pair.net.advance(0.05)
            pair.net.advance(after)
            # Unconfirmed until our next keepalive (50 s later).
            self.assertIsNotNone(pair.peer_of_b.keypairs.next)
            packet = pair.b_to_a()
            pair.net.advance(C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
            self.assertEqual(pair.a.written[-1], packet, f"{after} s after the handshake")

    def test_stock_peer_gets_its_key_confirmation(self) -> None:
        """Toward a stock WireGuard peer the keepalive's handshake is confirmed at once, as
        WireGuard does (a stock responder would hold its packets until our next keepalive)."""
        pair = Pair()
        pair.a_to_b()
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 50, pair.net.now)
        sent = self.record(pair, 2 * C.REJECT_AFTER_TIME + 100)
        handshakes = [t for t, kind in sent if kind == "handshake"]
        self.assertTrue(handshakes)
        for when in handshakes:
            self.assertIn(round(when, 3), [round(t, 3) for t, kind in sent if kind == "keepalive"])

    def record(self, pair: Pair, seconds: float) -> list[tuple[float, str]]:
        """A's datagrams over ``seconds``: (time since start, handshake or keepalive or other)."""
        started = pair.net.now
        sent: list[tuple[float, str]] = []
        original = pair.a.send_datagram

        def record(data: bytes, endpoint: tuple[str, int]) -> None:
            kind = "handshake" if data[0] == 1 else "keepalive" if is_keepalive(data) else "other"
            sent.append((pair.net.now - started, kind))
            original(data, endpoint)

        pair.a.send_datagram = record  # type: ignore[method-assign]
        pair.net.advance(seconds)
        pair.a.send_datagram = original  # type: ignore[method-assign]
        return sent

    def test_sent_counts_by_kind_and_idle_stretch(self) -> None:
        """Each peer counts keepalives, control messages and handshake messages it was sent;
        the idle stretch restarts with the first of them after a data packet."""
        pair = Pair()
        pair.a_to_b()
        counts = pair.peer_of_a.sent
        self.assertEqual(counts.total["handshake"], 1)
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 25, pair.net.now)
        pair.net.advance(111)
        # At once, then 25 s after the latest packet either way (B's passive keepalive at 10 s).
        self.assertEqual(counts.total["keepalive"], 5)
        self.assertEqual(counts.idle, {"keepalive": 5, "control": 0, "handshake": 0, "probe": 0})
        pair.a_to_b()
        pair.net.advance(40)  # B's passive keepalive at 10 s, ours 25 s later
        self.assertEqual(counts.idle["keepalive"], 1)
        self.assertEqual(counts.total["keepalive"], 6)
        self.assertEqual(counts.idle_since, counts.latest)
        self.assertEqual(pair.peer_of_b.sent.total["handshake"], 1)  # the response


class RoamingAndSourceTests(SynchronousTestCase):
    def test_roaming(self) -> None:
        """A's endpoint at B follows A's latest authenticated packet."""
        pair = Pair()
        pair.a_to_b()
        new = ("203.0.113.5", 40000)
        pair.net.move(pair.a, new)
        pair.a_to_b()
        self.assertEqual(pair.peer_of_b.endpoint, new)
        reply = pair.b_to_a()
        self.assertEqual(pair.a.written[-1], reply)

    def test_source_outside_allowed_ips_dropped(self) -> None:
        """A decrypted packet whose inner source is not A's allowed IPs never reaches B's TUN."""
        pair = Pair()
        pair.a_to_b()
        before = list(pair.b.written)
        spoofed = ipv4("10.0.0.77", "10.0.0.2", b"spoof")
        pair.net.send(pair.a, spoofed)
        self.assertEqual(pair.b.written, before)
        self.assertEqual(pair.b.device.counters.source_not_allowed, 1)


class RecordedRandom:
    """A seeded random-bytes source that keeps every draw."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        data = self.rng.randbytes(n)
        self.draws.append(data)
        return data


class JitterTests(SynchronousTestCase):
    def test_jitter_draws_random_once_per_32_arms(self) -> None:
        """Timer jitter takes two bytes at a time from a 64-byte pool refilled from the
        device's ``random`` (``os.urandom`` in production: a system call), so N arms call it
        ceil(N / 32) times; the values are the old formula's on the same bytes, in
        [0, 0.333]."""
        for arms in (1, 31, 32, 33, 64, 100):
            source = RecordedRandom(arms)
            device = MemoryNetwork().add(A_EP, source).device
            values = [device._jitter() for _ in range(arms)]
            self.assertEqual(len(source.draws), -(-arms // 32), f"{arms} arms")
            self.assertEqual({len(d) for d in source.draws}, {64})
            pool = b"".join(source.draws)
            expected = [
                int.from_bytes(pool[i : i + 2], "little") % 334 / 1000.0
                for i in range(0, 2 * arms, 2)
            ]
            self.assertEqual(values, expected)
            self.assertTrue(all(0.0 <= v <= 0.333 for v in values))
            self.assertLess(max(values), C.REKEY_TIMEOUT_JITTER_MAX)


class ConfigurationTests(SynchronousTestCase):
    def test_own_key_as_peer_is_ignored(self) -> None:
        pair = Pair()
        self.assertIsNone(pair.a.device.add_peer(public_key(pair.a_key)))

    def test_private_key_change_forces_handshake(self) -> None:
        pair = Pair()
        pair.a_to_b()
        rng = random.Random(77)
        new_key = generate_private_key(rng.randbytes)
        pair.a.device.set_private_key(new_key, pair.net.now)
        pair.b.device.remove_peer(public_key(pair.a_key))
        peer = pair.b.device.add_peer(public_key(new_key))
        assert peer is not None
        pair.b.device.replace_allowed_ips(peer, [ipaddress.ip_network("10.0.0.1/32")])
        pair.net.advance(C.REKEY_TIMEOUT)
        pair.a.sent.clear()
        packet = pair.a_to_b(b"new identity")
        self.assertEqual(kinds(pair.a.sent)[0], 1)
        self.assertEqual(pair.b.written[-1], packet)

    def test_remove_peer_frees_everything(self) -> None:
        pair = Pair()
        pair.a_to_b()
        pair.a.device.remove_peer(pair.peer_of_a.public_key)
        self.assertEqual(len(pair.a.device.indices), 0)
        self.assertEqual(len(pair.a.device.allowed_ips), 0)
        pair.net.advance(1000)

    def test_device_is_deterministic(self) -> None:
        """The same seed gives the same bytes on the wire."""
        one, two = Pair(seed=42), Pair(seed=42)
        one.a_to_b()
        two.a_to_b()
        # TAI64N and ephemeral keys are derived from injected time and randomness only.
        self.assertEqual(one.a.sent, two.a.sent)

    def test_device_class_is_sans_io(self) -> None:
        self.assertTrue(Device.__module__.startswith("meshguard.core"))


class EventRegistrationTests(SynchronousTestCase):
    """The device's events are wired through typed registration: owners once, listeners many."""

    def test_second_owner_fails_loudly(self) -> None:
        """Registering a second owner raises instead of silently replacing the first."""
        device = Pair().a.device

        def control(peer: object, kind: int, body: bytes, now: float) -> None:
            pass

        device.set_control_handler(control)
        with self.assertRaises(AlreadyRegisteredError):
            device.set_control_handler(control)
        device.set_too_big_handler(lambda peer, packet, now: None)
        with self.assertRaises(AlreadyRegisteredError):
            device.set_too_big_handler(lambda peer, packet, now: None)
        device.set_echo_handler(b"\x01\x02", lambda peer, packet, now: True)
        with self.assertRaises(AlreadyRegisteredError):
            device.set_echo_handler(b"\x03\x04", lambda peer, packet, now: True)
        self.assertEqual(device.echo_marker, b"\x01\x02")
        device.set_unknown_datagram_handler(lambda data, source, now: None)
        with self.assertRaises(AlreadyRegisteredError):
            device.set_unknown_datagram_handler(lambda data, source, now: None)

    def test_every_source_listener_is_told(self) -> None:
        """Several parties may listen to authenticated sources; each is told, with the peer."""
        pair = Pair()
        first: list[tuple[bytes, tuple[str, int]]] = []
        second: list[tuple[str, int]] = []
        pair.b.device.add_source_listener(lambda peer, s, now: first.append((peer.public_key, s)))
        pair.b.device.add_source_listener(lambda peer, s, now: second.append(s))
        pair.a_to_b(b"x")
        key = pair.peer_of_b.public_key
        self.assertEqual(first, [(key, A_EP), (key, A_EP)])
        self.assertEqual(second, [A_EP, A_EP])
        self.assertIsNone(pair.peer_of_b.arrived_via)

    def test_roaming_goes_to_its_owner(self) -> None:
        """With a roaming owner the device records where a datagram came from
        (``arrived_from``) and asks the owner, only when that differs from the endpoint, instead
        of moving the endpoint itself; a second owner fails loudly."""
        pair = Pair()
        asked: list[tuple[str, int]] = []

        def owner(peer: Peer, source: tuple[str, int], now: float) -> None:
            asked.append(source)
            peer.endpoint = source

        pair.b.device.set_roaming_handler(owner)
        with self.assertRaises(AlreadyRegisteredError):
            pair.b.device.set_roaming_handler(owner)
        packet = pair.a_to_b(b"x")
        self.assertEqual(pair.b.written, [packet])
        self.assertEqual(pair.peer_of_b.arrived_from, A_EP)
        self.assertEqual(asked, [A_EP])  # the initiation; the data came from the endpoint

    def test_without_a_roaming_owner_the_device_roams(self) -> None:
        pair = Pair()
        pair.a_to_b(b"x")
        self.assertEqual(pair.peer_of_b.endpoint, A_EP)


class LonePathShortcutTests(SynchronousTestCase):
    """The lone packet's path skips calls (docs/datapath.md, "Latency"): the route cache tried
    before a lookup, the MSS clamp only for TCP, the keypair's bound AEAD calls. Each skip must
    decide exactly as the call it saves."""

    def test_mss_clamped_both_ways_and_only_tcp_pays_the_call(self) -> None:
        """With MSS clamping on both ends, a TCP SYN (IPv4 and IPv6) is clamped by the sender
        and again by the receiver; other packets never reach ``clamp_if_syn``."""
        pair = Pair()
        pair.a.device.replace_allowed_ips(
            pair.peer_of_a,
            [ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::2/128")],
        )
        pair.a_to_b(b"warm")  # the session
        pair.peer_of_a.mss_mtu = 1280
        pair.peer_of_b.mss_mtu = 1216
        calls: list[bytes] = []

        def counted(packet: bytes, mtu: int) -> bytes:
            calls.append(packet)
            return clamp_if_syn(packet, mtu)

        self.patch(device_module, "clamp_if_syn", counted)
        option = struct.pack("!BBH", 2, 4, 1460)
        syn4 = ipv4("10.0.0.1", "10.0.0.2", tcp_segment(V4S, V4D, option, 0x02, False), 6)
        syn6 = ipv6("fd00::1", "fd00::2", tcp_segment(V6S, V6D, option, 0x02, True), 6)
        for syn in (syn4, syn6):
            pair.net.send(pair.a, syn)
            self.assertEqual(pair.b.written[-1], clamp_mss(clamp_mss(syn, 1280), 1216))
        self.assertEqual(len(calls), 4)
        # Not TCP, though the bytes where a TCP header's SYN flag would be have it set.
        others = [
            ipv4("10.0.0.1", "10.0.0.2", bytes([2]) * 40, 1),
            ipv4("10.0.0.1", "10.0.0.2", bytes([2]) * 40, 17),
            ipv6("fd00::1", "fd00::2", bytes([2]) * 40, 58),
        ]
        for packet in others:
            pair.net.send(pair.a, packet)
            self.assertEqual(pair.b.written[-1], packet)
        self.assertEqual(len(calls), 4)

    def test_route_cache_follows_changes(self) -> None:
        """A route or an allowed source looked up (and cached) before a change is not used
        after it: the device holds the table's cache, which every change clears in place."""
        pair = Pair()
        pair.a_to_b(b"cached")
        self.assertIs(pair.a.device._routes, pair.a.device.allowed_ips.cache)
        self.assertIn(bytes([10, 0, 0, 2]), pair.a.device._routes)
        pair.a.device.replace_allowed_ips(pair.peer_of_a, [ipaddress.ip_network("10.0.0.9/32")])
        pair.a_to_b(b"no route now")
        self.assertEqual(pair.a.device.counters.no_route, 1)
        pair.a.device.replace_allowed_ips(pair.peer_of_a, [ipaddress.ip_network("10.0.0.2/32")])
        pair.b.device.replace_allowed_ips(pair.peer_of_b, [ipaddress.ip_network("10.0.0.7/32")])
        written = len(pair.b.written)
        pair.a_to_b(b"source not allowed now")
        self.assertEqual(len(pair.b.written), written)
        self.assertEqual(pair.b.device.counters.source_not_allowed, 1)

    def test_zeroed_keypair_cannot_seal_or_open(self) -> None:
        """``Keypair.zero`` replaces the bound AEAD calls: sealing raises, opening finds none
        (the receive path counts a decrypt failure)."""
        pair = Pair()
        pair.a_to_b(b"session")
        keypair = pair.peer_of_b.keypairs.current
        assert keypair is not None
        keypair.zero()
        self.assertRaises(CryptoError, keypair.encrypt, bytes(12), b"x", None)
        self.assertIsNone(keypair.decrypt)
        before = pair.b.device.counters.decrypt_failed
        pair.a_to_b(b"after zero")
        self.assertEqual(pair.b.device.counters.decrypt_failed, before + 1)

    def test_zeroed_current_keypair_refused_by_every_send_path(self) -> None:
        """``zero`` also expires the keypair for sending, so even a zeroed keypair left in
        the current slot (the device never leaves one there) is refused by each send path's
        own limit check instead of reaching the AEAD and raising: data is staged behind a new
        handshake and arrives under the new session, control and probes report nothing sent."""
        pair = Pair(mesh=True)
        pair.a_to_b(b"session")
        pair.peer_of_a.is_meshguard = True
        keypair = pair.peer_of_a.keypairs.current
        assert keypair is not None
        keypair.zero()
        self.assertFalse(keypair.can_send(pair.net.now))
        pair.net.advance(C.REKEY_TIMEOUT)  # a new initiation may go out at once
        device, peer, now = pair.a.device, pair.peer_of_a, pair.net.now
        sent = len(pair.a.sent)
        lone = ipv4("10.0.0.1", "10.0.0.2", b"lone")
        batch = [ipv4("10.0.0.1", "10.0.0.2", bytes([i]) * 100) for i in range(3)]
        device.packet_from_tun(lone, now)
        device.packets_from_tun(batch, now)
        device.send_keepalive(peer, now)
        self.assertFalse(device.send_control(peer, 1, b"", now))
        self.assertFalse(device.send_control_to(peer, B_EP, 1, b"", now))
        self.assertIsNone(device.send_packet_probe(peer, lone, now))
        self.assertEqual(kinds(pair.a.sent[sent:]), [1], "one initiation, no transport message")
        self.assertEqual(keypair.send_counter, C.REJECT_AFTER_MESSAGES)
        pair.net.flush()
        self.assertIsNot(peer.keypairs.current, keypair)
        self.assertEqual(pair.b.written[-4:], [lone, *batch])
