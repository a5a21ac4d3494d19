"""The TLS relay's sans-I/O parts and its protocols, deterministic: framing, member proof,
server rules (membership, forwarding, limits, liveness), client backoff, config keys."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.internet import ClientService
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.relay.client import (
    RelayClientFactory,
    RelayClientLink,
    RelayClientProtocol,
    member_backoff,
    parse_pin,
    relay_backoff,
)
from meshguard.adapters.relay.connection import DEAD_AFTER
from meshguard.adapters.relay.server import AUTH_TIMEOUT, RelayHub, RelayServerProtocol
from meshguard.codecs.config import ConfigError, parse_config
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.relay import auth, frames
from meshguard.relay.fairness import SLACK


def keypair(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    private = generate_private_key(lambda n: bytes(rng.getrandbits(8) for _ in range(n)))
    return private, public_key(private)


RELAY = keypair(1)
ALICE = keypair(2)
BOB = keypair(3)
MALLORY = keypair(4)


# ---------------------------------------------------------------------------------- framing


class FrameTests(SynchronousTestCase):
    @given(
        st.lists(
            st.tuples(st.sampled_from(sorted(frames.KNOWN)), st.binary(max_size=300)),
            max_size=20,
        ),
        st.integers(1, 50),
    )
    def test_round_trip_in_any_chunks(self, items: list[tuple[int, bytes]], chunk: int) -> None:
        """Frames survive any split of the stream, boundaries kept."""
        stream = b"".join(frames.encode(k, p) for k, p in items)
        decoder = frames.FrameDecoder()
        out: list[tuple[int, bytes]] = []
        for i in range(0, len(stream), chunk):
            out.extend(decoder.feed(stream[i : i + chunk]))
        self.assertEqual(out, items)
        self.assertEqual(decoder.buffered, 0)

    @given(st.binary(max_size=2000))
    @settings(max_examples=300)
    def test_garbage_only_raises_frame_error(self, data: bytes) -> None:
        """Hostile bytes give frames or FrameError, never another exception or a big buffer."""
        decoder = frames.FrameDecoder(max_payload=1000)
        try:
            decoder.feed(data)
        except frames.FrameError:
            return
        self.assertLessEqual(decoder.buffered, frames.HEADER_SIZE + 1000)

    def test_oversized_header_refused_before_buffering(self) -> None:
        decoder = frames.FrameDecoder(max_payload=100)
        with self.assertRaises(frames.FrameError):
            decoder.feed(bytes((frames.SEND, 0, 0, 101)))


# ---------------------------------------------------------------------------------- proof


class ProofTests(SynchronousTestCase):
    def challenge(self, seed: int = 7) -> auth.Challenge:
        return auth.Challenge(auth.VERSION, RELAY[1], random.Random(seed).randbytes(32))

    def test_member_proof_verifies_both_ways(self) -> None:
        challenge = self.challenge()
        result = auth.answer(challenge, ALICE[0], ALICE[1], b"n" * 16, b"binding")
        assert result is not None
        answer, expected = result
        self.assertEqual(auth.verify(challenge, RELAY[0], answer, b"binding"), expected)

    def test_replay_wrong_key_or_binding_fail(self) -> None:
        """A proof is bound to its challenge, its TLS session and the key that made it."""
        challenge = self.challenge()
        result = auth.answer(challenge, ALICE[0], ALICE[1], b"n" * 16, b"binding")
        assert result is not None
        answer = result[0]
        self.assertIsNone(auth.verify(self.challenge(8), RELAY[0], answer, b"binding"))
        self.assertIsNone(auth.verify(challenge, RELAY[0], answer, b"other session"))
        claimed = auth.Answer(BOB[1], answer.nonce, answer.proof)
        self.assertIsNone(auth.verify(challenge, RELAY[0], claimed, b"binding"))
        forged = auth.answer(challenge, MALLORY[0], BOB[1], b"n" * 16, b"binding")
        assert forged is not None
        self.assertIsNone(auth.verify(challenge, RELAY[0], forged[0], b"binding"))

    @given(st.binary(min_size=64, max_size=64))
    def test_random_answers_fail(self, data: bytes) -> None:
        answer = auth.Answer.decode(data)
        assert answer is not None
        self.assertIsNone(auth.verify(self.challenge(), RELAY[0], answer, b""))

    @given(st.binary(max_size=100))
    def test_decoders_take_any_bytes(self, data: bytes) -> None:
        auth.Answer.decode(data)
        auth.Challenge.decode(data)


# ---------------------------------------------------------------------------------- server


class Recorder:
    def __init__(self) -> None:
        self.local: list[tuple[bytes, bytes]] = []


def make_hub(clock: task.Clock, members: set[bytes], **kw: Any) -> tuple[RelayHub, Recorder]:
    rec = Recorder()
    rng = random.Random(99)
    hub = RelayHub(
        clock,
        private_key=lambda: RELAY[0],
        public_key=lambda: RELAY[1],
        is_member=members.__contains__,
        deliver_local=lambda s, d: rec.local.append((s, d)),
        random=lambda n: rng.randbytes(n),
        **kw,
    )
    return hub, rec


def make_client(clock: task.Clock, key: tuple[bytes, bytes]) -> tuple[RelayClientLink, list[Any]]:
    received: list[Any] = []
    link = RelayClientLink(
        "relay.test",
        443,
        private_key=lambda: key[0],
        public_key=lambda: key[1],
        deliver=lambda s, d: received.append((s, d)),
        random=lambda n: b"\x01" * n,
        clock=clock,
    )
    return link, received


def connect(hub: RelayHub, link: RelayClientLink, clock: task.Clock) -> tuple[Any, Any, Any]:
    server = RelayServerProtocol(hub)
    client = RelayClientProtocol(link, clock)
    server_transport = iosim.FakeTransport(server, isServer=True)
    client_transport = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_transport, client, client_transport, greet=True)
    pump.flush()
    return server, client, pump


class ServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.hub, self.rec = make_hub(self.clock, {ALICE[1], BOB[1]})
        self.pumps: list[Any] = []
        self.addCleanup(self.close_all)

    def close_all(self) -> None:
        for server, client, pump in self.pumps:
            server.abort()
            client.abort()
            server.transport.reportDisconnect()
            client.transport.reportDisconnect()
            pump.flush()
            server.connectionLost(None)
            client.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def join(self, key: tuple[bytes, bytes]) -> tuple[RelayClientLink, list[Any], Any]:
        link, received = make_client(self.clock, key)
        connected = connect(self.hub, link, self.clock)
        self.pumps.append(connected)
        return link, received, connected[2]

    def test_members_authenticate_and_exchange_datagrams(self) -> None:
        """Two members prove their keys, see each other and the relay, and exchange datagrams;
        a datagram to the relay's own key goes to the relay node's device."""
        alice, alice_rx, alice_pump = self.join(ALICE)
        bob, bob_rx, bob_pump = self.join(BOB)
        alice_pump.flush()
        self.assertEqual(set(alice.present()), {RELAY[1], BOB[1]})
        self.assertEqual(set(bob.present()), {RELAY[1], ALICE[1]})
        self.assertTrue(alice.send(BOB[1], b"wireguard datagram"))
        alice_pump.flush()
        bob_pump.flush()
        self.assertEqual(bob_rx, [(ALICE[1], b"wireguard datagram")])
        alice.send(RELAY[1], b"to the relay node")
        alice_pump.flush()
        self.assertEqual(self.rec.local, [(ALICE[1], b"to the relay node")])
        self.assertTrue(self.hub.send(ALICE[1], b"from the relay node"))
        alice_pump.flush()
        self.assertEqual(alice_rx, [(RELAY[1], b"from the relay node")])

    def test_non_member_refused(self) -> None:
        """A client whose key is not a member is refused and never reaches the others."""
        mallory, _, _ = self.join(MALLORY)
        self.assertIsNone(mallory.connection)
        self.assertEqual(list(self.hub.present()), [])
        self.assertEqual(self.hub.refused, 1)

    def test_removed_member_is_cut_off_at_its_next_datagram(self) -> None:
        """A member removed from the mesh after it connected (a revocation) gets nothing more
        relayed: its next datagram closes its connection."""
        members = {ALICE[1], BOB[1]}
        self.hub.is_member = members.__contains__
        alice, _, alice_pump = self.join(ALICE)
        _, bob_rx, bob_pump = self.join(BOB)
        alice_pump.flush()
        members.discard(ALICE[1])
        alice.send(BOB[1], b"after removal")
        alice_pump.flush()
        bob_pump.flush()
        self.assertEqual(bob_rx, [])
        self.assertIsNone(alice.connection)
        self.assertNotIn(ALICE[1], self.hub.present())

    def test_wrong_proof_refused(self) -> None:
        """Claiming a member's key without its private key is refused."""
        impostor = (MALLORY[0], ALICE[1])
        link, _, _ = self.join(impostor)
        self.assertIsNone(link.connection)
        self.assertNotIn(ALICE[1], self.hub.present())

    def test_send_before_auth_closes(self) -> None:
        server = RelayServerProtocol(self.hub)
        transport = iosim.FakeTransport(server, isServer=True)
        server.makeConnection(transport)
        server.dataReceived(frames.encode(frames.SEND, BOB[1] + b"x"))
        self.assertTrue(server.closed)
        server.connectionLost(None)

    def test_no_proof_in_time_closes(self) -> None:
        server = RelayServerProtocol(self.hub)
        transport = iosim.FakeTransport(server, isServer=True)
        server.makeConnection(transport)
        self.clock.advance(AUTH_TIMEOUT)
        self.assertTrue(server.closed)
        server.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rate_limit_and_junk_flood_spare_others(self) -> None:
        """A member flooding junk is held to its byte rate; another pair's datagrams all pass."""
        self.hub.rate = 10_000
        self.hub.burst = 10_000
        alice, _, alice_pump = self.join(ALICE)
        _bob, bob_rx, bob_pump = self.join(BOB)
        # Mallory is a member here, flooding junk at Bob and at keys nobody has.
        self.hub.is_member = {ALICE[1], BOB[1], MALLORY[1]}.__contains__
        mallory, _, mallory_pump = self.join(MALLORY)
        alice_pump.flush()
        rng = random.Random(5)
        for i in range(2000):
            target = BOB[1] if i % 2 else rng.randbytes(32)
            mallory.connection.write_frame(frames.SEND, target + rng.randbytes(200))  # type: ignore[union-attr]
        for i in range(50):
            alice.send(BOB[1], b"ping %d" % i)
            self.clock.advance(0.01)
        mallory_pump.flush()
        alice_pump.flush()
        bob_pump.flush()
        self.assertEqual(
            [d for s, d in bob_rx if s == ALICE[1]], [b"ping %d" % i for i in range(50)]
        )
        self.assertGreater(self.hub.rate_limited, 1900)
        self.assertLess(len([1 for s, _ in bob_rx if s == MALLORY[1]]), 60)

    def test_paused_target_drops_instead_of_buffering(self) -> None:
        """While the target's transport is over its high-water mark, frames to it are dropped
        beyond a bounded slack (SLACK bytes until it resumes), however many senders there are."""
        self.join(ALICE)
        self.join(BOB)
        self.hub.is_member = {ALICE[1], BOB[1], MALLORY[1]}.__contains__
        self.join(MALLORY)
        target = self.hub.clients[BOB[1]]
        target.pauseProducing()
        written = len(target.transport.stream)  # type: ignore[union-attr]
        for i in range(200):
            sender = ALICE[1] if i % 2 else MALLORY[1]
            self.hub.forward(self.hub.clients[sender], BOB[1], b"x" * 1000, self.clock.seconds())
        grown = len(target.transport.stream) - written  # type: ignore[union-attr]
        self.assertLessEqual(grown, SLACK + 200 * frames.HEADER_SIZE)
        self.assertGreater(self.hub.backpressure_drops, 100)
        target.resumeProducing()
        before = self.hub.forwarded
        self.hub.forward(self.hub.clients[ALICE[1]], BOB[1], b"x" * 100, self.clock.seconds())
        self.assertEqual(self.hub.forwarded, before + 1)

    def test_paused_receiver_is_shared_fairly(self) -> None:
        """Mallory floods Bob (within her own rate limit) and keeps his connection paused;
        Alice's light traffic to Bob still gets through while Mallory's excess is dropped."""
        self.join(ALICE)
        self.join(BOB)
        self.hub.is_member = {ALICE[1], BOB[1], MALLORY[1]}.__contains__
        self.join(MALLORY)
        target = self.hub.clients[BOB[1]]
        delivered = {ALICE[1]: 0, MALLORY[1]: 0}
        offered = {ALICE[1]: 0, MALLORY[1]: 0}
        for step in range(400):  # 2 s: the transport drains 32 KiB per 10 ms step
            now = step * 0.005
            for _ in range(20):
                offered[MALLORY[1]] += 1
                if self.hub._write(target, MALLORY[1], b"m" * 1200, now):
                    delivered[MALLORY[1]] += 1
            if step % 4 == 1:  # always while Bob's transport is paused
                offered[ALICE[1]] += 1
                if self.hub._write(target, ALICE[1], b"a" * 1200, now):
                    delivered[ALICE[1]] += 1
            # The transport pauses over its high-water mark and resumes when drained.
            if step % 2 == 0:
                target.pauseProducing()
            else:
                target.resumeProducing()
        self.assertEqual(delivered[ALICE[1]], offered[ALICE[1]])
        self.assertLess(delivered[MALLORY[1]], offered[MALLORY[1]] * 0.75)
        self.assertGreater(self.hub.fair_admitted, 0)

    def test_junk_frame_type_closes_only_that_client(self) -> None:
        self.join(ALICE)
        self.join(BOB)
        self.hub.clients[ALICE[1]].dataReceived(b"\xff\x00\x00\x01x")
        self.assertTrue(self.hub.clients[ALICE[1]].closed)
        self.assertFalse(self.hub.clients[BOB[1]].closed)

    def test_silent_connection_closed_in_bounded_time(self) -> None:
        """No byte for DEAD_AFTER seconds (pings unanswered) and the connection is aborted."""
        server = RelayServerProtocol(self.hub)
        transport = iosim.FakeTransport(server, isServer=True)
        server.makeConnection(transport)
        server.member = ALICE[1]  # as if authenticated
        if server._auth_timer is not None:
            server._auth_timer.cancel()
            server._auth_timer = None
        self.clock.pump([1.0] * int(DEAD_AFTER + 2))
        self.assertTrue(server.closed)
        self.assertIn(frames.encode(frames.PING, b"\0" * 8), b"".join(transport.stream))
        server.connectionLost(None)


# ---------------------------------------------------------------------------------- client


class BackoffTests(SynchronousTestCase):
    def test_policy_doubles_to_the_cap_with_jitter(self) -> None:
        values = iter([0.0, 0.999, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
        policy = relay_backoff(initial=1.0, factor=2.0, cap=30.0, random=lambda: next(values))
        self.assertEqual(policy(0), 0.5)
        self.assertAlmostEqual(policy(1), 2.0 * 0.9995)
        self.assertEqual(policy(2), 4.0 * 0.75)
        self.assertEqual([policy(n) for n in (5, 6, 100)], [15.0, 15.0, 15.0])

    def test_client_service_reconnects_with_backoff(self) -> None:
        """Failed connection attempts are retried at the policy's delays, and a connection that
        is lost is made again; stopping leaves no timer behind."""
        reactor = MemoryReactorClock()
        rng = random.Random(3)
        policy = relay_backoff(random=rng.random)
        reference = relay_backoff(random=random.Random(3).random)
        expected = [reference(n) for n in range(1, 6)]  # ClientService counts from 1
        attempts: list[float] = []

        class Endpoint:
            def connect(self, factory: Factory) -> Any:
                from twisted.internet import defer

                attempts.append(reactor.seconds())
                if len(attempts) <= 5:
                    return defer.fail(ConnectionRefusedError())
                protocol = factory.buildProtocol(None)
                transport = iosim.FakeTransport(protocol, isServer=False)
                protocol.makeConnection(transport)
                self.protocol = protocol
                return defer.succeed(protocol)

        endpoint = Endpoint()
        service = ClientService(
            endpoint, Factory.forProtocol(Protocol), retryPolicy=policy, clock=reactor
        )
        service.startService()
        for _ in range(200):
            reactor.advance(0.25)
        self.assertEqual(len(attempts), 6)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        for gap, want in zip(gaps, expected, strict=False):
            self.assertLessEqual(abs(gap - want), 0.25)
        # Lost: reconnected after a fresh (first-step) backoff.
        endpoint.protocol.connectionLost(None)
        for _ in range(20):
            reactor.advance(0.25)
        self.assertEqual(len(attempts), 7)
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_tls_and_auth_failures_grow_the_backoff(self) -> None:
        """Attempts that connect over TCP but then fail TLS verification or member
        authentication count as failures: the delays double to the cap instead of restarting
        at the first step; a successful AUTH_OK resets them, and stopping leaves no timer."""
        from OpenSSL import SSL
        from twisted.internet import defer
        from twisted.python.failure import Failure

        reactor = MemoryReactorClock()
        members: set[bytes] = set()
        hub, _ = make_hub(reactor, members)
        link, _ = make_client(reactor, ALICE)
        #: What the next connection does: "tls" (verification fails), "auth" (the relay
        #: refuses us) or "ok" (we authenticate).
        outcomes = iter(
            ["tls", "auth", "tls", "auth", "tls", "tls", "tls", "ok", "tls", "auth", "tls"]
        )
        attempts: list[float] = []
        pumps: list[Any] = []

        class Endpoint:
            def connect(self, factory: Factory) -> Any:
                attempts.append(reactor.seconds())
                outcome = next(outcomes)
                client = factory.buildProtocol(None)
                if outcome == "tls":
                    transport = iosim.FakeTransport(client, isServer=False)
                    client.makeConnection(transport)
                    # The TLS layer reports a failed handshake as the connection's loss.
                    error = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
                    reactor.callLater(0, client.connectionLost, error)
                else:
                    if outcome == "ok":
                        members.add(ALICE[1])
                    else:
                        members.discard(ALICE[1])
                    server = RelayServerProtocol(hub)
                    pump = iosim.connect(
                        server,
                        iosim.FakeTransport(server, isServer=True),
                        client,
                        iosim.FakeTransport(client, isServer=False),
                        greet=False,
                    )
                    pumps.append((server, pump))
                    reactor.callLater(0, pump.flush)
                return defer.succeed(client)

        service = ClientService(
            Endpoint(),
            RelayClientFactory(link, reactor),
            retryPolicy=member_backoff(link, relay_backoff(random=lambda: 0.0)),
            clock=reactor,
        )
        service.startService()
        reactor.advance(0)
        while len(attempts) < 8:
            reactor.advance(0.5)
        # Seven failures in a row: 0.5 * min(30, 2**n) for n = 1..7, however each one failed.
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        self.assertEqual(gaps, [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0])
        self.assertIsNotNone(link.connection)
        self.assertEqual(link.failures, 0)
        # The authenticated connection is lost: the count starts again from the first step.
        server, pump = pumps[-1]
        server.abort()
        pump.flush()
        self.assertIsNone(link.connection)
        while len(attempts) < 11:
            reactor.advance(0.5)
        self.assertEqual([b - a for a, b in itertools.pairwise(attempts[7:])], [1.0, 2.0, 4.0])
        service.stopService()
        for server, _pump in pumps:
            server.connectionLost(None)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_pin_parsing(self) -> None:
        self.assertEqual(parse_pin("sha256:" + "ab" * 32), bytes.fromhex("ab" * 32))
        with self.assertRaises(ValueError):
            parse_pin("md5:00")


# ---------------------------------------------------------------------------------- config

HEADER = "[Interface]\nPrivateKey = " + "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=" + "\n"


class RelayConfigTests(SynchronousTestCase):
    def test_keys_parse(self) -> None:
        config = parse_config(
            HEADER
            + "RelayListen = 0.0.0.0:8443\nRelayCertificate = relay.crt\nRelayKey = relay.key\n"
            + "Relay = tls://relay.example.net:8443\nRelay = tls://[2001:db8::1]:443\n"
            + "RelayCA = ca.pem\nRelayPin = sha256:"
            + "00" * 32
            + "\n",
            "/etc/meshguard/mg0.conf",
        )
        interface = config.interface
        self.assertEqual(interface.relay_listen, ("0.0.0.0", 8443))
        self.assertEqual(interface.relay_certificate, "/etc/meshguard/relay.crt")
        self.assertEqual(interface.relays, [("relay.example.net", 8443), ("2001:db8::1", 443)])
        self.assertEqual(interface.relay_ca, "/etc/meshguard/ca.pem")
        self.assertEqual(interface.relay_pins, [bytes(32)])

    def test_errors_name_the_line(self) -> None:
        cases = [
            ("Relay = https://x:1\n", "mg0.conf:3: Relay"),
            ("RelayListen = 0.0.0.0:8443\n", "mg0.conf:3: RelayListen needs RelayCertificate"),
            ("RelayPin = sha256:00\n", "mg0.conf:3: RelayPin is not"),
            ("RelayCA = ca.pem\n", "mg0.conf:3: RelayCA without any Relay"),
        ]
        for line, want in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_config(HEADER + line, "mg0.conf")
            self.assertIn(want, str(caught.exception))
