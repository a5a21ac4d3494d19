"""Path MTU discovery on a real path-MTU black hole (netns, root): meshguard carries big TCP
transfers where stock wireguard-go at its default MTU stalls, and follows MTU changes.

Takes about two minutes, most of it waiting for the steady-state re-check (30 s) to notice the
middle link's MTU going down and then up.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    Blackhole,
    MeshguardPeer,
    Testbed,
    TwoHosts,
    blackhole_drops,
    meshguard_config_text,
    pmtu_blackhole,
    require_root_netns,
    start_meshguard,
    wg_keypair,
    wireguard_go_pair,
    write_meshguard_config,
)

PORT = 51900
MB100 = 100 * 1000 * 1000


class PMTUBlackholeTests(TestCase):
    timeout = 400

    def _status_peer(self, ifname: str) -> dict[str, Any] | None:
        try:
            document = read_status(ifname)
        except (OSError, ValueError):
            return None
        peers = document.get("peers", [])
        return peers[0] if peers else None

    def _wait_path_mtu(self, tb: Testbed, ifname: str, expected: int, timeout: float) -> float:
        """Seconds until ``ifname``'s peer shows path MTU ``expected``, found by probing."""
        begin = time.monotonic()

        def found() -> bool:
            peer = self._status_peer(ifname)
            return peer is not None and peer.get("path_mtu") == expected

        tb.wait_for(found, timeout=timeout, interval=0.05, what=f"path MTU {expected} on {ifname}")
        return time.monotonic() - begin

    def _set_mid_mtu(self, tb: Testbed, bh: Blackhole, mtu: int) -> None:
        tb.ip(bh.mid, "link", "set", "dev", "b0", "mtu", str(mtu))
        tb.ip(bh.b, "link", "set", "dev", "eth0", "mtu", str(mtu))

    def test_blackhole(self) -> None:
        """1280 middle link, ICMP "too big" dropped: meshguard (MTU 1420 on the interface)
        finds 1280 in about a second, moves 100 MB each way with the checksum verified, and
        follows the link going down to 1200 and up to 1380; wireguard-go at 1420 stalls."""
        require_root_netns(self, binaries=("ip", "nft", "wg", "wireguard-go", "ping", "ss"))
        tb = Testbed(self)
        bh = pmtu_blackhole(tb, mtu=1280)
        key_a, key_b = wg_keypair(), wg_keypair()
        if_a, if_b = tb.ifname("pa"), tb.ifname("pb")
        conf_a = tb.log_dir / "a.conf"
        conf_b = tb.log_dir / "b.conf"
        write_meshguard_config(
            conf_a,
            meshguard_config_text(
                key_a.private,
                listen_port=PORT,
                addresses=["10.77.0.1/24"],
                peers=[
                    MeshguardPeer(key_b.public, ["10.77.0.2/32"], endpoint=f"{bh.b_addr}:{PORT}")
                ],
            ),
        )
        write_meshguard_config(
            conf_b,
            meshguard_config_text(
                key_b.private,
                listen_port=PORT,
                addresses=["10.77.0.2/24"],
                peers=[
                    MeshguardPeer(key_a.public, ["10.77.0.1/32"], endpoint=f"{bh.a_addr}:{PORT}")
                ],
            ),
        )
        start_meshguard(tb, bh.a, conf_a, if_a)
        start_meshguard(tb, bh.b, conf_b, if_b)

        # First contact starts the handshake; discovery starts with the session.
        begin = time.monotonic()
        self.assertTrue(tb.ping(bh.a, "10.77.0.2", count=3, timeout=6))
        found_a = self._wait_path_mtu(tb, if_a, 1276, timeout=15) + (time.monotonic() - begin)
        self._wait_path_mtu(tb, if_b, 1276, timeout=15)
        peer_a = self._status_peer(if_a)
        assert peer_a is not None
        self.assertEqual(peer_a["path_mtu_source"], "probe")
        self.assertEqual(peer_a["tunnel_mtu"], 1216)
        report = [
            f"1280 found {found_a:.2f} s after first ping; A: {peer_a['pmtu_probes']} probes, "
            f"converged in {peer_a['pmtu_converged_in']} s"
        ]

        t0 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.b, bh.a, "10.77.0.2", MB100, timeout=120))
        t1 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.a, bh.b, "10.77.0.1", MB100, port=7010, timeout=120))
        t2 = time.monotonic()
        report.append(f"100 MB A->B {t1 - t0:.1f} s, B->A {t2 - t1:.1f} s")

        # The same path under stock wireguard-go at its default MTU: big segments vanish.
        hosts = TwoHosts(bh.a, bh.b, "eth0", "eth0", bh.a_addr, bh.b_addr)
        go = wireguard_go_pair(tb, hosts, port=51820)
        tb.wait_for(
            lambda: tb.ping(bh.a, go.b_tun, count=1, timeout=1),
            timeout=20,
            what="wireguard-go tunnel up",
        )
        drops_before = blackhole_drops(tb, bh)
        stalled = time.monotonic()
        self.assertFalse(tb.tcp_transfer(bh.b, bh.a, go.b_tun, MB100, port=7011, timeout=20))
        report.append(
            f"wireguard-go: transfer failed after {time.monotonic() - stalled:.1f} s, "
            f"{blackhole_drops(tb, bh) - drops_before} ICMP too-big dropped by mid"
        )

        # Down, then up: the re-checks notice both.
        self._set_mid_mtu(tb, bh, 1200)
        down = self._wait_path_mtu(tb, if_a, 1196, timeout=50)
        self.assertTrue(tb.ping(bh.a, "10.77.0.2", size=1136 - 28, dont_fragment=True))
        self._set_mid_mtu(tb, bh, 1380)
        up = self._wait_path_mtu(tb, if_a, 1372, timeout=50)
        self.assertTrue(tb.tcp_transfer(bh.b, bh.a, "10.77.0.2", 10_000_000, port=7012))
        report.append(f"shrink 1280->1200 followed in {down:.1f} s, growth ->1380 in {up:.1f} s")
        with (tb.log_dir / "pmtu-report.txt").open("w") as f:
            f.write("\n".join(report) + "\n")
        print("\n".join(report))
