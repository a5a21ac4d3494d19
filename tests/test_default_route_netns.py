"""A peer that takes all traffic (AllowedIPs = 0.0.0.0/0), for real: no routing loop.

meshguard in A sends everything through its tunnel to wireguard-go in B, the way wg-quick sets it
up (fwmark on the socket, policy rules): an address that exists only behind B answers, the
encrypted datagrams still reach B directly, and stopping the node removes the rules.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests import netns


class FullTunnelTests(TestCase):
    timeout = 120

    def test_all_traffic_through_tunnel(self) -> None:
        netns.require_root_netns(self)
        tb = netns.Testbed(self)
        hosts = netns.two_hosts(tb)
        mg_if, go_if = tb.ifname("mg"), tb.ifname("go")
        mg_key, go_key = netns.wg_keypair(), netns.wg_keypair()
        tb.start_wireguard_go(hosts.b, go_if)
        tb.wg_set_interface(hosts.b, go_if, go_key.private, 51821)
        tb.wg_set_peer(hosts.b, go_if, mg_key.public, allowed_ips=("10.99.0.1/32",))
        tb.addr(hosts.b, go_if, "10.99.0.2/24")
        tb.up(hosts.b, go_if)
        # An address that exists only behind B: A can reach it only through the tunnel.
        tb.addr(hosts.b, "lo", "10.200.0.1/32")
        text = netns.meshguard_config_text(
            mg_key.private,
            listen_port=51820,
            addresses=("10.99.0.1/24",),
            peers=[
                netns.MeshguardPeer(
                    go_key.public,
                    allowed_ips=("0.0.0.0/0",),
                    endpoint=f"{hosts.b_addr}:51821",
                )
            ],
        )
        config = netns.write_meshguard_config(tb.log_dir / f"{mg_if}.conf", text)
        proc = netns.start_meshguard(tb, hosts.a, config, mg_if)
        rules = tb.run(hosts.a, ["ip", "-4", "rule", "show"]).stdout
        self.assertIn("not from all fwmark 0xca6c lookup 51820", rules)
        tb.wait_for(lambda: tb.ping(hosts.a, "10.200.0.1"), timeout=15, what="ping via tunnel")
        self.assertTrue(tb.ping(hosts.a, "10.99.0.2"))
        self.assertEqual(netns.wg_dump(tb, hosts.a, mg_if)[0][3], "0xca6c")  # the socket mark
        tb.stop(proc)
        rules = tb.run(hosts.a, ["ip", "-4", "rule", "show"]).stdout
        self.assertNotIn("51820", rules)
