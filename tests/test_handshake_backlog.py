"""Under load the responder serves transport data for live sessions first; handshakes wait in a
bounded backlog and are handled a budget at a time."""

from __future__ import annotations

import random
from collections import deque

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.app.node import Node
from meshguard.core import device as device_module
from meshguard.core.cookie import CookieGenerator
from meshguard.core.crypto import public_key
from tests.packets import ipv4
from tests.test_device import Pair

STRANGER = ("192.0.2.66", 4444)


def valid_mac1_initiations(responder_public: bytes, count: int, seed: int = 3) -> list[bytes]:
    """Initiations anyone who knows the public key can make: mac1 right, contents random."""
    rng = random.Random(seed)
    generator = CookieGenerator(responder_public)
    return [
        generator.add_macs(b"\x01\0\0\0" + rng.randbytes(112) + bytes(32), 0.0)
        for _ in range(count)
    ]


class BacklogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pair = Pair()
        self.pair.a_to_b(b"first")  # the session A -> B (handshake done before the backlog)
        self.b = self.pair.b.device
        self.assertIn(b"first", self.pair.b.written[-1])
        # From now on under load after the first handshake message: cookies are demanded.
        self.b.under_load_threshold = 0
        self.b.handshake_backlog = deque()
        self.b.handshake_budget = 2
        self.flood = valid_mac1_initiations(public_key(self.pair.b_key), 5)
        self.now = self.pair.net.now

    def data_from_a(self, payload: bytes) -> tuple[bytes, tuple[str, int]]:
        """A transport datagram A sends B (captured from A's sends, not yet delivered)."""
        a = self.pair.a
        before = len(a.sent)
        a.device.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", payload), self.now)
        (datagram, _endpoint) = a.sent[before]
        self.pair.net.queue.clear()
        return datagram, a.endpoint

    def test_data_first_then_handshakes_by_budget(self) -> None:
        """In one batch of flood initiations with A's data among them, the data reaches the
        TUN side at once and no initiation is handled until the adapter runs the backlog,
        which then handles two (the budget) per call, oldest first."""
        # One handshake first, to enter "under load".
        self.b.datagram_received(self.flood[0], STRANGER, self.now)
        cookies = self.b.counters.cookie_sent
        written = len(self.pair.b.written)
        data, source = self.data_from_a(b"payload")
        for message in self.flood[1:3]:
            self.b.datagram_received(message, STRANGER, self.now)
        self.b.datagram_received(data, source, self.now)
        for message in self.flood[3:]:
            self.b.datagram_received(message, STRANGER, self.now)
        self.assertEqual(len(self.pair.b.written), written + 1)
        self.assertIn(b"payload", self.pair.b.written[-1])
        self.assertEqual(self.b.counters.cookie_sent, cookies)
        self.assertEqual(len(self.b.handshake_backlog or ()), 4)
        self.assertTrue(self.b.run_handshake_backlog(self.now))
        self.assertEqual(self.b.counters.cookie_sent, cookies + 2)
        self.assertFalse(self.b.run_handshake_backlog(self.now))
        self.assertEqual(self.b.counters.cookie_sent, cookies + 4)
        self.assertFalse(self.b.run_handshake_backlog(self.now))

    def test_backlog_is_bounded(self) -> None:
        self.patch(device_module, "HANDSHAKE_BACKLOG", 3)
        self.b.datagram_received(self.flood[0], STRANGER, self.now)
        for message in self.flood[1:]:
            self.b.datagram_received(message, STRANGER, self.now)
        self.assertEqual(len(self.b.handshake_backlog or ()), 3)
        self.assertEqual(self.b.counters.handshake_backlog_full, 1)

    def test_not_under_load_handshakes_are_handled_at_once(self) -> None:
        pair = Pair()
        b = pair.b.device
        b.handshake_backlog = deque()
        pair.a_to_b(b"hello")  # the whole handshake runs inline
        self.assertEqual(len(b.handshake_backlog), 0)
        self.assertIn(b"hello", pair.b.written[-1])

    def test_a_peer_rehandshakes_through_the_backlog_with_a_cookie(self) -> None:
        """A's session is gone while B is flooded: A's initiation gets a cookie reply, A's
        retry carries mac2 and completes, both through the backlog."""
        pair = self.pair
        for keypair in pair.peer_of_a.keypairs.clear():
            keypair.zero()
        pair.peer_of_a.last_sent_handshake = None  # as after REKEY_TIMEOUT
        self.b.datagram_received(self.flood[0], STRANGER, self.now)  # under load
        pair.a.device.packet_from_tun(ipv4("10.0.0.1", "10.0.0.2", b"again"), self.now)
        for _ in range(20):
            pair.net.flush()
            while self.b.run_handshake_backlog(pair.net.now):
                pass
            pair.net.flush()
            if pair.b.written and b"again" in pair.b.written[-1]:
                break
            pair.net.now += 1.0
            pair.a.device.run_timers(pair.net.now)
            pair.b.device.run_timers(pair.net.now)
            self.b.datagram_received(self.flood[1], STRANGER, pair.net.now)  # still loaded
        self.assertIn(b"again", pair.b.written[-1])
        self.assertGreaterEqual(self.b.counters.cookie_sent, 1)
        self.assertLessEqual(pair.net.now - self.now, 10)


class NodeBacklogTests(SynchronousTestCase):
    def test_batch_end_runs_the_backlog_and_comes_back_for_more(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        node = Node("mgbl0", clock)
        ran: list[float] = []
        backlog = node.device.handshake_backlog
        assert backlog is not None
        backlog.extend([(b"x", STRANGER)] * 3)

        def run(now: float) -> bool:
            ran.append(now)
            backlog.popleft()
            return bool(backlog)

        node.device.run_handshake_backlog = run  # type: ignore[method-assign]
        node._batch_end()
        self.assertEqual(len(ran), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(len(ran), 3)
        self.assertEqual(clock.getDelayedCalls(), [])
