"""meshguard against stock WireGuard, and against itself, over a real veth between namespaces.

Every case moves a 100 MB TCP stream with its SHA-256 checked, so a corrupted, truncated or
reordered-and-lost byte anywhere in the data path fails the test, not just a lost ping. The
cases are combined so that each of these is covered at least once while keeping runtime low:
outer IPv4 and IPv6, inner IPv4 and IPv6 in both directions, meshguard as the handshake's
initiator and as its responder, with and without a preshared key, and two meshguard nodes both
started through ``twistd``.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    MeshguardGoPair,
    MeshguardPeer,
    Namespace,
    Testbed,
    meshguard_config_text,
    meshguard_go_pair,
    require_root_netns,
    start_meshguard,
    two_hosts,
    wg_dump,
    wg_keypair,
    write_meshguard_config,
)

MB100 = 100 * 1000 * 1000

#: Another wireguard-go build to test against besides the one on PATH (Debian's): the current
#: upstream, with its TUN and UDP offloads. Set MESHGUARD_WIREGUARD_GO_CURRENT to its path; on
#: the development machine the reference build's usual place is tried. Absent: those cases skip.
CURRENT_WIREGUARD_GO = os.environ.get(
    "MESHGUARD_WIREGUARD_GO_CURRENT", "/work/shared/bin/wireguard-go"
)


class InteropMixin:
    tb: Testbed

    def assert_pings(self, ns: Namespace, addr: str, timeout: float = 15.0) -> None:
        """A ping answered within ``timeout`` (the first one may wait for a handshake)."""
        self.tb.wait_for(
            lambda: self.tb.ping(ns, addr, timeout=1), timeout=timeout, what=f"ping {addr} in {ns}"
        )

    def assert_transfer(self, server: Namespace, client: Namespace, addr: str, seed: int) -> None:
        ok = self.tb.tcp_transfer(server, client, addr, MB100, timeout=60, seed=seed)
        if not ok:
            raise AssertionError(
                f"100 MB transfer {client} -> {server} [{addr}] failed; see "
                f"{self.tb.log_dir}/tcp_transfer.log"
            )


class MeshguardWireGuardGoTests(InteropMixin, SynchronousTestCase):
    """meshguard in A (twistd, config file), wireguard-go in B."""

    #: The wireguard-go command run in B.
    wireguard_go = "wireguard-go"

    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def check_pair(self, pair: MeshguardGoPair, first: str) -> None:
        """Ping both families both ways, starting from the side that must initiate."""
        hosts = pair.hosts
        if first == "meshguard":
            self.assert_pings(hosts.a, pair.go_tun)
        else:
            self.assert_pings(hosts.b, pair.mg_tun)
        self.assert_pings(hosts.a, pair.go_tun6)
        self.assert_pings(hosts.b, pair.mg_tun)
        self.assert_pings(hosts.b, pair.mg_tun6)
        # Each side lists the other with a handshake and traffic both ways.
        _, mg_peers = wg_dump(self.tb, hosts.a, pair.mg_if)
        self.assertEqual(len(mg_peers), 1)
        self.assertEqual(mg_peers[0][0], pair.go_key.public)
        self.assertEqual(mg_peers[0][1], pair.psk or "(none)")
        self.assertGreater(int(mg_peers[0][4]), 0, "latest handshake")
        self.assertGreater(int(mg_peers[0][5]), 0, "rx bytes")
        self.assertGreater(int(mg_peers[0][6]), 0, "tx bytes")
        _, go_peers = wg_dump(self.tb, hosts.b, pair.go_if)
        self.assertGreater(int(go_peers[0][4]), 0, "wireguard-go saw no handshake")

    def assert_offloads_used(self, pair: MeshguardGoPair) -> None:
        """meshguard's TUN offloads carried the transfers: super-packets cut on the way out,
        segments joined on the way in (on a kernel that takes TSO); and the node loaded
        OpenSSL with its AVX-512 code off (meshguard/adapters/openssl_setup.py: twistd imports
        meshguard before anything loads cryptography)."""
        node = read_status(pair.mg_if)["node"]
        self.assertEqual(node["openssl_cpu"], "avx512-off")
        tun = node["tun_offload"]
        if "tso4" not in tun["offloads"]:
            return
        self.assertGreater(tun["gso_reads"], 0, "no super-packet read")
        self.assertGreater(tun["gro_writes"], 0, "no coalesced write")
        self.assertEqual(tun["offload_errors"], 0)

    def test_outer_v4_meshguard_initiates_with_psk(self) -> None:
        """Outer IPv4, only meshguard knows an endpoint, a preshared key: ping both families
        both ways, then 100 MB over inner IPv4 A -> B and over inner IPv6 B -> A."""
        hosts = two_hosts(self.tb, v6=True)
        pair = meshguard_go_pair(
            self.tb, hosts, initiator="meshguard", psk=True, wireguard_go=self.wireguard_go
        )
        self.check_pair(pair, first="meshguard")
        # meshguard reached wireguard-go at the configured IPv4 endpoint.
        _, go_peers = wg_dump(self.tb, hosts.b, pair.go_if)
        self.assertEqual(go_peers[0][2], f"{hosts.a_addr}:{pair.mg_port}")
        self.assert_transfer(hosts.b, hosts.a, pair.go_tun, seed=1)
        self.assert_transfer(hosts.a, hosts.b, pair.mg_tun6, seed=2)
        self.assert_offloads_used(pair)

    def test_outer_v6_meshguard_responds_without_psk(self) -> None:
        """Outer IPv6, only wireguard-go knows an endpoint, no preshared key: meshguard learns
        wireguard-go's endpoint from its initiation; 100 MB over inner IPv6 A -> B and over
        inner IPv4 B -> A."""
        hosts = two_hosts(self.tb, v6=True)
        pair = meshguard_go_pair(
            self.tb, hosts, initiator="wireguard-go", outer_v6=True, wireguard_go=self.wireguard_go
        )
        self.check_pair(pair, first="wireguard-go")
        _, mg_peers = wg_dump(self.tb, hosts.a, pair.mg_if)
        self.assertEqual(mg_peers[0][2], f"[{hosts.b_addr6}]:{pair.go_port}")
        self.assert_transfer(hosts.b, hosts.a, pair.go_tun6, seed=3)
        self.assert_transfer(hosts.a, hosts.b, pair.mg_tun, seed=4)
        self.assert_offloads_used(pair)


class CurrentWireGuardGoTests(MeshguardWireGuardGoTests):
    """The same cases against the current wireguard-go (TSO/GRO on its TUN, UDP GSO/GRO), so
    both ends of the pair cut and join super-packets."""

    wireguard_go = CURRENT_WIREGUARD_GO

    def setUp(self) -> None:
        if not os.access(self.wireguard_go, os.X_OK):
            raise SkipTest(
                f"no current wireguard-go at {self.wireguard_go} "
                "(set MESHGUARD_WIREGUARD_GO_CURRENT to test against one)"
            )
        super().setUp()


class TwoMeshguardNodesTests(InteropMixin, SynchronousTestCase):
    """Two meshguard nodes, both ``twistd -n --pidfile= meshguard --config ...``."""

    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def test_two_twistd_nodes(self) -> None:
        """Outer IPv6, a preshared key, endpoints on both sides: both families ping both ways
        and 100 MB cross each way (inner IPv4 one way, IPv6 the other)."""
        tb = self.tb
        hosts = two_hosts(tb, v6=True)
        a_key, b_key = wg_keypair(), wg_keypair()
        psk = tb.wg(hosts.a, "genpsk").strip()
        a_if, b_if = tb.ifname("mga"), tb.ifname("mgb")
        for ns, ifname, own, other, own_n, other_n, other_host in (
            (hosts.a, a_if, a_key, b_key, 1, 2, hosts.b_addr6),
            (hosts.b, b_if, b_key, a_key, 2, 1, hosts.a_addr6),
        ):
            text = meshguard_config_text(
                own.private,
                listen_port=51820,
                addresses=(f"10.99.0.{own_n}/24", f"fd99::{own_n}/64"),
                peers=[
                    MeshguardPeer(
                        other.public,
                        allowed_ips=(f"10.99.0.{other_n}/32", f"fd99::{other_n}/128"),
                        endpoint=f"[{other_host}]:51820",
                        preshared_key=psk,
                    )
                ],
            )
            start_meshguard(
                tb, ns, write_meshguard_config(tb.log_dir / f"{ifname}.conf", text), ifname
            )
        self.assert_pings(hosts.a, "10.99.0.2")
        self.assert_pings(hosts.a, "fd99::2")
        self.assert_pings(hosts.b, "10.99.0.1")
        self.assert_pings(hosts.b, "fd99::1")
        self.assert_transfer(hosts.b, hosts.a, "10.99.0.2", seed=5)
        self.assert_transfer(hosts.a, hosts.b, "fd99::1", seed=6)
        for ns, ifname, other in ((hosts.a, a_if, b_key), (hosts.b, b_if, a_key)):
            _, peers = wg_dump(tb, ns, ifname)
            self.assertEqual([p[0] for p in peers], [other.public])
            self.assertEqual(peers[0][1], psk)
            self.assertGreater(int(peers[0][5]), MB100 // 2)
