"""``PersistentKeepalive = auto`` against simulated NATs (in memory, deterministic clock)."""

from __future__ import annotations

import base64
import ipaddress
import random
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import PERSISTENT_KEEPALIVE, Peer
from meshguard.mesh import keepalive as K
from meshguard.mesh import lifetime_measurement as M
from meshguard.mesh import lifetime_probe as P
from meshguard.mesh.agent import MeshAgent
from meshguard.testing.memory import MemoryNAT, MemoryNetwork, MemoryNode, MemoryProbeSockets
from tests.packets import ipv4

HOME = ("192.168.1.2", 51820)
HUB = ("198.51.100.2", 51820)
HUB2 = ("198.51.100.3", 51820)
PUBLIC = "203.0.113.2"
HOUR = 3600.0


def is_keepalive(data: bytes) -> bool:
    """An empty transport message, or a keepalive request (an empty control message, 48
    bytes, toward a peer that answers keepalives: mesh/keepalive_acks.py)."""
    return data[:4] == b"\x04\x00\x00\x00" and len(data) in (32, 48)


class Member:
    """A device with its mesh agent and keepalive policy on the in-memory network."""

    def __init__(
        self,
        net: MemoryNetwork,
        endpoint: Endpoint,
        rng: random.Random,
        overrides: Sequence[K.IntervalOverride] = (),
    ) -> None:
        self.node: MemoryNode = net.add(endpoint, rng.randbytes)
        self.key = generate_private_key(rng.randbytes)
        self.public = public_key(self.key)
        self.address = f"10.9.0.{len(net.nodes)}"
        self.agent = MeshAgent(self.node.device, local_endpoints=lambda: [endpoint])
        self.policy = K.KeepalivePolicy(
            self.node.device,
            self.agent,
            rng.randbytes,
            MemoryProbeSockets(net, endpoint[0]),
            overrides=overrides,
        )
        self.agent.add_feature(self.policy)
        net.timed.append(self.agent)
        self.node.device.set_private_key(self.key, net.now)

    def peer(self, other: Member) -> Peer:
        peer = self.node.device.peers[other.public]
        return peer


class Mesh:
    """Home (maybe behind a NAT) and one or two hubs; home's peers are auto, as are the hubs'.

    ``overrides``: keepalive plugins the home's policy consults. ``preserve_port``: the NAT
    re-creates an expired mapping on the same public port (Linux masquerade).
    """

    def __init__(
        self,
        lifetime: float | None,
        *,
        hubs: int = 1,
        endpoint_dependent: bool = False,
        seed: int = 7,
        hub_auto: bool = True,
        overrides: Sequence[K.IntervalOverride] = (),
        preserve_port: bool = False,
        filtering: str = "port",
    ) -> None:
        rng = random.Random(seed)
        self.net = MemoryNetwork()
        self.nat: MemoryNAT | None = None
        if lifetime is not None:
            self.nat = self.net.add_nat(
                MemoryNAT(
                    PUBLIC,
                    {HOME[0]},
                    lifetime,
                    endpoint_dependent=endpoint_dependent,
                    preserve_port=preserve_port,
                    filtering=filtering,
                )
            )
        self.home = Member(self.net, HOME, rng, overrides)
        self.hubs = [Member(self.net, ep, rng) for ep in (HUB, HUB2)[:hubs]]
        now = self.net.now
        for hub in self.hubs:
            home_peer = self.home.node.device.add_peer(hub.public)
            hub_peer = hub.node.device.add_peer(self.home.public)
            assert home_peer is not None and hub_peer is not None
            self.home.node.device.set_endpoint(home_peer, hub.node.endpoint)
            self.home.node.device.replace_allowed_ips(
                home_peer, [ipaddress.ip_network(f"{hub.address}/32")]
            )
            hub.node.device.replace_allowed_ips(
                hub_peer, [ipaddress.ip_network(f"{self.home.address}/32")]
            )
            if hub_auto:
                hub.policy.configure_auto({self.home.public}, now)
        self.home.policy.configure_auto({h.public for h in self.hubs}, now)
        for member in (self.home, *self.hubs):
            member.node.device.up(now)
        self.net.flush()

    @property
    def policy(self) -> K.KeepalivePolicy:
        return self.home.policy

    def hub_reaches_home(self, hub: Member | None = None) -> bool:
        """The hub sends one packet to the home's tunnel address; did the home get it?"""
        hub = hub or self.hubs[0]
        before = len(self.home.node.written)
        self.net.send(hub.node, ipv4(hub.address, self.home.address, b"wake up"))
        self.net.advance(10.0)  # room for a handshake and its retry
        return len(self.home.node.written) > before

    def keepalives_from_home(self, since: int) -> int:
        return sum(1 for data, _ in self.home.node.sent[since:] if is_keepalive(data))


class MeasurementTests(SynchronousTestCase):
    def assert_measured(self, lifetime: float) -> Mesh:
        mesh = Mesh(lifetime)
        mesh.net.advance(30 * 60)
        nat = mesh.policy.nat
        self.assertEqual(nat.natted, True)
        self.assertEqual(nat.measurement, "measured")
        assert nat.lifetime is not None
        # Known alive below the lifetime, and within the bisection's precision of it.
        self.assertLess(nat.lifetime, lifetime)
        self.assertGreaterEqual(nat.lifetime, lifetime - M._precision(lifetime) - 1)
        decision = mesh.policy.decisions[mesh.hubs[0].public]
        self.assertEqual(decision.interval, K.interval_for(nat.lifetime, acked=True))
        self.assertLess(decision.interval, lifetime)
        self.assertGreaterEqual(decision.interval, K.INTERVAL_MIN)
        self.assertIn("the measured NAT lifetime", decision.reason)
        # The hub answers keepalives: a lost one and its resends still fit in the lifetime.
        resends = K.ACK_WAIT * K.ACK_RESENDS
        self.assertLessEqual(decision.interval + resends, nat.lifetime)
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, decision.interval)
        return mesh

    def test_lifetimes_measured_and_interval_below_them(self) -> None:
        """NATs of 10, 30, 45, 120 and 300 s: each measured to within the bisection precision;
        the interval is 0.7 of the lifetime known alive (the hub answers keepalives), and a
        lost keepalive's resends fit before the lifetime ends."""
        for lifetime in (10.0, 30.0, 45.0, 120.0, 300.0):
            self.assert_measured(lifetime)

    def test_long_lifetime_capped(self) -> None:
        """A NAT that keeps mappings longer than the ladder's top: lifetime 'at least 600 s',
        interval at the ceiling."""
        mesh = Mesh(3600.0)
        mesh.net.advance(40 * 60)
        self.assertTrue(mesh.policy.nat.lifetime_at_least)
        self.assertEqual(mesh.policy.nat.lifetime, P.LIFETIME_MAX)
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, K.INTERVAL_MAX)

    def test_idle_hour_reachable_with_fewer_keepalives(self) -> None:
        """After measuring, an idle hour: the hub still reaches the home, and the home sent
        fewer keepalives than a fixed 25 s would (the mapping lives 120 s)."""
        mesh = self.assert_measured(120.0)
        start = len(mesh.home.node.sent)
        mesh.net.advance(HOUR)
        sent = mesh.keepalives_from_home(start)
        self.assertTrue(mesh.hub_reaches_home())
        self.assertLess(sent, HOUR / 25 / 2)
        self.assertGreater(sent, 0)

    def test_short_nat_reachable_after_idle(self) -> None:
        """A 10 s NAT: the default 25 s would lose the home; the measured interval keeps it."""
        mesh = self.assert_measured(10.0)
        mesh.net.advance(HOUR)
        self.assertTrue(mesh.hub_reaches_home())

    def test_fixed_interval_above_lifetime_loses_home(self) -> None:
        """Control: the same NAT with a fixed 25 s keepalive (no auto) drops the mapping, so the
        hub cannot reach the home; the test above cannot pass by accident."""
        mesh = Mesh(10.0)
        mesh.home.policy.configure_auto(set(), mesh.net.now)
        peer = mesh.home.peer(mesh.hubs[0])
        mesh.home.node.device.set_persistent_keepalive(peer, 25, mesh.net.now)
        mesh.net.advance(600)
        # Try between two keepalives, once the mapping has expired (the hub's attempt lasts
        # 10 s: it must not meet the next keepalive, which would re-open the mapping).
        deadline = peer.timers.deadlines[PERSISTENT_KEEPALIVE]
        assert deadline is not None
        target = deadline - 25 + 11  # 11 s after the latest keepalive
        if target <= mesh.net.now:
            target += 25
        mesh.net.advance(target - mesh.net.now)
        self.assertFalse(mesh.hub_reaches_home())

    def test_not_natted_sends_nothing(self) -> None:
        """No NAT: both sides see local endpoints, auto means no keepalive at all."""
        mesh = Mesh(None)
        mesh.net.advance(120)
        self.assertEqual(mesh.policy.nat.natted, False)
        start = len(mesh.home.node.sent)
        mesh.net.advance(HOUR)
        self.assertEqual(mesh.keepalives_from_home(start), 0)
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 0)
        self.assertIn("not behind a NAT", mesh.policy.decisions[mesh.hubs[0].public].reason)
        # The hub is public too: it sends none either.
        self.assertEqual(mesh.hubs[0].peer(mesh.home).persistent_keepalive, 0)
        self.assertTrue(mesh.hub_reaches_home())

    def test_hub_is_not_natted(self) -> None:
        """The public hub with auto: no keepalives toward the NATed home."""
        mesh = Mesh(30.0)
        mesh.net.advance(600)
        self.assertEqual(mesh.hubs[0].policy.nat.natted, False)
        self.assertEqual(mesh.hubs[0].peer(mesh.home).persistent_keepalive, 0)

    def test_secondary_socket_probes_do_not_refresh_tunnel_mapping(self) -> None:
        """Every probe ran on its own socket, never the tunnel's port."""
        mesh = self.assert_measured(30.0)
        paths = mesh.home.policy.paths
        assert isinstance(paths, MemoryProbeSockets)
        self.assertGreaterEqual(paths.opened, len([d for d in P.LIFETIME_LADDER if d < 30.0]))
        probe_datagrams = [d for d, _ in mesh.home.node.sent if d[:4] == P.PROBE_MAGIC]
        self.assertEqual(probe_datagrams, [])
        self.assertEqual(mesh.net.sockets, {})  # every secondary socket closed again


class MappingTests(SynchronousTestCase):
    def test_endpoint_independent_one_carrier(self) -> None:
        """Two meshguard hubs see the same public endpoint and the filtering check shows the NAT
        admits a remote we did not send to ("full cone"): one keepalive stream, not two, and
        the other hub still reaches the idle home."""
        mesh = Mesh(60.0, hubs=2, filtering="none")
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        self.assertEqual(policy.nat.mapping, "endpoint-independent")
        self.assertEqual(policy.nat.filtering, K.FILTER_OPEN)
        intervals = sorted(mesh.home.peer(h).persistent_keepalive for h in mesh.hubs)
        self.assertEqual(intervals[0], 0)
        self.assertEqual(intervals[1], K.interval_for(policy.nat.lifetime or 0, acked=True))
        carrier = next(h for h in mesh.hubs if mesh.home.peer(h).persistent_keepalive)
        other = next(h for h in mesh.hubs if h is not carrier)
        self.assertEqual(policy.carrier, carrier.public)
        self.assertIn("endpoint-independent", policy.decisions[other.public].reason)
        self.assertIn("filtering checked with", policy.decisions[other.public].reason)
        start = len(mesh.home.node.sent)
        mesh.net.advance(HOUR)
        to_other = [
            d
            for d, ep in mesh.home.node.sent[start:]
            if ep == other.node.endpoint and is_keepalive(d)
        ]
        self.assertEqual(to_other, [])
        self.assertTrue(mesh.hub_reaches_home(other))
        mesh.net.advance(HOUR)
        self.assertTrue(mesh.hub_reaches_home(carrier))
        self.assertIn("keepalive_carrier", policy.node_status())

    def test_endpoint_dependent_keeps_each(self) -> None:
        """A hard NAT (a port per destination): every path needs its own keepalive."""
        mesh = Mesh(60.0, hubs=2, endpoint_dependent=True)
        mesh.net.advance(30 * 60)
        self.assertEqual(mesh.policy.nat.mapping, "endpoint-dependent")
        for hub in mesh.hubs:
            self.assertGreater(mesh.home.peer(hub).persistent_keepalive, 0)
        mesh.net.advance(HOUR)
        for hub in mesh.hubs:
            self.assertTrue(mesh.hub_reaches_home(hub))


class EvidenceTests(SynchronousTestCase):
    def test_shrinks_when_nat_starts_forgetting_sooner(self) -> None:
        """The NAT's timeout drops from 120 s to 20 s (a router reboot, say): the hub sees the
        home's port change, the interval is halved at once and re-measured below 20 s."""
        mesh = Mesh(120.0)
        mesh.net.advance(30 * 60)
        self.assertGreater(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 20)
        assert mesh.nat is not None
        mesh.nat.lifetime = 20.0
        mesh.net.advance(HOUR)
        policy = mesh.policy
        self.assertGreater(policy.counters.get("expiry_evidence", 0), 0)
        self.assertTrue(any("mapping expired" in e for e in policy.nat.events))
        self.assertEqual(policy.nat.measurement, "measured")
        self.assertLess(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 20)
        mesh.net.advance(HOUR)
        self.assertTrue(mesh.hub_reaches_home())

    def test_new_public_address_remeasures(self) -> None:
        """Roaming to another NAT (new public address): measured again, for the new NAT."""
        mesh = Mesh(120.0)
        mesh.net.advance(30 * 60)
        assert mesh.nat is not None
        mesh.nat.public_host = "203.0.113.99"
        mesh.nat.lifetime = 40.0
        mesh.net.advance(HOUR)
        policy = mesh.policy
        self.assertTrue(any("public address changed" in e for e in policy.nat.events))
        assert policy.nat.lifetime is not None
        self.assertLess(policy.nat.lifetime, 40.0)
        self.assertEqual(
            mesh.home.peer(mesh.hubs[0]).persistent_keepalive,
            K.interval_for(policy.nat.lifetime, acked=True),
        )
        self.assertLess(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 40 * K.ACKED_FRACTION)

    def test_status(self) -> None:
        mesh = Mesh(30.0)
        mesh.net.advance(30 * 60)
        node = mesh.policy.node_status()
        self.assertEqual(node["nat"], "yes")
        self.assertIsNotNone(node["nat_lifetime"])
        self.assertEqual(
            node["keepalive_interval"], K.interval_for(node["nat_lifetime"], acked=True)
        )
        peer = mesh.policy.peer_status(mesh.home.peer(mesh.hubs[0]))
        self.assertTrue(peer["keepalive_auto"])
        self.assertIn("measured NAT lifetime", peer["keepalive_reason"])
        hub_status = mesh.hubs[0].policy.node_status()
        self.assertEqual(hub_status["nat"], "no")
        self.assertEqual(hub_status["keepalive_interval"], 0)

    def test_release_by_uapi(self) -> None:
        """A number set by an operator (UAPI) takes the peer out of auto."""
        mesh = Mesh(30.0)
        mesh.net.advance(10 * 60)
        peer = mesh.home.peer(mesh.hubs[0])
        mesh.policy.release(peer.public_key)
        mesh.home.node.device.set_persistent_keepalive(peer, 7, mesh.net.now)
        mesh.net.advance(10 * 60)
        self.assertEqual(peer.persistent_keepalive, 7)
        self.assertFalse(mesh.policy.peer_status(peer)["keepalive_auto"])


class ConfigTests(SynchronousTestCase):
    def test_auto_parsed_and_left_to_the_policy(self) -> None:
        """`PersistentKeepalive = auto` parses; the UAPI operations leave the number to the
        policy (None = unchanged), while numbers and off pass through as WireGuard's."""
        from meshguard.app.node import config_operations
        from meshguard.codecs.config import KEEPALIVE_AUTO, parse_config
        from meshguard.codecs.uapi import PeerUpdate

        keys = [public_key(generate_private_key(random.Random(i).randbytes)) for i in range(4)]
        b64 = [base64.b64encode(k).decode() for k in keys]
        text = f"[Interface]\nPrivateKey = {b64[0]}\n"
        for key, value in zip(b64[1:], ("auto", "off", "25"), strict=True):
            text += f"\n[Peer]\nPublicKey = {key}\nPersistentKeepalive = {value}\n"
        config = parse_config(text, "mg0.conf")
        self.assertEqual([p.persistent_keepalive for p in config.peers], [KEEPALIVE_AUTO, 0, 25])
        updates = [op for op in config_operations(config) if isinstance(op, PeerUpdate)]
        self.assertEqual([u.persistent_keepalive for u in updates], [None, 0, 25])
