"""The mesh agent: hello exchange, observed endpoints, feature dispatch, hostile bodies."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent, decode_json, parse_endpoint
from tests.test_device import A_EP, B_EP, Pair


class RecordingFeature:
    kinds = (99,)

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        self.events.append(("control", body))
        if body == b"boom":
            raise RuntimeError("feature bug")

    def session_started(self, peer: Peer, now: float) -> None:
        self.events.append(("session", peer.public_key))

    def next_deadline(self) -> float | None:
        return None

    def run_timers(self, now: float) -> None:
        pass

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        return {"recording": len(self.events)}


def mesh_pair() -> tuple[Pair, MeshAgent, MeshAgent, RecordingFeature, RecordingFeature]:
    pair = Pair()
    agent_a = MeshAgent(pair.a.device, local_endpoints=lambda: [("10.1.0.1", 51820)])
    agent_b = MeshAgent(pair.b.device, local_endpoints=lambda: [("10.2.0.1", 51820)])
    fa, fb = RecordingFeature(), RecordingFeature()
    agent_a.add_feature(fa)
    agent_b.add_feature(fb)
    return pair, agent_a, agent_b, fa, fb


def run(pair: Pair, *agents: MeshAgent) -> None:
    for agent in agents:
        agent.run_timers(pair.net.now)
    pair.net.flush()


class HelloTests(SynchronousTestCase):
    def test_hello_exchange_reports_observed_endpoints(self) -> None:
        pair, agent_a, agent_b, fa, fb = mesh_pair()
        pair.a_to_b()
        run(pair, agent_a, agent_b)
        self.assertEqual(agent_a.state(pair.peer_of_a).observed_self, A_EP)
        self.assertEqual(agent_b.state(pair.peer_of_b).observed_self, B_EP)
        self.assertEqual(agent_a.state(pair.peer_of_a).local_endpoints, [("10.2.0.1", 51820)])
        self.assertEqual(fa.events, [("session", pair.peer_of_a.public_key)])
        self.assertEqual(fb.events, [("session", pair.peer_of_b.public_key)])
        self.assertTrue(agent_b.state(pair.peer_of_b).hello_acked)

    def test_dispatch_and_feature_bug_contained(self) -> None:
        pair, agent_a, agent_b, _, fb = mesh_pair()
        pair.a_to_b()
        run(pair, agent_a, agent_b)
        pair.a.device.send_control(pair.peer_of_a, 99, b"boom", pair.net.now)
        pair.a.device.send_control(pair.peer_of_a, 98, b"nobody", pair.net.now)
        pair.net.flush()
        self.assertEqual(fb.events[-1], ("control", b"boom"))
        self.assertEqual(agent_b.dropped, 2)

    def test_kind_collision_refused(self) -> None:
        _, agent_a, _, _, _ = mesh_pair()
        self.assertRaises(ValueError, agent_a.add_feature, RecordingFeature())

    def test_hostile_hello_ignored(self) -> None:
        pair, agent_a, agent_b, _, _ = mesh_pair()
        pair.a_to_b()
        run(pair, agent_a, agent_b)
        for body in (b"", b"[]", b"{", b'{"observed": ["not an ip", 1]}', b"x" * 20000):
            pair.b.device.send_control(pair.peer_of_b, kinds.HELLO, body, pair.net.now)
        pair.net.flush()
        self.assertEqual(agent_a.state(pair.peer_of_a).observed_self, A_EP)


class ParsingTests(SynchronousTestCase):
    @given(st.binary(max_size=200))
    def test_decode_json_never_raises(self, data: bytes) -> None:
        value = decode_json(data)
        self.assertTrue(value is None or isinstance(value, dict))

    @given(st.recursive(st.none() | st.integers() | st.text(), st.lists, max_leaves=5))
    def test_parse_endpoint_never_raises(self, value: object) -> None:
        result = parse_endpoint(value)
        self.assertTrue(result is None or isinstance(result, tuple))

    def test_parse_endpoint(self) -> None:
        self.assertEqual(parse_endpoint(["192.0.2.1", 5]), ("192.0.2.1", 5))
        self.assertEqual(parse_endpoint(["fe80::1%eth0", 5]), ("fe80::1%eth0", 5))
        self.assertIsNone(parse_endpoint(["192.0.2.1", 0]))
        self.assertIsNone(parse_endpoint(["example.com", 5]))

    def test_relay_stand_ins_are_never_candidates(self) -> None:
        """Another node's relay stand-in (100::/64) could name one of our own: a peer's HELLO or
        an introducer's call-me-maybe carrying one must not become a UDP candidate (seen in
        namespaces: a punch "candidate" that went out through our TLS relay and pulled the
        pair back onto it)."""
        self.assertIsNone(parse_endpoint(["100::1", 1]))
        self.assertIsNone(parse_endpoint(["100::1:0:5", 1]))
        self.assertEqual(parse_endpoint(["100:1::1", 1]), ("100:1::1", 1))


def timed_pair() -> tuple[Pair, MeshAgent, MeshAgent, RecordingFeature, RecordingFeature]:
    """A mesh pair whose agents the network's clock drives (``pair.net.advance``)."""
    pair, agent_a, agent_b, fa, fb = mesh_pair()
    pair.net.timed.extend([agent_a, agent_b])
    pair.a_to_b()
    pair.net.advance(1.0)
    return pair, agent_a, agent_b, fa, fb


def controls(peer: Peer) -> int:
    return peer.sent.total["control"]


class IdleHelloTests(SynchronousTestCase):
    """An idle tunnel says nothing it already said (issue 17)."""

    def test_idle_refresh_skipped_and_resumed_by_traffic(self) -> None:
        """Once both sides told each other everything and no data crosses, the minutely
        refresh sends nothing (counted as skipped); the first data after the pause brings the
        refresh back within a refresh period."""
        pair, agent_a, _agent_b, _, _ = timed_pair()
        # The refresh after the first exchange still follows traffic (the first packet).
        pair.net.advance(70.0)
        a_sent, b_sent = controls(pair.peer_of_a), controls(pair.peer_of_b)
        pair.net.advance(600.0)
        self.assertEqual(controls(pair.peer_of_a), a_sent)
        self.assertEqual(controls(pair.peer_of_b), b_sent)
        self.assertGreaterEqual(agent_a.state(pair.peer_of_a).hellos_skipped, 9)
        self.assertIn("hellos_skipped_idle", agent_a.peer_status(pair.peer_of_a))
        pair.a_to_b()
        pair.net.advance(61.0)
        self.assertGreater(controls(pair.peer_of_a), a_sent)
        self.assertGreater(controls(pair.peer_of_b), b_sent)

    def test_quiet_rekey_sends_no_hello_but_features_hear_of_it(self) -> None:
        """A keepalive-driven rekey on an idle tunnel exchanges no HELLO (nothing new to tell);
        the features still hear of each new session."""
        pair, _, _, fa, fb = timed_pair()
        pair.net.advance(70.0)
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 50, pair.net.now)
        a_sent, b_sent = controls(pair.peer_of_a), controls(pair.peer_of_b)
        sessions_a, sessions_b = len(fa.events), len(fb.events)
        handshakes = pair.peer_of_a.sent.total["handshake"]
        pair.net.advance(900.0)
        self.assertGreaterEqual(pair.peer_of_a.sent.total["handshake"] - handshakes, 3)
        self.assertEqual(controls(pair.peer_of_a), a_sent)
        self.assertEqual(controls(pair.peer_of_b), b_sent)
        self.assertGreaterEqual(len(fa.events) - sessions_a, 3)
        self.assertGreaterEqual(len(fb.events) - sessions_b, 3)

    def test_new_observed_endpoint_told_while_idle(self) -> None:
        """The peer sees us at a new endpoint (a NAT mapping expired and came back on another
        port): its next refresh tells us, idle or not, so auto learns of the expiry."""
        pair, agent_a, _, _, _ = timed_pair()
        pair.net.advance(130.0)
        moved = ("192.0.2.1", 40000)
        pair.net.move(pair.a, moved)
        pair.a.device.set_persistent_keepalive(pair.peer_of_a, 25, pair.net.now)
        a_sent = controls(pair.peer_of_a)
        pair.net.advance(120.0)
        self.assertEqual(agent_a.state(pair.peer_of_a).observed_self, moved)
        # Told once (the HELLO at the first session after the move), then quiet again.
        pair.net.advance(600.0)
        self.assertEqual(controls(pair.peer_of_a) - a_sent, 1)  # our acknowledgement

    def test_peer_that_lost_its_state_is_told_again(self) -> None:
        """A peer whose mesh state is new (a restart) says hello on its next session, and our
        acknowledgement tells it everything, though we had nothing new to say."""
        pair, agent_a, agent_b, _, _ = timed_pair()
        pair.net.advance(200.0)  # the session expired
        agent_a.peers.clear()
        pair.a_to_b()
        pair.net.advance(3.0)
        state = agent_a.state(pair.peer_of_a)
        self.assertTrue(state.hello_acked)
        self.assertEqual(state.observed_self, A_EP)
        self.assertEqual(state.local_endpoints, [("10.2.0.1", 51820)])
        self.assertTrue(agent_b.state(pair.peer_of_b).hello_acked)
