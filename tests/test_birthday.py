"""The birthday technique's core (mesh/birthday.py and its part of mesh/paths.py), in memory:
when it starts, what it sends, how fast, and when it gives up. (That it makes an easy and a hard
NAT go direct is proven over real NATs in tests/test_birthday_netns.py: the in-memory NAT picks
ports in sequence, not at random.)"""

from __future__ import annotations

import itertools
import random
import socket
import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.interfaces import Endpoint
from meshguard.mesh import birthday as bd
from meshguard.mesh import kinds
from meshguard.mesh.paths import PathState
from meshguard.testing.memory import MemoryNAT
from tests.meshsim import MeshSim, SimMember


class _Sockets:
    """The adapter's extra sockets, recorded."""

    def __init__(self) -> None:
        self.opened: list[tuple[Endpoint, int, float, float]] = []
        self.released: list[Endpoint] = []
        self.now = lambda: 0.0

    def open(self, toward: Endpoint, count: int, hold: float) -> bool:
        self.opened.append((toward, count, hold, self.now()))
        return True

    def release(self, toward: Endpoint) -> None:
        self.released.append(toward)


def _hard(sim: MeshSim, index: int) -> MemoryNAT:
    return sim.net.add_nat(
        MemoryNAT(f"203.0.{index}.2", {f"192.168.{index}.2"}, 30, endpoint_dependent=True)
    )


class SprayTests(SynchronousTestCase):
    def test_random_ports_are_distinct_and_in_range(self) -> None:
        """1,024 distinct ports from Linux's range for the NAT's pick (1024-65535)."""
        rng = random.Random(1)
        ports = bd.random_ports(rng.randbytes)
        self.assertEqual(len(ports), bd.PROBES)
        self.assertEqual(len(set(ports)), bd.PROBES)
        self.assertTrue(all(bd.LOW_PORT <= p <= bd.HIGH_PORT for p in ports))

    def test_spray_is_paced(self) -> None:
        """A spray hands out at most PROBES_PER_TICK ports per TICK, each once, and is done
        after all of them: 1,024 pings over ~10 s."""
        spray = bd.Spray("203.0.2.2", b"n" * 8, list(range(2000, 2000 + bd.PROBES)), 0.0)
        now, sent = 0.0, []
        while not spray.done:
            batch = spray.due(now)
            self.assertLessEqual(len(batch), bd.PROBES_PER_TICK)
            self.assertEqual(spray.due(now), [])  # nothing more in the same tick
            sent += batch
            now += 0.01
        self.assertEqual(sorted(sent), list(range(2000, 2000 + bd.PROBES)))
        self.assertLess(abs(now - bd.PROBES / bd.PROBES_PER_TICK * bd.TICK), 1.0)


class PathsTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Two hard NATs can still meet by chance: both NATs here hand out ports in sequence,
        # and a pair forms when each side's spray happens to hit the port the other's NAT gave
        # the very ping that answers it (about 1 in 1,000 an attempt). The tests below mean
        # the case where it does not (checked where it matters): with seed 11 it did once the
        # device drew its timer jitter 64 bytes at a time, in the second attempt.
        sim = MeshSim(seed=12)
        self.a = sim.add_member(_hard(sim, 1), "192.168.1.2")
        self.b = sim.add_member(_hard(sim, 2), "192.168.2.2")
        self.sockets: dict[str, _Sockets] = {}
        for member in (self.a, self.b):
            member.stack.paths.primer = lambda endpoint: None
            sockets = _Sockets()
            sockets.now = lambda: sim.net.now
            member.stack.paths.birthday = sockets
            self.sockets[member.name] = sockets
        self.sim = sim

    def _sent(self, member: SimMember) -> int:
        return member.stack.paths.birthday_probes_sent

    def test_quiet_punching_starts_it_both_ways_and_it_gives_up(self) -> None:
        """Two NATs that map per destination: punching goes quiet, and then each side opens
        SOCKETS extra sockets toward the other's observed endpoint and asks it (BIRTHDAY,
        over the relay) to spray; each sprays the other's public address with PROBES pings
        at 100 a second, to distinct ports. Nothing hits here (hard against hard), so after
        MAX_ATTEMPTS attempts, ATTEMPT_GAP apart, both give up and stay relayed."""
        sim, a, b = self.sim, self.a, self.b
        sim.start()
        sim.run(40)
        opened = self.sockets[a.name].opened
        self.assertGreaterEqual(len(opened), 1)
        toward, count, hold, _ = opened[0]
        self.assertEqual(toward[0], "203.0.2.2")  # b's NAT, as the introducer sees it
        self.assertEqual((count, hold), (bd.SOCKETS, bd.HOLD))
        self.assertIn(self._sent(a), range(1, bd.PROBES + 1))
        # Pace: at most 100 pings a second.
        before = self._sent(b)
        sim.run(1.0)
        self.assertLessEqual(self._sent(b) - before, 110)
        for _ in range(1800):
            sim.run(1.0)
            # The premise (see setUp): no path formed by chance, which would reset attempts.
            self.assertEqual(sim.path(a, b), "relayed", "a chance hit: pick another seed")
        for member in (a, b):
            attempts = self.sockets[member.name].opened
            self.assertEqual(len(attempts), bd.MAX_ATTEMPTS, member.name)
            times = [at for *_, at in attempts]
            self.assertTrue(all(t2 - t1 >= bd.ATTEMPT_GAP for t1, t2 in itertools.pairwise(times)))
            # Each side sprayed once per attempt of the other, never more than PROBES each.
            self.assertEqual(self._sent(member), bd.MAX_ATTEMPTS * bd.PROBES, member.name)
            self.assertEqual(sim.path(member, b if member is a else a), "relayed")
        status = a.stack.paths.peer_status(a.node.device.peers[b.public_key])
        self.assertEqual(status["birthday"]["attempts"], bd.MAX_ATTEMPTS)
        self.assertFalse(status["birthday"]["spraying"])

    def _run_until_spraying(self) -> PathState:
        """Start the pair and run until a's spray toward b has sent its first pings."""
        self.sim.start()
        state = self.a.stack.paths.states.get(self.b.public_key)
        while state is None or state.spray is None or state.spray.sent == 0:
            self.sim.run(0.05)
            state = self.a.stack.paths.states.get(self.b.public_key)
        return state

    def test_a_lapsed_session_mid_spray_pauses_the_spray_and_it_resumes(self) -> None:
        """An idle relayed pair's session lapses (REJECT_AFTER_TIME) during a spray: the spray
        sends nothing while no session carries its pings, a new session is made at once, and
        the spray then sends the rest: all PROBES pings, none used up by the lapse."""
        sim, a, b = self.sim, self.a, self.b
        state = self._run_until_spraying()
        spray = state.spray
        peer = a.node.device.peers[b.public_key]
        keypair = peer.keypairs.current
        assert keypair is not None
        keypair.expire_for_sending()
        sent = self._sent(a)
        sim.run(0.5)
        self.assertEqual(self._sent(a), sent)
        self.assertGreater(a.stack.paths.spray_pauses, 0)
        sim.run(20.0)
        self.assertTrue(spray.done)
        self.assertEqual(self._sent(a), bd.PROBES)
        self.assertIsNot(peer.keypairs.current, keypair)

    def test_an_attempt_that_meets_a_lapsed_session_starts_once_it_is_renewed(self) -> None:
        """Punching goes quiet while the pair's session has lapsed: the attempt (sockets, then
        the BIRTHDAY message) waits for the session it starts and begins as soon as that is
        there, instead of a whole punch cycle and quiet period later; status says it waits."""
        sim, a, b = self.sim, self.a, self.b
        sim.start()
        sim.run(6.0)  # REKEY_TIMEOUT after the first handshake, before punching went quiet
        state = a.stack.paths.states[b.public_key]
        peer = a.node.device.peers[b.public_key]
        self.assertEqual(self.sockets[a.name].opened, [])
        self.assertIsNotNone(state.public_endpoint())
        keypair = peer.keypairs.current
        assert keypair is not None
        keypair.expire_for_sending()
        a.stack.paths._birthday_start(state, sim.net.now)
        self.assertEqual(self.sockets[a.name].opened, [])
        self.assertTrue(a.node.device.handshake_underway(peer, sim.net.now))
        status = a.stack.paths.peer_status(peer)
        self.assertEqual(status["birthday"]["attempts"], 0)
        self.assertTrue(status["birthday"]["waiting_for_session"])
        started = sim.net.now
        sim.run(1.0)
        self.assertIsNot(peer.keypairs.current, keypair)
        opened = self.sockets[a.name].opened
        self.assertEqual(len(opened), 1)
        self.assertLess(opened[0][3] - started, 1.0)
        self.assertEqual(state.birthday_attempts, 1)
        self.assertFalse(state.birthday_pending)

    def test_a_spray_held_up_past_the_spray_gap_gives_way_to_a_new_attempt(self) -> None:
        """A spray is not restarted by another BIRTHDAY while it runs; but one a lapsed session
        held up for SPRAY_GAP aims at sockets the other side closed long ago, and the member's
        next attempt replaces it with a fresh spray."""
        sim, a, b = self.sim, self.a, self.b
        state = self._run_until_spraying()
        old = state.spray
        peer = a.node.device.peers[b.public_key]
        dropped = a.stack.paths.dropped
        a.stack.paths._birthday_received(peer, sim.net.now)
        self.assertTrue(state.spray is old)
        self.assertEqual(a.stack.paths.dropped, dropped + 1)
        keypair = peer.keypairs.current
        assert keypair is not None
        keypair.expire_for_sending()
        sim.net.filters.append(lambda data, source, destination: False)
        sim.run(bd.SPRAY_GAP + 1.0)
        sim.net.filters.pop()
        self.assertTrue(state.spray is old)
        self.assertFalse(old.done)
        a.stack.paths._birthday_received(peer, sim.net.now)
        self.assertFalse(state.spray is old)
        assert state.spray is not None
        self.assertEqual(state.spray.started, sim.net.now)

    def test_birthday_message_is_bounded(self) -> None:
        """A BIRTHDAY message starts at most one spray per SPRAY_GAP; one from a peer we have
        no path state for (the introducer), or while we are direct, starts none."""
        sim, a, b = self.sim, self.a, self.b
        sim.start()
        sim.run(5)
        paths = a.stack.paths
        peer_b = a.node.device.peers[b.public_key]
        now = sim.net.now
        paths.control_received(peer_b, kinds.BIRTHDAY, b"", now)
        spray = paths.states[b.public_key].spray
        self.assertIsNotNone(spray)
        assert spray is not None
        self.assertEqual(spray.host, "203.0.2.2")
        dropped = paths.dropped
        paths.control_received(peer_b, kinds.BIRTHDAY, b"junk", now + 1)
        self.assertIs(paths.states[b.public_key].spray, spray)
        self.assertEqual(paths.dropped, dropped + 1)
        intro = a.node.device.peers[sim.introducer.public_key]
        paths.control_received(intro, kinds.BIRTHDAY, b"", now + 1)
        self.assertEqual(paths.dropped, dropped + 2)

    def test_a_hit_ends_the_quiet_period(self) -> None:
        """The adapter reports a hit on the extra sockets toward a member: punching toward it
        resumes at once (through the winning socket) instead of after the quiet period; a
        dead path through it releases the socket."""
        sim, a, b = self.sim, self.a, self.b
        sim.start()
        sim.run(40)
        state = a.stack.paths.states[b.public_key]
        toward = state.birthday_toward
        self.assertIsNotNone(toward)
        assert toward is not None
        state.quiet_until = state.next_punch = sim.net.now + 30
        pending = set(state.pending)
        a.stack.paths.birthday_hit(toward, sim.net.now)
        self.assertIsNone(state.quiet_until)
        self.assertEqual(state.next_punch, sim.net.now)
        # The ping goes at once, not at the next round (which waits for b's CALL_ME_MAYBE).
        sent = [state.pending[n] for n in set(state.pending) - pending]
        self.assertEqual(sent, [(toward, sim.net.now)])
        self.assertGreaterEqual(a.stack.paths.node_status()["birthday_hits"], 1)


class BirthdaySocketTests(SynchronousTestCase):
    """The adapter's groups of extra sockets (meshguard/adapters/birthday_sockets.py)."""

    def group(
        self, authentic: set[bytes], count: int
    ) -> tuple[Any, dict[Endpoint, Any], list[bytes]]:
        from meshguard.adapters.birthday_sockets import BirthdaySockets, _Extra, _Group

        steered: dict[Endpoint, Any] = {}
        delivered: list[bytes] = []
        #: Whether ``TOWARD`` was steered while each datagram was delivered.
        self.steered_during: list[bool] = []

        def deliver(data: bytes, source: Endpoint) -> bool:
            delivered.append(data)
            self.steered_during.append(TOWARD in steered)
            return data in authentic

        def steer(endpoint: Endpoint, send: Any) -> None:
            if send is None:
                steered.pop(endpoint, None)
            else:
                steered[endpoint] = send

        owner = BirthdaySockets(
            None,
            steer=steer,
            deliver=deliver,
            on_hit=lambda endpoint: None,
        )
        group = _Group(owner, TOWARD)
        group.sockets = [_Extra(group) for _ in range(count)]
        return group, steered, delivered

    def test_only_an_authenticated_datagram_makes_a_socket_win(self) -> None:
        """A datagram from the right endpoint that does not authenticate is handed to the
        device but leaves nothing steered and closes no socket; the first one that
        authenticates wins, and then only the winner's datagrams are delivered. While the
        device handles a datagram, answers to the endpoint leave through its socket."""
        group, steered, delivered = self.group({b"good"}, 4)
        first, second = group.sockets[0], group.sockets[1]
        group.received(first, b"forged", TOWARD)
        self.assertEqual(steered, {})
        self.assertIsNone(group.winner)
        self.assertEqual(len(group.sockets), 4)
        group.received(second, b"good", TOWARD)
        self.assertIs(group.winner, second)
        self.assertEqual(steered, {TOWARD: second.send})
        self.assertEqual(group.sockets, [second])
        group.received(first, b"late", TOWARD)
        group.received(second, b"more", TOWARD)
        self.assertEqual(delivered, [b"forged", b"good", b"more"])
        self.assertEqual(self.steered_during, [True, True, True])

    def test_other_sources_are_ignored(self) -> None:
        """Nothing from another address reaches the device or wins."""
        group, steered, delivered = self.group({b"good"}, 2)
        group.received(group.sockets[0], b"good", ("203.0.113.8", 41641))
        self.assertEqual((steered, delivered), ({}, []))


TOWARD: Endpoint = ("203.0.113.7", 41641)


class _Port:
    """What ``listenUDP`` returns, over a real socket on loopback."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)

    def stopListening(self) -> None:
        self.socket.close()


class _Reactor:
    def __init__(self) -> None:
        self.ports: list[_Port] = []
        self.clock = Clock()

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> _Port:
        opened = _Port()
        self.ports.append(opened)
        return opened

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        return self.clock.callLater(delay, f, *args)


class BirthdaySocketFilterTests(SynchronousTestCase):
    def test_extra_sockets_carry_the_port_filter(self) -> None:
        """Each extra socket gets the WireGuard port's kernel filter: junk sent to it over
        loopback never reaches it, a well-formed transport message does."""
        from meshguard.adapters.birthday_sockets import BirthdaySockets

        reactor = _Reactor()
        sockets = BirthdaySockets(
            reactor, steer=lambda e, s: None, deliver=lambda d, s: False, on_hit=lambda e: None
        )
        self.assertTrue(sockets.open(("127.0.0.1", 9), 3, bd.HOLD))
        self.addCleanup(sockets.close)
        self.assertEqual(sockets.filter_errors, 0)
        transport = struct.pack("<I", 4) + bytes(28)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for port in reactor.ports:
                target = port.socket.getsockname()
                sender.sendto(b"junk" * 5, target)
                sender.sendto(struct.pack("<I", 9) + bytes(60), target)
                sender.sendto(transport, target)
        for port in reactor.ports:
            received = []
            while True:
                try:
                    received.append(port.socket.recv(2048))
                except BlockingIOError:
                    break
            self.assertEqual(received, [transport])
