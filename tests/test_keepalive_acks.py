"""Acknowledged keepalives (mesh/keepalive_acks.py): both sides, in memory."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.sent import CONTROL, KEEPALIVE
from meshguard.mesh import keepalive as K
from meshguard.mesh import keepalive_acks as A
from meshguard.mesh import kinds
from tests.test_keepalive import HUB, Mesh

TRANSPORT = b"\x04\x00\x00\x00"


class AnsweringTests(SynchronousTestCase):
    def setUp(self) -> None:
        # No NAT: the home is public, so nothing of the keepalive schedule runs meanwhile.
        self.mesh = Mesh(None)
        self.mesh.net.advance(60.0)
        self.hub = self.mesh.hubs[0]
        self.home_peer = self.mesh.home.peer(self.hub)
        self.hub_peer = self.hub.peer(self.mesh.home)

    def test_capability_in_hello(self) -> None:
        """Each side learns from the other's HELLO that it answers keepalive requests."""
        self.assertTrue(self.mesh.policy.acks.speaks(self.home_peer))
        self.assertTrue(self.hub.policy.acks.speaks(self.hub_peer))
        self.assertIn(A.CAPABILITY, K.KeepalivePolicy.capabilities)

    def test_one_empty_keepalive_per_request_never_answered(self) -> None:
        """Both sides ask at the same moment: each answers with one empty keepalive, which
        nobody answers (no ping-pong); four datagrams in all."""
        net = self.mesh.net
        home_sent = len(self.mesh.home.node.sent)
        hub_sent = len(self.hub.node.sent)
        now = net.now
        self.mesh.home.node.device.send_control(self.home_peer, kinds.KEEPALIVE_REQUEST, b"", now)
        self.hub.node.device.send_control(self.hub_peer, kinds.KEEPALIVE_REQUEST, b"", now)
        net.flush()
        net.advance(30.0)
        home_out = self.mesh.home.node.sent[home_sent:]
        hub_out = self.hub.node.sent[hub_sent:]
        self.assertEqual([len(d) for d, _ in home_out], [48, 32])
        self.assertEqual([len(d) for d, _ in hub_out], [48, 32])

    def test_answers_rate_limited_and_need_a_session(self) -> None:
        """Requests closer than ANSWER_GAP are ignored; without a session none is answered and
        no handshake is started for it."""
        acks = self.hub.policy.acks
        now = self.mesh.net.now
        sent = len(self.hub.node.sent)
        for step in range(5):
            acks.control_received(self.hub_peer, kinds.KEEPALIVE_REQUEST, b"", now + step * 0.1)
        self.assertEqual(len(self.hub.node.sent) - sent, 1)
        self.assertEqual(self.hub.policy.counters["keepalive_request_ignored"], 4)
        keypair = self.hub_peer.keypairs.current
        assert keypair is not None
        keypair.expire_for_sending()
        acks.control_received(self.hub_peer, kinds.KEEPALIVE_REQUEST, b"", now + 5.0)
        self.assertEqual(len(self.hub.node.sent) - sent, 1)

    def test_request_counted_as_keepalive(self) -> None:
        """The request is the keepalive in ``sent`` (what ``meshguard status`` shows)."""
        counts = self.home_peer.sent
        keepalives, control = counts.total[KEEPALIVE], counts.total[CONTROL]
        self.mesh.policy.acks._send(self.home_peer, self.mesh.net.now)
        self.assertEqual(counts.total[KEEPALIVE], keepalives + 1)
        self.assertEqual(counts.total[CONTROL], control)


class RequestingTests(SynchronousTestCase):
    def test_slot_carries_the_request_and_the_handshake_slot_the_initiation(self) -> None:
        """Behind a 120 s NAT: every slot carries one datagram, a request (answered at once,
        no resend) or, once the session expired, the initiation; no separate confirmation."""
        mesh = Mesh(120.0)
        mesh.net.advance(30 * 60)
        hub = mesh.hubs[0]
        start = len(mesh.home.node.sent)
        mesh.net.advance(3600.0)
        sent = [(d, ep) for d, ep in mesh.home.node.sent[start:] if ep[0] == HUB[0]]
        kinds_sent = {len(d) for d, _ in sent}
        self.assertLessEqual(kinds_sent, {48, 148, 96})  # requests, initiations, self-check
        interval = mesh.home.peer(hub).persistent_keepalive
        self.assertLessEqual(len(sent), 3600 / interval + 3)
        stats = mesh.policy.acks.stats[hub.public]
        self.assertEqual(stats["resent"], 0)
        self.assertEqual(stats["unanswered"], 0)
        self.assertEqual(mesh.policy.peer_status(mesh.home.peer(hub))["keepalive_acks"], stats)

    def test_fixed_keepalive_is_not_acknowledged(self) -> None:
        """A number in the config keeps WireGuard's plain keepalive."""
        mesh = Mesh(None)
        hub = mesh.hubs[0]
        mesh.policy.release(hub.public)
        peer = mesh.home.peer(hub)
        mesh.home.node.device.set_persistent_keepalive(peer, 25, mesh.net.now)
        start = len(mesh.home.node.sent)
        mesh.net.advance(300.0)
        lengths = {len(d) for d, _ in mesh.home.node.sent[start:] if d[:4] == TRANSPORT}
        self.assertIn(32, lengths)
        self.assertNotIn(48, lengths)  # no keepalive request
