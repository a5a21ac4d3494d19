"""The first handshake between two members that learn of each other at the same moment
(mesh/paths.py, ``HANDSHAKE_YIELD``): only the member with the smaller key initiates at once, so
the two initiations never cross (each side's answer would otherwise meet a replaced handshake
state and no session would form for REKEY_TIMEOUT, 5-10 s). In memory, time in fixed ticks."""

from __future__ import annotations

import ipaddress
import random

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.crypto import public_key
from meshguard.core.device import Device
from meshguard.core.peer import Peer
from meshguard.mesh.members import MemberInfo
from meshguard.mesh.paths import HANDSHAKE_YIELD
from meshguard.testing.memory import MemoryNetwork
from tests.meshsim import MeshSim, SimMember
from tests.packets import ipv4


def _pair(seed: int) -> tuple[MeshSim, SimMember, SimMember]:
    """Two public members of one introducer, ``low`` with the smaller public key."""
    sim = MeshSim(seed=seed)
    a = sim.add_member(None, "198.51.100.10")
    b = sim.add_member(None, "198.51.100.11")
    return (sim, a, b) if a.public_key < b.public_key else (sim, b, a)


def _record_learned(sim: MeshSim, member: SimMember, learned: dict[str, float]) -> None:
    def listener(peer: Peer, info: MemberInfo | None, sources: set[bytes], now: float) -> None:
        if info is not None:
            learned.setdefault(member.name, now)

    member.stack.membership.listeners.append(listener)


def _record_initiations(member: SimMember, other: SimMember, sent: list[float]) -> None:
    """Note each initiation ``member`` actually sends to ``other`` (a new handshake state)."""
    device = member.node.device
    original = device.send_initiation

    def send_initiation(peer: Peer, now: float, *, retry: bool) -> None:
        before = peer.handshake
        original(peer, now, retry=retry)
        if peer.public_key == other.public_key and peer.handshake is not before:
            sent.append(now)

    device.send_initiation = send_initiation  # type: ignore[method-assign]


def _session_at(sim: MeshSim, a: SimMember, b: SimMember, limit: float) -> float | None:
    """Run until both sides can send to each other; the time then (None: not by ``limit``)."""
    end = sim.net.now + limit
    while sim.net.now < end:
        sim.run(0.05)
        usable = []
        for x, y in ((a, b), (b, a)):
            peer = x.node.device.peers.get(y.public_key)
            keypair = peer.keypairs.current if peer is not None else None
            usable.append(keypair is not None and keypair.can_send(sim.net.now))
        if all(usable):
            return sim.net.now
    return None


class HandshakeYieldTests(SynchronousTestCase):
    def test_members_that_learn_of_each_other_at_once_do_not_cross_initiations(self) -> None:
        """Both learn of the other in the same tick; only the smaller key initiates, the other
        answers, and the pair has a session within HANDSHAKE_YIELD of learning, with no
        response rejected (before: crossed initiations, no session for 5-10 s)."""
        for seed in (1, 2, 3):
            sim, low, high = _pair(seed)
            learned: dict[str, float] = {}
            sent: dict[str, list[float]] = {low.name: [], high.name: []}
            for x, y in ((low, high), (high, low)):
                _record_learned(sim, x, learned)
                _record_initiations(x, y, sent[x.name])
            sim.start()
            at = _session_at(sim, low, high, 30.0)
            self.assertEqual(learned[low.name], learned[high.name], seed)
            assert at is not None
            self.assertLessEqual(at - learned[low.name], HANDSHAKE_YIELD, seed)
            self.assertEqual(len(sent[low.name]), 1, seed)
            self.assertEqual(sent[high.name], [], seed)
            for member in (low, high):
                self.assertEqual(member.node.device.counters.unknown_index, 0, seed)
            sim.run(5.0)
            self.assertEqual(sent[high.name], [], seed)

    def test_the_yielding_member_initiates_if_the_other_never_does(self) -> None:
        """The smaller key's initiation never comes: the other initiates HANDSHAKE_YIELD after
        it learned of the member, and the pair has its session then."""
        sim, low, high = _pair(4)
        learned: dict[str, float] = {}
        sent: list[float] = []
        _record_learned(sim, high, learned)
        _record_initiations(high, low, sent)

        def never(peer: Peer, now: float, *, retry: bool) -> None:
            if peer.public_key != high.public_key:
                Device.send_initiation(low.node.device, peer, now, retry=retry)

        low.node.device.send_initiation = never  # type: ignore[method-assign]
        sim.start()
        at = _session_at(sim, low, high, 30.0)
        assert at is not None
        self.assertEqual(len(sent), 1)
        self.assertGreaterEqual(sent[0] - learned[high.name], HANDSHAKE_YIELD)
        self.assertLessEqual(at - learned[high.name], HANDSHAKE_YIELD + 0.5)
        self.assertEqual(high.node.device.counters.unknown_index, 0)


class StockWireGuardTests(SynchronousTestCase):
    def test_configured_peers_initiate_at_once_whatever_their_keys(self) -> None:
        """Two peers an operator configured (no mesh): data from the larger key's side starts
        a handshake at once, and the packet arrives in the same instant, as with WireGuard."""
        net = MemoryNetwork()
        rng = random.Random(6)
        privates = [bytes([7] * 32), bytes([9] * 32)]
        privates.sort(key=public_key, reverse=True)  # the larger public key sends
        nodes = []
        for index, private in enumerate(privates):
            node = net.add((f"198.51.100.{index + 1}", 51820), rng.randbytes)
            node.device.set_private_key(private, net.now)
            nodes.append(node)
        for index, node in enumerate(nodes):
            other = nodes[1 - index]
            peer = node.device.add_peer(public_key(privates[1 - index]))
            assert peer is not None
            node.device.set_endpoint(peer, other.endpoint)
            node.device.replace_allowed_ips(peer, [ipaddress.ip_network(f"10.0.0.{2 - index}")])
            node.device.up(net.now)
        packet = ipv4("10.0.0.1", "10.0.0.2", b"hello")
        net.send(nodes[0], packet)
        self.assertEqual(nodes[1].written, [packet])
