"""Path MTU discovery over a simulated path: schedule, convergence, loss, shrink, growth, roaming,
and what the node does with packets that do not fit (ICMP, fragments, MSS clamping)."""

from __future__ import annotations

import random
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.mss import clamp_mss
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.pmtu import (
    RECHECK_INTERVAL,
    STEADY,
    PathMTUDiscovery,
)
from meshguard.testing.memory import MemoryNetwork, PathMTULimit
from tests.packets import ipv4, ipv6
from tests.test_device import Pair

A_NEW_EP = ("192.0.2.77", 40000)


def tcp_syn(mss: int) -> bytes:
    """A TCP SYN header (no payload) with the MSS option then NOP NOP SACK-permitted."""
    options = struct.pack("!BBH", 2, 4, mss) + b"\x01\x01\x04\x02"
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", 40000, 22, 1, 0, offset << 4, 0x02, 65535, 0, 0)
    return header + options


class Mesh:
    """Two meshguard devices with agents and path MTU features over one limited path."""

    def __init__(self, path_mtu: int | None, route_mtu: int = 1500, seed: int = 1) -> None:
        self.pair = Pair(seed)
        self.net: MemoryNetwork = self.pair.net
        self.limit = PathMTULimit(path_mtu)
        self.net.filters.append(self.limit)
        self.route = route_mtu
        self.changes: list[tuple[str, int]] = []
        self.agent_a = MeshAgent(self.pair.a.device)
        self.agent_b = MeshAgent(self.pair.b.device)
        self.pmtu_a = PathMTUDiscovery(
            self.pair.a.device,
            route_mtu=lambda endpoint: self.route,
            on_change=lambda peer, mtu: self.changes.append(("a", mtu)),
        )
        self.pmtu_b = PathMTUDiscovery(
            self.pair.b.device,
            route_mtu=lambda endpoint: self.route,
            on_change=lambda peer, mtu: self.changes.append(("b", mtu)),
        )
        self.agent_a.add_feature(self.pmtu_a)
        self.agent_b.add_feature(self.pmtu_b)
        self.start = self.net.now
        self.pair.a_to_b()
        self.run(5)

    @property
    def peer_of_a(self) -> Peer:
        return self.pair.peer_of_a

    @property
    def peer_of_b(self) -> Peer:
        return self.pair.peer_of_b

    def run(self, seconds: float) -> None:
        """Let time pass, firing device and agent timers at their own instants."""
        net = self.net
        end = net.now + seconds
        agents = (self.agent_a, self.agent_b)
        for _ in range(1_000_000):
            net.flush()
            deadlines = [d for d in [net.next_deadline()] if d is not None]
            deadlines += [d for a in agents if (d := a.next_deadline()) is not None]
            if not deadlines or min(deadlines) > end:
                break
            net.now = max(net.now, min(deadlines))
            for node in list(net.nodes.values()):
                node.device.run_timers(net.now)
            for agent in agents:
                agent.run_timers(net.now)
        net.now = end
        net.flush()

    def run_until_steady(self, limit: float = 60.0) -> float:
        """Run in 10 ms steps until A's prober is steady; returns the time it took."""
        state = self.pmtu_a.peers.get(self.peer_of_a.public_key)
        begin = self.net.now
        while self.net.now - begin < limit:
            state = self.pmtu_a.peers.get(self.peer_of_a.public_key)
            if state is not None and state.state == STEADY:
                return self.net.now - begin
            self.run(0.01)
        raise AssertionError(f"not steady after {limit} s: {state}")


class ConvergenceTests(SynchronousTestCase):
    def test_right_guess_confirmed_in_one_round(self) -> None:
        """When the route's MTU is the path's, the first round's acknowledgements settle it:
        no timeout is waited for and six probes (three sizes, two copies) were sent."""
        mesh = Mesh(path_mtu=None, route_mtu=1500)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        self.assertEqual(state.state, STEADY)
        self.assertEqual(state.converged_in, 0.0)
        self.assertEqual(state.searches, 1)
        self.assertEqual(state.probes, 6)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1440)  # 1500 - 20 - 8 - 32
        self.assertEqual(mesh.peer_of_b.inner_mtu, 1440)
        status = mesh.pmtu_a.peer_status(mesh.peer_of_a)
        self.assertEqual(status["path_mtu"], 1500)
        self.assertEqual(status["path_mtu_source"], "probe")

    def test_blackhole_1280_found(self) -> None:
        """A 1280 path under a 1500 route: 1216 (the largest 16-aligned inner size that fits
        1280 - 60) within two probe timeouts; both sides find it, MSS uses both."""
        mesh = Mesh(path_mtu=1280)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        self.assertEqual(state.state, STEADY)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1216)
        self.assertEqual(mesh.peer_of_b.inner_mtu, 1216)
        assert state.converged_in is not None
        self.assertLessEqual(state.converged_in, 1.0 + 0.2 + 1e-6)
        self.assertLessEqual(state.probes, 14)
        mesh.run(RECHECK_INTERVAL + 1)
        self.assertEqual(mesh.peer_of_a.mss_mtu, 1216)
        self.assertEqual(mesh.pmtu_a.peer_status(mesh.peer_of_a)["path_mtu"], 1276)

    def test_odd_path_mtus(self) -> None:
        """Whatever the path's MTU, the result is the largest 16-aligned size that fits."""
        for mtu in (576, 1000, 1280, 1380, 1420, 1460, 1492, 1499):
            mesh = Mesh(path_mtu=mtu)
            mesh.run(5)
            self.assertEqual(mesh.peer_of_a.inner_mtu, (mtu - 60) & ~15, mtu)

    def test_lost_copy_is_not_too_big(self) -> None:
        """Every first copy of every probe lost: the second copies still find the exact size."""
        mesh = Mesh(path_mtu=None)  # settle once, then break the path and search again
        dropped = {"n": 0}

        def drop_first_copies(data: bytes, source: object, destination: object) -> bool:
            if len(data) > 300:
                dropped["n"] += 1
                return dropped["n"] % 2 == 0
            return True

        mesh.net.filters.append(drop_first_copies)
        mesh.limit.mtu = 1380
        assert mesh.peer_of_a.endpoint is not None
        mesh.pmtu_a.start(mesh.peer_of_a, mesh.net.now)
        mesh.run_until_steady()
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1312)

    def test_random_loss_converges(self) -> None:
        """20 % random loss of every datagram: the result never exceeds what fits, and with
        these seeds it is exact."""
        for seed in range(5):
            mesh = Mesh(path_mtu=None)
            rng = random.Random(seed)
            mesh.net.filters.append(lambda d, s, t, rng=rng: rng.random() >= 0.2)
            mesh.limit.mtu = 1400
            mesh.pmtu_a.start(mesh.peer_of_a, mesh.net.now)
            mesh.run_until_steady(limit=120)
            self.assertLessEqual(mesh.peer_of_a.inner_mtu, 1340)
            self.assertGreaterEqual(mesh.peer_of_a.inner_mtu, 1280)

    def test_local_emsgsize_is_conclusive(self) -> None:
        """A probe the local stack refuses (EMSGSIZE) is too big at once, no timeout."""
        mesh = Mesh(path_mtu=None, route_mtu=9000)
        node = mesh.pair.a
        sent: list[int] = []

        def send_probe(data: bytes, endpoint: tuple[str, int]) -> bool:
            sent.append(len(data))
            if len(data) + 28 > 1500:
                return False
            node.send_datagram(data, endpoint)
            return True

        node.send_probe = send_probe  # type: ignore[attr-defined]
        mesh.pmtu_a.start(mesh.peer_of_a, mesh.net.now)
        took = mesh.run_until_steady()
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1440)
        self.assertLess(took, 0.05)


class ScheduleTests(SynchronousTestCase):
    def test_steady_state_is_cheap(self) -> None:
        """Once settled: two probes (current size and one step up) per re-check interval."""
        mesh = Mesh(path_mtu=1280)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        before = state.probes
        for _ in range(10):
            mesh.pair.a_to_b()  # traffic keeps the session (and so the probing) alive
            mesh.run(RECHECK_INTERVAL)
        self.assertEqual(state.probes - before, 2 * 10)
        self.assertEqual(state.searches, 1)

    def test_shrink_noticed(self) -> None:
        """The path shrinks 1500 -> 1280: three unanswered re-checks, then a new search."""
        mesh = Mesh(path_mtu=1500)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1440)
        mesh.limit.mtu = 1280
        mesh.pair.a_to_b()  # the tunnel is in use (an idle one is not re-checked)
        mesh.run(RECHECK_INTERVAL + 5)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1216)
        self.assertIn(("a", 1216), mesh.changes)

    def test_idle_tunnel_is_not_rechecked(self) -> None:
        """No data either way: no re-check probes, so the NAT and the peer may sleep (the
        keepalive policy counts on it); data again: re-checks resume."""
        mesh = Mesh(path_mtu=1500)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        mesh.run(RECHECK_INTERVAL + 1)  # the first re-check sees the initial packet's data
        before = state.probes
        mesh.run(5 * RECHECK_INTERVAL)
        self.assertEqual(state.probes, before)
        mesh.pair.a_to_b()
        mesh.run(RECHECK_INTERVAL + 1)
        self.assertGreater(state.probes, before)

    def test_growth_noticed(self) -> None:
        """The path grows 1280 -> 1500: the step-up probe passes and the search goes up."""
        mesh = Mesh(path_mtu=1280)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1216)
        mesh.limit.mtu = 1500
        mesh.run(RECHECK_INTERVAL + 2)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1440)

    def test_roaming_restarts(self) -> None:
        """B moves to a new endpoint: A searches again toward the new endpoint."""
        mesh = Mesh(path_mtu=1500)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        self.assertEqual(state.searches, 1)
        mesh.net.move(mesh.pair.b, A_NEW_EP)
        mesh.pair.b_to_a()  # B's traffic from its new address tells A where it went
        mesh.run(6)
        self.assertEqual(mesh.peer_of_a.endpoint, A_NEW_EP)
        self.assertEqual(state.endpoint, A_NEW_EP)
        self.assertEqual(state.searches, 2)
        self.assertEqual(state.state, STEADY)

    def test_peer_gone_is_failed_not_tiny(self) -> None:
        """No probe gets through at all: probing failed, the enforced MTU is not lowered."""
        mesh = Mesh(path_mtu=1500)
        mesh.limit.mtu = 100
        mesh.pair.a_to_b()
        mesh.run(RECHECK_INTERVAL + 10)
        self.assertEqual(mesh.peer_of_a.inner_mtu, 1440)
        state = mesh.pmtu_a.peers[mesh.peer_of_a.public_key]
        self.assertEqual(state.state, "failed")


class EnforcementTests(SynchronousTestCase):
    def test_df_packet_gets_frag_needed(self) -> None:
        mesh = Mesh(path_mtu=1280)
        packet = ipv4("10.0.0.1", "10.0.0.2", bytes(1300))
        mesh.pair.a.written.clear()
        mesh.net.send(mesh.pair.a, packet)
        (error,) = mesh.pair.a.written
        self.assertEqual(error[9], 1)  # ICMP
        self.assertEqual(error[20:22], b"\x03\x04")
        self.assertEqual(struct.unpack("!H", error[26:28])[0], 1216)
        self.assertEqual(error[12:16], packet[16:20])
        self.assertEqual(error[16:20], packet[12:16])
        self.assertEqual(mesh.pmtu_a.icmp_sent, 1)

    def test_no_df_packet_is_fragmented(self) -> None:
        mesh = Mesh(path_mtu=1280)
        packet = bytearray(ipv4("10.0.0.1", "10.0.0.2", bytes(range(256)) * 10))
        packet[6] = 0  # clear DF (the header checksum is not checked on this path)
        mesh.pair.b.written.clear()
        mesh.net.send(mesh.pair.a, bytes(packet))
        self.assertEqual(len(mesh.pair.b.written), 3)
        self.assertEqual(b"".join(f[20:] for f in mesh.pair.b.written), bytes(packet[20:]))
        self.assertTrue(all(len(f) <= 1216 for f in mesh.pair.b.written))

    def test_v6_gets_packet_too_big(self) -> None:
        mesh = Mesh(path_mtu=1400)
        mesh.run(1)
        packet = ipv6("fd00::2", "fd00::1", bytes(1400))
        self.assertLess(mesh.peer_of_b.inner_mtu, len(packet))
        mesh.pair.b.written.clear()
        mesh.pair.b.device.packet_from_tun(packet, mesh.net.now)
        (error,) = mesh.pair.b.written
        self.assertEqual(error[6], 58)
        self.assertEqual(error[40], 2)
        self.assertEqual(struct.unpack("!I", error[44:48])[0], 1328)

    def test_syn_clamped_both_directions(self) -> None:
        """SYNs A->B and B->A through the tunnel leave with MSS = tunnel MTU - 40."""
        mesh = Mesh(path_mtu=1280)
        mesh.run(RECHECK_INTERVAL + 1)
        syn = ipv4("10.0.0.1", "10.0.0.2", tcp_syn(1460), protocol=6)
        mesh.pair.b.written.clear()
        mesh.net.send(mesh.pair.a, syn)
        (arrived,) = mesh.pair.b.written
        self.assertEqual(struct.unpack("!H", arrived[42:44])[0], 1176)
        self.assertEqual(arrived, clamp_mss(syn, 1216))
        back = ipv4("10.0.0.2", "10.0.0.1", tcp_syn(1460), protocol=6)
        # Clamped on receipt too: turn off A->B clamping on B's sending side to see A do it.
        mesh.peer_of_b.mss_mtu = 0
        mesh.pair.a.written.clear()
        mesh.net.send(mesh.pair.b, back)
        (arrived,) = mesh.pair.a.written
        self.assertEqual(struct.unpack("!H", arrived[42:44])[0], 1176)


class HostileTests(SynchronousTestCase):
    @given(kind=st.sampled_from([kinds.PMTU_PROBE, kinds.PMTU_ACK]), body=st.binary(max_size=64))
    def test_garbage_bodies(self, kind: int, body: bytes) -> None:
        """Any body from an authenticated peer is handled or ignored, never raised."""
        mesh = _hostile_mesh()
        mesh.pmtu_a.control_received(mesh.peer_of_a, kind, body, mesh.net.now)
        mesh.net.flush()


_MESH: Mesh | None = None


def _hostile_mesh() -> Mesh:
    global _MESH
    if _MESH is None:
        _MESH = Mesh(path_mtu=1280)
    return _MESH
