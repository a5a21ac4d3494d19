"""An introducer's enrollment: the store's members become peers, revocations cut them off, and
records heard through the mesh are written back to the store (deterministic: task.Clock)."""

from __future__ import annotations

import base64
import ipaddress
import os
import tempfile
from types import SimpleNamespace
from typing import Any

from nacl.signing import SigningKey
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from meshguard.app.enrollment import POLL, Enrollment
from meshguard.codecs.config import parse_config
from meshguard.mesh.authority import sign_member, sign_revocation
from tests.meshsim import MeshSim

AUTHORITY = SigningKey(bytes(range(32)))
LATER = 4_000_000_000


class SyncRunner:
    """The store called in line (the thread pool's job, without threads)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def run(self, name: str, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(getattr(self.store, name), *args)


def record(name: str, key: bytes, host: int) -> str:
    address = (ipaddress.ip_network(f"10.99.0.{host}/32"),)
    return sign_member(AUTHORITY, "home", name, key, address, frozenset(), LATER)


class EnrollmentTests(SynchronousTestCase):
    def setUp(self) -> None:
        sim = MeshSim(seed=41)
        self.intro = sim.introducer
        self.membership = self.intro.stack.membership
        path = os.path.join(tempfile.mkdtemp(), "home.db")
        authority = base64.b64encode(bytes(AUTHORITY.verify_key)).decode()
        config = parse_config(
            f"[Interface]\nMeshName = home\nMeshAuthority = {authority}\n"
            f"MeshStore = sqlite:{path}\n",
            "hub.conf",
        )
        node = SimpleNamespace(
            mesh_stack=self.intro.stack, device=self.intro.node.device, reschedule=lambda: None
        )
        self.clock = task.Clock()
        self.enrollment = Enrollment(config, node, self.clock)
        self.alice, self.bob, self.carol = os.urandom(32), os.urandom(32), os.urandom(32)
        from meshguard.adapters.store import SqliteStore

        self.store = SqliteStore(path)
        self.store.put_record(self.alice, "alice", ["10.99.0.2/32"], record("alice", self.alice, 2))
        self.enrollment.open()
        self.enrollment.runner = SyncRunner(self.store)
        self.enrollment.start()
        self.addCleanup(self.enrollment.stop)

    def test_store_members_become_peers_and_follow_the_store(self) -> None:
        """Members in the store at start and added later are peers with their signed
        addresses; a revocation in the store removes one and is announced to subscribers."""
        device = self.intro.node.device
        self.assertIn(self.alice, self.membership.enrolled)
        self.assertEqual(
            device.allowed_ips.networks(device.peers[self.alice]),
            [ipaddress.ip_network("10.99.0.2/32")],
        )
        self.store.put_record(self.bob, "bob", ["10.99.0.3/32"], record("bob", self.bob, 3))
        self.clock.advance(POLL)
        self.assertIn(self.bob, device.peers)
        generation = self.membership.generation
        revocation = sign_revocation(AUTHORITY, "home", self.alice, "alice", 1)
        self.store.revoke(self.alice, revocation)
        self.clock.advance(POLL)
        self.assertNotIn(self.alice, device.peers)
        self.assertGreater(self.membership.generation, generation)
        self.assertEqual(self.membership.name_of(self.bob), "bob")

    def test_records_heard_through_the_mesh_are_stored(self) -> None:
        """A verified record (and a revocation) the roster heard from another introducer is
        written to this introducer's store at the next poll, then enrolled from it."""
        roster = self.enrollment.roster
        roster.accept(record("carol", self.carol, 4), self.clock.seconds())
        roster.revoke(sign_revocation(AUTHORITY, "home", self.bob, "bob", 1))
        self.clock.advance(POLL)
        snapshot = self.store.snapshot()
        self.assertIn(record("carol", self.carol, 4), snapshot.records)
        self.assertEqual(len(snapshot.revocations), 1)
        self.assertIn(self.carol, self.membership.enrolled)

    def test_a_forged_record_in_the_store_is_not_enrolled(self) -> None:
        """The store is only a carrier: a record another authority signed stays out."""
        other = SigningKey(bytes(range(1, 33)))
        forged = sign_member(
            other,
            "home",
            "mallory",
            self.bob,
            (ipaddress.ip_network("10.99.0.9/32"),),
            frozenset(),
            LATER,
        )
        self.store.put_record(self.bob, "mallory", ["10.99.0.9/32"], forged)
        self.clock.advance(POLL)
        self.assertNotIn(self.bob, self.intro.node.device.peers)
