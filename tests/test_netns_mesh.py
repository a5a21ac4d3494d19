"""The mesh over real nftables NATs: homes punch to each other, an easy and a hard NAT go direct
by the birthday technique, two hard NATs are relayed, a LAN pair uses the LAN, a router reboot
recovers, and a stock wireguard-go peer keeps working."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.natmesh import start_mesh, start_stock_peer, status_peer, stock_peer_lines
from tests.netns import (
    CONNTRACK,
    DEFAULT_BINARIES,
    Namespace,
    Testbed,
    nat_homes,
    reboot_router,
    require_root_netns,
    wg_keypair,
)

PORT = 51820


def _path(status: dict[str, Any], key: str) -> str:
    return str(status_peer(status, key).get("path", "absent"))


def _endpoint_host(status: dict[str, Any], key: str) -> str | None:
    endpoint = status_peer(status, key).get("endpoint")
    return str(endpoint[0]) if endpoint else None


class MeshOverNatsTests(TestCase):
    timeout = 400

    def test_homes_punch_hard_nats_relay_lan_pair_and_reboot(self) -> None:
        """Home 1 (two hosts) and home 2 behind plain masquerade, homes 3 and 4 behind
        ``masquerade random``, one public introducer and a wireguard-go peer of it; the
        routers drop unsolicited WAN input (as many home routers do)."""
        self._homes(wan_filter=True)

    def test_without_wan_filter(self) -> None:
        """The same start, with routers that do not drop unsolicited WAN input (a Linux box
        doing masquerade, a cloud NAT instance): punches reaching a router before its home
        sent must not leave the pair relayed (docs/nat-matrix.md)."""
        self._homes(wan_filter=False, reboot=False)

    def test_without_wan_filter_reboot(self) -> None:
        """Home 2's router reboots with a new address, routers without a WAN filter: home 2's
        packets from its new address reach home 1's router first and clash with both hosts'
        mappings there (both on port 51820), yet both go direct with home 2 again
        (docs/nat-matrix.md, 'After a reboot without a WAN filter')."""
        self._homes(wan_filter=False)

    def _homes(self, *, wan_filter: bool, reboot: bool = True) -> None:
        require_root_netns(self, [*DEFAULT_BINARIES, CONNTRACK])
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(
            tb,
            [(2, False), (1, False), (1, True), (1, True)],
            extra_public=1,
            wan_filter=wan_filter,
        )
        wgo_ns = Namespace(f"{tb.prefix}-pub2")
        wgo_keys = wg_keypair()
        # The introducer lists every member (and the wireguard-go peer) as a plain [Peer].
        mesh = start_mesh(
            tb,
            net,
            subnet="10.99.0",
            introducer_peers=stock_peer_lines(
                wgo_keys.public, "10.99.0.100", f"198.51.101.2:{PORT}"
            ),
        )
        # A stock wireguard-go peer of the introducer, outside the mesh.
        start_stock_peer(
            tb,
            wgo_ns,
            wgo_keys,
            introducer_key=mesh.introducer_key,
            introducer_endpoint=f"{net.public_address}:{PORT}",
            address="10.99.0.100/24",
            allowed_ips="10.99.0.1/32",
        )
        ifnames, addresses, intro_if = mesh.ifnames, mesh.addresses, mesh.introducer_if

        a, a2, b, c, d = range(5)
        ns_of, key_of = mesh.namespaces, mesh.keys
        pairs = [(a, b), (a, c), (a, d), (b, c), (b, d), (c, d), (a, a2), (a2, b)]

        def all_ping() -> bool:
            return all(
                tb.ping(ns_of[x], addresses[y], count=1, timeout=1)
                and tb.ping(ns_of[y], addresses[x], count=1, timeout=1)
                for x, y in pairs
            )

        tb.wait_for(all_ping, timeout=60, what="every home pings every other")

        def paths_settled() -> bool:
            sa, sb, sc = (read_status(ifnames[i]) for i in (a, b, c))
            return (
                _path(sa, key_of[b]) == "direct"
                and _path(sb, key_of[a]) == "direct"
                and _path(sa, key_of[a2]) == "lan"
                and _path(sc, key_of[d]).startswith("relayed via")
                # Easy against hard: direct by the birthday technique (docs/nat-matrix.md).
                and _path(sa, key_of[c]) == "direct"
            )

        try:
            tb.wait_for(paths_settled, timeout=60, what="direct, LAN and relayed paths")
        except AssertionError:
            summary = {
                i: {
                    p["public_key"][:6]: (p.get("path"), p.get("endpoint"), p.get("candidates"))
                    for p in read_status(ifnames[i])["peers"]
                }
                for i in range(len(ifnames))
            }
            self.fail(f"paths did not settle: {summary} keys {[k[:6] for k in key_of]}")

        def by_pair(x: int, y: int) -> int:
            counts = read_status(intro_if)["node"]["relay_forwarded_by_pair"]
            return int(counts.get(f"{key_of[x]}>{key_of[y]}", 0))

        punched_before = by_pair(a, b) + by_pair(b, a)
        relayed_before = by_pair(c, d)
        self.assertTrue(tb.ping(ns_of[a], addresses[b], count=5, timeout=2))
        self.assertTrue(tb.ping(ns_of[b], addresses[a], count=5, timeout=2))
        self.assertTrue(tb.ping(ns_of[c], addresses[d], count=5, timeout=2))
        # Counted by the relay itself: nothing forwarded between the punched homes.
        self.assertEqual(by_pair(a, b) + by_pair(b, a), punched_before)
        self.assertGreater(by_pair(c, d), relayed_before)
        self.assertTrue(tb.ping(net.public, "10.99.0.100", count=2, timeout=2))

        if not reboot:
            return
        # Home 2's router reboots with a new public address.
        reboot_router(tb, net.homes[1], "203.0.2.3")

        # Home 1's two hosts both listen on 51820: toward home 2's new address only the first
        # to send keeps that port on home 1's router, the other's mapping depends on the
        # destination. Without the WAN filter, home 2's first packets from its new address
        # also leave entries there that clash with both hosts' mappings. Both hosts go direct
        # again in either flavour, the one that lost the port by the birthday technique
        # (docs/nat-matrix.md), each side's status says so, at home 2's new address.
        def direct_again(x: int) -> bool:
            sx, sb = read_status(ifnames[x]), read_status(ifnames[b])
            return (
                _path(sx, key_of[b]) == "direct"
                and _path(sb, key_of[x]) == "direct"
                and _endpoint_host(sx, key_of[b]) == "203.0.2.3"
            )

        def recovered() -> bool:
            return (
                direct_again(a)
                and direct_again(a2)
                and tb.ping(ns_of[a], addresses[b], count=1, timeout=1)
                and tb.ping(ns_of[a2], addresses[b], count=1, timeout=1)
                and tb.ping(ns_of[b], addresses[c], count=1, timeout=1)
            )

        rebooted = time.monotonic()
        tb.wait_for(
            recovered, timeout=120, interval=1.0, what="home 2 direct again after its reboot"
        )
        with (Path(tb.log_dir) / "recovery.txt").open("a") as f:
            f.write(f"wan_filter={wan_filter}: direct again {time.monotonic() - rebooted:.0f} s\n")
        self.assertTrue(tb.ping(net.public, "10.99.0.100", count=2, timeout=2))
        self.assertTrue(tb.ping(wgo_ns, "10.99.0.1", count=2, timeout=2))
