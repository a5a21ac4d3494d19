"""Path MTU discovery toward a stock WireGuard peer: padded ICMP echo through the tunnel, the
replies taken out of the receive path, the same search as between meshguard nodes."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.icmp import echo_reply, echo_request
from meshguard.core.peer import Peer
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.pmtu import (
    FAILED,
    GUESS_RETRY_AFTER,
    RECHECK_INTERVAL,
    STEADY,
    STOCK_GRACE,
    PathMTUDiscovery,
)
from meshguard.testing.memory import MemoryNetwork, PathMTULimit
from tests.packets import ipv4
from tests.test_device import A_EP, Pair

A_ADDR = ipaddress.ip_interface("10.0.0.1/24")
A_ADDR6 = ipaddress.ip_interface("fd00::1/64")


class OneWayLimit(PathMTULimit):
    """A path MTU limit on datagrams toward ``destination`` only."""

    def __init__(self, mtu: int | None, destination: tuple[str, int]) -> None:
        super().__init__(mtu)
        self.destination = destination

    def __call__(self, data: bytes, source: tuple[str, int], destination: tuple[str, int]) -> bool:
        return destination != self.destination or super().__call__(data, source, destination)


class StockPeer:
    """A: meshguard (agent + path MTU); B: a stock device whose host answers pings."""

    def __init__(
        self,
        path_mtu: int | None,
        *,
        route_mtu: int = 1500,
        answers: bool = True,
        addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = (A_ADDR,),
        v6: bool = False,
        b_meshguard: bool = False,
    ) -> None:
        self.pair = Pair(1)
        self.net: MemoryNetwork = self.pair.net
        self.limit = PathMTULimit(path_mtu)
        self.net.filters.append(self.limit)
        self.pair.b.answers_echo = answers
        if v6:
            self.pair.a.device.replace_allowed_ips(
                self.peer,
                [ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::2/128")],
            )
        if b_meshguard:
            self.agent_b = MeshAgent(self.pair.b.device)
            self.agent_b.add_feature(PathMTUDiscovery(self.pair.b.device, route_mtu=lambda e: 1500))
            self.net.timed.append(self.agent_b)
        self.agent = MeshAgent(self.pair.a.device)
        self.pmtu = PathMTUDiscovery(
            self.pair.a.device,
            route_mtu=lambda endpoint: route_mtu,
            local_addresses=lambda: addresses,
        )
        self.agent.add_feature(self.pmtu)
        self.net.timed.append(self.agent)
        self.pair.a_to_b()

    @property
    def peer(self) -> Peer:
        return self.pair.peer_of_a

    def replies_written(self) -> list[bytes]:
        """Echo replies that reached A's TUN device (the OS)."""
        return [
            p
            for p in self.pair.a.written
            if (p[0] == 0x45 and p[9] == 1 and p[20] == 0) or (p[0] >> 4 == 6 and p[40] == 129)
        ]


class StockPeerTests(SynchronousTestCase):
    def test_blackhole_1280_found_with_echo(self) -> None:
        """A 1280 path under a 1500 route toward a stock peer: echo probes find 1216 after the
        hello grace; the source says icmp-echo and no reply reaches A's TUN device."""
        s = StockPeer(path_mtu=1280)
        s.net.advance(STOCK_GRACE + 5)
        state = s.pmtu.peers[s.peer.public_key]
        self.assertEqual(state.state, STEADY)
        self.assertEqual(s.peer.inner_mtu, 1216)
        self.assertEqual(s.peer.mss_mtu, 1216)
        assert state.converged_in is not None
        self.assertLessEqual(state.converged_in, 1.0 + 0.2 + 1e-6)
        self.assertLessEqual(state.probes, 14)
        status = s.pmtu.peer_status(s.peer)
        self.assertEqual(status["path_mtu_source"], "icmp-echo")
        self.assertEqual(status["path_mtu"], 1276)
        self.assertEqual(s.replies_written(), [])
        self.assertFalse(s.peer.is_meshguard)

    def test_right_guess_in_one_round(self) -> None:
        """No limit below the route: the first round's replies settle 1440 at once."""
        s = StockPeer(path_mtu=None)
        s.net.advance(STOCK_GRACE + 1)
        state = s.pmtu.peers[s.peer.public_key]
        self.assertEqual((state.state, state.converged_in, state.probes), (STEADY, 0.0, 6))
        self.assertEqual(s.peer.inner_mtu, 1440)

    def test_smaller_return_path_counts(self) -> None:
        """The replies are as big as the requests: a return path of 1380 under a forward one
        of 1500 gives 1312, the smaller of both directions."""
        s = StockPeer(path_mtu=None)
        s.net.filters.append(OneWayLimit(1380, A_EP))
        s.net.advance(STOCK_GRACE + 5)
        self.assertEqual(s.peer.inner_mtu, 1312)

    def test_ipv6_tunnel_address(self) -> None:
        """With only an IPv6 interface address, ICMPv6 echo to the peer's /128 is used."""
        s = StockPeer(path_mtu=1280, addresses=(A_ADDR6,), v6=True)
        s.net.advance(STOCK_GRACE + 5)
        self.assertEqual(s.peer.inner_mtu, 1216)
        addresses = s.pmtu.echo_addresses(s.peer)
        assert addresses is not None
        self.assertEqual(addresses[1], ipaddress.ip_address("fd00::2").packed)
        self.assertEqual(s.replies_written(), [])

    def test_peer_filtering_ping_falls_back_to_route(self) -> None:
        """A peer that does not answer pings: probing fails, nothing is enforced and the
        status shows the route's MTU."""
        s = StockPeer(path_mtu=1280, answers=False)
        s.net.advance(STOCK_GRACE + 10)
        self.assertEqual(s.pmtu.peers[s.peer.public_key].state, FAILED)
        self.assertEqual(s.peer.inner_mtu, 65535)
        status = s.pmtu.peer_status(s.peer)
        self.assertEqual((status["path_mtu"], status["path_mtu_source"]), (1500, "route"))

    def test_no_tunnel_address_no_probes(self) -> None:
        """Without an interface address of ours there is no source for echo: no probing."""
        s = StockPeer(path_mtu=1280, addresses=())
        s.net.advance(STOCK_GRACE + 5)
        self.assertNotIn(s.peer.public_key, s.pmtu.peers)

    def test_shrink_and_growth_followed(self) -> None:
        """Steady-state re-checks with echo notice the path shrinking and growing."""
        s = StockPeer(path_mtu=1500)
        s.net.advance(STOCK_GRACE + 1)
        self.assertEqual(s.peer.inner_mtu, 1440)
        s.limit.mtu = 1280
        for _ in range(2):
            s.pair.a_to_b()  # traffic keeps a session, so probing goes on
            s.net.advance(RECHECK_INTERVAL / 2 + 3)
        self.assertEqual(s.peer.inner_mtu, 1216)
        s.limit.mtu = 1500
        for _ in range(3):
            s.pair.a_to_b()
            s.net.advance(RECHECK_INTERVAL / 2)
        self.assertEqual(s.peer.inner_mtu, 1440)

    def _subnet_gateway(self, peer_networks: list[str], *, answers: bool = True) -> StockPeer:
        """A stock peer that is the gateway of a subnet (no host route of its own): we are
        10.9.0.5/24 and the peer's AllowedIPs are ``peer_networks``."""
        ours = ipaddress.ip_interface("10.9.0.5/24")
        s = StockPeer(path_mtu=1280, addresses=(ours,), answers=answers)
        s.pair.a.device.replace_allowed_ips(
            s.peer, [ipaddress.ip_network(n) for n in peer_networks]
        )
        s.pair.b.device.replace_allowed_ips(s.pair.peer_of_b, [ipaddress.ip_network("10.9.0.5/32")])
        return s

    def test_subnet_gateway_probed_at_the_first_host(self) -> None:
        """AllowedIPs 10.9.0.0/24 with no /32: the guess 10.9.0.1 answers, 1216 is found, and
        the status names the target as a guess."""
        s = self._subnet_gateway(["10.9.0.0/24"])
        target = s.pmtu.echo_target(s.peer)
        self.assertEqual(target, (bytes([10, 9, 0, 5]), bytes([10, 9, 0, 1]), True))
        s.net.advance(STOCK_GRACE + 5)
        self.assertEqual(s.peer.inner_mtu, 1216)
        status = s.pmtu.peer_status(s.peer)
        self.assertEqual(status["pmtu_echo_target"], "10.9.0.1")
        self.assertTrue(status["pmtu_echo_target_guessed"])

    def test_default_route_peer_guessed_in_our_own_subnet(self) -> None:
        """A VPN-style peer with AllowedIPs 0.0.0.0/0: the first host of our own interface's
        subnet routes to it and is tried; 0.0.0.1 never is."""
        s = self._subnet_gateway(["0.0.0.0/0"])
        self.assertEqual(
            s.pmtu.echo_target(s.peer), (bytes([10, 9, 0, 5]), bytes([10, 9, 0, 1]), True)
        )
        s.net.advance(STOCK_GRACE + 5)
        self.assertEqual(s.peer.inner_mtu, 1216)

    def test_host_route_preferred_and_guess_never_ours_or_another_peers(self) -> None:
        s = self._subnet_gateway(["10.9.0.0/24", "10.9.0.7/32"])
        self.assertEqual(
            s.pmtu.echo_target(s.peer), (bytes([10, 9, 0, 5]), bytes([10, 9, 0, 7]), False)
        )
        # Our own address is the first host: no guess there (nor in 0.0.0.0/0's 0.0.0.1).
        ours = ipaddress.ip_interface("10.9.0.1/24")
        s.pmtu.local_addresses = lambda: (ours,)
        s.pair.a.device.replace_allowed_ips(s.peer, [ipaddress.ip_network("10.9.0.0/24")])
        self.assertIsNone(s.pmtu.echo_target(s.peer))

    def test_silent_guess_is_retried_rarely(self) -> None:
        """Nobody answers at the guessed address: one failed search, then nothing for
        GUESS_RETRY_AFTER seconds; the route MTU is shown."""
        s = self._subnet_gateway(["10.9.0.0/24"], answers=False)
        s.net.advance(STOCK_GRACE + 10)
        state = s.pmtu.peers[s.peer.public_key]
        self.assertEqual(state.state, FAILED)
        probes = state.probes
        self.assertEqual(GUESS_RETRY_AFTER, 600.0)
        for _ in range(10):  # 300 s of traffic
            s.net.send(s.pair.a, ipv4("10.9.0.5", "10.9.0.1", b"traffic"))
            s.net.advance(RECHECK_INTERVAL)
        self.assertEqual(state.probes, probes)
        for _ in range(12):  # 360 s more
            s.net.send(s.pair.a, ipv4("10.9.0.5", "10.9.0.1", b"traffic"))
            s.net.advance(RECHECK_INTERVAL)
        self.assertGreater(state.probes, probes)  # tried again, once its time came
        self.assertEqual(s.pmtu.peer_status(s.peer)["path_mtu_source"], "route")

    def test_other_echo_replies_reach_the_tun(self) -> None:
        """Replies to the host's own pings (another identifier, or ours without the probe
        marker) are written to the TUN device as usual."""
        s = StockPeer(path_mtu=None)
        s.net.advance(STOCK_GRACE + 1)
        a, b = A_ADDR.ip.packed, ipaddress.ip_address("10.0.0.2").packed
        ident = int.from_bytes(s.pmtu.echo_ident)
        s.pair.a.written.clear()
        for request in (
            echo_request(a, b, ident ^ 1, b"ping payload"),
            echo_request(a, b, ident, b"same identifier, no marker"),
        ):
            s.net.send(s.pair.a, request)
        self.assertEqual(len(s.replies_written()), 2)

    def test_meshguard_peer_not_probed_with_echo(self) -> None:
        """A peer that says hello within the grace period is probed over the control channel."""
        s = StockPeer(path_mtu=1280, answers=False, b_meshguard=True)
        s.net.advance(STOCK_GRACE + 5)
        self.assertTrue(s.peer.is_meshguard)
        self.assertEqual(s.pmtu.peer_status(s.peer)["path_mtu_source"], "probe")
        self.assertEqual(s.peer.inner_mtu, 1216)


class EchoPacketTests(SynchronousTestCase):
    def test_reply_mirrors_request(self) -> None:
        """The in-memory host's reply swaps the addresses, keeps size, identifier and payload,
        and has valid checksums."""
        a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
        request = echo_request(a, b, 0x1234, b"x" * 100)
        reply = echo_reply(request)
        assert reply is not None
        self.assertEqual(len(reply), len(request))
        self.assertEqual((reply[12:16], reply[16:20], reply[20]), (b, a, 0))
        self.assertEqual(reply[24:], request[24:])
        from meshguard.core.icmp import checksum

        self.assertEqual(checksum(reply[:20]), 0)
        self.assertEqual(checksum(reply[20:]), 0)

    def test_not_a_request(self) -> None:
        self.assertIsNone(echo_reply(ipv4("10.0.0.1", "10.0.0.2", b"hello")))
        self.assertIsNone(echo_reply(b""))
