"""Persistent keepalive through a real NAT: a home behind a masquerading router (nftables) with
short UDP conntrack timeouts, a hub on the far side (network namespaces, real kernel NAT).

The one legitimate wait in these tests is real time passing so that conntrack forgets an idle
mapping; the router's timeouts are set to a few seconds to keep that short.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.mesh import keepalive as K
from meshguard.status_client import read_status
from tests.netns import (
    Namespace,
    Testbed,
    nat_home,
    require_root_netns,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)

HOME_TUN = "10.99.0.1"
HUB_TUN = "10.99.0.2"
PORT = 51820

_COUNTER_TABLE = """table inet mg_keepalive_count {
  chain count {
    type filter hook forward priority -10
    iifname "lan0" udp sport 51820 counter
  }
}
"""


def home_config(private: str, hub_public: str, hub_addr: str, keepalive: str) -> str:
    return (
        f"[Interface]\nPrivateKey = {private}\nListenPort = {PORT}\nAddress = {HOME_TUN}/24\n\n"
        f"[Peer]\nPublicKey = {hub_public}\nAllowedIPs = {HUB_TUN}/32\n"
        f"Endpoint = {hub_addr}:{PORT}\nPersistentKeepalive = {keepalive}\n"
    )


def hub_config(private: str, home_public: str, keepalive: str) -> str:
    return (
        f"[Interface]\nPrivateKey = {private}\nListenPort = {PORT}\nAddress = {HUB_TUN}/24\n\n"
        f"[Peer]\nPublicKey = {home_public}\nAllowedIPs = {HOME_TUN}/32\n"
        f"PersistentKeepalive = {keepalive}\n"
    )


def conntrack_flows(tb: Testbed, router: Namespace, port: int = PORT) -> int:
    """UDP conntrack entries in the router from the home's WireGuard port."""
    text = tb.run(router, ["cat", "/proc/net/nf_conntrack"]).stdout
    return sum(
        1
        for line in text.splitlines()
        if " udp " in line and "src=192.168.1.2 " in line and f"sport={port} " in line
    )


def forwarded_from_home(tb: Testbed, router: Namespace) -> int:
    listing = tb.run(router, ["nft", "list", "table", "inet", "mg_keepalive_count"]).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))


class KeepaliveThroughNatTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def idle(self, seconds: float) -> None:
        """Real time passes with no traffic from us: the router's conntrack timer runs."""
        time.sleep(seconds)

    def test_fixed_keepalive_keeps_home_reachable_and_off_loses_it(self) -> None:
        """meshguard at home, wireguard-go at the hub, conntrack 6 s. Keepalive off: after 3
        timeouts of idle the mapping is gone (conntrack empty) and the hub cannot ping the home.
        Keepalive 2 s set through UAPI (`wg set`): after the same idle the hub reaches the home.
        A SIGHUP reload of the file sets another number."""
        tb = self.tb
        timeout = 6
        nat = nat_home(tb, conntrack_timeout=timeout)
        home_key, hub_key = wg_keypair(), wg_keypair()
        hub_if, home_if = tb.ifname("hub"), tb.ifname("home")
        tb.start_wireguard_go(nat.hub, hub_if)
        tb.wg_set_interface(nat.hub, hub_if, hub_key.private, PORT)
        tb.wg_set_peer(nat.hub, hub_if, home_key.public, allowed_ips=(f"{HOME_TUN}/32",))
        tb.addr(nat.hub, hub_if, f"{HUB_TUN}/24")
        tb.up(nat.hub, hub_if)
        config = tb.log_dir / "home.conf"
        text = home_config(home_key.private, hub_key.public, nat.hub_addr, "off")
        write_meshguard_config(config, text)
        home = start_meshguard(tb, nat.home, config, home_if)

        # Off: the hub learns the home's endpoint, then the mapping is forgotten.
        self.assertTrue(tb.ping(nat.home, HUB_TUN, count=3, timeout=6))
        self.assertTrue(tb.ping(nat.hub, HOME_TUN, timeout=2))
        self.idle(3 * timeout)
        # The last passive keepalive/handshake may be up to ~15 s after the ping: wait (bounded)
        # until the router holds no mapping for the home at all.
        tb.wait_for(
            lambda: conntrack_flows(tb, nat.router) == 0,
            timeout=4 * timeout,
            interval=0.5,
            what="the router to forget the home's mapping",
        )
        self.assertFalse(tb.ping(nat.hub, HOME_TUN, timeout=2), "reached without keepalive")

        # On, through UAPI (the stock wg tool).
        tb.wg(nat.home, "set", home_if, "peer", hub_key.public, "persistent-keepalive", "2")
        self.assertIn("every 2 seconds", tb.wg(nat.home, "show", home_if))
        tb.wait_for(
            lambda: tb.ping(nat.home, HUB_TUN, timeout=2), timeout=20, what="home reaches hub"
        )
        self.idle(3 * timeout)
        self.assertGreater(conntrack_flows(tb, nat.router), 0)
        self.assertTrue(tb.ping(nat.hub, HOME_TUN, timeout=2), "keepalive did not hold the NAT")

        # SIGHUP reload: the file's number wins again.
        write_meshguard_config(
            config, home_config(home_key.private, hub_key.public, nat.hub_addr, "4")
        )
        home.send_signal(signal.SIGHUP)
        tb.wait_for(
            lambda: "every 4 seconds" in tb.wg(nat.home, "show", home_if),
            timeout=10,
            what="reload to 4 s",
        )

    def test_auto_measures_nat_and_keeps_home_reachable(self) -> None:
        """meshguard on both sides, `PersistentKeepalive = auto`, conntrack 10 s: the home finds
        it is NATed, measures a lifetime below 10 s, keeps an interval within the bounds and
        below it; after idle periods of several timeouts the hub reaches the home. The hub
        (public) sends no keepalives."""
        tb = self.tb
        timeout = 10
        nat = nat_home(tb, conntrack_timeout=timeout)
        tb.nft(nat.router, _COUNTER_TABLE)
        home_key, hub_key = wg_keypair(), wg_keypair()
        hub_if, home_if = tb.ifname("hub"), tb.ifname("home")
        hub_conf = write_meshguard_config(
            tb.log_dir / "hub.conf", hub_config(hub_key.private, home_key.public, "auto")
        )
        start_meshguard(tb, nat.hub, hub_conf, hub_if)
        home_conf = write_meshguard_config(
            tb.log_dir / "home.conf",
            home_config(home_key.private, hub_key.public, nat.hub_addr, "auto"),
        )
        start_meshguard(tb, nat.home, home_conf, home_if)
        started = time.monotonic()

        def measured() -> dict[str, Any] | None:
            status: dict[str, Any] = read_status(home_if)
            return status if status["node"].get("nat_measurement") == "measured" else None

        status = tb.wait_for(measured, timeout=150, interval=1.0, what="NAT measured")
        took = time.monotonic() - started
        node = status["node"]
        lifetime = node["nat_lifetime"]
        interval = node["keepalive_interval"]
        self.assertEqual(node["nat"], "yes")
        self.assertLess(lifetime, timeout)
        self.assertGreaterEqual(lifetime, timeout * 0.6)
        self.assertTrue(K.INTERVAL_MIN <= interval < lifetime)
        peer = status["peers"][0]
        self.assertTrue(peer["keepalive_auto"])
        self.assertEqual(peer["keepalive_interval"], interval)
        hub_status = read_status(hub_if)
        self.assertEqual(hub_status["node"]["nat"], "no")
        self.assertEqual(hub_status["peers"][0]["keepalive_interval"], 0)
        self.assertIn(f"every {interval} seconds", tb.wg(nat.home, "show", home_if))

        before = forwarded_from_home(tb, nat.router)
        idle = 3 * timeout
        self.idle(idle)
        sent = forwarded_from_home(tb, nat.router) - before
        self.assertTrue(tb.ping(nat.hub, HOME_TUN, timeout=2), "hub lost the home with auto")
        # About idle / interval keepalives (+ a handshake when the session ages), not more.
        self.assertLessEqual(sent, idle / interval + 4)
        report = (
            f"conntrack {timeout} s: measured lifetime {lifetime} s in {took:.0f} s, "
            f"interval {interval} s, {sent} datagrams from the home in {idle} s idle "
            f"(fixed 25 s would send {idle / 25:.1f} and lose the home)\n"
        )
        Path(tb.log_dir / "keepalive.txt").write_text(report)
        print("\n  " + report.strip())
