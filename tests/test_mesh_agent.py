"""The mesh agent: hello exchange, observed endpoints, feature dispatch, hostile bodies."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent, decode_json, is_discard_only, parse_endpoint
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
        self.assertTrue(is_discard_only(("100::2", 1)))
        self.assertFalse(is_discard_only(("2001:db8::1", 1)))
        self.assertFalse(is_discard_only(("192.0.2.1", 1)))
        self.assertFalse(is_discard_only(None))
