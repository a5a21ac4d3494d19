"""Signed membership: records, grants, bindings and revocations; members trust only signatures."""

from __future__ import annotations

import ipaddress
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from twisted.trial.unittest import SynchronousTestCase

from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.authority import (
    GRANT_DOMAIN,
    RECORD_DOMAIN,
    AuthorityError,
    b64u,
    bind,
    bound_record,
    canonical,
    sign_grant,
    sign_member,
    sign_revocation,
    unb64u,
    verify_grant,
    verify_member,
    verify_revocation,
)
from meshguard.mesh.members import MemberInfo
from meshguard.mesh.roster import Roster
from tests.meshsim import MeshSim, SimMember

RNG = random.Random(12)
AUTHORITY = SigningKey(RNG.randbytes(32))
OTHER = SigningKey(RNG.randbytes(32))
VERIFY = AUTHORITY.verify_key
WG_KEY = RNG.randbytes(32)
ADDR = (ipaddress.ip_network("10.99.0.5/32"),)
LATER = 2_000_000_000


def record(name: str = "alice", key: bytes = WG_KEY, expires: int = LATER, signer=AUTHORITY) -> str:  # type: ignore[no-untyped-def]
    return sign_member(signer, "home", name, key, ADDR, frozenset(), expires)


class RecordTests(SynchronousTestCase):
    def test_member_record_round_trip(self) -> None:
        """A record the authority signed reads back with every field."""
        text = sign_member(AUTHORITY, "home", "alice", WG_KEY, ADDR, frozenset({"relay"}), LATER)
        member = verify_member(VERIFY, "home", text, 1000.0)
        assert member is not None
        self.assertEqual(
            (member.name, member.key, member.addresses, member.roles, member.expires),
            ("alice", WG_KEY, ADDR, frozenset({"relay"}), LATER),
        )
        self.assertEqual(member.text, text)

    def test_forged_records_are_refused(self) -> None:
        """Another authority's signature, another mesh, a changed body or signature: refused."""
        text = record()
        self.assertIsNone(verify_member(VERIFY, "home", record(signer=OTHER), 0))
        self.assertIsNone(verify_member(VERIFY, "work", text, 0))
        body, sig = text.split(".")
        value = json.loads(unb64u(body) or b"")
        value["addresses"] = ["10.99.0.1/32"]
        self.assertIsNone(verify_member(VERIFY, "home", f"{b64u(canonical(value))}.{sig}", 0))
        flipped = bytearray(unb64u(sig) or b"")
        flipped[0] ^= 1
        self.assertIsNone(verify_member(VERIFY, "home", f"{body}.{b64u(bytes(flipped))}", 0))

    def test_expired_record_is_refused(self) -> None:
        """A record is good until its expiry, and refused from then on."""
        text = record(expires=5000)
        self.assertIsNotNone(verify_member(VERIFY, "home", text, 4999.0))
        self.assertIsNone(verify_member(VERIFY, "home", text, 5000.0))

    def test_invited_record_needs_the_invitation_key(self) -> None:
        """A grant plus a binding by the invitation key is a record; a binding by any other key
        (an introducer that holds the grant but not the invitation) is refused."""
        invitation = SigningKey(RNG.randbytes(32))
        grant = sign_grant(
            AUTHORITY,
            "home",
            "bob",
            ADDR,
            frozenset(),
            LATER,
            bytes(invitation.verify_key),
            3000,
        )
        parsed = verify_grant(VERIFY, "home", grant)
        assert parsed is not None
        self.assertEqual(parsed.join_by, 3000)
        text = bound_record(grant, WG_KEY, bind(invitation, WG_KEY))
        member = verify_member(VERIFY, "home", text, 10.0)
        assert member is not None
        self.assertEqual((member.name, member.key), ("bob", WG_KEY))
        intruder = SigningKey(RNG.randbytes(32))
        forged = bound_record(grant, WG_KEY, bind(intruder, WG_KEY))
        self.assertIsNone(verify_member(VERIFY, "home", forged, 10.0))
        other_key = RNG.randbytes(32)
        swapped = bound_record(grant, other_key, bind(invitation, WG_KEY))
        self.assertIsNone(verify_member(VERIFY, "home", swapped, 10.0))

    def test_kinds_cannot_stand_for_each_other(self) -> None:
        """A grant is not a record and a revocation is not a record (domain separation)."""
        invitation = SigningKey(RNG.randbytes(32))
        grant = sign_grant(
            AUTHORITY, "home", "bob", ADDR, frozenset(), LATER, bytes(invitation.verify_key), 9
        )
        revocation = sign_revocation(AUTHORITY, "home", WG_KEY, "alice", 7)
        self.assertIsNone(verify_member(VERIFY, "home", grant, 0))
        self.assertIsNone(verify_member(VERIFY, "home", revocation, 0))
        self.assertIsNone(verify_revocation(VERIFY, "home", record()))
        self.assertIsNone(verify_grant(VERIFY, "home", record()))
        parsed = verify_revocation(VERIFY, "home", revocation)
        assert parsed is not None
        self.assertEqual((parsed.key, parsed.name, parsed.issued), (WG_KEY, "alice", 7))
        self.assertIsNone(verify_revocation(OTHER.verify_key, "home", revocation))

    def test_signing_refuses_bad_input(self) -> None:
        """Names must be DNS labels and roles known: the admin hears of a typo at once."""
        with self.assertRaises(AuthorityError):
            sign_member(AUTHORITY, "home", "Alice!", WG_KEY, ADDR, frozenset(), LATER)
        with self.assertRaises(AuthorityError):
            sign_member(AUTHORITY, "home", "alice", WG_KEY, ADDR, frozenset({"admin"}), LATER)
        with self.assertRaises(AuthorityError):
            sign_member(AUTHORITY, "home", "alice", WG_KEY, (), frozenset(), LATER)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=300), st.binary(max_size=100).map(b64u)))
    def test_parsers_never_raise_on_garbage(self, text: str) -> None:
        """Any text is refused quietly by every verifier."""
        for dots in ("", ".", "..."):
            candidate = text + dots + text
            self.assertIsNone(verify_member(VERIFY, "home", candidate, 0))
            self.assertIsNone(verify_revocation(VERIFY, "home", candidate))
            self.assertIsNone(verify_grant(VERIFY, "home", candidate))
        unb64u(text)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(
                ["kind", "mesh", "name", "key", "addresses", "roles", "expires", "invite"]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.text(max_size=20),
                st.lists(st.one_of(st.text(max_size=20), st.integers()), max_size=4),
                st.sampled_from(["member", "home", "10.99.0.5/32", b64u(WG_KEY)]),
            ),
        )
    )
    def test_signed_odd_bodies_are_checked_field_by_field(self, value: dict[str, object]) -> None:
        """Even a body the authority signed is refused unless every field is well formed."""
        body = canonical(value)
        text = f"{b64u(body)}.{b64u(AUTHORITY.sign(RECORD_DOMAIN + body).signature)}"
        member = verify_member(VERIFY, "home", text, 0)
        if member is not None:
            self.assertEqual(len(member.key), 32)
            self.assertTrue(member.addresses)
        grant_text = f"{b64u(body)}.{b64u(AUTHORITY.sign(GRANT_DOMAIN + body).signature)}"
        verify_grant(VERIFY, "home", grant_text)


class RosterTests(SynchronousTestCase):
    def test_revoked_key_is_refused_even_with_a_valid_record(self) -> None:
        roster = Roster("home", VERIFY)
        self.assertIsNotNone(roster.accept(record(), 0))
        self.assertEqual(roster.name_of(WG_KEY), "alice")
        self.assertEqual(roster.lookup("alice"), [ipaddress.ip_address("10.99.0.5")])
        self.assertIsNotNone(roster.revoke(sign_revocation(AUTHORITY, "home", WG_KEY, "alice", 1)))
        self.assertIsNone(roster.name_of(WG_KEY))
        self.assertIsNone(roster.accept(record(), 0))
        self.assertIsNone(roster.revoke(sign_revocation(OTHER, "home", WG_KEY, "alice", 1)))


def signed_sim(seed: int) -> tuple[MeshSim, SimMember, SimMember, SimMember]:
    """An introducer whose members come from signed records (enrolled), three homes."""
    sim = MeshSim(seed=seed)
    homes = [sim.add_member(None, f"198.51.100.{20 + i}") for i in range(3)]
    intro = sim.introducer
    records = {}
    for i, home in enumerate(homes):
        intro.node.device.remove_peer(home.public_key)
        records[home.public_key] = sign_member(
            AUTHORITY,
            "home",
            f"h{i}",
            home.public_key,
            (ipaddress.ip_network(home.address),),
            frozenset(),
            LATER,
        )
    own = sign_member(
        AUTHORITY,
        "home",
        "hub",
        intro.public_key,
        (ipaddress.ip_network(intro.address),),
        frozenset({"introducer"}),
        LATER,
    )
    intro_roster = Roster("home", VERIFY)
    intro.stack.membership.set_authority(intro_roster, own, 0)
    intro.stack.membership.enroll(
        [m for t in records.values() if (m := intro_roster.accept(t, 0)) is not None], 0
    )
    for home in homes:
        home.stack.membership.set_authority(Roster("home", VERIFY), records[home.public_key], 0)
    return sim, homes[0], homes[1], homes[2]


class SignedMembershipTests(SynchronousTestCase):
    def test_signed_members_learn_each_other_by_name(self) -> None:
        """Members learn enrolled members with their names and addresses from the records."""
        sim, a, b, c = signed_sim(21)
        sim.start()
        sim.run(15)
        membership = a.stack.membership
        self.assertEqual(set(membership.learned), {b.public_key, c.public_key})
        self.assertEqual(membership.name_of(b.public_key), "h1")
        self.assertEqual(membership.name_of(sim.introducer.public_key), "hub")
        self.assertEqual(sim.introducer.stack.membership.name_of(a.public_key), "h0")
        peer = a.node.device.peers[b.public_key]
        self.assertEqual(a.stack.agent.peer_status(peer)["name"], "h1")
        self.assertTrue(sim.ping(a, b) or sim.ping(a, b))

    def test_unsigned_and_forged_members_from_an_introducer_are_ignored(self) -> None:
        """An introducer that lists a member without a record, or with a record another
        authority signed, or with a stolen record under another key, adds nobody."""
        sim, a, b, _c = signed_sim(22)
        sim.start()
        sim.run(15)
        intro_peer = a.node.device.peers[sim.introducer.public_key]
        evil = RNG.randbytes(32)
        entries = [
            MemberInfo(evil, (ipaddress.ip_network("10.99.0.66/32"),)),
            MemberInfo(evil, ADDR, record=record("mallory", evil, signer=OTHER)),
            MemberInfo(evil, ADDR, record=a.stack.membership.roster.members[b.public_key].text),  # type: ignore[union-attr]
        ]
        before = set(a.node.device.peers)
        refused = a.stack.membership.refused
        for info in entries:
            body = encode_json(
                {"op": "list", "gen": 999, "page": 0, "pages": 1, "members": [info.to_json()]}
            )
            a.agent.control_received(intro_peer, kinds.MEMBERS, body, sim.net.now)
        self.assertNotIn(evil, a.node.device.peers)
        self.assertEqual(a.stack.membership.refused, refused + 3)
        self.assertLessEqual(set(a.node.device.peers), before)

    def test_revocation_cuts_a_member_off_everywhere(self) -> None:
        """A signed revocation reaches every member through the introducer within seconds: the
        revoked member is removed (its sessions end) and not re-learned."""
        sim, a, b, c = signed_sim(23)
        sim.start()
        sim.run(15)
        intro = sim.introducer.stack.membership
        revocation = sign_revocation(AUTHORITY, "home", c.public_key, "h2", 100)
        assert intro.roster is not None
        intro.roster.revoke(revocation)
        intro.enroll([m for k, m in intro.enrolled.items() if k != c.public_key], sim.net.now)
        sim.run(4)
        for node in (a, b, sim.introducer):
            self.assertNotIn(c.public_key, node.node.device.peers, node.name)
        self.assertTrue(ping_twice(sim, a, b))
        sim.run(70)  # a re-subscription later, still gone
        self.assertNotIn(c.public_key, a.node.device.peers)

    def test_expired_member_is_dropped(self) -> None:
        """A learned member whose record expires is removed when it expires."""
        sim, a, _b, c = signed_sim(24)
        intro = sim.introducer.stack.membership
        assert intro.roster is not None
        short = sign_member(
            AUTHORITY,
            "home",
            "h2",
            c.public_key,
            (ipaddress.ip_network(c.address),),
            frozenset(),
            int(sim.net.now) + 30,
        )
        intro.roster.members.pop(c.public_key)
        member = intro.roster.accept(short, 0)
        assert member is not None
        c.stack.membership.set_authority(Roster("home", VERIFY), short, 0)
        intro.enroll([*(m for k, m in intro.enrolled.items() if k != c.public_key), member], 0)
        sim.start()
        sim.run(15)
        self.assertIn(c.public_key, a.node.device.peers)
        sim.run(20)
        self.assertNotIn(c.public_key, a.node.device.peers)
        self.assertNotIn(c.public_key, sim.introducer.node.device.peers)


def ping_twice(sim: MeshSim, a: SimMember, b: SimMember) -> bool:
    for _ in range(5):
        if sim.ping(a, b):
            return True
        sim.run(1.0)
    return False


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=50)
    | st.sampled_from([record(), record(signer=OTHER), "a.b", "a.b.c.d"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


class SignedHostileInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sim, self.a, self.b, self.c = signed_sim(31)
        self.sim.start()
        self.sim.run(15)

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(
                ["op", "gen", "page", "pages", "members", "relay", "self", "revoked", "record"]
            ),
            _VALUES,
        ).map(encode_json)
        | st.binary(max_size=200)
    )
    def test_member_bodies_from_the_introducer_never_raise_or_add_unsigned_peers(
        self, body: bytes
    ) -> None:
        """Any MEMBERS body, even from the introducer itself, is handled without an exception
        escaping, and adds no peer without a record signed by the authority."""
        a = self.a
        intro = a.node.device.peers[self.sim.introducer.public_key]
        before = set(a.node.device.peers)
        dropped = a.agent.dropped
        a.agent.control_received(intro, kinds.MEMBERS, body, self.sim.net.now)
        self.assertEqual(a.agent.dropped, dropped)
        self.assertLessEqual(set(a.node.device.peers), before)
