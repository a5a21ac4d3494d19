"""A meshguard node's behaviour on a real network, with wireguard-go as its peer.

Roaming, the cryptokey source check, replies from the address the peer reached (IP_PKTINFO),
small and large inner MTUs, SIGHUP reload, ``meshguard-userspace`` under ``wg-quick`` and an
interface moved to another namespace while the process stays.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    DEFAULT_BINARIES,
    MeshguardGoPair,
    MeshguardPeer,
    Namespace,
    Testbed,
    meshguard_config_text,
    meshguard_env,
    meshguard_go_pair,
    require_root_netns,
    start_meshguard,
    start_meshguard_userspace,
    two_hosts,
    wg_dump,
    wg_keypair,
    write_meshguard_config,
)


class NodeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def assert_pings(self, ns: Namespace, addr: str, timeout: float = 15.0, **kw: object) -> None:
        self.tb.wait_for(
            lambda: self.tb.ping(ns, addr, timeout=1, **kw),  # type: ignore[arg-type]
            timeout=timeout,
            what=f"ping {addr} in {ns}",
        )

    def endpoint_seen_by(self, ns: Namespace, ifname: str) -> str:
        """The endpoint of the only peer of ``ifname``, as ``wg show dump`` prints it."""
        _, peers = wg_dump(self.tb, ns, ifname)
        return peers[0][2]


class RoamingTests(NodeTestCase):
    def test_roaming_and_cryptokey_source_check(self) -> None:
        """wireguard-go moves to a new address and port; after its next authenticated packet
        meshguard sends to the new endpoint. Inner packets from a source outside the sender's
        AllowedIPs are dropped (and counted) until meshguard allows that source."""
        tb = self.tb
        hosts = two_hosts(tb)
        pair = meshguard_go_pair(tb, hosts, initiator="both")
        self.assert_pings(hosts.a, pair.go_tun)
        self.assertEqual(self.endpoint_seen_by(hosts.a, pair.mg_if), f"10.0.0.2:{pair.go_port}")

        tb.ip(hosts.b, "addr", "del", "10.0.0.2/24", "dev", hosts.b_dev)
        tb.addr(hosts.b, hosts.b_dev, "10.0.0.3/24")
        tb.wg(hosts.b, "set", pair.go_if, "listen-port", "51899")
        # Until wireguard-go speaks, meshguard still sends to the old endpoint.
        self.assertEqual(self.endpoint_seen_by(hosts.a, pair.mg_if), f"10.0.0.2:{pair.go_port}")
        self.assert_pings(hosts.b, pair.mg_tun)
        self.assertEqual(self.endpoint_seen_by(hosts.a, pair.mg_if), "10.0.0.3:51899")
        self.assertTrue(tb.ping(hosts.a, pair.go_tun6, timeout=2))

        # A second address on wireguard-go's side, outside what meshguard allows for it.
        tb.addr(hosts.b, pair.go_if, "10.99.0.77/32")
        before = self.drops(pair)
        self.assertFalse(self.ping_from(hosts.b, "10.99.0.77", pair.mg_tun))
        self.assertGreater(self.drops(pair), before)
        tb.wg(
            hosts.a,
            "set",
            pair.mg_if,
            "peer",
            pair.go_key.public,
            "allowed-ips",
            "10.99.0.2/32,fd99::2/128,10.99.0.77/32",
        )
        self.assertTrue(self.ping_from(hosts.b, "10.99.0.77", pair.mg_tun))

    def drops(self, pair: MeshguardGoPair) -> int:
        status = read_status(pair.mg_if)
        return int(status["drops"].get("source_not_allowed", 0))

    def ping_from(self, ns: Namespace, source: str, addr: str) -> bool:
        argv = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-I", source, addr]
        return self.tb.run(ns, argv, check=False).returncode == 0


class StickySourceTests(NodeTestCase):
    def test_replies_leave_from_the_address_the_peer_reached(self) -> None:
        """meshguard's namespace has two addresses (v4 and v6) on its veth; wireguard-go talks
        to the second. Replies come from that second address (wireguard-go would otherwise roam
        to the first); once the address is removed, replies fall back to the route's source."""
        tb = self.tb
        hosts = two_hosts(tb, v6=True)
        tb.addr(hosts.a, hosts.a_dev, "10.0.0.11/24")
        tb.addr(hosts.a, hosts.a_dev, "fd00:0:0:1::11/64")
        second = dataclasses.replace(hosts, a_addr="10.0.0.11", a_addr6="fd00:0:0:1::11")
        pair = meshguard_go_pair(tb, second, initiator="wireguard-go")
        self.assert_pings(hosts.b, pair.mg_tun)
        self.assertTrue(tb.ping(hosts.a, pair.go_tun, count=3, timeout=2))
        self.assertEqual(self.endpoint_seen_by(hosts.b, pair.go_if), "10.0.0.11:51820")

        tb.wg(
            hosts.b,
            "set",
            pair.go_if,
            "peer",
            pair.mg_key.public,
            "endpoint",
            "[fd00:0:0:1::11]:51820",
        )
        self.assert_pings(hosts.b, pair.mg_tun6)
        self.assertTrue(tb.ping(hosts.a, pair.go_tun6, count=3, timeout=2))
        self.assertEqual(self.endpoint_seen_by(hosts.b, pair.go_if), "[fd00:0:0:1::11]:51820")

        # The sticky address disappears: meshguard's next datagram leaves from the route's
        # source and wireguard-go roams to it.
        tb.ip(hosts.a, "addr", "del", "fd00:0:0:1::11/64", "dev", hosts.a_dev)
        self.assert_pings(hosts.a, pair.go_tun6)
        self.assertEqual(self.endpoint_seen_by(hosts.b, pair.go_if), "[fd00:0:0:1::1]:51820")


class MTUTests(NodeTestCase):
    def check_mtu(self, pair: MeshguardGoPair, mtu: int) -> None:
        """Full-size packets pass with DF set both ways; one byte more is refused locally."""
        a, b = pair.hosts.a, pair.hosts.b
        link = self.tb.ip(a, "-o", "link", "show", "dev", pair.mg_if)
        self.assertIn(f"mtu {mtu} ", link)
        payload = mtu - 28  # IPv4 + ICMP headers
        self.assert_pings(a, pair.go_tun, size=payload, dont_fragment=True)
        self.assert_pings(b, pair.mg_tun, size=payload, dont_fragment=True)
        self.assert_pings(a, pair.go_tun6, size=mtu - 48, dont_fragment=True)
        self.assertFalse(self.tb.ping(a, pair.go_tun, size=payload + 1, dont_fragment=True))
        ok = self.tb.tcp_transfer(b, a, pair.go_tun, 20_000_000, timeout=30)
        self.assertTrue(ok, "20 MB A -> B")
        ok = self.tb.tcp_transfer(a, b, pair.mg_tun6, 20_000_000, timeout=30, seed=2)
        self.assertTrue(ok, "20 MB B -> A")

    def test_mtu_1280(self) -> None:
        """Inner MTU 1280, the IPv6 minimum."""
        hosts = two_hosts(self.tb)
        self.check_mtu(meshguard_go_pair(self.tb, hosts, mtu=1280), 1280)

    def test_mtu_34816(self) -> None:
        """Inner MTU 34816 (meshguard's largest) over a veth with MTU 65535, wireguard-go's
        side at 34816 too: each datagram carries one 34 KB packet."""
        hosts = two_hosts(self.tb, mtu=65535)
        self.check_mtu(meshguard_go_pair(self.tb, hosts, mtu=34816), 34816)


class ReloadTests(NodeTestCase):
    def test_sighup_adds_a_peer_and_keeps_the_session(self) -> None:
        """A peer added to the file works after SIGHUP while the live session with the other
        peer goes on (same handshake); a broken file on SIGHUP is refused with a log line and
        the running configuration stays."""
        tb = self.tb
        hosts = two_hosts(tb)
        pair = meshguard_go_pair(tb, hosts, initiator="both")
        self.assert_pings(hosts.a, pair.go_tun)
        handshake = wg_dump(tb, hosts.a, pair.mg_if)[1][0][4]

        # A third host C on a second veth of A, running wireguard-go as 10.99.0.3.
        c = tb.netns("c")
        tb.veth(hosts.a, "eth1", c, "eth0")
        tb.addr(hosts.a, "eth1", "10.0.1.1/24")
        tb.addr(c, "eth0", "10.0.1.2/24")
        c_if, c_key = tb.ifname("goc"), wg_keypair()
        tb.start_wireguard_go(c, c_if)
        tb.wg_set_interface(c, c_if, c_key.private, 51822)
        tb.wg_set_peer(
            c, c_if, pair.mg_key.public, allowed_ips=("10.99.0.1/32",), endpoint="10.0.1.1:51820"
        )
        tb.addr(c, c_if, "10.99.0.3/24")
        tb.up(c, c_if)

        text = pair.mg_config.read_text() + (
            f"\n[Peer]\nPublicKey = {c_key.public}\nAllowedIPs = 10.99.0.3/32\n"
            "Endpoint = 10.0.1.2:51822\n"
        )
        pair.mg_config.write_text(text)
        os.kill(pair.mg_proc.pid, signal.SIGHUP)
        self.assert_pings(hosts.a, "10.99.0.3")
        self.assert_pings(c, pair.mg_tun)
        _, peers = wg_dump(tb, hosts.a, pair.mg_if)
        self.assertEqual(len(peers), 2)
        old = next(p for p in peers if p[0] == pair.go_key.public)
        self.assertEqual(old[4], handshake, "the reload re-handshook with an unchanged peer")
        self.assertTrue(tb.ping(hosts.a, pair.go_tun, timeout=2))

        pair.mg_config.write_text(text.replace("[Peer]", "[Peer]\nBogusKey = 1", 1))
        os.kill(pair.mg_proc.pid, signal.SIGHUP)
        log = tb.log_of(pair.mg_proc)
        tb.wait_for(lambda: "reload refused" in log.read_text(), timeout=10, what="reload log")
        refused = [line for line in log.read_text().splitlines() if "reload refused" in line]
        self.assertEqual(len(refused), 1)
        self.assertIn(f"{pair.mg_config}:", refused[0])
        self.assertIn("BogusKey", refused[0])
        self.assertIsNone(pair.mg_proc.poll())
        self.assertEqual(len(wg_dump(tb, hosts.a, pair.mg_if)[1]), 2)
        self.assertTrue(tb.ping(hosts.a, pair.go_tun, timeout=2))
        self.assertTrue(tb.ping(hosts.a, "10.99.0.3", timeout=2))


class ShutdownTests(NodeTestCase):
    def test_sigterm_removes_everything(self) -> None:
        """SIGTERM: twistd shuts down cleanly and the interface, its routes, the UDP port, the UAPI
        socket and the status socket are gone."""
        tb = self.tb
        ns = tb.netns("x")
        ifname = tb.ifname("x")
        text = meshguard_config_text(
            wg_keypair().private,
            listen_port=51820,
            addresses=("10.99.0.1/24", "fd99::1/64"),
            peers=[MeshguardPeer(wg_keypair().public, allowed_ips=("10.50.0.0/16", "fd50::/64"))],
        )
        config = write_meshguard_config(tb.log_dir / f"{ifname}.conf", text)
        proc = start_meshguard(tb, ns, config, ifname)
        self.assertIn("10.50.0.0/16", tb.ip(ns, "route", "show", "dev", ifname))
        self.assertIn("fd50::/64", tb.ip(ns, "-6", "route", "show", "dev", ifname))
        self.assertTrue(tb.listening(ns, 51820, "udp"))
        status = Path("/var/run/meshguard") / f"{ifname}.sock"
        self.assertTrue(status.exists())
        # twistd re-raises the signal that stopped it once it has shut down cleanly.
        self.assertIn(tb.stop(proc), (0, -signal.SIGTERM), tb.log_tail(proc))
        self.assertIn("Server Shut Down.", tb.log_tail(proc))
        self.assertNotIn(ifname, tb.ip(ns, "-o", "link", "show"))
        self.assertEqual(tb.ip(ns, "route", "show").strip(), "")
        self.assertFalse(tb.listening(ns, 51820, "udp"))
        self.assertFalse(tb.uapi_socket(ifname).exists())
        self.assertFalse(status.exists())


class UserspaceTests(NodeTestCase):
    def go_peer(self, hosts_b: Namespace, mg_public: str, mg_endpoint: str) -> tuple[str, str]:
        """wireguard-go in B as 10.99.0.2, peered with meshguard; returns (ifname, public)."""
        tb = self.tb
        go_if, go_key = tb.ifname("go"), wg_keypair()
        tb.start_wireguard_go(hosts_b, go_if)
        tb.wg_set_interface(hosts_b, go_if, go_key.private, 51821)
        tb.wg_set_peer(
            hosts_b, go_if, mg_public, allowed_ips=("10.99.0.1/32",), endpoint=mg_endpoint
        )
        tb.addr(hosts_b, go_if, "10.99.0.2/24")
        tb.up(hosts_b, go_if)
        return go_if, go_key.public

    def test_wg_quick_up_down(self) -> None:
        """`wg-quick up FILE` with WG_QUICK_USERSPACE_IMPLEMENTATION=meshguard-userspace brings
        the interface up (addresses, routes, peers); `wg-quick down` removes it and the
        daemon exits, taking its UAPI socket with it."""
        require_root_netns(self, (*DEFAULT_BINARIES, "wg-quick"))
        tb = self.tb
        hosts = two_hosts(tb)
        mg_key = wg_keypair()
        ifname = tb.ifname("wq")
        self.addCleanup(self.kill_userspace_daemons, hosts.a)
        _, go_public = self.go_peer(hosts.b, mg_key.public, "10.0.0.1:51820")
        text = meshguard_config_text(
            mg_key.private,
            listen_port=51820,
            addresses=("10.99.0.1/24",),
            peers=[
                MeshguardPeer(
                    go_public,
                    allowed_ips=("10.99.0.2/32", "10.98.0.0/16"),
                    endpoint=f"{hosts.b_addr}:51821",
                )
            ],
        )
        config = write_meshguard_config(tb.log_dir / f"{ifname}.conf", text)
        env = meshguard_env({"WG_QUICK_USERSPACE_IMPLEMENTATION": "meshguard-userspace"})
        up = tb.run(hosts.a, ["wg-quick", "up", str(config)], timeout=30, env=env, check=False)
        self.assertEqual(up.returncode, 0, up.stderr)
        self.assertIn("meshguard-userspace", up.stderr)
        self.assertTrue(tb.uapi_socket(ifname).exists())
        self.assertIn("10.98.0.0/16", tb.ip(hosts.a, "route", "show", "dev", ifname))
        self.assert_pings(hosts.a, "10.99.0.2")
        self.assert_pings(hosts.b, "10.99.0.1")
        self.assertEqual(wg_dump(tb, hosts.a, ifname)[1][0][0], go_public)

        down = tb.run(hosts.a, ["wg-quick", "down", str(config)], timeout=30, env=env, check=False)
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertNotIn(ifname, tb.ip(hosts.a, "-o", "link", "show"))
        tb.wait_for(lambda: not self.userspace_daemons(hosts.a), timeout=10, what="daemon exit")
        self.assertFalse(tb.uapi_socket(ifname).exists())

    def userspace_daemons(self, ns: Namespace) -> list[int]:
        """Pids of meshguard-userspace processes in ``ns`` (only ever started by this test)."""
        pids = []
        for pid in self.tb.run(None, ["ip", "netns", "pids", ns.name], check=False).stdout.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"meshguard-userspace" in cmdline or b"meshguard.app.userspace" in cmdline:
                pids.append(int(pid))
        return pids

    def kill_userspace_daemons(self, ns: Namespace) -> None:
        for pid in self.userspace_daemons(ns):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def test_interface_moved_to_another_namespace(self) -> None:
        """`meshguard-userspace -f` in A; its interface moves to namespace C and carries
        traffic from there through the process and UDP socket left in A; deleting the
        interface ends the process and removes its socket."""
        tb = self.tb
        hosts = two_hosts(tb)
        c = tb.netns("c")
        ifname = tb.ifname("mv")
        proc = start_meshguard_userspace(tb, hosts.a, ifname)
        mg_key = wg_keypair()
        _, go_public = self.go_peer(hosts.b, mg_key.public, "10.0.0.1:51820")
        tb.wg_set_interface(hosts.a, ifname, mg_key.private, 51820)
        tb.wg_set_peer(
            hosts.a,
            ifname,
            go_public,
            allowed_ips=("10.99.0.2/32",),
            endpoint=f"{hosts.b_addr}:51821",
        )
        tb.ip(hosts.a, "link", "set", "dev", ifname, "netns", c.name)
        tb.addr(c, ifname, "10.99.0.1/24")
        tb.up(c, ifname)
        self.assert_pings(c, "10.99.0.2")
        self.assert_pings(hosts.b, "10.99.0.1")
        self.assertTrue(tb.tcp_transfer(hosts.b, c, "10.99.0.2", 10_000_000, timeout=30))
        # The UDP socket stayed in A: wg still reaches the process through its UAPI socket.
        self.assertEqual(wg_dump(tb, hosts.a, ifname)[1][0][0], go_public)
        tb.ip(c, "link", "del", "dev", ifname)
        tb.wait_for(lambda: proc.poll() is not None, timeout=10, what="meshguard-userspace exit")
        self.assertEqual(proc.returncode, 0, tb.log_tail(proc))
        self.assertFalse(tb.uapi_socket(ifname).exists())
