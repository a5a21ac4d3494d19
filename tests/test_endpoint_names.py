"""DNS names in ``Endpoint`` are re-resolved when the peer goes quiet or the TTL runs out, off the
reactor thread, and never override a newer endpoint that roaming proved."""

from __future__ import annotations

import base64

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import meshguard.app.node
from meshguard.adapters.endpoint_names import (
    CHECK_INTERVAL,
    DEFAULT_TTL,
    MIN_GAP,
    MIN_TTL,
    QUIET_AFTER,
    Resolution,
    SystemResolver,
    is_name,
)
from meshguard.app.node import Node
from meshguard.codecs.config import parse_config
from meshguard.codecs.uapi import PeerUpdate
from meshguard.core.constants import REKEY_TIMEOUT
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint

OLD: Endpoint = ("192.0.2.10", 51820)
NEW: Endpoint = ("192.0.2.20", 51820)


def private(n: int) -> bytes:
    return generate_private_key(lambda size: bytes([n]) * size)


class FakeResolver:
    """Answers lookups when the test says so; records each one."""

    def __init__(self) -> None:
        self.lookups: list[tuple[str, int, Deferred[Resolution]]] = []

    def resolve(self, host: str, port: int) -> Deferred[Resolution]:
        d: Deferred[Resolution] = Deferred()
        self.lookups.append((host, port, d))
        return d

    def answer(self, endpoint: Endpoint | None, ttl: float | None = None) -> None:
        _host, _port, d = self.lookups[-1]
        d.callback(Resolution(endpoint, ttl))


class Sent:
    """The device's outputs, recorded."""

    def __init__(self) -> None:
        self.datagrams: list[Endpoint] = []

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        self.datagrams.append(endpoint)

    def write_packet(self, packet: bytes) -> None:
        pass


class EndpointNamesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.resolver = FakeResolver()
        self.answers = {"peer.example": OLD}
        self.patch(meshguard.app.node, "resolve_endpoint", self._resolve_at_load)
        self.node = Node("mgdns0", self.clock, resolver=self.resolver, plugins=False)
        self.sent = Sent()
        self.node.device.io = self.sent
        self.peer_key = public_key(private(2))
        config = parse_config(
            f"[Interface]\nPrivateKey = {base64.b64encode(private(1)).decode()}\n\n"
            f"[Peer]\nPublicKey = {base64.b64encode(self.peer_key).decode()}\n"
            "AllowedIPs = 10.0.0.2/32\nEndpoint = peer.example:51820\n",
            "mg0.conf",
        )
        self.node.apply_config(config)
        self.node.device.up(self.clock.seconds())
        self.node.names.start()
        self.addCleanup(self._stop)
        self.peer = self.node.device.peers[self.peer_key]

    def _resolve_at_load(self, endpoint: tuple[str, int]) -> Endpoint | None:
        return self.answers.get(endpoint[0])

    def _stop(self) -> None:
        self.node.names.stop()
        self.node.device.down()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance(self, seconds: float) -> None:
        """Let time pass for the device's protocol timers and the name checks alike."""
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)
            self.node.device.run_timers(self.clock.seconds())

    def go_quiet(self) -> None:
        """Start a handshake nobody answers and wait until it counts as quiet."""
        before = len(self.resolver.lookups)
        self.node.device.send_initiation(self.peer, self.clock.seconds(), retry=False)
        self.advance(QUIET_AFTER - 1)
        self.assertEqual(len(self.resolver.lookups), before)
        # Seen outstanding at a check (within CHECK_INTERVAL), quiet QUIET_AFTER later.
        self.advance(2 * CHECK_INTERVAL + 1)
        self.assertEqual(len(self.resolver.lookups), before + 1)

    def test_the_name_is_kept_and_shown(self) -> None:
        """The config's name is kept per peer (status shows it) beside the address it gave."""
        self.assertEqual(self.peer.endpoint, OLD)
        self.assertEqual(self.node.names.name_of(self.peer_key), "peer.example:51820")
        entry = self.node.status_document()["peers"][0]
        self.assertEqual(entry["endpoint_name"], "peer.example:51820")
        self.assertEqual(entry["endpoint"], list(OLD))

    def test_an_answering_peer_is_not_looked_up_before_the_ttl(self) -> None:
        """While handshakes are answered (no retransmissions) the name is not resolved again
        until its TTL (the default, as getaddrinfo gives none) runs out."""
        self.advance(DEFAULT_TTL - 10)
        self.assertEqual(self.resolver.lookups, [])
        self.advance(20)
        self.assertEqual([(h, p) for h, p, _ in self.resolver.lookups], [("peer.example", 51820)])
        self.resolver.answer(OLD, ttl=3600)
        self.assertEqual(self.peer.endpoint, OLD)
        self.advance(DEFAULT_TTL + 10)
        self.assertEqual(len(self.resolver.lookups), 1)

    def test_quiet_peer_is_re_resolved_and_moved(self) -> None:
        """Unanswered handshakes for about three REKEY_TIMEOUTs make the peer quiet: its name is
        resolved again, the new address becomes its endpoint, and the handshake goes there within
        REKEY_TIMEOUT."""
        self.go_quiet()
        self.sent.datagrams.clear()
        self.resolver.answer(NEW)
        self.assertEqual(self.peer.endpoint, NEW)
        self.advance(REKEY_TIMEOUT + 1)
        self.assertIn(NEW, self.sent.datagrams)
        self.assertEqual(self.node.names.changes, 1)

    def test_handshakes_that_complete_never_make_a_peer_quiet(self) -> None:
        """A peer that answers (a new handshake is outstanding at every check, but each one
        before it completed) is not quiet, however long that goes on."""
        for _ in range(12):
            self.node.device.send_initiation(self.peer, self.clock.seconds(), retry=False)
            self.peer.last_handshake_time = self.clock.seconds()
            self.advance(CHECK_INTERVAL)
        self.assertEqual(self.resolver.lookups, [])

    def test_quiet_peer_with_the_same_address_stays(self) -> None:
        """A quiet peer whose name still gives the same address keeps it; lookups are spaced by
        at least MIN_GAP."""
        self.go_quiet()
        self.resolver.answer(OLD)
        self.assertEqual(self.peer.endpoint, OLD)
        self.advance(MIN_GAP - CHECK_INTERVAL - 1)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.advance(2 * CHECK_INTERVAL + 2)
        self.assertEqual(len(self.resolver.lookups), 2)
        self.resolver.answer(OLD)

    def test_roaming_during_the_lookup_wins(self) -> None:
        """An authenticated packet that moved the endpoint while the lookup ran is newer proof
        than DNS: the answer does not override it."""
        self.go_quiet()
        roamed: Endpoint = ("198.51.100.7", 40000)
        self.peer.endpoint = roamed  # what the device does for an authenticated datagram
        self.resolver.answer(NEW)
        self.assertEqual(self.peer.endpoint, roamed)

    def test_ttl_change_does_not_override_a_roamed_endpoint(self) -> None:
        """When the TTL runs out while the peer answers from where roaming put it, the new DNS
        address is remembered but not applied; once the peer goes quiet it is."""
        roamed: Endpoint = ("198.51.100.7", 40000)
        self.peer.endpoint = roamed
        self.advance(DEFAULT_TTL + 5)
        self.resolver.answer(NEW, ttl=60)
        self.assertEqual(self.peer.endpoint, roamed)
        self.go_quiet()
        self.resolver.answer(NEW, ttl=60)
        self.assertEqual(self.peer.endpoint, NEW)

    def test_ttl_change_moves_an_unroamed_endpoint(self) -> None:
        """When the TTL runs out and the name points elsewhere, a peer still at the old DNS
        address moves to the new one; a short TTL is clamped to MIN_TTL."""
        self.advance(DEFAULT_TTL + 5)
        self.resolver.answer(NEW, ttl=1)
        self.assertEqual(self.peer.endpoint, NEW)
        self.advance(MIN_TTL - 6)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.advance(CHECK_INTERVAL + 6)
        self.assertEqual(len(self.resolver.lookups), 2)
        self.resolver.answer(NEW, ttl=600)

    def test_failed_lookups_keep_the_endpoint_and_back_off(self) -> None:
        """A name that stops resolving (or a resolver error) keeps the last address, and the
        lookups back off."""
        self.go_quiet()
        _host, _port, d = self.resolver.lookups[-1]
        d.errback(OSError("no such name"))
        self.assertEqual(self.peer.endpoint, OLD)
        self.advance(MIN_GAP * 2 - 1)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.advance(CHECK_INTERVAL + 1)
        self.assertEqual(len(self.resolver.lookups), 2)
        self.resolver.answer(None)
        self.assertEqual(self.peer.endpoint, OLD)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_an_endpoint_set_by_hand_drops_the_name(self) -> None:
        """``wg set ... endpoint`` says where the peer is: the name no longer applies, and a
        lookup in flight is cancelled and ignored."""
        self.go_quiet()
        self.node.apply([PeerUpdate(public_key=self.peer_key, endpoint=("203.0.113.1", 1))])
        self.assertIsNone(self.node.names.name_of(self.peer_key))
        self.assertEqual(self.peer.endpoint, ("203.0.113.1", 1))
        self.assertNotIn("endpoint_name", self.node.status_document()["peers"][0])

    def test_a_name_that_never_resolved_is_tried_again(self) -> None:
        """A peer whose name did not resolve at load has no endpoint: it counts as quiet and
        the name is tried again, and the answer becomes its endpoint."""
        self.answers.clear()
        self.node.apply([PeerUpdate(public_key=self.peer_key, remove=True)])
        config = parse_config(
            f"[Interface]\nPrivateKey = {base64.b64encode(private(1)).decode()}\n\n"
            f"[Peer]\nPublicKey = {base64.b64encode(self.peer_key).decode()}\n"
            "Endpoint = peer.example:51820\n",
            "mg0.conf",
        )
        self.node.apply_config(config, reload=True)
        peer = self.node.device.peers[self.peer_key]
        self.assertIsNone(peer.endpoint)
        self.advance(MIN_GAP + 5)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.resolver.answer(NEW)
        self.assertEqual(peer.endpoint, NEW)


class SystemResolverTests(SynchronousTestCase):
    def test_names_and_numbers(self) -> None:
        """Numeric hosts (with an IPv6 zone too) are not names; anything else is."""
        self.assertFalse(is_name("192.0.2.1"))
        self.assertFalse(is_name("fe80::1%eth0"))
        self.assertTrue(is_name("peer.example"))

    def test_lookup_runs_in_the_thread_pool(self) -> None:
        """The system resolver hands getaddrinfo to the reactor's thread pool."""
        calls: list[object] = []

        class Pool:
            pass

        class Reactor:
            def getThreadPool(self) -> Pool:
                return Pool()

        def fake_defer(reactor: object, pool: object, f: object) -> Deferred[Resolution]:
            calls.append(pool)
            assert callable(f)
            return Deferred()

        import meshguard.adapters.endpoint_names

        self.patch(meshguard.adapters.endpoint_names, "deferToThreadPool", fake_defer)
        SystemResolver(Reactor()).resolve("localhost", 51820)
        self.assertEqual(len(calls), 1)
        self.assertIsInstance(calls[0], Pool)
