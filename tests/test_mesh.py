"""The mesh: membership through introducers, hole punching, relaying, recovery (in memory)."""

from __future__ import annotations

import ipaddress
import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint
from meshguard.core.keytext import key_text
from meshguard.core.peer import PATH_TLS, PATH_UDP
from meshguard.mesh import arbiter as arb
from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.forwarding import Relaying, parse_relay_body
from meshguard.mesh.members import MemberInfo, parse_member, parse_page
from meshguard.mesh.paths import (
    CHECK_INTERVAL,
    DEAD_AFTER,
    FALLBACK_JUDGED_AFTER,
    MOVED_QUIET_FOR,
    PING_BACK_GAP,
    QUIET_FOR,
    RECOVERY_BOUND,
    RETRY_INTERVAL,
)
from meshguard.testing.memory import MemoryNAT, MemoryNode
from tests.meshsim import PORT, MeshSim, SimMember
from tests.packets import ipv4


def home(sim: MeshSim, index: int, *, hard: bool = False, filtering: str = "port") -> MemoryNAT:
    """A home router with public address 203.0.113.INDEX and LAN 192.168.INDEX.0/24."""
    return sim.net.add_nat(
        MemoryNAT(
            f"203.0.113.{index}",
            {f"192.168.{index}.{host}" for host in range(2, 10)},
            60,
            endpoint_dependent=hard,
            filtering=filtering,
        )
    )


class _FakeTls:
    """The TLS relay logic as the arbiter asks it: which peers a relay reaches."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()

    def reaches(self, peer: Any) -> bool:
        return peer.public_key in self.held


def ping_retry(sim: MeshSim, a: SimMember, b: SimMember, tries: int = 5) -> bool:
    for _ in range(tries):
        if sim.ping(a, b):
            return True
        sim.run(1.0)
    return False


class HolePunchingTests(SynchronousTestCase):
    def test_members_behind_easy_nats_go_direct_and_the_relay_goes_quiet(self) -> None:
        """Members behind endpoint-independent NATs learn each other, punch, and talk directly:
        after convergence the introducer forwards nothing between them."""
        sim = MeshSim(seed=2)
        a = sim.add_member(home(sim, 1), "192.168.1.2")
        b = sim.add_member(home(sim, 2, filtering="address"), "192.168.2.2")
        c = sim.add_member(home(sim, 3), "192.168.3.2")
        sim.start()
        sim.run(20)
        for x, y in ((a, b), (a, c), (b, c), (b, a), (c, a), (c, b)):
            self.assertEqual(sim.path(x, y), "direct", (x.name, y.name))
        relay = sim.introducer.stack.relaying
        before = relay.forwarded_bytes
        for x, y in ((a, b), (a, c), (b, c), (b, a), (c, a), (c, b)):
            self.assertTrue(sim.ping(x, y), (x.name, y.name))
        sim.run(30)
        self.assertEqual(relay.forwarded_bytes, before)
        # The peer's endpoint is the other home's public mapping, not the introducer.
        endpoint = sim.endpoint_of(a, b)
        assert endpoint is not None
        self.assertEqual(endpoint[0], "203.0.113.2")

    def test_answered_path_checks_are_reported_for_the_tls_relay(self) -> None:
        """While the TLS relay's logic holds a peer, every PATH_PONG that proves a UDP path is
        told to the arbiter's listeners (that logic leaves the relay on it), and a datagram
        over another path does not make the arbiter restore the direct endpoint; once the
        relay lets go, the arbiter keeps the direct path it chose."""
        sim = MeshSim(seed=2)
        a = sim.add_member(home(sim, 1), "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        confirmed: list[tuple[bytes, tuple[str, int]]] = []
        arbiter = a.stack.arbiter
        arbiter.add_udp_proven_listener(
            lambda peer, endpoint, now: confirmed.append((peer.public_key, endpoint))
        )
        tls = _FakeTls()
        arbiter.set_tls(tls)
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "direct")
        self.assertEqual(confirmed, [])  # nothing held: nothing to tell
        peer = a.node.device.peers[b.public_key]
        tls.held.add(b.public_key)
        direct = peer.endpoint
        self.assertTrue(arbiter.tls_take(peer, "relay.test:443", sim.net.now, "UDP failed"))
        self.assertIs(peer.path_kind, PATH_TLS)
        self.assertEqual(peer.endpoint, direct)  # no stand-in: the last UDP endpoint stays
        self.assertEqual(arbiter.status(peer)["path_kind"], "tls-relay")
        self.assertEqual(arbiter.status(peer)["path_via"], "relay.test:443")
        sim.run(CHECK_INTERVAL * 2 + 1)
        self.assertIn((b.public_key, sim.endpoint_of(a, b)), confirmed)
        # The fake TLS logic did not let go, but a newly proven UDP path beats the relay.
        self.assertIs(peer.path_kind, PATH_UDP)
        self.assertFalse(arbiter.holds_tls(peer))
        tls.held.clear()
        state = a.stack.paths.states[b.public_key]
        elsewhere = ("198.51.100.9", 4000)
        peer.endpoint = elsewhere  # roaming
        a.stack.paths._keep_chosen(state, elsewhere, sim.net.now)
        self.assertEqual(peer.endpoint, state.direct)
        self.assertEqual(arbiter.status(peer)["path_kind"], "direct")
        self.assertIsNone(arbiter.status(peer)["not_direct_reason"])

    def test_hard_nats_on_both_sides_are_relayed(self) -> None:
        """Two homes whose NATs map per destination cannot punch: their traffic is relayed
        through the introducer, which counts it, and arrives."""
        sim = MeshSim(seed=3)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        sim.start()
        sim.run(30)
        self.assertEqual(sim.path(a, b), "relayed")
        status = a.stack.paths.peer_status(a.node.device.peers[b.public_key])
        self.assertEqual(status["relay"], key_text(sim.introducer.public_key))
        self.assertEqual(status["path"], f"relayed via {key_text(sim.introducer.public_key)}")
        before = sim.introducer.stack.relaying.forwarded_bytes
        self.assertTrue(sim.ping(a, b))
        self.assertTrue(sim.ping(b, a))
        self.assertGreater(sim.introducer.stack.relaying.forwarded_bytes, before)

    def test_two_members_on_one_lan_use_the_lan(self) -> None:
        """Two members behind the same router reach each other on their LAN addresses."""
        sim = MeshSim(seed=4)
        nat = home(sim, 1)
        a = sim.add_member(nat, "192.168.1.2")
        b = sim.add_member(nat, "192.168.1.3")
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "lan")
        self.assertEqual(sim.path(b, a), "lan")
        self.assertEqual(sim.endpoint_of(a, b), ("192.168.1.3", PORT))
        self.assertTrue(sim.ping(a, b))

    def test_dead_direct_path_falls_back_to_the_relay_then_returns(self) -> None:
        """When the direct path stops carrying packets the pair is relayed within
        DEAD_AFTER + CHECK_INTERVAL seconds, and goes direct again once it can."""
        sim = MeshSim(seed=5)
        a = sim.add_member(home(sim, 1), "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "direct")
        blocked = True

        def block(data: bytes, source: tuple[str, int], destination: tuple[str, int]) -> bool:
            # Filters see the sender's own address: drop what one home sends to the other.
            pairs = {("192.168.1.2", "203.0.113.2"), ("192.168.2.2", "203.0.113.1")}
            return not (blocked and (source[0], destination[0]) in pairs)

        sim.net.filters.append(block)
        sim.run(DEAD_AFTER + CHECK_INTERVAL + 1)
        self.assertEqual(sim.path(a, b), "relayed")
        self.assertEqual(sim.path(b, a), "relayed")
        self.assertTrue(sim.ping(a, b))
        self.assertTrue(sim.ping(b, a))
        blocked = False
        sim.run(RETRY_INTERVAL * 1.2)
        self.assertEqual(sim.path(a, b), "direct")
        self.assertEqual(sim.path(b, a), "direct")

    def test_a_dead_fallback_endpoint_is_checked_too(self) -> None:
        """The direct path dies while another endpoint of the member was proven moments ago
        (two ports of its NAT, as a birthday hit leaves): the arbiter falls back to that one,
        and it is checked like any direct path, so when it is dead too (the member's router
        rebooted) the pair goes to the relay within FALLBACK_JUDGED_AFTER plus a check, not
        stays on it for good."""
        sim = MeshSim(seed=2)
        a = sim.add_member(home(sim, 1), "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        sim.start()
        sim.run(20)
        state = a.stack.paths.states[b.public_key]
        peer = a.node.device.peers[b.public_key]
        first = state.direct
        assert first is not None
        self.assertEqual(sim.path(a, b), "direct")
        homes = {"192.168.1.2", "192.168.2.2", "203.0.113.1", "203.0.113.2"}
        sim.net.filters.append(lambda data, src, dst: not (src[0] in homes and dst[0] in homes))
        sim.run(4)
        second = (first[0], first[1] + 1)
        a.stack.paths.arbiter.proven(peer, arb.Path(arb.DIRECT, second), 0.5, sim.net.now)
        self.assertEqual(state.direct, first)  # the faster proof stays chosen
        while state.direct == first:
            sim.run(0.5)
        self.assertEqual(state.direct, second)
        fell_back = sim.net.now
        self.assertIsNotNone(state.next_check)
        while sim.path(a, b) == "direct" and sim.net.now - fell_back < 30:
            sim.run(0.5)
        self.assertTrue(sim.path(a, b).startswith("relayed"))
        self.assertLessEqual(sim.net.now - fell_back, FALLBACK_JUDGED_AFTER + CHECK_INTERVAL + 1)
        self.assertTrue(ping_retry(sim, a, b))

    def test_router_reboot_with_a_new_address_recovers_without_restart(self) -> None:
        """A home router reboots (mappings gone, new public address): within the documented
        bound every pair with that home is direct again and carries traffic."""
        sim = MeshSim(seed=6)
        nat_a = home(sim, 1)
        a = sim.add_member(nat_a, "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        c = sim.add_member(home(sim, 3, hard=True), "192.168.3.2")
        sim.start()
        sim.run(30)
        self.assertEqual(sim.path(a, b), "direct")
        nat_a.reboot("203.0.113.99")
        sim.run(DEAD_AFTER + CHECK_INTERVAL + RECOVERY_BOUND + 25)
        self.assertEqual(sim.path(a, b), "direct")
        self.assertEqual(sim.path(b, a), "direct")
        endpoint = sim.endpoint_of(b, a)
        assert endpoint is not None
        self.assertEqual(endpoint[0], "203.0.113.99")
        for x, y in ((a, b), (b, a), (a, c), (c, a)):
            self.assertTrue(ping_retry(sim, x, y), (x.name, y.name))

    def test_stock_wireguard_peer_keeps_working_beside_the_mesh(self) -> None:
        """A plain WireGuard device configured as a peer of a member never gets control
        messages and keeps exchanging data while the mesh converges."""
        sim = MeshSim(seed=7)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        rng = random.Random(9)
        plain: MemoryNode = sim.net.add(("198.51.100.30", PORT), rng.randbytes)
        plain_key = generate_private_key(rng.randbytes)
        plain.device.set_private_key(plain_key, sim.net.now)
        to_a = plain.device.add_peer(a.public_key)
        to_plain = a.node.device.add_peer(public_key(plain_key))
        assert to_a is not None and to_plain is not None
        plain.device.set_endpoint(to_a, ("198.51.100.20", PORT))
        plain.device.replace_allowed_ips(to_a, [ipaddress.ip_network(a.address)])
        a.node.device.replace_allowed_ips(to_plain, [ipaddress.ip_network("10.200.0.1/32")])
        sim.start()
        plain.device.up(sim.net.now)
        for _ in range(6):
            sim.run(5)
            before = len(a.node.written)
            plain.device.packet_from_tun(ipv4("10.200.0.1", a.address, b"x"), sim.net.now)
            sim.net.flush()
            sim.run(0.1)
            self.assertEqual(len(a.node.written), before + 1)
        self.assertEqual(plain.device.counters.bad_inner_packet, 0)
        self.assertFalse(to_plain.is_meshguard)
        self.assertTrue(sim.ping(a, b))


class MembershipTests(SynchronousTestCase):
    def test_configured_peer_is_never_overridden(self) -> None:
        """A member the user configured by hand keeps its endpoint and AllowedIPs, and an
        introduced member's AllowedIPs that overlap a configured peer's are left out."""
        sim = MeshSim(seed=8)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(None, "198.51.100.21")
        c = sim.add_member(None, "198.51.100.22")
        manual = a.node.device.add_peer(b.public_key)
        assert manual is not None
        a.node.device.set_endpoint(manual, ("198.51.100.21", PORT))
        a.node.device.replace_allowed_ips(manual, [ipaddress.ip_network("10.50.0.0/16")])
        # The introducer claims an overlapping network for c.
        intro_c = sim.introducer.node.device.peers[c.public_key]
        sim.introducer.node.device.replace_allowed_ips(
            intro_c, [ipaddress.ip_network(c.address), ipaddress.ip_network("10.50.1.0/24")]
        )
        sim.start()
        sim.run(20)
        membership = a.stack.membership
        self.assertNotIn(b.public_key, membership.learned)
        self.assertIn(c.public_key, membership.learned)
        self.assertEqual(
            a.node.device.allowed_ips.networks(manual), [ipaddress.ip_network("10.50.0.0/16")]
        )
        self.assertEqual(
            a.node.device.allowed_ips.networks(a.node.device.peers[c.public_key]),
            [ipaddress.ip_network(c.address)],
        )

    def test_member_removed_when_introducer_stops_listing_it(self) -> None:
        """When the introducer's config drops a member, the others remove their learned peer."""
        sim = MeshSim(seed=9)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(None, "198.51.100.21")
        sim.start()
        sim.run(10)
        self.assertIn(b.public_key, a.node.device.peers)
        sim.introducer.node.device.remove_peer(b.public_key)
        sim.run(5)
        self.assertNotIn(b.public_key, a.node.device.peers)
        self.assertNotIn(b.public_key, a.stack.paths.states)

    def test_lists_from_a_non_introducer_are_ignored(self) -> None:
        """A member trusts membership only from its introducers."""
        sim = MeshSim(seed=10)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(None, "198.51.100.21")
        sim.start()
        sim.run(10)
        peer_b = a.node.device.peers[b.public_key]
        stranger = MemberInfo(bytes(range(32)), (ipaddress.ip_network("10.9.9.9/32"),))
        body = encode_json(
            {"op": "list", "gen": 99, "page": 0, "pages": 1, "members": [stranger.to_json()]}
        )
        before = set(a.node.device.peers)
        a.agent.control_received(peer_b, kinds.MEMBERS, body, sim.net.now)
        self.assertEqual(set(a.node.device.peers), before)
        self.assertEqual(a.stack.membership.dropped, 1)

    def test_two_introducers_merge(self) -> None:
        """A member listed by two introducers is learned from both and stays while either
        lists it."""
        sim = MeshSim(seed=11)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(None, "198.51.100.21")
        second = sim._make("intro2", "198.51.100.2", None)
        for member in (a, b):
            peer = second.node.device.add_peer(member.public_key)
            assert peer is not None
            second.node.device.replace_allowed_ips(peer, [ipaddress.ip_network(member.address)])
            back = member.node.device.add_peer(second.public_key)
            assert back is not None
            member.node.device.set_endpoint(back, ("198.51.100.2", PORT))
            member.node.device.replace_allowed_ips(back, [ipaddress.ip_network("10.98.0.2/32")])
            member.node.device.set_persistent_keepalive(back, 25, sim.net.now)
            member.stack.configure({sim.introducer.public_key, second.public_key}, True, 0.0)
        sim.members.append(second)
        sim.start()
        sim.run(15)
        self.assertEqual(len(a.stack.membership.learned[b.public_key]), 2)
        sim.introducer.node.device.remove_peer(b.public_key)
        sim.run(5)
        self.assertEqual(len(a.stack.membership.learned[b.public_key]), 1)
        self.assertTrue(ping_retry(sim, a, b))


class RelayTests(SynchronousTestCase):
    def test_forwarding_no_refuses_to_relay(self) -> None:
        """An introducer with ``Forwarding = no`` forwards nothing; members whose NATs allow
        it still reach each other, the handshake itself punching."""
        sim = MeshSim(seed=12, forwarding=False)
        a = sim.add_member(home(sim, 1, filtering="none"), "192.168.1.2")
        b = sim.add_member(None, "198.51.100.21")
        sim.start()
        sim.run(40)
        self.assertEqual(sim.introducer.stack.relaying.forwarded_bytes, 0)
        self.assertTrue(ping_retry(sim, a, b))
        self.assertTrue(ping_retry(sim, b, a))

    def test_relay_limits_each_sender_and_buffers_nothing(self) -> None:
        """A member cannot make the relay forward more than its burst at once: the excess is
        dropped and counted, never queued."""
        sim = MeshSim(seed=13)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        sim.start()
        sim.run(20)
        relay: Relaying = sim.introducer.stack.relaying
        relay.rate, relay.burst = 1000.0, 2000.0
        relay._buckets.clear()
        delivered = sum(sim.ping(a, b) for _ in range(100))
        self.assertLess(delivered, 40)
        self.assertGreater(relay.rate_limited, 50)
        self.assertEqual(len(sim.net.queue), 0)

    def test_a_lapsed_session_with_the_relay_is_renewed_at_once(self) -> None:
        """Control messages do not rekey, so an idle member's session with its relay lapses
        (REJECT_AFTER_TIME) until its next persistent keepalive, up to 25 s later. Relayed
        traffic meeting a lapsed session renews it at once, on the sending member's side and
        on the relay's side toward the target: the pair talks again a packet later, not after
        the keepalives (a drop each side, nothing queued)."""
        sim = MeshSim(seed=15)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        sim.start()
        sim.run(20)
        self.assertTrue(sim.path(a, b).startswith("relayed"))
        self.assertTrue(sim.ping(a, b))
        intro = sim.introducer
        for x, y in ((a, intro), (intro, b)):
            keypair = x.node.device.peers[y.public_key].keypairs.current
            assert keypair is not None
            keypair.expire_for_sending()
        self.assertEqual([sim.ping(a, b) for _ in range(3)], [False, False, True])
        self.assertEqual(a.stack.relaying.renewed, 1)
        self.assertEqual(intro.stack.relaying.renewed, 1)


class ForwardingRateTests(SynchronousTestCase):
    def test_rate_setting_bounds_each_sender(self) -> None:
        """``ForwardingRate`` sets the bytes per second forwarded per sender (burst: an eighth
        of a second of it); unlimited forwards everything."""
        sim = MeshSim(seed=14)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        sim.start()
        sim.run(20)
        stack = sim.introducer.stack
        stack.configure(set(), True, sim.net.now, 1024 * 1024)
        self.assertEqual(stack.relaying.rate, 1024 * 1024)
        self.assertEqual(stack.relaying.burst, 512 * 1024)
        stack.configure(set(), True, sim.net.now, None)
        limited = stack.relaying.rate_limited
        self.assertEqual(sum(sim.ping(a, b) for _ in range(50)), 50)
        self.assertEqual(stack.relaying.rate_limited, limited)


class HostileInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        sim = MeshSim(seed=14)
        self.a = sim.add_member(None, "198.51.100.20")
        self.b = sim.add_member(None, "198.51.100.21")
        sim.start()
        sim.run(10)
        self.sim = sim

    @settings(max_examples=300, deadline=None)
    @given(
        kind=st.sampled_from(
            [
                kinds.MEMBERS,
                kinds.CALL_ME_MAYBE,
                kinds.PATH_PING,
                kinds.PATH_PONG,
                kinds.BIRTHDAY,
                kinds.RELAY_FORWARD,
                kinds.RELAY_DELIVER,
            ]
        ),
        body=st.one_of(
            st.binary(max_size=200),
            st.builds(
                lambda v: encode_json(v),
                st.dictionaries(
                    st.sampled_from(
                        ["op", "gen", "page", "pages", "members", "to", "from", "observed", "relay"]
                    ),
                    st.recursive(
                        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
                        lambda c: (
                            st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=8), c, max_size=4)
                        ),
                        max_leaves=10,
                    ),
                ),
            ),
        ),
    )
    def test_control_bodies_from_a_member_never_raise_or_add_peers(
        self, kind: int, body: bytes
    ) -> None:
        """Any control body from a (non-introducer) member is handled without an exception
        escaping and without adding or removing peers."""
        a, b = self.a, self.b
        peer_b = a.node.device.peers[b.public_key]
        before = set(a.node.device.peers)
        dropped = a.agent.dropped
        a.agent.control_received(peer_b, kind, body, self.sim.net.now)
        self.assertEqual(a.agent.dropped, dropped)  # no feature raised
        self.assertEqual(set(a.node.device.peers), before)

    @given(st.binary(max_size=100))
    def test_relay_body_parser(self, body: bytes) -> None:
        parsed = parse_relay_body(body)
        if parsed is not None:
            self.assertEqual(parsed[0] + parsed[1], body)
            self.assertEqual(len(parsed[0]), 32)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=60),
            lambda c: (
                st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5)
            ),
            max_leaves=20,
        )
    )
    def test_member_and_page_parsers_accept_only_well_formed(self, value: object) -> None:
        member = parse_member(value)
        if member is not None:
            self.assertEqual(parse_member(member.to_json()), member)
        if isinstance(value, dict):
            parse_page(value)

    def test_member_round_trip(self) -> None:
        info = MemberInfo(
            bytes(32),
            (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")),
            ("203.0.113.1", 4000),
            (("192.168.1.2", 51820),),
        )
        self.assertEqual(parse_member(info.to_json()), info)


class ScaleTests(SynchronousTestCase):
    KINDS = ((False, "port"), (False, "address"), (False, "none"), (True, "port"), (None, ""))

    def build(self, count: int, seed: int, loss: float) -> tuple[MeshSim, dict[str, tuple]]:
        sim = MeshSim(seed=seed, loss=loss)
        nat_of: dict[str, tuple] = {}
        for index in range(count):
            hard, filtering = self.KINDS[index % len(self.KINDS)]
            if hard is None:
                member = sim.add_member(None, f"198.51.100.{10 + index}")
            else:
                nat = sim.net.add_nat(
                    MemoryNAT(
                        f"203.0.{index // 200}.{index % 200 + 1}",
                        {f"10.{index}.0.2"},
                        60,
                        endpoint_dependent=hard,
                        filtering=filtering,
                    )
                )
                member = sim.add_member(nat, f"10.{index}.0.2")
            nat_of[member.name] = (hard, filtering)
        sim.start()
        return sim, nat_of

    @staticmethod
    def can_be_direct(x: tuple, y: tuple) -> bool:
        if x[0] is None or y[0] is None or not (x[0] or y[0]):
            return True
        if x[0] and y[0]:
            return False
        easy = y if x[0] else x
        return easy[1] in ("none", "address")

    def converge(self, count: int, loss: float) -> float:
        """Run a mesh, check full reachability and directness; return control datagrams sent
        per member in a steady minute."""
        sim, nat_of = self.build(count, seed=count, loss=loss)
        sim.run(60)
        for x in sim.members:
            for y in sim.members:
                if x is y:
                    continue
                direct = sim.path(x, y) in ("direct", "lan")
                self.assertEqual(
                    direct, self.can_be_direct(nat_of[x.name], nat_of[y.name]), (x.name, y.name)
                )
                self.assertTrue(ping_retry(sim, x, y, tries=3), (x.name, y.name))
        before = sum(len(m.node.sent) for m in sim.members)
        sim.run(60)
        after = sum(len(m.node.sent) for m in sim.members)
        return (after - before) / count

    def test_fifty_members_converge_and_control_traffic_grows_linearly(self) -> None:
        """10, 25 and 50 members behind assorted NATs (with 1% loss for 50) all reach each
        other, directly wherever both NATs allow it; the datagrams each member sends in a
        steady minute grow no faster than the number of other members."""
        per_member = {
            count: self.converge(count, 0.01 if count == 50 else 0.0) for count in (10, 25, 50)
        }
        per_peer = {count: value / (count - 1) for count, value in per_member.items()}
        self.assertLess(per_peer[50], per_peer[10] * 1.5, per_peer)
        self.assertLess(per_peer[25], per_peer[10] * 1.5, per_peer)


class IdleMembershipTests(SynchronousTestCase):
    def test_idle_member_heartbeats_in_keepalive_slots_and_gets_no_repeated_lists(self) -> None:
        """A member behind a NAT, idle for an hour, with a 25 s keepalive to its introducer:
        its minutely re-subscription goes in the place of a keepalive (one datagram per
        slot, never two), and the introducer, whose list did not change, sends no list
        again (issue 17). A list that changes still arrives. (An introducer that counts its
        subscribers' traffic as heartbeats needs even fewer: tests/test_keepalive_idle.py.)"""
        sim = MeshSim(seed=3)
        sim.introducer.stack.membership.capabilities = ()  # the minutely heartbeat
        member = sim.add_member(home(sim, 1), "192.168.1.2")
        sim.start()
        sim.run(200)
        membership = member.stack.membership
        self.assertIn(sim.introducer.public_key, membership.views)
        peer = member.node.device.peers[sim.introducer.public_key]
        back = sim.introducer.node.device.peers[member.public_key]
        sent, lists = len(member.node.sent), sim.introducer.stack.membership.lists_sent
        times: list[float] = []
        original = member.node.send_datagram

        def record(data: bytes, endpoint: tuple[str, int]) -> None:
            times.append(sim.net.now)
            original(data, endpoint)

        member.node.send_datagram = record  # type: ignore[method-assign]
        heartbeats = peer.sent.total["control"]
        sim.run(3600, tick=0.25)
        self.assertGreaterEqual(peer.sent.total["control"] - heartbeats, 25)
        self.assertEqual(sim.introducer.stack.membership.lists_sent, lists)
        self.assertGreater(len(times), 0)
        self.assertGreaterEqual(min(b - a for a, b in itertools.pairwise(times)), 24)
        self.assertLessEqual(len(member.node.sent) - sent, 3600 / 25 + 2)
        # The introducer still knows the member: a new member reaches it in a list.
        other = sim.add_member(home(sim, 2), "192.168.2.2")
        other.node.device.up(sim.net.now)
        sim.run(30)
        self.assertIn(other.public_key, membership.learned)
        self.assertGreater(back.sent.total["control"], 0)


class PrimedPunchingTests(SynchronousTestCase):
    """With a primer (the node's TTL-limited datagram), pings go to a member's candidates only
    after it said it primed its own NAT toward us (docs/nat-matrix.md)."""

    def test_primed_members_go_direct_and_prime_before_pinging(self) -> None:
        """Both sides prime, call, then ping: the pair goes direct; each side sent primers,
        heard the other's call (``peer_primed``) and pinged."""
        sim = MeshSim(seed=21)
        a = sim.add_member(home(sim, 1), "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        first_primer: dict[str, float] = {}
        for member in (a, b):

            def primer(endpoint: Endpoint, name: str = member.name) -> None:
                first_primer.setdefault(name, sim.net.now)

            member.stack.paths.primer = primer
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "direct")
        self.assertEqual(sim.path(b, a), "direct")
        for member, other in ((a, b), (b, a)):
            state = member.stack.paths.states[other.public_key]
            self.assertGreater(state.pings_sent, 0)
            self.assertIsNotNone(state.peer_primed)
            self.assertIn(member.name, first_primer)

    def test_unanswered_primed_rounds_go_quiet(self) -> None:
        """Hard NATs on both sides: after QUIET_AFTER_ROUNDS pinged rounds without a pong the
        member sends nothing to the other for QUIET_FOR seconds, then tries again."""
        sim = MeshSim(seed=22)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        primed: list[float] = []
        a.stack.paths.primer = lambda endpoint: primed.append(sim.net.now)
        b.stack.paths.primer = lambda endpoint: None
        sim.start()
        sim.run(15)
        state = a.stack.paths.states[b.public_key]
        self.assertIsNotNone(state.quiet_until)
        assert state.quiet_until is not None
        quiet_until = state.quiet_until  # a later quiet period moves it
        quiet_from = quiet_until - QUIET_FOR
        self.assertFalse([t for t in primed if quiet_from < t < quiet_until - 0.5])
        self.assertTrue(sim.path(a, b).startswith("relayed"))
        sim.run(QUIET_FOR + 5)
        self.assertTrue([t for t in primed if t >= quiet_until - 0.5])

    def test_the_member_that_moved_is_left_alone_until_its_packets_expired(self) -> None:
        """A's router reboots with a new address. Until A found its path dead it kept sending
        to B's endpoint from the new address, which on a NAT without a WAN input filter leaves
        entries that would give B's first packets toward A's new address another port (and
        that port to B's later flows to anyone; the in-memory NAT does not model it: here B's
        NAT just drops what A sends until B goes quiet). So once B's path died and B sees A at
        the new address, B sends A nothing over UDP (no primer, ping or call) for
        MOVED_QUIET_FOR; then both punch and the pair is direct at the new address. A, whose
        peer did not move, punches at once (its own NAT is new)."""
        sim = MeshSim(seed=24)
        nat_a = home(sim, 1)
        a = sim.add_member(nat_a, "192.168.1.2")
        b = sim.add_member(home(sim, 2), "192.168.2.2")
        primed: dict[str, list[tuple[float, Endpoint]]] = {a.name: [], b.name: []}
        for member in (a, b):

            def primer(endpoint: Endpoint, name: str = member.name) -> None:
                primed[name].append((sim.net.now, endpoint))

            member.stack.paths.primer = primer
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "direct")
        state_b = b.stack.paths.states[a.public_key]
        quiet_end: list[float] = []

        def clash(data: bytes, source: tuple[str, int], destination: tuple[str, int]) -> bool:
            if state_b.moved_until is not None and not quiet_end:
                quiet_end.append(state_b.moved_until)
            if quiet_end and sim.net.now >= quiet_end[0]:
                return True
            return (source[0], destination[0]) != ("192.168.1.2", "203.0.113.2")

        sim.net.filters.append(clash)
        blocked = False
        rebooted = sim.net.now
        nat_a.reboot("203.0.113.99")
        sim.run(DEAD_AFTER + CHECK_INTERVAL + 6)
        assert state_b.moved_until is not None
        quiet_from = state_b.moved_until - MOVED_QUIET_FOR
        self.assertTrue(sim.path(b, a).startswith("relayed"))
        self.assertIsNone(a.stack.paths.states[b.public_key].moved_until)
        sim.run(MOVED_QUIET_FOR + 15)
        to_new = [t for t, e in primed[b.name] if e[0] == "203.0.113.99"]
        self.assertTrue(to_new)
        self.assertGreaterEqual(min(to_new), quiet_from + MOVED_QUIET_FOR - 0.01)
        self.assertTrue([t for t, _ in primed[a.name] if rebooted < t <= quiet_from])
        self.assertEqual(sim.path(a, b), "direct")
        self.assertEqual(sim.path(b, a), "direct")
        endpoint = sim.endpoint_of(b, a)
        assert endpoint is not None
        self.assertEqual(endpoint[0], "203.0.113.99")
        self.assertIsNone(state_b.moved_until)
        # The new path dies too while A's old address is still a candidate: that is where A
        # was, not a move, so B punches at once.
        state_b.reflexive.append(("203.0.113.1", 20000))
        sim.net.filters.append(lambda data, source, destination: not blocked)
        blocked = True
        sim.run(DEAD_AFTER + CHECK_INTERVAL + 1)
        self.assertTrue(sim.path(b, a).startswith("relayed"))
        self.assertIsNone(state_b.moved_until)
        blocked = False

    def test_a_ping_straight_from_the_member_is_pinged_back_while_quiet(self) -> None:
        """A PATH_PING that came straight from a member (through its NAT, so its NAT maps that
        source toward us) is pinged back at once although we are quiet toward it, at most
        once per PING_BACK_GAP: the side whose NAT let the ping in proves the path without
        waiting out its quiet period."""
        sim = MeshSim(seed=23)
        a = sim.add_member(home(sim, 1, hard=True), "192.168.1.2")
        b = sim.add_member(home(sim, 2, hard=True), "192.168.2.2")
        for member in (a, b):
            member.stack.paths.primer = lambda endpoint: None
        sim.start()
        sim.run(15)
        paths = a.stack.paths
        state = paths.states[b.public_key]
        self.assertIsNotNone(state.quiet_until)
        peer = a.node.device.peers[b.public_key]
        now = sim.net.now
        source = ("203.0.113.2", 40000)
        before = set(state.pending)
        peer.arrived_from = source  # where the authenticated ping came from
        paths.control_received(peer, kinds.PATH_PING, b"12345678", now)
        self.assertEqual([state.pending[n] for n in set(state.pending) - before], [(source, now)])
        other = ("203.0.113.2", 40001)
        peer.arrived_from = other
        paths.control_received(peer, kinds.PATH_PING, b"87654321", now + PING_BACK_GAP / 2)
        self.assertFalse([n for n in state.pending if state.pending[n][0] == other])
        paths.control_received(peer, kinds.PATH_PING, b"87654321", now + PING_BACK_GAP)
        self.assertTrue([n for n in state.pending if state.pending[n][0] == other])
