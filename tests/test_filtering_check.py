"""The filtering check (mesh/filtering_check.py): a home with two meshguard hubs behind NATs
with and without address/port-dependent filtering, in memory, wired as the node wires it
(moved from test_keepalive)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.interfaces import Endpoint
from meshguard.mesh import filtering_check as F
from meshguard.mesh import keepalive as K
from tests.test_keepalive import HOUR, HUB2, Mesh


class FilteringCheckTests(SynchronousTestCase):
    def test_one_lost_late_reply_does_not_flip_the_verdict(self) -> None:
        """A lost late reply is one miss: the next check passes and carrier-only follows."""
        mesh = Mesh(60.0, hubs=2, filtering="none")
        dropped: list[bytes] = []
        for hub in mesh.hubs:
            check = hub.policy.self_check
            send = check._send_late_reply

            def lossy(token: bytes, late: object, now: float, send: object = send) -> None:
                pending = mesh.policy.filtering._check
                if not dropped and pending is not None and pending.token == token:
                    dropped.append(token)
                    return
                send(token, late, now)  # type: ignore[operator]

            check._send_late_reply = lossy  # type: ignore[method-assign]
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        self.assertEqual(len(dropped), 1)
        self.assertEqual(policy.counters.get("filter_missed"), 1)
        self.assertEqual(policy.nat.filtering, F.FILTER_OPEN)
        self.assertEqual(policy.counters.get("filter_ok"), 1)
        intervals = sorted(mesh.home.peer(h).persistent_keepalive for h in mesh.hubs)
        self.assertEqual(intervals[0], 0)

    def test_filtering_status(self) -> None:
        """Status: unknown before the check, the verdict with its peer after; the per-peer
        reason says why a non-carrier hub keeps its own keepalive."""
        mesh = Mesh(60.0, hubs=2)
        mesh.net.advance(1)
        self.assertEqual(mesh.policy.node_status()["nat_filtering"], "unknown")
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        status = policy.node_status()
        checked = mesh.policy.nat.filtering_peer
        self.assertEqual(
            status["nat_filtering"], f"address-or-port-dependent (checked with {checked})"
        )
        self.assertIsInstance(status["nat_filtering_at"], float)
        other = next(h for h in mesh.hubs if h.public != policy.carrier)
        peer = policy.peer_status(mesh.home.peer(other))
        self.assertIn("filtering admits only peers we sent to", peer["keepalive"])

        fresh = Mesh(300.0, hubs=2)
        fresh.net.advance(2 * HOUR)
        other = next(h for h in fresh.hubs if h.public != fresh.policy.carrier)
        reason = fresh.policy.decisions[other.public].reason
        self.assertIn("filtering not known to admit other peers", reason)
        self.assertEqual(fresh.policy.node_status()["nat_filtering"], "unknown")
        self.assertIn("not checked", fresh.policy.node_status()["nat_filtering_check"])
        for hub in fresh.hubs:
            self.assertGreater(fresh.home.peer(hub).persistent_keepalive, 0)

    def test_port_dependent_filtering_keeps_both_hubs(self) -> None:
        """One public port for all destinations, but inbound only from a remote we sent to
        lately (Linux masquerade, most home routers): both hubs keep their own keepalive, so
        the second hub still reaches the idle home."""
        mesh = Mesh(60.0, hubs=2)
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        self.assertEqual(policy.nat.mapping, "endpoint-independent")
        self.assertEqual(policy.nat.filtering, "address-or-port-dependent")
        assert policy.nat.lifetime is not None
        for hub in mesh.hubs:
            self.assertEqual(
                mesh.home.peer(hub).persistent_keepalive,
                K.interval_for(policy.nat.lifetime, acked=True),
            )
        other = next(h for h in mesh.hubs if h.public != policy.carrier)
        self.assertIn(
            "filtering admits only peers we sent to", policy.decisions[other.public].reason
        )
        mesh.net.advance(HOUR)
        for hub in reversed(mesh.hubs):
            self.assertTrue(mesh.hub_reaches_home(hub))

    def test_filtering_request_goes_instead_of_a_keepalive(self) -> None:
        """The filtering check's first request to the second hub leaves when that hub's
        keepalive is due, in its place, not beside it (issue 17)."""
        mesh = Mesh(60.0, hubs=2)
        sent: list[tuple[float, int]] = []
        original = mesh.home.node.send_datagram

        def record(data: bytes, endpoint: Endpoint) -> None:
            if endpoint == HUB2:
                sent.append((mesh.net.now, len(data)))
            original(data, endpoint)

        mesh.home.node.send_datagram = record  # type: ignore[method-assign]
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        self.assertEqual(policy.nat.filtering, "address-or-port-dependent")
        # The request is the first 96-byte message (a late-reply request) to the second hub.
        first = next(i for i, (_, size) in enumerate(sent) if size == 96)
        # The keepalive it replaced was armed with the 25 s in force before the measurement.
        gap = sent[first][0] - sent[first - 1][0]
        self.assertGreaterEqual(gap, K.DEFAULT_INTERVAL - 1.0)
