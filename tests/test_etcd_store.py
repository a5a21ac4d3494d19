"""The etcd store against a real etcd: round trips, single use under concurrent joins, with
the blocking driver (command line) and the Agent driver (node)."""

from __future__ import annotations

import os
import threading

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshguard.adapters.etcd_store import EtcdAgentStore, EtcdStore
from meshguard.adapters.store import JoinRefusedError, StoreError
from meshguard.adapters.store_url import open_store
from tests.etcd import start_loopback_etcd


class EtcdStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.url = start_loopback_etcd(self)
        store = open_store(f"etcd:{self.url}/meshes/home")
        assert isinstance(store, EtcdStore)
        self.store = store

    def test_round_trip(self) -> None:
        """Meta, records and revocations read back; the version moves with every write."""
        store = self.store
        self.assertIsNone(store.get_meta("prefix"))
        store.set_meta("prefix", "10.99.0.0/24")
        self.assertEqual(store.get_meta("prefix"), "10.99.0.0/24")
        before = store.version()
        store.put_record(b"\x01" * 32, "alice", ["10.99.0.2/32"], "rec-a")
        store.put_record(b"\x02" * 32, "bob", ["10.99.0.3/32"], "rec-b")
        self.assertNotEqual(store.version(), before)
        self.assertEqual(sorted(store.snapshot().records), ["rec-a", "rec-b"])
        self.assertEqual(store.keys_named("bob"), [b"\x02" * 32])
        self.assertEqual(store.used_addresses(0), {"10.99.0.2/32", "10.99.0.3/32"})
        store.revoke(b"\x02" * 32, "rev-b")
        snapshot = store.snapshot()
        self.assertEqual((snapshot.records, snapshot.revocations), (["rec-a"], ["rev-b"]))
        self.assertEqual(store.names_taken(0), {"alice"})

    def test_an_invitation_is_used_once_under_concurrent_joins(self) -> None:
        """Eight joiners at once through etcd's transaction: one record, seven refusals."""
        invite = os.urandom(32)
        self.store.add_invitation(invite, "carol", "grant", ["10.99.0.4/32"], 2_000_000_000)
        barrier = threading.Barrier(8)
        results: list[str] = []

        def joiner() -> None:
            key = os.urandom(32)
            store = EtcdStore(
                f"{self.url}/meshes/home"
            )  # its own connection, like a second introducer
            barrier.wait()
            try:
                store.redeem(invite, key, lambda grant: f"{grant}+{key.hex()}", 1000)
                results.append("ok")
            except JoinRefusedError as e:
                results.append(str(e))

        threads = [threading.Thread(target=joiner) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results.count("ok"), 1, results)
        self.assertTrue(all("already used" in r for r in results if r != "ok"), results)
        self.assertEqual(len(self.store.snapshot().records), 1)
        with self.assertRaisesRegex(JoinRefusedError, "expired"):
            other = os.urandom(32)
            self.store.add_invitation(other, "dave", "g", ["10.99.0.5/32"], 10)
            self.store.redeem(other, os.urandom(32), lambda g: g, 1000)


class EtcdAgentStoreTests(TestCase):
    """The node's driver: the same operations over twisted.web's Agent, on the reactor."""

    def setUp(self) -> None:
        self.url = start_loopback_etcd(self)
        self.store = EtcdAgentStore(reactor, f"{self.url}/meshes/home")
        self.addCleanup(self.store.close)

    async def test_concurrent_joins_on_the_reactor_use_an_invitation_once(self) -> None:
        """Eight redemptions started at once, interleaved on one reactor: one record, seven
        refusals; what the blocking driver wrote, the Agent driver reads."""
        EtcdStore(f"{self.url}/meshes/home").set_meta("prefix", "10.99.0.0/24")
        self.assertEqual(await self.store.run("get_meta", "prefix"), "10.99.0.0/24")
        invite = os.urandom(32)
        await self.store.run("add_invitation", invite, "erin", "grant", ["10.99.0.6/32"], 10**10)
        attempts = []
        for _ in range(8):
            key = os.urandom(32)
            attempts.append(
                self.store.run("redeem", invite, key, lambda g, k=key: f"{g}+{k.hex()}", 1000)
            )
        results = await defer.DeferredList(attempts, consumeErrors=True)
        wins = [value for ok, value in results if ok]
        losses = [value for ok, value in results if not ok]
        self.assertEqual(len(wins), 1)
        self.assertTrue(all(f.check(JoinRefusedError) for f in losses))
        snapshot = await self.store.run("snapshot")
        self.assertEqual(snapshot.records, wins)

    async def test_unreachable_etcd_is_a_store_error(self) -> None:
        store = EtcdAgentStore(reactor, "http://127.0.0.1:9")
        self.addCleanup(store.close)
        with self.assertRaises(StoreError):
            await store.run("version")
