"""The port-mapping seam in the mesh (in memory): a node's mapped endpoint travels in its HELLO
to its introducer, in the introducer's member list to the other members, and becomes one of
their candidates (kind ``mapped``); a change is advertised at once."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from meshguard.codecs.config import ConfigError, parse_config
from meshguard.core.interfaces import Endpoint
from meshguard.mesh import kinds
from meshguard.mesh.agent import MAX_MAPPED, encode_json
from meshguard.mesh.members import MemberInfo, parse_member
from meshguard.mesh.sources import Candidate, PortMapped
from meshguard.testing.memory import MemoryNAT
from tests.meshsim import MeshSim

MAPPED: Endpoint = ("203.0.113.1", 51820)


def hard_home(sim: MeshSim, index: int) -> MemoryNAT:
    return sim.net.add_nat(
        MemoryNAT(
            f"203.0.113.{index}",
            {f"192.168.{index}.2"},
            60,
            endpoint_dependent=True,
        )
    )


class MappedCandidateTests(SynchronousTestCase):
    def test_mapped_endpoint_reaches_other_members_as_a_candidate(self) -> None:
        """Member A reports a mapped endpoint in its HELLO; the introducer lists it; member B
        has it among A's candidates; when A's mapping changes, ``advertise`` makes B learn the
        new one within seconds (not at the next minute's HELLO refresh)."""
        sim = MeshSim(seed=3)
        a = sim.add_member(hard_home(sim, 1), "192.168.1.2")
        b = sim.add_member(hard_home(sim, 2), "192.168.2.2")
        mapped = [MAPPED]
        a.agent.mapped_endpoints = lambda: list(mapped)
        sim.start()
        sim.run(10)
        intro_view = sim.introducer.agent.peers[a.public_key]
        self.assertEqual(intro_view.mapped_endpoints, [MAPPED])
        self.assertEqual(
            sim.introducer.agent.peer_status(sim.introducer.node.device.peers[a.public_key])[
                "mapped_endpoints"
            ],
            [list(MAPPED)],
        )
        state = b.stack.paths.states[a.public_key]
        self.assertIn(MAPPED, state.candidates())
        self.assertNotIn(MAPPED, a.stack.paths.states[b.public_key].candidates())

        mapped[:] = [("203.0.113.1", 40001)]
        a.agent.advertise(sim.net.now)
        sim.run(4)
        self.assertIn(("203.0.113.1", 40001), b.stack.paths.states[a.public_key].candidates())

    def test_path_through_a_mapping_is_mapped(self) -> None:
        """Three members behind NATs that map per destination; only A's gateway maps a port
        (A advertises it). B and C each go direct to A through that mapping, and the arbiter
        calls those paths ``mapped`` (status ``path_kind``, the logged move), while A reaches
        them at the endpoints their pings came from (``direct``) and B and C, with no mapping
        between them, stay relayed."""
        sim = MeshSim(seed=5)
        nat_a = hard_home(sim, 1)
        nat_a.forward(MAPPED[1], ("192.168.1.2", 51820))
        a = sim.add_member(nat_a, "192.168.1.2")
        b = sim.add_member(hard_home(sim, 2), "192.168.2.2")
        c = sim.add_member(hard_home(sim, 3), "192.168.3.2")
        a.agent.mapped_endpoints = lambda: [MAPPED]
        moves: list[str] = []
        b.stack.arbiter.observers.append(
            lambda peer, old, new, reason: moves.append(new.describe())
        )
        sim.start()
        sim.run(40)
        for other in (b, c):
            peer_a = other.node.device.peers[a.public_key]
            self.assertEqual(other.node.device.peers[a.public_key].endpoint, MAPPED)
            status = other.stack.arbiter.status(peer_a)
            self.assertEqual(status["path_kind"], "mapped", other.name)
            self.assertIsNone(status["not_direct_reason"])
            # Hole punching's own view (status ``path``) stays ``direct``.
            self.assertEqual(sim.path(other, a), "direct")
            self.assertTrue(sim.ping(other, a))
            self.assertTrue(sim.ping(a, other))
            peer_other = a.node.device.peers[other.public_key]
            self.assertEqual(a.stack.arbiter.status(peer_other)["path_kind"], "direct")
        self.assertIn("mapped 203.0.113.1:51820", moves)
        peer_c = b.node.device.peers[c.public_key]
        self.assertEqual(b.stack.arbiter.status(peer_c)["path_kind"], "member")

    def test_hello_mapped_is_bounded_and_checked(self) -> None:
        """A peer's HELLO ``mapped`` list keeps at most MAX_MAPPED numeric endpoints and drops
        names, bad ports and relay stand-ins; a non-list is ignored."""
        sim = MeshSim(seed=4)
        a = sim.add_member(None, "198.51.100.7")
        sim.start()
        sim.run(5)
        intro = sim.introducer
        peer = intro.node.device.peers[a.public_key]
        good = [["203.0.113.9", 1000 + i] for i in range(MAX_MAPPED + 3)]
        body = {"mapped": [["name.example", 1], ["203.0.113.9", 0], ["100::1", 5], *good]}
        intro.agent.control_received(peer, kinds.HELLO, encode_json(body), sim.net.now)
        self.assertEqual(
            intro.agent.peers[a.public_key].mapped_endpoints,
            [("203.0.113.9", 1000 + i) for i in range(MAX_MAPPED - 3)],
        )
        intro.agent.control_received(peer, kinds.HELLO, encode_json({"mapped": "x"}), sim.net.now)
        self.assertEqual(len(intro.agent.peers[a.public_key].mapped_endpoints), 1)

    def test_member_info_carries_mapped(self) -> None:
        """``mapped`` round-trips in a member entry, is left out when empty (old lists stay
        byte for byte the same), and a non-list makes the entry malformed."""
        info = MemberInfo(bytes(32), (ipaddress.ip_network("10.0.0.0/24"),), None, (), (MAPPED,))
        self.assertEqual(parse_member(info.to_json()), info)
        self.assertNotIn("mapped", MemberInfo(bytes(32)).to_json())
        self.assertIsNone(parse_member({**info.to_json(), "mapped": {"a": 1}}))

    def test_port_mapped_source(self) -> None:
        """The ``mapped`` source offers each introducer's reported mapped endpoints as direct
        candidates of kind ``mapped``."""
        reports = {b"i" * 32: MemberInfo(b"m" * 32, mapped=(MAPPED,))}
        self.assertEqual(
            list(PortMapped().candidates(b"m" * 32, reports)), [Candidate(MAPPED, kind="mapped")]
        )


class ConfigTests(SynchronousTestCase):
    def test_port_mapping_setting(self) -> None:
        """``PortMapping`` is ``auto`` by default, accepts ``off``, and anything else names the
        file, line and the allowed values."""
        key = "[Interface]\nPrivateKey = " + "A" * 43 + "=\n"
        self.assertEqual(parse_config(key, "a.conf").interface.port_mapping, "auto")
        off = parse_config(key + "PortMapping = Off\n", "a.conf")
        self.assertEqual(off.interface.port_mapping, "off")
        with self.assertRaises(ConfigError) as raised:
            parse_config(key + "PortMapping = upnp\n", "a.conf")
        self.assertIn("a.conf:3", str(raised.exception))
        self.assertIn("'auto' or 'off'", str(raised.exception))
