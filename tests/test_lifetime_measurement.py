"""Measuring the NAT lifetime (mesh/lifetime_measurement.py): the machine on its own, and our
side of the probes against hostile input and after a measurement (moved from test_keepalive)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.mesh import keepalive as K
from meshguard.mesh import lifetime_measurement as M
from meshguard.mesh import lifetime_probe as P
from meshguard.testing.memory import MemoryProbeSockets
from tests.test_keepalive import HOME, HUB, Mesh


class MachineTests(SynchronousTestCase):
    """The machine with the policy's decisions replaced by plain functions."""

    def setUp(self) -> None:
        self.mesh = Mesh(30.0)
        self.mesh.net.advance(5)
        self.home = self.mesh.home
        self.nat = K.NatState()
        self.wanted = True
        self.helper: object = None
        self.measured: list[float] = []
        self.counts: list[str] = []
        tokens = itertools.count(1)
        self.machine = M.LifetimeMeasurement(
            self.home.node.device,
            self.home.agent,
            self.nat,
            MemoryProbeSockets(self.mesh.net, HOME[0]),
            new_token=lambda: next(tokens).to_bytes(P.TOKEN_SIZE, "big"),
            wanted=lambda: self.wanted,
            pick_helper=lambda now: self.helper,  # type: ignore[arg-type,return-value]
            measured=self.measured.append,
            count=self.counts.append,
            event=lambda text: None,
        )

    def test_not_wanted_nothing_runs(self) -> None:
        """A measurement nobody wants is never started and keeps no deadline."""
        self.wanted = False
        self.machine.measure_soon(self.mesh.net.now)
        self.assertIsNone(self.machine.next_deadline())
        self.machine.maybe_start(self.mesh.net.now)
        self.assertFalse(self.machine.busy())
        self.assertEqual(self.counts, [])

    def test_no_helper_waits_without_polling(self) -> None:
        """Without a meshguard peer to help, it says so and keeps no deadline: the next
        session or observation (the policy's update) starts it."""
        self.machine.measure_soon(self.mesh.net.now)
        self.machine.maybe_start(self.mesh.net.now)
        self.assertEqual(self.nat.measurement, "waiting for a meshguard peer with a session")
        self.assertIsNone(self.machine.next_deadline())

    def test_campaign_launches_the_ladder_and_restart_cancels_it(self) -> None:
        """With a helper, one request per rung of the ladder goes out at once; a restart (a new
        public address) cancels them all, forgets the lifetime and measures again at once."""
        self.helper = self.home.peer(self.mesh.hubs[0])
        now = self.mesh.net.now
        self.machine.measure_soon(now)
        self.machine.maybe_start(now)
        self.assertEqual(self.counts.count("campaigns"), 1)
        self.assertEqual(len(self.machine._probes), len(P.LIFETIME_LADDER))
        self.assertTrue(self.machine.busy())
        self.nat.lifetime = 110.0
        self.machine.restart(now, "public address changed")
        self.assertFalse(self.machine.busy())
        self.assertIsNone(self.nat.lifetime)
        self.assertEqual(self.nat.measurement, "pending (public address changed)")
        self.assertEqual(self.machine.next_deadline(), now)


class HostileInputTests(SynchronousTestCase):
    """Our side against hostile datagrams on the secondary sockets."""

    def setUp(self) -> None:
        self.mesh = Mesh(30.0)
        self.mesh.net.advance(5)
        self.hub = self.mesh.hubs[0]
        self.device = self.hub.node.device

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=80))
    def test_garbage_on_secondary_path(self, data: bytes) -> None:
        """Whatever reaches a secondary socket, only our helper's ack/echo of our token counts."""
        policy = self.mesh.policy
        before = list(policy.results)
        for token in list(policy.measurement._probes):
            policy.path_datagram_received(token, data, ("192.0.2.9", 1), self.mesh.net.now)
        policy.path_datagram_received(b"x" * 16, data, HUB, self.mesh.net.now)
        self.assertEqual(policy.results, before)


class ProbeCancelTests(SynchronousTestCase):
    """A finished measurement tells its helper which probes are over (issue 17)."""

    def test_helper_stays_silent_after_the_measurement(self) -> None:
        """Once the first probe dies, the longer ones are cancelled at the helper: it sends no
        late reports into the idle tunnel (before, one per cancelled probe, up to 600 s after
        the start), and the home counts no stale results after the measurement."""
        mesh = Mesh(120.0)
        while mesh.policy.nat.measurement != "measured":
            mesh.net.advance(1.0)
        hub = mesh.hubs[0]
        # 24 rungs up to 110 s survived, 126.5 s died: the 12 longer ones were cancelled.
        self.assertEqual(hub.policy.counters["help_cancelled"], 12)
        self.assertEqual(mesh.policy.counters["probes_cancel_sent"], 1)
        echoes = hub.policy.counters["echoes_sent"]
        stale = mesh.policy.counters.get("stale_result", 0)
        hub_peer = hub.peer(mesh.home)
        controls = hub_peer.sent.total["control"]
        mesh.net.advance(700.0)
        self.assertEqual(hub.policy.counters["echoes_sent"], echoes)
        self.assertEqual(mesh.policy.counters.get("stale_result", 0), stale)
        # Only the self-check's acknowledgement went from the hub into the tunnel.
        self.assertLessEqual(hub_peer.sent.total["control"] - controls, 1)
