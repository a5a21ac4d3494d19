"""The real-network harness, proven with stock tools only (wireguard-go, wg, ping, nft)."""

from __future__ import annotations

import os
import unittest
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from tests import netns
from tests.netns import (
    Testbed,
    blackhole_drops,
    block_udp,
    nat_home,
    pmtu_blackhole,
    require_root_netns,
    two_hosts,
    unblock_udp,
    wireguard_go_pair,
)


class RequireRootNetnsTests(SynchronousTestCase):
    """Missing prerequisites skip locally and fail on CI."""

    def test_skips_outside_ci(self) -> None:
        """Without CI=true a missing binary is a skip."""
        with mock.patch.dict(os.environ, {"CI": "false"}):
            with self.assertRaises(unittest.SkipTest):
                require_root_netns(self, binaries=["mg-no-such-binary"])

    def test_fails_on_ci(self) -> None:
        """With CI=true a missing binary is a test failure, never a skip."""
        with mock.patch.dict(os.environ, {"CI": "true"}):
            with self.assertRaises(self.failureException):
                require_root_netns(self, binaries=["mg-no-such-binary"])


class TestbedTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def test_names_unique_and_short(self) -> None:
        """Interface names carry the run prefix, fit in 15 characters and are never reused."""
        name = self.tb.ifname("wg0")
        self.assertTrue(name.startswith(self.tb.prefix))
        self.assertLessEqual(len(name), 15)
        self.assertRaises(ValueError, self.tb.ifname, "wg0")
        self.assertRaises(ValueError, self.tb.ifname, "x" * 8)
        self.assertNotEqual(Testbed(self).prefix, self.tb.prefix)

    def test_cleanup_removes_what_it_created(self) -> None:
        """cleanup() stops processes, deletes namespaces and UAPI sockets; twice is harmless."""
        hosts = two_hosts(self.tb)
        ifname = self.tb.ifname("wg")
        proc = self.tb.start_wireguard_go(hosts.a, ifname)
        sock = self.tb.uapi_socket(ifname)
        self.assertTrue(sock.exists())
        self.tb.cleanup()
        self.assertIsNotNone(proc.poll())
        self.assertFalse(sock.exists())
        self.assertFalse(os.path.exists(f"/run/netns/{hosts.a}"))
        self.assertFalse(os.path.exists(f"/run/netns/{hosts.b}"))
        self.tb.cleanup()

    def test_wait_for_is_bounded(self) -> None:
        """wait_for raises, naming what it waited for, once the deadline passes."""
        with self.assertRaises(netns.WaitTimeoutError) as cm:
            self.tb.wait_for(lambda: False, timeout=0.1, what="the impossible")
        self.assertIn("the impossible", str(cm.exception))

    def test_command_failure_carries_stderr(self) -> None:
        """A failing command raises CommandError with its stderr."""
        ns = self.tb.netns("x")
        with self.assertRaises(netns.CommandError) as cm:
            self.tb.ip(ns, "link", "set", "dev", "nosuchdev", "up")
        self.assertIn("nosuchdev", str(cm.exception))


class WireGuardGoPairTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def test_tunnel_both_directions(self) -> None:
        """Two wireguard-go peers configured with wg: ping v4 and v6 both ways, verified TCP."""
        hosts = two_hosts(self.tb, v6=True)
        pair = wireguard_go_pair(self.tb, hosts, outer_v6=True)
        self.tb.wait_for(
            lambda: self.tb.ping(hosts.a, pair.b_tun, timeout=1),
            timeout=15,
            what="first ping A -> B through the tunnel",
        )
        self.assertTrue(self.tb.ping(hosts.b, pair.a_tun))
        self.assertTrue(self.tb.ping(hosts.a, pair.b_tun6))
        self.assertTrue(self.tb.ping(hosts.b, pair.a_tun6))
        self.assertTrue(self.tb.latest_handshake(hosts.a, pair.a_if, pair.b_key.public) > 0)
        self.assertTrue(self.tb.tcp_transfer(hosts.b, hosts.a, pair.b_tun, 1 << 20))
        self.assertTrue(self.tb.tcp_transfer(hosts.a, hosts.b, pair.a_tun6, 1 << 20))


class TopologyTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def test_nat_home(self) -> None:
        """home reaches hub through masquerade; hub cannot reach home; conntrack timeout is
        set in the router only."""
        nat = nat_home(self.tb, conntrack_timeout=5)
        self.assertTrue(self.tb.ping(nat.home, nat.hub_addr))
        self.assertFalse(self.tb.ping(nat.hub, nat.home_addr, timeout=0.5))
        self.assertTrue(self.tb.udp_reachable(nat.hub, nat.home, nat.hub_addr))
        key = "net.netfilter.nf_conntrack_udp_timeout"
        self.assertEqual(self.tb.read_sysctl(nat.router, key), "5")
        self.assertEqual(self.tb.read_sysctl(nat.router, key + "_stream"), "5")

    def test_block_udp(self) -> None:
        """block_udp drops UDP through the router while ICMP still passes; unblock restores."""
        nat = nat_home(self.tb, hard=True)
        block_udp(self.tb, nat.router)
        self.assertTrue(self.tb.ping(nat.home, nat.hub_addr))
        self.assertFalse(self.tb.udp_reachable(nat.hub, nat.home, nat.hub_addr, timeout=1))
        unblock_udp(self.tb, nat.router)
        self.assertTrue(self.tb.udp_reachable(nat.hub, nat.home, nat.hub_addr))

    def test_pmtu_blackhole(self) -> None:
        """A large don't-fragment ping vanishes in the black hole, its ICMP error dropped by mid;
        a small one passes (v4, v6)."""
        bh = pmtu_blackhole(self.tb, mtu=1280)
        for dst in (bh.b_addr, bh.b_addr6):
            self.assertTrue(self.tb.ping(bh.a, dst, size=1000, dont_fragment=True))
            before = blackhole_drops(self.tb, bh)
            self.assertFalse(
                self.tb.ping(bh.a, dst, size=1400, dont_fragment=True, count=2, timeout=1)
            )
            self.assertGreater(blackhole_drops(self.tb, bh), before)
        # A never learned the small path MTU: the route to B carries no cached MTU.
        self.assertNotIn("mtu", self.tb.ip(bh.a, "route", "get", bh.b_addr))
