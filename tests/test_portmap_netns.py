"""Port mapping against a real router daemon: Debian's miniupnpd in the router namespace.

Each protocol (PCP, NAT-PMP, UPnP-IGD) obtains a mapping that really forwards a datagram from the
"internet" to the home and is removed again; and a home behind a hard NAT (``masquerade
random``) whose router offers mapping goes direct with other hard-NAT homes (path kind
``mapped`` on their side), while two hard-NAT homes without mapping stay relayed.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import format_status, format_table, read_status
from tests.miniupnpd import MINIUPNPD, start_miniupnpd
from tests.netns import (
    DEFAULT_BINARIES,
    REPO_ROOT,
    Testbed,
    meshguard_env,
    nat_homes,
    require_root_netns,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)

PORT = 51820
_SEND = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for _ in range(5):\n"
    "    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))\n"
    "    time.sleep(0.1)\n"
)


def _require(testcase: TestCase) -> None:
    require_root_netns(testcase, [*DEFAULT_BINARIES, MINIUPNPD])


def _peer(status: dict[str, Any], key: str) -> dict[str, Any]:
    for peer in status["peers"]:
        if peer["public_key"] == key:
            return dict(peer)
    return {}


class ProtocolTests(TestCase):
    timeout = 120

    def test_each_protocol_maps_forwards_and_removes(self) -> None:
        """PCP, NAT-PMP and UPnP-IGD each get a mapping of a home's UDP port from miniupnpd
        behind a ``masquerade random`` router; a datagram sent from the internet to the mapped
        endpoint arrives at the home; removing the mapping takes miniupnpd's DNAT rule away."""
        _require(self)
        tb = Testbed(self)
        net = nat_homes(tb, [(1, True)])
        home = net.homes[0]
        host, _ = home.hosts[0]
        start_miniupnpd(tb, home.router, "192.168.1.0/24")
        for index, method in enumerate(("pcp", "natpmp", "upnp")):
            internal = 40000 + index
            probe = tb.spawn(
                host,
                [sys.executable, "-m", "tests.portmap_probe", method, str(internal), "3"],
                env=meshguard_env(),
                cwd=REPO_ROOT,
            )

            def grant(probe: Any = probe, method: str = method) -> dict[str, Any] | None:
                for line in tb.log_tail(probe, 100000).splitlines():
                    if line.startswith("GRANT "):
                        return dict(json.loads(line[6:]))
                    if line.startswith("FAILED"):
                        raise AssertionError(f"{method}: {line}")
                return None

            granted = tb.wait_for(grant, 15, what=f"a {method} mapping")
            self.assertEqual(granted["external_address"], home.public, method)
            rules = tb.run(home.router, ["nft", "list", "table", "inet", "mupnp_nat"]).stdout
            self.assertIn(f"192.168.1.2:{internal}", rules, method)
            tb.run(
                net.public,
                [sys.executable, "-c", _SEND, home.public, str(granted["external_port"]), method],
            )
            log = tb.wait_for(
                lambda probe=probe: (text := tb.log_tail(probe, 100000)) and "RELEASED" in text
                and text,
                15,
                what=f"{method} probe to finish",
            )  # fmt: skip
            self.assertIn(f"RECEIVED {method} FROM {net.public_address}:", log)
            rules = tb.run(home.router, ["nft", "list", "table", "inet", "mupnp_nat"]).stdout
            self.assertNotIn(f"192.168.1.2:{internal}", rules, method)


class HardNatMappingTests(TestCase):
    timeout = 300

    def test_hard_nat_with_mapping_goes_direct(self) -> None:
        """Three homes behind ``masquerade random``; only home 1's router runs miniupnpd. Home 1
        maps its WireGuard port (status shows it), advertises it, and goes direct with homes 2
        and 3: their packets arrive on the mapped port, their status calls that path ``mapped``
        (home 1's calls its paths to them ``direct``), and the introducer forwards nothing for
        those pairs during a transfer. Homes 2 and 3 (no mapping) stay relayed."""
        _require(self)
        tb = Testbed(self)
        net = nat_homes(tb, [(1, True), (1, True), (1, True)])
        start_miniupnpd(tb, net.homes[0].router, "192.168.1.0/24")
        intro_keys = wg_keypair()
        hosts = [home.hosts[0] for home in net.homes]
        keys = [wg_keypair() for _ in hosts]
        addresses = [f"10.98.0.{i + 2}" for i in range(len(hosts))]
        logdir = Path(tb.log_dir)
        lines = ["[Interface]", f"PrivateKey = {intro_keys.private}", f"ListenPort = {PORT}"]
        lines.append("Address = 10.98.0.1/24")
        lines.append("PortMapping = off")
        for k, address in zip(keys, addresses, strict=True):
            lines += ["", "[Peer]", f"PublicKey = {k.public}", f"AllowedIPs = {address}/32"]
        intro_if = tb.ifname("in")
        config = write_meshguard_config(logdir / "introducer.conf", "\n".join(lines) + "\n")
        start_meshguard(tb, net.public, config, intro_if)
        ifnames = []
        for index, ((ns, _), k, address) in enumerate(zip(hosts, keys, addresses, strict=True)):
            text = (
                f"[Interface]\nPrivateKey = {k.private}\nListenPort = {PORT}\n"
                f"Address = {address}/24\n\n[Peer]\nPublicKey = {intro_keys.public}\n"
                f"AllowedIPs = 10.98.0.1/32\nEndpoint = {net.public_address}:{PORT}\n"
                "PersistentKeepalive = 25\nIntroducer = yes\n"
            )
            ifname = tb.ifname(f"m{index}")
            start_meshguard(tb, ns, write_meshguard_config(logdir / f"m{index}.conf", text), ifname)
            ifnames.append(ifname)
        a, b, c = range(3)
        mapped = [net.homes[0].public, PORT]

        def mapping_shown() -> bool:
            node = read_status(ifnames[a])["node"]
            pm = node.get("port_mapping", {})
            return pm.get("state") == "mapped" and pm.get("external") == f"{mapped[0]}:{PORT}"

        tb.wait_for(mapping_shown, 30, what="home 1 to show its port mapping")

        def none_offered() -> bool:
            states = [read_status(ifnames[i])["node"].get("port_mapping", {}) for i in (b, c)]
            return all(s.get("state") == "none offered" for s in states)

        # Closed port 5351 (PCP, NAT-PMP), then UPnP discovery finds nothing (2 s).
        tb.wait_for(none_offered, 30, what="homes 2 and 3 to find no port mapping")

        def settled() -> bool:
            s = [read_status(i) for i in ifnames]
            return (
                _peer(s[b], keys[a].public).get("path") == "direct"
                and _peer(s[c], keys[a].public).get("path") == "direct"
                and _peer(s[a], keys[b].public).get("path") == "direct"
                and _peer(s[a], keys[c].public).get("path") == "direct"
                and str(_peer(s[b], keys[c].public).get("path")).startswith("relayed via")
            )

        try:
            tb.wait_for(settled, 90, interval=0.5, what="home 1 direct with homes 2 and 3")
        except AssertionError:
            summary = {
                i: {
                    p["public_key"][:6]: (p.get("path"), p.get("endpoint"), p.get("candidates"))
                    for p in read_status(ifnames[i])["peers"]
                }
                for i in range(3)
            }
            self.fail(f"paths did not settle: {summary} keys {[k.public[:6] for k in keys]}")
        for other in (b, c):
            status = read_status(ifnames[other])
            peer = _peer(status, keys[a].public)
            # The other home sends to home 1's mapped port, and hears it from there; the path
            # arbiter calls that path "mapped" (status and the table), home 1's own paths to
            # them (to where their pings came from) are "direct".
            self.assertEqual(peer["endpoint"], mapped)
            self.assertIn(f"{mapped[0]}:{PORT}", peer["candidates"])
            self.assertEqual(peer["path_kind"], "mapped")
            self.assertIsNone(peer["not_direct_reason"])
            row = [line for line in format_table(status).splitlines() if " mapped" in line]
            self.assertEqual(len(row), 1, format_table(status))
            self.assertEqual(
                _peer(read_status(ifnames[a]), keys[other].public)["path_kind"], "direct"
            )

        def forwarded(x: int, y: int) -> int:
            counts = read_status(intro_if)["node"].get("relay_forwarded_by_pair", {})
            return int(counts.get(f"{keys[x].public}>{keys[y].public}", 0))

        # Home 1's router counts, per peer home, the bytes that peer sends to the mapped port
        # (first in the chain: miniupnpd's own rule accepts them).
        router = net.homes[0].router
        for other in (b, c):
            tb.run(
                router,
                ["nft", "insert", "rule", "inet", "mupnp_filter", "forward", "ct", "direction",
                 "original", "ct", "original", "ip", "saddr", net.homes[other].public, "ct",
                 "original", "ip", "daddr", mapped[0], "meta", "l4proto", "udp", "ct",
                 "original", "proto-dst", str(PORT), "counter"],
            )  # fmt: skip

        def mapped_bytes() -> dict[str, int]:
            chain = tb.run(router, ["nft", "list", "chain", "inet", "mupnp_filter", "forward"])
            found = re.findall(r"ip saddr ([\d.]+) .*counter packets \d+ bytes (\d+)", chain.stdout)
            return {source: int(count) for source, count in found}

        before = {pair: forwarded(*pair) for pair in ((a, b), (b, a), (a, c), (c, a))}
        relayed_before = forwarded(b, c)
        mapped_before = mapped_bytes()
        host_ns = [ns for ns, _ in hosts]
        self.assertTrue(tb.tcp_transfer(host_ns[a], host_ns[b], addresses[a], 4 << 20))
        self.assertTrue(tb.tcp_transfer(host_ns[c], host_ns[a], addresses[c], 1 << 20))
        self.assertTrue(tb.ping(host_ns[b], addresses[c], count=3, timeout=2))
        after = {pair: forwarded(*pair) for pair in before}
        self.assertEqual(after, before)
        self.assertGreater(forwarded(b, c), relayed_before)
        # The peers' packets arrived on the mapped port: home 2's whole 4 MiB upload to home 1,
        # and home 3's side (the acknowledgements) of home 1's 1 MiB upload to it. With the
        # TUN offloads (docs/datapath.md) home 3's kernel sees coalesced segments and sends
        # only a few dozen acknowledgements (3.0-3.9 kB measured), still many times the path
        # checks (a ~100-byte PATH_PING every 4 s) the counter also sees.
        grown = {k: v - mapped_before.get(k, 0) for k, v in mapped_bytes().items()}
        self.assertGreater(grown[net.homes[b].public], 4 << 20, grown)
        self.assertGreater(grown[net.homes[c].public], 1500, grown)


class NodeLifecycleTests(TestCase):
    timeout = 120

    def test_node_maps_at_start_and_removes_on_reload_off_and_on_stop(self) -> None:
        """A node behind a router running miniupnpd maps its port at start (status shows
        it), removes it when a reload says ``PortMapping = off`` (the status field goes), maps
        again when a reload says ``auto``, moves the mapping when a reload changes
        ``ListenPort``, maps again within seconds when the router's miniupnpd restarts with
        its rules gone (it multicasts a PCP ANNOUNCE), and removes the mapping when it is
        stopped (SIGTERM)."""
        _require(self)
        tb = Testbed(self)
        net = nat_homes(tb, [(1, True)])
        home = net.homes[0]
        host, _ = home.hosts[0]
        daemon = start_miniupnpd(tb, home.router, "192.168.1.0/24")
        keys = wg_keypair()
        base = f"[Interface]\nPrivateKey = {keys.private}\nListenPort = {PORT}\n"
        path = write_meshguard_config(Path(tb.log_dir) / "node.conf", base)
        ifname = tb.ifname("pm")
        proc = start_meshguard(tb, host, path, ifname)

        def rule(port: int = PORT) -> bool:
            table = tb.run(home.router, ["nft", "list", "table", "inet", "mupnp_nat"]).stdout
            return f"192.168.1.2:{port}" in table

        def state() -> str | None:
            value = read_status(ifname)["node"].get("port_mapping")
            return None if value is None else str(value["state"])

        tb.wait_for(lambda: state() == "mapped" and rule(), 15, what="a mapping at start")
        shown = format_status(read_status(ifname))
        self.assertIn(f"  port mapping: PCP {home.public}:{PORT} (expires in 1h5", shown)

        # The router "reboots": miniupnpd restarts and its rules are gone.
        tb.stop(daemon)
        for chain in ("prerouting_miniupnpd", "postrouting_miniupnpd"):
            tb.run(home.router, ["nft", "flush", "chain", "inet", "mupnp_nat", chain])
        tb.run(home.router, ["nft", "flush", "chain", "inet", "mupnp_filter", "miniupnpd"])
        self.assertFalse(rule())
        start_miniupnpd(tb, home.router, "192.168.1.0/24")
        tb.wait_for(rule, 15, what="the mapping again after the gateway's announcement")
        self.assertEqual(read_status(ifname)["node"]["port_mapping"]["announcements"], 1)
        path.write_text(base + "PortMapping = off\n")
        proc.send_signal(signal.SIGHUP)  # reload
        tb.wait_for(lambda: state() is None and not rule(), 15, what="removal on reload")
        path.write_text(base + "PortMapping = auto\n")
        proc.send_signal(signal.SIGHUP)
        tb.wait_for(lambda: state() == "mapped" and rule(), 15, what="a mapping after reload")
        path.write_text(base.replace(f"ListenPort = {PORT}", f"ListenPort = {PORT + 1}"))
        proc.send_signal(signal.SIGHUP)
        tb.wait_for(lambda: rule(PORT + 1) and not rule(PORT), 15, what="the mapping to move ports")
        external = read_status(ifname)["node"]["port_mapping"]["external"]
        self.assertEqual(external, f"{home.public}:{PORT + 1}")
        self.assertIn(tb.stop(proc), (0, -signal.SIGTERM), tb.log_tail(proc))
        self.assertFalse(rule(PORT + 1))
