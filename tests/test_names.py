"""Members by name: the mesh's DNS zone answers NAME.MESH from verified records only."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.names import client, dns
from twisted.names.error import DNSNameError, DomainError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshguard.adapters.dns_server import MeshZone, listen_names

TABLE = {
    "alice": [ipaddress.ip_address("10.99.0.2"), ipaddress.ip_address("fd00::2")],
    "bob": [ipaddress.ip_address("10.99.0.3")],
}


def zone() -> MeshZone:
    return MeshZone("home", lambda name: TABLE.get(name, []))


class ZoneTests(SynchronousTestCase):
    def test_a_and_aaaa_for_members(self) -> None:
        answers = self.successResultOf(zone().lookupAddress(b"Alice.home."))[0]
        self.assertEqual([a.payload.dottedQuad() for a in answers], ["10.99.0.2"])
        answers = self.successResultOf(zone().lookupIPV6Address(b"alice.home"))[0]
        self.assertEqual(len(answers), 1)
        self.assertEqual(self.successResultOf(zone().lookupIPV6Address(b"bob.home"))[0], [])

    def test_unknown_names_and_other_zones_fail(self) -> None:
        for name in (b"carol.home", b"alice.work", b"home", b"x.alice.home"):
            self.failureResultOf(zone().lookupAddress(name), DomainError)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=80))
    def test_any_query_name_is_answered_or_refused_never_raised(self, name: bytes) -> None:
        for lookup in (zone().lookupAddress, zone().lookupIPV6Address):
            results: list[object] = []
            lookup(name).addBoth(results.append)
            if isinstance(results[0], Failure):
                self.assertTrue(results[0].check(DomainError))


class ServerTests(TestCase):
    @defer.inlineCallbacks
    def test_served_over_udp(self) -> defer.Generator[object, object, None]:  # type: ignore[name-defined]
        """A stock resolver asking the node's server gets the member's address, and NXDOMAIN
        for a name that is not a member."""
        ports = listen_names(reactor, zone(), ["127.0.0.1"], port=0)
        self.addCleanup(ports[0].stopListening)
        resolver = client.Resolver(servers=[("127.0.0.1", ports[0].getHost().port)])
        answers, _, _ = yield resolver.lookupAddress("bob.home")
        self.assertEqual(
            [a.payload.dottedQuad() for a in answers if a.type == dns.A], ["10.99.0.3"]
        )
        with self.assertRaises(DNSNameError):
            yield resolver.lookupAddress("nobody.home")


class LogNameTests(SynchronousTestCase):
    def test_logs_show_a_registered_name_and_the_key_prefix(self) -> None:
        """Path logs describe a member by name once a roster knows it, by key prefix before."""
        from meshguard.mesh import member_names

        key = bytes(range(32))
        self.assertEqual(member_names.describe(key), "AAECAwQF...")
        lookup = {key: "alice"}.get
        member_names.register(lookup)
        self.addCleanup(member_names.unregister, lookup)
        self.assertEqual(member_names.describe(key), "alice (AAECAwQF...)")
