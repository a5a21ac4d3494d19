"""IPv6 direct paths: homes with global IPv6 behind stateful v6 firewalls (nothing new comes in)
and NATed IPv4 reach each other directly over IPv6, learned from the candidates the mesh shares;
the introducer forwards nothing for them during a transfer."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.natmesh import start_mesh
from tests.netns import Testbed, nat_homes, require_root_netns


class Ipv6DirectTests(TestCase):
    timeout = 240

    def _pair(self, kind: str) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, kind), (1, kind)], ipv6=True, wan_filter=False)
        mesh = start_mesh(tb, net)
        v6 = [home.v6[0] for home in net.homes]

        def on_v6() -> bool:
            a, b = mesh.peer(0, 1), mesh.peer(1, 0)
            return (
                a.get("path_kind") == "direct-v6"
                and b.get("path_kind") == "direct-v6"
                and (a.get("endpoint") or [""])[0] == v6[1]
                and (b.get("endpoint") or [""])[0] == v6[0]
            )

        tb.wait_for(on_v6, timeout=60, interval=1.0, what="both members on IPv6")
        before = mesh.forwarded(0, 1)
        self.assertTrue(
            tb.tcp_transfer(mesh.namespaces[1], mesh.namespaces[0], mesh.addresses[1], 2**20)
        )
        self.assertEqual(mesh.forwarded(0, 1), before)
        self.assertTrue(on_v6())

    def test_easy_nats_use_ipv6(self) -> None:
        """IPv4 behind plain masquerade (it could punch): the pair still moves to IPv6."""
        self._pair("easy")

    def test_hard_nats_use_ipv6(self) -> None:
        """IPv4 behind ``masquerade random`` on both sides (relayed over IPv4): IPv6 is direct."""
        self._pair("hard")
