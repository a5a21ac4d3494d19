"""The "via TLS relay" path rules, in memory with simulated time: fall back when UDP handshakes go
unanswered, carry data through the relay, move back to UDP once a probe gets through."""

from __future__ import annotations

from collections.abc import Collection

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.peer import PATH_MEMBER, PATH_TLS, PATH_UDP
from meshguard.mesh.agent import MeshAgent
from meshguard.relay.paths import TlsPaths
from tests.test_device import A_EP, B_EP, Pair


class MemoryRelay:
    """Both ends of one relay connection between A and B: queued, delivered on flush."""

    def __init__(self) -> None:
        self.queue: list[tuple[TlsPaths, int, bytes, bytes]] = []
        self.up = True

    def end(self, own: bytes, other: bytes, name: str) -> _End:
        return _End(self, own, other, name)

    def flush(self, now: float) -> None:
        while self.queue:
            paths, link_id, source, datagram = self.queue.pop(0)
            paths.delivered(link_id, source, datagram, now)


class _End:
    def __init__(self, relay: MemoryRelay, own: bytes, other: bytes, name: str) -> None:
        self.relay, self.own, self.other, self.name = relay, own, other, name
        self.far: tuple[TlsPaths, int] | None = None

    def present(self) -> Collection[bytes]:
        return {self.other} if self.relay.up else set()

    def send(self, destination: bytes, datagram: bytes) -> bool:
        if not self.relay.up or destination != self.other or self.far is None:
            return False
        self.relay.queue.append((self.far[0], self.far[1], self.own, datagram))
        return True


def udp_blocked(data: bytes, source: tuple[str, int], destination: tuple[str, int]) -> bool:
    return False


class TlsPathRulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pair = Pair()
        net = self.pair.net
        self.relay = MemoryRelay()
        a_key, b_key = self.pair.peer_of_b.public_key, self.pair.peer_of_a.public_key
        self.agents = [MeshAgent(self.pair.a.device), MeshAgent(self.pair.b.device)]
        self.paths: list[TlsPaths] = []
        ends = [self.relay.end(a_key, b_key, "relay.test:443"), self.relay.end(b_key, a_key, "b")]
        for agent, end in zip(self.agents, ends, strict=True):
            paths = TlsPaths(agent)  # registers itself as the device's PATH_TLS transport
            agent.add_feature(paths)
            link_id = paths.add_link(end, net.now)
            self.paths.append(paths)
            net.timed.append(agent)
            self.assertEqual(link_id, 0)
        ends[0].far, ends[1].far = (self.paths[1], 0), (self.paths[0], 0)
        self.filter = udp_blocked
        net.filters.append(self.filter)

    def advance(self, seconds: float) -> None:
        net = self.pair.net
        for _ in range(int(seconds * 10)):
            net.advance(0.1)
            self.relay.flush(net.now)
            net.flush()

    def path_of_a(self) -> str:
        return str(self.paths[0].peer_status(self.pair.peer_of_a).get("path", "udp"))

    def test_fallback_data_and_return_to_udp(self) -> None:
        """UDP blocked: A's handshake goes unanswered, A moves B to the relay within about 6 s
        and data flows; UDP unblocked: a probe gets through and both sides return to UDP."""
        self.pair.peer_of_a.persistent_keepalive = 0
        self.pair.a_to_b(b"first")
        self.assertEqual(self.pair.b.written, [])
        self.advance(7)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        # The path is explicit; the endpoint stays the last UDP one (no stand-in address).
        self.assertIs(self.pair.peer_of_a.path_kind, PATH_TLS)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        packet = self.pair.a_to_b(b"through the relay")
        self.relay.flush(self.pair.net.now)
        self.assertIn(packet, self.pair.b.written)
        self.assertIs(self.pair.peer_of_b.path_kind, PATH_TLS)
        self.assertEqual(getattr(self.pair.peer_of_b.arrived_via, "name", None), "b")
        reply = self.pair.b_to_a(b"back")
        self.relay.flush(self.pair.net.now)
        self.assertIn(reply, self.pair.a.written)

        self.pair.net.filters.remove(self.filter)
        self.advance(7)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        self.assertEqual(self.pair.peer_of_b.endpoint, A_EP)
        self.assertIs(self.pair.peer_of_a.path_kind, PATH_UDP)
        self.assertIs(self.pair.peer_of_b.path_kind, PATH_UDP)
        self.assertEqual(self.path_of_a(), "udp")
        self.assertEqual(self.paths[0].returns, 1)
        self.assertEqual(self.paths[1].returns, 1)

    def test_relay_gone_returns_to_udp_endpoint(self) -> None:
        self.pair.a_to_b(b"first")
        self.advance(7)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        self.relay.up = False
        self.advance(2)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        self.assertIs(self.pair.peer_of_a.path_kind, PATH_UDP)

    def test_removed_link_returns_its_peers_to_udp_at_once(self) -> None:
        """A relay removed on reload: its peers are back on their UDP endpoint right away, the
        link no longer reaches anyone, and the transport sends nothing more for them."""
        self.pair.a_to_b(b"first")
        self.advance(7)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        self.paths[0].remove_link(0, self.pair.net.now)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        self.assertIs(self.pair.peer_of_a.path_kind, PATH_UDP)
        self.assertFalse(self.paths[0].reaches(self.pair.peer_of_a))
        self.assertEqual(self.paths[0].node_status()["tls_relays"], {})
        dropped = self.paths[0].dropped
        self.assertFalse(self.paths[0].send(self.pair.peer_of_a, b"x", self.pair.net.now))
        self.assertEqual(self.paths[0].dropped, dropped + 1)

    def test_endpoint_stays_the_last_udp_one_on_the_relay(self) -> None:
        """A peer on a relay keeps its last UDP endpoint (what ``wg show``/``wg showconf``
        report): datagrams through the relay never change it, and the arbiter reports the
        relay, never "direct"."""
        self.pair.a_to_b(b"first")
        self.advance(7)
        peer = self.pair.peer_of_a
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        self.assertEqual(peer.endpoint, B_EP)
        self.pair.b_to_a(b"back")
        self.relay.flush(self.pair.net.now)
        # B never heard from A over UDP: no endpoint to show, however much came via the relay.
        self.assertIsNone(self.pair.peer_of_b.endpoint)
        self.assertIs(self.pair.peer_of_b.path_kind, PATH_TLS)
        self.assertEqual(peer.endpoint, B_EP)
        status = self.paths[0].arbiter.status(peer)
        self.assertEqual((status["path_kind"], status["path_via"]), ("tls-relay", "relay.test:443"))

    def test_junk_from_the_relay_is_dropped(self) -> None:
        """A datagram that does not authenticate moves nothing."""
        self.paths[0].delivered(0, self.pair.peer_of_a.public_key, b"\x04junk" * 10, 0.0)
        self.paths[0].delivered(0, b"\x01" * 32, b"junk", 0.0)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)

    def test_member_forwarding_gives_way_to_the_relay(self) -> None:
        """A peer another member forwards for (inside our session with that member) is sent
        through the TLS relay that reaches it instead, at the next tick; data flows there."""
        peer = self.pair.peer_of_a
        self.assertTrue(self.paths[0].reaches(peer))
        self.pair.a_to_b(b"first")
        peer.relay = self.pair.peer_of_b  # stands for a forwarding member
        peer.path_kind = PATH_MEMBER
        self.advance(1.5)
        self.assertIsNone(peer.relay)
        self.assertIs(peer.path_kind, PATH_TLS)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        self.advance(0.5)  # the handshake it started through the relay
        packet = self.pair.a_to_b(b"through the relay")
        self.relay.flush(self.pair.net.now)
        self.assertIn(packet, self.pair.b.written)
        self.relay.up = False
        self.assertFalse(self.paths[0].reaches(peer))

    def test_established_session_moves_soon_after_udp_dies(self) -> None:
        """A session on UDP whose path dies while data is sent moves to the relay about 6 s
        later (not WireGuard's ~20 s), and a stalled but idle peer answering the stall probe
        over UDP stays on UDP."""
        net = self.pair.net
        net.filters.remove(self.filter)
        self.pair.a_to_b(b"first")
        self.advance(1)
        self.assertEqual(self.path_of_a(), "udp")
        # Sending into a silent but working peer: the stall probe's answer keeps UDP.
        for _ in range(8):
            self.pair.peer_of_a.tx_bytes += 1
            self.advance(1)
        self.assertEqual(self.path_of_a(), "udp")
        self.assertEqual(self.paths[0].fallbacks, 0)
        net.filters.append(self.filter)
        moved_at = None
        for step in range(100):
            self.pair.a_to_b(b"data %d" % step)
            self.advance(0.2)
            if self.path_of_a() != "udp":
                moved_at = step * 0.2
                break
        self.assertIsNotNone(moved_at)
        self.assertLess(moved_at, 8.0)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        packet = self.pair.a_to_b(b"through the relay")
        self.relay.flush(net.now)
        self.assertIn(packet, self.pair.b.written)
        self.assertEqual(getattr(self.pair.peer_of_b.arrived_via, "name", None), "b")

    def test_mesh_path_check_answered_leaves_the_relay_for_good(self) -> None:
        """The mesh's own path check (PATH_PONG) proving UDP both ways moves the pair off the
        relay at once, and datagrams the peer still had in flight through the relay, or sends
        there before it hears of the switch, do not pull it back (the flap seen in namespaces
        when the mesh and the relay logic each owned the endpoint)."""
        net = self.pair.net
        self.pair.a_to_b(b"first")
        self.advance(7)
        self.assertEqual(self.path_of_a(), "tls-relay via relay.test:443")
        self.pair.b_to_a(b"on the relay")
        self.relay.flush(net.now)
        self.assertTrue(self.paths[0].holds(self.pair.peer_of_a))
        self.assertIs(self.pair.peer_of_b.path_kind, PATH_TLS)
        net.filters.remove(self.filter)
        in_flight = self.pair.b_to_a(b"in flight through the relay")  # queued, not yet delivered
        self.paths[0].direct_confirmed(self.pair.peer_of_a, B_EP, net.now)
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        self.assertFalse(self.paths[0].holds(self.pair.peer_of_a))
        self.relay.flush(net.now)
        self.assertIn(in_flight, self.pair.a.written)
        net.flush()  # the SWITCH over UDP
        self.assertEqual(self.pair.peer_of_a.endpoint, B_EP)
        self.assertEqual(self.pair.peer_of_b.endpoint, A_EP)
        for step in range(40):
            self.pair.a_to_b(b"a %d" % step)
            self.pair.b_to_a(b"b %d" % step)
            self.advance(0.5)
            self.assertEqual(self.path_of_a(), "udp")
            self.assertEqual(self.pair.peer_of_b.endpoint, A_EP)
        self.assertEqual(self.paths[0].returns, 1)
        self.assertEqual(self.paths[1].returns, 1)

    def test_direct_confirmed_is_ignored_off_the_relay(self) -> None:
        """A path check answered while we are on UDP anyway changes nothing and sends nothing."""
        self.pair.net.filters.remove(self.filter)
        self.pair.a_to_b(b"first")
        self.advance(1)
        sent = self.pair.peer_of_a.tx_bytes
        self.paths[0].direct_confirmed(self.pair.peer_of_a, B_EP, self.pair.net.now)
        self.assertEqual(self.pair.peer_of_a.tx_bytes, sent)
        self.assertEqual(self.paths[0].returns, 0)
