"""The helper side of NAT lifetime probes (mesh/probe_helper.py): what it answers, to whom,
how often, and what it holds, against hostile input; in memory, wired as the node wires it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.mesh import keepalive as K
from meshguard.mesh import lifetime_probe as P
from meshguard.mesh import probe_helper as H
from meshguard.mesh.agent import encode_json
from tests.test_keepalive import Mesh


class HostileInputTests(SynchronousTestCase):
    """The helper side against hostile peers and strangers (moved from test_keepalive)."""

    def setUp(self) -> None:
        self.mesh = Mesh(30.0)
        self.mesh.net.advance(5)
        self.hub = self.mesh.hubs[0]
        self.device = self.hub.node.device

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64))
    def test_garbage_datagrams_dropped_and_counted(self, data: bytes) -> None:
        """Random non-WireGuard datagrams never raise, never answer, never change state."""
        if data[:1] in (b"\x01", b"\x02", b"\x03", b"\x04"):
            data = b"\xff" + data[1:]
        sent = len(self.hub.node.sent)
        help_before = dict(self.hub.policy.probe_helper._help)
        self.device.datagram_received(data, ("203.0.113.50", 1234), self.mesh.net.now)
        self.assertEqual(len(self.hub.node.sent), sent)
        self.assertEqual(self.hub.policy.probe_helper._help, help_before)

    def test_unknown_token_counted(self) -> None:
        policy = self.hub.policy
        self.device.datagram_received(
            P.PROBE_MAGIC + bytes(16), ("203.0.113.2", 9), self.mesh.net.now
        )
        self.assertEqual(policy.counters["unknown_token"], 1)

    def test_known_token_wrong_source_and_rate_limit(self) -> None:
        """A token is answered only from the requesting peer's address, at most 4 times."""
        policy = self.hub.policy
        now = self.mesh.net.now
        peer = self.hub.peer(self.mesh.home)
        token = b"t" * 16
        policy.control_received(
            peer, K.kinds.NAT_PROBE_REQUEST, b'{"t":"%s","d":30}' % token.hex().encode(), now
        )
        self.assertIn(token, policy.probe_helper._help)
        self.device.datagram_received(P.PROBE_MAGIC + token, ("192.0.2.66", 5), now)
        self.assertEqual(policy.counters["token_source_mismatch"], 1)
        assert peer.endpoint is not None
        source = (peer.endpoint[0], 40001)
        sent = len(self.hub.node.sent)
        for _ in range(10):
            self.device.datagram_received(P.PROBE_MAGIC + token, source, now)
        acks = [d for d, _ in self.hub.node.sent[sent:] if d[:4] == P.ACK_MAGIC]
        self.assertEqual(len(acks), P.MAX_PROBE_SENDS)
        self.assertEqual(policy.counters["probe_rate_limited"], 10 - P.MAX_PROBE_SENDS)

    def test_bad_requests_refused(self) -> None:
        policy = self.hub.policy
        peer = self.hub.peer(self.mesh.home)
        now = self.mesh.net.now
        policy.probe_helper._help.clear()
        for body in (
            b"",
            b"{}",
            b'{"t": 5}',
            b'{"t":"zz","d":5}',
            b'{"t":"' + b"00" * 16 + b'","d":true}',
            b'{"t":"' + b"01" * 16 + b'","d":100000}',
            b'{"t":"' + b"02" * 16 + b'","d":-1}',
        ):
            policy.control_received(peer, K.kinds.NAT_PROBE_REQUEST, body, now)
        self.assertEqual(policy.probe_helper._help, {})
        for i in range(H.MAX_HELP_PER_PEER + 5):
            body = b'{"t":"%s","d":30}' % bytes([i]).hex().encode().rjust(32, b"0")
            policy.control_received(peer, K.kinds.NAT_PROBE_REQUEST, body, now)
        self.assertEqual(len(policy.probe_helper._help), H.MAX_HELP_PER_PEER)
        self.assertEqual(policy.counters["help_refused_busy"], 5)


class CancelTests(SynchronousTestCase):
    """A measuring peer cancels its own probes only (moved from test_keepalive)."""

    def test_cancel_touches_only_the_senders_own_tokens(self) -> None:
        """A peer cannot cancel another peer's probes; a foreign or unknown token is ignored."""
        mesh = Mesh(30.0, hubs=2)
        mesh.net.advance(5)
        hub, other = mesh.hubs
        policy = hub.policy
        now = mesh.net.now
        policy.probe_helper._help.clear()
        token = b"\x07" * P.TOKEN_SIZE
        policy.probe_helper._help[token] = H._Help(mesh.home.public, 30.0, now + 60)
        body = encode_json({"t": token.hex(), "x": [token.hex(), "11" * P.TOKEN_SIZE]})
        policy.control_received(hub.peer(mesh.home), K.kinds.NAT_PROBE_REQUEST, body, now)
        self.assertEqual(policy.probe_helper._help, {})
        policy.probe_helper._help[token] = H._Help(mesh.home.public, 30.0, now + 60)
        stranger = other.node.device.add_peer(b"\x09" * 32)
        assert stranger is not None
        policy.control_received(stranger, K.kinds.NAT_PROBE_REQUEST, body, now)
        self.assertIn(token, policy.probe_helper._help)

    @settings(max_examples=200, deadline=None)
    @given(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=40),
            st.lists(st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=40),
        )
    )
    def test_hostile_cancel_lists(self, value: object) -> None:
        """Whatever a peer puts in a cancel list, nothing raises and only its own well-formed
        tokens are ever dropped."""
        mesh = Mesh(30.0)
        hub = mesh.hubs[0]
        policy = hub.policy
        now = mesh.net.now
        token = b"\x05" * P.TOKEN_SIZE
        policy.probe_helper._help[token] = H._Help(b"\x01" * 32, 30.0, now + 60)  # another peer's
        body = encode_json({"t": "00" * P.TOKEN_SIZE, "x": value})
        policy.control_received(hub.peer(mesh.home), K.kinds.NAT_PROBE_REQUEST, body, now)
        self.assertIn(token, policy.probe_helper._help)
