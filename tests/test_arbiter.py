"""The path arbiter in memory: lists of events in, lists of moves (and peer fields) out."""

from __future__ import annotations

import base64
import ipaddress

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.app.node import Node
from meshguard.codecs.config import parse_config
from meshguard.codecs.uapi import parse_set
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import AlreadyRegisteredError
from meshguard.core.peer import PATH_MEMBER, PATH_TLS, PATH_UDP, Peer
from meshguard.mesh import arbiter as arb
from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.arbiter import Path, PathArbiter
from meshguard.mesh.members import MemberInfo

A_LAN = ("192.168.1.7", 51820)
A_PUBLIC = ("203.0.113.7", 41641)
A_V6 = ("2001:db8::7", 51820)


class _Tls:
    """The TLS relay logic as the arbiter asks it: which peers a relay reaches."""

    def __init__(self) -> None:
        self.present: set[bytes] = set()

    def reaches(self, peer: Peer) -> bool:
        return peer.public_key in self.present


def _relay_member(key: int) -> Peer:
    relay = Peer(bytes([key]) * 32)
    relay.keypairs.current = object()  # type: ignore[assignment]
    return relay


class ArbiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.moves: list[tuple[str, str, str]] = []
        self.arbiter = PathArbiter(
            on_move=lambda peer, old, new, reason: self.moves.append(
                (old.describe(), new.describe(), reason)
            )
        )
        self.peer = Peer(b"\x07" * 32)
        self.relay = _relay_member(1)

    def test_relay_first_then_direct_then_lan(self) -> None:
        """Member relay at once; a proven public endpoint beats it; a proven LAN endpoint beats
        that; each move is told once with its reason, and the peer's fields follow."""
        a = self.arbiter
        a.offer_member(self.peer, [self.relay], 0.0)
        self.assertIs(self.peer.relay, self.relay)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.030, 1.0)
        self.assertIsNone(self.peer.relay)
        self.assertEqual(self.peer.endpoint, A_PUBLIC)
        a.proven(self.peer, Path(arb.LAN, A_LAN), 0.002, 2.0)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.030, 2.5)  # no move: LAN stays
        self.assertEqual(self.peer.endpoint, A_LAN)
        self.assertEqual(
            self.moves,
            [
                ("none", f"via member {self.relay.short_name}", "a member offers to forward"),
                (
                    f"via member {self.relay.short_name}",
                    "direct 203.0.113.7:41641",
                    "a ping to 203.0.113.7:41641 was answered",
                ),
                (
                    "direct 203.0.113.7:41641",
                    "lan 192.168.1.7:51820",
                    "a ping to 192.168.1.7:51820 was answered",
                ),
            ],
        )
        self.assertEqual(
            a.status(self.peer),
            {
                "path_kind": "lan",
                "path_via": None,
                "not_direct_reason": None,
                "path_reason": "a ping to 192.168.1.7:51820 was answered",
            },
        )

    def test_failed_path_falls_back_and_is_not_chosen_again_unproven(self) -> None:
        """A direct path that failed goes back to the member relay at once; stale proofs do
        not count after ``proven_for``."""
        a = self.arbiter
        a.offer_member(self.peer, [self.relay], 0.0)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.03, 1.0)
        a.failed(self.peer, A_PUBLIC, 12.0, "pings to 203.0.113.7:41641 unanswered for 10 s")
        self.assertIs(self.peer.relay, self.relay)
        self.assertEqual(self.moves[-1][2], "pings to 203.0.113.7:41641 unanswered for 10 s")
        a.proven(self.peer, Path(arb.DIRECT_V6, A_V6), 0.02, 13.0)
        self.assertEqual(self.peer.endpoint, A_V6)
        self.assertEqual(a.status(self.peer)["path_kind"], "direct-v6")
        # Much later, with nothing proven lately, a relay offer moves it back to the relay.
        a.offer_member(self.peer, [self.relay], 13.0 + arb.HOLD_DOWN["proven_for"] + 1)
        self.assertIs(self.peer.relay, self.relay)

    def test_rtt_decides_within_a_kind_and_ipv6_leads(self) -> None:
        """Two proven IPv4 endpoints: the lower round-trip time wins; a proven global IPv6
        endpoint wins over IPv4 (no NAT mapping to keep alive), whatever its RTT."""
        a = self.arbiter
        other = ("198.51.100.9", 51820)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.050, 1.0)
        a.proven(self.peer, Path(arb.DIRECT, other), 0.010, 1.1)
        self.assertEqual(self.peer.endpoint, other)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.005, 1.2)
        self.assertEqual(self.peer.endpoint, A_PUBLIC)
        a.proven(self.peer, Path(arb.DIRECT_V6, A_V6), 0.020, 1.3)
        self.assertEqual(self.peer.endpoint, A_V6)

    def test_mapped_path_is_reported_and_ranked_just_below_direct(self) -> None:
        """A path proven to a port-mapped endpoint is ``mapped`` (status, the logged move) and
        beats a member relay; a proven direct path wins over it, whatever the RTTs; when the
        direct one fails the peer moves back to the mapped one, not to the relay."""
        a = self.arbiter
        mapped = ("203.0.113.7", 51820)
        a.offer_member(self.peer, [self.relay], 0.0)
        a.proven(self.peer, Path(arb.MAPPED, mapped), 0.010, 1.0)
        self.assertIsNone(self.peer.relay)
        self.assertEqual(self.peer.endpoint, mapped)
        status = a.status(self.peer)
        self.assertEqual(status["path_kind"], "mapped")
        self.assertIsNone(status["path_via"])
        self.assertIsNone(status["not_direct_reason"])
        self.assertEqual(
            self.moves[-1],
            (
                f"via member {self.relay.short_name}",
                "mapped 203.0.113.7:51820",
                "a ping to 203.0.113.7:51820 was answered",
            ),
        )
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.050, 2.0)
        self.assertEqual(self.peer.endpoint, A_PUBLIC)
        self.assertEqual(a.status(self.peer)["path_kind"], "direct")
        a.proven(self.peer, Path(arb.MAPPED, mapped), 0.010, 3.0)  # no move back
        self.assertEqual(self.peer.endpoint, A_PUBLIC)
        a.failed(self.peer, A_PUBLIC, 4.0, "pings to 203.0.113.7:41641 unanswered for 10 s")
        self.assertEqual(self.peer.endpoint, mapped)
        self.assertIsNone(self.peer.relay)
        self.assertEqual(a.status(self.peer)["path_kind"], "mapped")

    def test_roaming_does_not_pull_a_chosen_path_down(self) -> None:
        """A datagram from another endpoint (roaming moved ``peer.endpoint``) does not move a
        peer off its chosen path."""
        a = self.arbiter
        a.proven(self.peer, Path(arb.LAN, A_LAN), 0.002, 1.0)
        self.peer.endpoint = A_PUBLIC  # what the device's roaming did
        a.heard_from(self.peer, A_PUBLIC, 1.5)
        self.assertEqual(self.peer.endpoint, A_LAN)

    def test_roaming_is_the_arbiters(self) -> None:
        """The arbiter owns roaming: a stock (or configured) peer follows its datagrams as in
        WireGuard, each move logged once; a learned member keeps the path proofs chose; a
        configured or resolved endpoint is written and logged with its reason."""
        a = self.arbiter
        stock = Peer(b"\x09" * 32)
        a.configured(stock, A_PUBLIC, "configured")
        a.roamed(stock, A_LAN, 1.0)
        a.roamed(stock, A_LAN, 1.1)  # the same source again: nothing new
        self.assertEqual(stock.endpoint, A_LAN)
        a.configured(stock, A_V6, "peer.example now resolves to [2001:db8::7]:51820")
        self.assertEqual(
            self.moves,
            [
                ("none", "direct 203.0.113.7:41641", "configured"),
                (
                    "direct 203.0.113.7:41641",
                    "direct 192.168.1.7:51820",
                    "roaming: an authenticated datagram came from there",
                ),
                (
                    "direct 192.168.1.7:51820",
                    "direct-v6 [2001:db8::7]:51820",
                    "peer.example now resolves to [2001:db8::7]:51820",
                ),
            ],
        )
        a.proven(self.peer, Path(arb.LAN, A_LAN), 0.002, 2.0)
        del self.moves[:]
        a.roamed(self.peer, A_PUBLIC, 2.5)
        self.assertEqual(self.peer.endpoint, A_LAN)
        self.assertEqual(self.moves, [])

    def test_mesh_and_tls_relay_together(self) -> None:
        """A TLS relay that reaches the peer replaces the forwarding member; on the relay the
        path is explicit (``path_kind``), the endpoint stays the last UDP one and status never
        calls it direct; a proven UDP path is told to the TLS logic and wins."""
        tls = _Tls()
        told: list[tuple[bytes, tuple[str, int]]] = []
        a = self.arbiter
        a.set_tls(tls)
        a.add_udp_proven_listener(lambda peer, ep, now: told.append((peer.public_key, ep)))
        self.peer.endpoint = A_PUBLIC  # where the punching source last tried
        a.offer_member(self.peer, [self.relay], 0.0)
        self.assertEqual((self.peer.path_kind, self.peer.relay), (PATH_MEMBER, self.relay))
        tls.present.add(self.peer.public_key)
        a.offer_member(self.peer, [self.relay], 1.0)  # the TLS relay reaches it: no member
        self.assertEqual((self.peer.path_kind, self.peer.relay), (PATH_UDP, None))
        self.assertTrue(a.tls_take(self.peer, "relay.example:443", 1.5, "UDP failed"))
        self.assertIs(self.peer.path_kind, PATH_TLS)
        self.assertEqual(self.peer.endpoint, A_PUBLIC)  # no stand-in: wg show keeps this
        a.offer_member(self.peer, [self.relay], 2.0)  # the member again: the relay stays
        self.assertIs(self.peer.path_kind, PATH_TLS)
        status = a.status(self.peer)
        self.assertEqual(status["path_kind"], "tls-relay")
        self.assertEqual(status["path_via"], "relay.example:443")
        self.assertIsNotNone(status["not_direct_reason"])
        a.add_udp_proven_listener(
            lambda peer, ep, now: a.tls_release(peer, ep, "the mesh path check was answered", now)
        )
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.03, 3.0)
        self.assertEqual(told, [(self.peer.public_key, A_PUBLIC)])
        self.assertFalse(a.holds_tls(self.peer))  # the TLS logic left the relay on being told
        self.assertEqual((self.peer.path_kind, self.peer.endpoint), (PATH_UDP, A_PUBLIC))
        self.assertEqual(a.status(self.peer)["path_kind"], "direct")
        self.assertEqual(
            [(old, new) for old, new, _ in self.moves],
            [
                ("none", f"via member {self.relay.short_name}"),
                (f"via member {self.relay.short_name}", "none"),
                ("none", "tls-relay via relay.example:443"),
                ("tls-relay via relay.example:443", "direct 203.0.113.7:41641"),
            ],
        )

    def test_proof_after_the_relay_took_the_peer_wins_without_the_tls_logic(self) -> None:
        """Proofs from before a TLS fallback no longer count (UDP failed since); a UDP path
        proven afterwards beats the relay even if the TLS logic does not let go: the arbiter
        moves the peer, once, and the TLS logic follows (``holds_tls`` turns False)."""
        a = self.arbiter
        tls = _Tls()
        a.set_tls(tls)
        tls.present.add(self.peer.public_key)
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.03, 1.0)
        self.assertTrue(a.tls_take(self.peer, "r:443", 2.0, "UDP stopped answering"))
        self.assertIsNone(a.best_udp(self.peer, 2.5))
        a.offer_member(self.peer, [self.relay], 3.0)  # no stale proof pulls it back
        self.assertIs(self.peer.path_kind, PATH_TLS)
        a.proven(self.peer, Path(arb.LAN, A_LAN), 0.002, 4.0)
        self.assertEqual((self.peer.path_kind, self.peer.endpoint), (PATH_UDP, A_LAN))
        self.assertFalse(a.holds_tls(self.peer))
        self.assertEqual(
            [(old, new) for old, new, _ in self.moves][-2:],
            [
                ("direct 203.0.113.7:41641", "tls-relay via r:443"),
                ("tls-relay via r:443", "lan 192.168.1.7:51820"),
            ],
        )

    def test_one_state_per_peer_moved_only_by_the_table(self) -> None:
        """Each peer has one state; events move it only along the transition table (a move
        the policy does not name is refused and counted, nothing changes)."""
        a = self.arbiter
        self.assertIs(a.state_of(self.peer), arb.State.UNREACHED)
        a.offer_member(self.peer, [self.relay], 0.0)
        self.assertIs(a.state_of(self.peer), arb.State.MEMBER)
        # Roaming is not a way off a member path (nor onto a relay): refused by the table.
        self.assertFalse(a._enter(self.peer, Path(arb.DIRECT, A_PUBLIC), "roam", "x", 1.0))
        self.assertEqual(a.refused, 1)
        self.assertEqual((self.peer.path_kind, self.peer.relay), (PATH_MEMBER, self.relay))
        self.assertTrue(a.tls_take(self.peer, "r:443", 1.0, "UDP failed"))
        self.assertIs(a.state_of(self.peer), arb.State.TLS_RELAY)
        a.roamed(self.peer, A_PUBLIC, 1.5)  # the endpoint follows; the state does not
        self.assertEqual((self.peer.endpoint, self.peer.path_kind), (A_PUBLIC, PATH_TLS))
        a.tls_release(self.peer, A_PUBLIC, "our probe was answered", 2.0)
        self.assertIs(a.state_of(self.peer), arb.State.UDP)
        a.tls_release(self.peer, A_LAN, "late", 2.5)  # not held: nothing to release
        self.assertEqual(self.peer.endpoint, A_PUBLIC)
        for event, pairs in arb.TRANSITIONS.items():
            if event != "tls-take":
                self.assertNotIn((arb.State.UDP, arb.State.TLS_RELAY), pairs, event)

    def test_a_udp_path_the_tls_logic_found_answering_survives_a_member_offer(self) -> None:
        """The TLS logic moves a learned member back to UDP because UDP answered its probe:
        that counts as a proof, so the member list's next offer does not drop the peer to no
        path (it did: "direct -> none (a member offers to forward)") while the TLS relay still
        reaches it. A release for any other reason proves nothing."""
        tls = _Tls()
        a = self.arbiter
        a.set_tls(tls)
        tls.present.add(self.peer.public_key)
        a.offer_member(self.peer, [self.relay], 0.0)
        self.assertTrue(a.tls_take(self.peer, "r:443", 1.0, "UDP failed"))
        a.tls_release(self.peer, A_PUBLIC, "our probe was answered", 2.0, answered=True)
        a.offer_member(self.peer, [self.relay], 3.0)
        self.assertEqual((self.peer.path_kind, self.peer.endpoint), (PATH_UDP, A_PUBLIC))
        self.assertEqual(a.status(self.peer)["path_kind"], "direct")
        # A measured proof of the same endpoint replaces the unmeasured one.
        a.proven(self.peer, Path(arb.DIRECT, A_PUBLIC), 0.02, 4.0)
        self.assertEqual(a.best_udp(self.peer, 4.0), (Path(arb.DIRECT, A_PUBLIC), 0.02))
        # Without ``answered`` (the relay link went down) the last endpoint is no proof.
        self.assertTrue(a.tls_take(self.peer, "r:443", 5.0, "UDP failed"))
        a.tls_release(self.peer, A_PUBLIC, "the relay link went down", 6.0)
        self.assertIsNone(a.best_udp(self.peer, 6.0))

    def test_a_peer_that_reached_us_through_a_member_is_answered_that_way(self) -> None:
        """Unreached and no endpoint: a datagram through a member puts the peer on that member
        (logged); a peer with an endpoint, or already on a path, stays as it is."""
        a = self.arbiter
        a.relayed(self.peer, self.relay, 1.0)
        self.assertEqual((self.peer.path_kind, self.peer.relay), (PATH_MEMBER, self.relay))
        self.assertEqual(
            self.moves,
            [("none", f"via member {self.relay.short_name}", "it reached us through this member")],
        )
        other = Peer(b"\x0a" * 32)
        other.endpoint = A_PUBLIC
        a.relayed(other, self.relay, 1.0)
        self.assertEqual((other.path_kind, other.relay), (PATH_UDP, None))

    def test_a_second_tls_logic_fails_loudly(self) -> None:
        self.arbiter.set_tls(_Tls())
        with self.assertRaises(AlreadyRegisteredError):
            self.arbiter.set_tls(_Tls())

    def test_not_direct_reason_comes_from_the_punching_source(self) -> None:
        """Status says why a relayed member is not direct, in the punching source's words."""
        a = self.arbiter
        a.offer_member(self.peer, [self.relay], 0.0)
        self.assertEqual(
            a.status(self.peer)["not_direct_reason"],
            "no direct path proven yet; hole punching is under way",
        )
        a.explain(self.peer, "punches to 203.0.113.7:41641 unanswered since 12:03:10 UTC")
        self.assertEqual(
            a.status(self.peer)["not_direct_reason"],
            "punches to 203.0.113.7:41641 unanswered since 12:03:10 UTC",
        )
        self.assertEqual(a.status(self.peer)["path_via"], _b64(self.relay.public_key))

    def test_configured_peer_status(self) -> None:
        """A peer the arbiter does not track (configured, or stock WireGuard) is direct at its
        endpoint, or has none and status says what to do."""
        stock = Peer(b"\x09" * 32)
        self.assertEqual(self.arbiter.status(stock)["path_kind"], "none")
        self.assertIn("Endpoint", str(self.arbiter.status(stock)["not_direct_reason"]))
        stock.endpoint = A_PUBLIC
        self.assertEqual(self.arbiter.status(stock)["path_kind"], "direct")
        self.assertIsNone(self.arbiter.status(stock)["not_direct_reason"])

    def test_a_removed_peer_leaves_nothing_behind(self) -> None:
        """The device removed a peer (``Device.add_peer_removed_listener``): its path,
        proofs, offers and notes go, a decided path ends with one logged move, and the key
        added again starts afresh; a stale removal does not touch the newer peer."""
        a = self.arbiter
        stock = Peer(b"\x09" * 32)
        a.configured(stock, A_PUBLIC, "configured")
        a.roamed(stock, A_LAN, 1.0)
        a.offer_member(self.peer, [self.relay], 1.0)
        a.proven(self.peer, Path(arb.LAN, A_LAN), 0.002, 2.0)
        a.explain(self.peer, "a note")
        del self.moves[:]
        a.removed(stock)
        a.removed(self.peer)
        a.removed(self.peer)  # twice (the device, then the member's leaving): nothing more
        self.assertEqual((a.peers, a.paths), ({}, {}))
        self.assertEqual(
            self.moves,
            [
                ("direct 192.168.1.7:51820", "none", "removed"),
                ("lan 192.168.1.7:51820", "none", "removed"),
            ],
        )
        again = Peer(self.peer.public_key)
        self.assertEqual(a.status(again)["path_kind"], "none")
        a.offer_member(again, [self.relay], 3.0)
        self.assertIs(again.relay, self.relay)  # no old proof of A_LAN pulls it onto UDP
        a.removed(self.peer)  # the old object, removed late
        self.assertIs(a.peers[again.public_key].peer, again)
        self.assertEqual(a.kind_of(again), arb.MEMBER)


class RemovalWiringTests(SynchronousTestCase):
    def test_uapi_and_config_removal_drop_the_arbiters_state(self) -> None:
        """A node's arbiter hears of every peer its device removes: ``wg set ... peer X
        remove`` and a reload of a file without the peer leave nothing of it behind."""

        def key(n: int) -> bytes:
            return generate_private_key(lambda size: bytes([n]) * size)

        def text(data: bytes) -> str:
            return base64.b64encode(data).decode()

        one, two = public_key(key(2)), public_key(key(3))
        node = Node("mgar0", Clock())
        arbiter = node.mesh_stack.arbiter
        peers = "".join(
            f"\n[Peer]\nPublicKey = {text(k)}\nAllowedIPs = 10.9.0.{i}/32\n"
            f"Endpoint = 198.51.100.{i}:51820\n"
            for i, k in ((2, one), (3, two))
        )
        head = f"[Interface]\nPrivateKey = {text(key(1))}\n"
        node.apply_config(parse_config(head + peers, "mg0.conf"))
        for k in (one, two):
            # Roaming and a note: state the arbiter keeps per peer.
            arbiter.roamed(node.device.peers[k], A_LAN, 1.0)
            arbiter.explain(node.device.peers[k], "a note")
        self.assertEqual(set(arbiter.paths), {one, two})
        node.apply(parse_set(f"public_key={one.hex()}\nremove=true\n".encode()))
        self.assertEqual((set(arbiter.paths), set(arbiter.peers)), ({two}, {two}))
        node.apply_config(parse_config(head, "mg0.conf"), reload=True)
        self.assertEqual((arbiter.paths, arbiter.peers), ({}, {}))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class TakeOverTests(SynchronousTestCase):
    def test_a_learned_member_the_user_configures_leaves_its_member_relay(self) -> None:
        """A learned member forwarded by a member that the user then configures by hand with
        an endpoint (``wg set ... peer K endpoint ...``): the user's endpoint is used at once;
        the member relay path, which only the mesh keeps, does not outlive the mesh's claim."""
        clock = Clock()
        clock.advance(1_700_000_000)
        intro, member = (
            public_key(generate_private_key(lambda size, n=n: bytes([n]) * size)) for n in (2, 4)
        )
        node = Node("mgto0", clock)
        head = _b64(generate_private_key(lambda size: bytes([1]) * size))
        node.apply_config(
            parse_config(
                f"[Interface]\nPrivateKey = {head}\n\n[Peer]\nPublicKey = {_b64(intro)}\n"
                "Introducer = yes\nAllowedIPs = 10.99.0.1/32\nEndpoint = 198.51.100.1:51820\n",
                "mg0.conf",
            )
        )
        introducer = node.device.peers[intro]
        introducer.is_meshguard = True
        info = MemberInfo(member, (ipaddress.ip_network("10.99.0.4/32"),), ("203.0.113.4", 4))
        body = encode_json(
            {"op": "list", "gen": 1, "page": 0, "pages": 1, "relay": True,
             "members": [info.to_json()]}
        )  # fmt: skip
        node.mesh_stack.membership.control_received(
            introducer, kinds.MEMBERS, body, clock.seconds()
        )
        arbiter = node.mesh_stack.arbiter
        peer = node.device.peers[member]
        arbiter._enter(peer, Path(arb.MEMBER, via=introducer), "decide", "forwarded", 1.0)
        self.assertIs(peer.path_kind, PATH_MEMBER)
        node.apply(parse_set(f"public_key={member.hex()}\nendpoint=192.0.2.9:51820\n".encode()))
        self.assertEqual(
            (peer.path_kind, peer.relay, peer.endpoint, arbiter.kind_of(peer)),
            (PATH_UDP, None, ("192.0.2.9", 51820), arb.DIRECT),
        )
