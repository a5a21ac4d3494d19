"""Path MTU discovery on a real black hole (netns, root), the two cases beyond a meshguard pair
at a fixed MTU: toward stock wireguard-go (ICMP echo probes through the tunnel), and a meshguard
pair with ``MTU = auto`` whose interfaces follow what discovery found.

About 30 s in all.
"""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    MeshguardPeer,
    Namespace,
    Testbed,
    TwoHosts,
    blackhole_drops,
    meshguard_config_text,
    meshguard_go_pair,
    pmtu_blackhole,
    require_root_netns,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)

MB20 = 20 * 1000 * 1000
PORT = 51930


def status_peer(ifname: str) -> dict[str, Any] | None:
    try:
        document = read_status(ifname)
    except (OSError, ValueError):
        return None
    peers = document.get("peers", [])
    return peers[0] if peers else None


def link_mtu(tb: Testbed, ns: Namespace, ifname: str) -> int:
    match = re.search(r"\bmtu (\d+)", tb.ip(ns, "link", "show", "dev", ifname))
    assert match is not None
    return int(match.group(1))


def report(tb: Testbed, name: str, lines: list[str]) -> None:
    with (tb.log_dir / name).open("w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


class PMTUEchoTests(TestCase):
    timeout = 120

    def test_stock_peer_found_with_echo(self) -> None:
        """meshguard (A, interface MTU 1420) toward wireguard-go (B) across a 1280 link whose
        ICMP "too big" is dropped: padded echo through the tunnel finds 1280 and a 20 MB TCP
        transfer A->B completes with its checksum; B->A is tried and reported."""
        require_root_netns(self, binaries=("ip", "nft", "wg", "wireguard-go", "ping", "ss"))
        tb = Testbed(self)
        bh = pmtu_blackhole(tb, mtu=1280)
        hosts = TwoHosts(bh.a, bh.b, "eth0", "eth0", bh.a_addr, bh.b_addr)
        pair = meshguard_go_pair(tb, hosts, mg_port=PORT, go_port=PORT + 1)
        begin = time.monotonic()
        self.assertTrue(tb.ping(bh.a, pair.go_tun, count=3, timeout=6))

        def found() -> bool:
            peer = status_peer(pair.mg_if)
            return peer is not None and peer.get("path_mtu_source") == "icmp-echo"

        tb.wait_for(found, timeout=20, interval=0.05, what="echo path MTU toward wireguard-go")
        took = time.monotonic() - begin
        peer = status_peer(pair.mg_if)
        assert peer is not None
        self.assertEqual((peer["path_mtu"], peer["tunnel_mtu"]), (1276, 1216))
        self.assertFalse(peer["meshguard"])
        lines = [
            f"wireguard-go peer: 1280 found {took:.2f} s after first ping (2 s hello grace "
            f"included); {peer['pmtu_probes']} echo probes, search {peer['pmtu_converged_in']} s"
        ]
        drops = blackhole_drops(tb, bh)
        t0 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.b, bh.a, pair.go_tun, MB20, port=7020, timeout=40))
        t1 = time.monotonic()
        lines.append(
            f"20 MB meshguard->wireguard-go: {t1 - t0:.1f} s, "
            f"{blackhole_drops(tb, bh) - drops} ICMP too-big dropped by mid meanwhile"
        )
        back = tb.tcp_transfer(bh.a, bh.b, pair.mg_tun, MB20, port=7021, timeout=40)
        lines.append(
            f"20 MB wireguard-go->meshguard: ok={back} in {time.monotonic() - t1:.1f} s "
            "(B's own 1280 link fragments its outer datagrams locally; SYNs clamped both ways)"
        )
        report(tb, "pmtu-echo-report.txt", lines)
        self.assertTrue(back)

    def test_reverse_blackhole_tcp_saved_by_clamping(self) -> None:
        """The black hole on wireguard-go's side of the trip (mid's link toward A at 1280, B's
        links at 1500): wireguard-go's own big datagrams vanish (a 1300-byte ping from B with DF
        is lost), but TCP from B to A completes because meshguard clamps the MSS of SYNs in both
        directions to what its echo probes found."""
        require_root_netns(self, binaries=("ip", "nft", "wg", "wireguard-go", "ping", "ss"))
        tb = Testbed(self)
        bh = pmtu_blackhole(tb, mtu=1280)
        for ns, dev, mtu in ((bh.mid, "b0", 1500), (bh.b, "eth0", 1500)):
            tb.ip(ns, "link", "set", "dev", dev, "mtu", str(mtu))
        for ns, dev in ((bh.mid, "a0"), (bh.a, "eth0")):
            tb.ip(ns, "link", "set", "dev", dev, "mtu", "1280")
        hosts = TwoHosts(bh.a, bh.b, "eth0", "eth0", bh.a_addr, bh.b_addr)
        pair = meshguard_go_pair(tb, hosts, mg_port=PORT, go_port=PORT + 1)
        self.assertTrue(tb.ping(bh.a, pair.go_tun, count=3, timeout=6))

        def found() -> bool:
            peer = status_peer(pair.mg_if)
            return peer is not None and peer.get("path_mtu_source") == "icmp-echo"

        tb.wait_for(found, timeout=20, interval=0.05, what="echo path MTU toward wireguard-go")
        peer = status_peer(pair.mg_if)
        assert peer is not None
        self.assertEqual(peer["tunnel_mtu"], 1216)
        big = tb.ping(bh.b, pair.mg_tun, count=2, timeout=2, size=1300, dont_fragment=True)
        self.assertFalse(big)  # the problem is real on this side
        drops = blackhole_drops(tb, bh)
        t0 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.a, bh.b, pair.mg_tun, MB20, port=7024, timeout=40))
        report(
            tb,
            "pmtu-echo-reverse-report.txt",
            [
                f"black hole toward meshguard: 1300-byte DF ping from wireguard-go lost, "
                f"{drops} ICMP too-big dropped; 20 MB wireguard-go->meshguard by TCP "
                f"{time.monotonic() - t0:.1f} s (MSS clamped to 1176)"
            ],
        )

    def test_mtu_auto_follows_discovery(self) -> None:
        """Two meshguard nodes with ``MTU = auto`` across the same 1280 black hole: both
        interfaces end at the tunnel MTU discovery found (1216) and 20 MB cross both ways."""
        require_root_netns(self, binaries=("ip", "nft", "ping", "ss"))
        tb = Testbed(self)
        bh = pmtu_blackhole(tb, mtu=1280)
        key_a, key_b = wg_keypair(), wg_keypair()
        if_a, if_b = tb.ifname("aa"), tb.ifname("ab")
        sides = (
            (bh.a, if_a, key_a, key_b, "10.78.0.1", "10.78.0.2", bh.b_addr),
            (bh.b, if_b, key_b, key_a, "10.78.0.2", "10.78.0.1", bh.a_addr),
        )
        for ns, ifname, own, other, address, peer_address, endpoint in sides:
            text = meshguard_config_text(
                own.private,
                listen_port=PORT + 2,
                addresses=[f"{address}/24"],
                peers=[
                    MeshguardPeer(
                        other.public, [f"{peer_address}/32"], endpoint=f"{endpoint}:{PORT + 2}"
                    )
                ],
            )
            text = text.replace("[Interface]\n", "[Interface]\nMTU = auto\n", 1)
            config = write_meshguard_config(tb.log_dir / f"{ifname}.conf", text)
            start_meshguard(tb, ns, config, ifname)
        start = (link_mtu(tb, bh.a, if_a), link_mtu(tb, bh.b, if_b))
        begin = time.monotonic()
        self.assertTrue(tb.ping(bh.a, "10.78.0.2", count=3, timeout=6))
        tb.wait_for(
            lambda: (link_mtu(tb, bh.a, if_a), link_mtu(tb, bh.b, if_b)) == (1216, 1216),
            timeout=20,
            interval=0.1,
            what="both interface MTUs at 1216",
        )
        took = time.monotonic() - begin
        t0 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.b, bh.a, "10.78.0.2", MB20, port=7022, timeout=40))
        t1 = time.monotonic()
        self.assertTrue(tb.tcp_transfer(bh.a, bh.b, "10.78.0.1", MB20, port=7023, timeout=40))
        t2 = time.monotonic()
        report(
            tb,
            "pmtu-auto-report.txt",
            [
                f"MTU = auto: interfaces started at {start[0]} (A) / {start[1]} (B), both 1216 "
                f"{took:.2f} s after the first ping",
                f"20 MB A->B {t1 - t0:.1f} s, B->A {t2 - t1:.1f} s",
            ],
        )
