"""The TLS relay over real networks: a home whose router drops UDP reaches its introducer (which
runs the relay) through TLS, moves back to UDP on its own once UDP passes, and comes back through
the relay after the relay node is killed and restarted, without a restart of its own."""

from __future__ import annotations

import shutil
from pathlib import Path

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.natmesh import status_peer
from tests.netns import (
    Testbed,
    block_udp,
    nat_home,
    require_root_netns,
    start_meshguard,
    unblock_udp,
    wg_keypair,
    write_meshguard_config,
)
from tests.relaycerts import TestCA

PORT = 51820
RELAY_PORT = 8443
RELAY_NAME = "relay.test"


class TlsRelayNetnsTests(TestCase):
    timeout = 240

    def test_blocked_udp_home_uses_the_relay_then_udp_then_survives_relay_restart(self) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_home(tb)
        logdir = Path(tb.log_dir)
        ca = TestCA(logdir / "pki")
        issued = ca.issue(RELAY_NAME)
        # The home resolves the relay's TLS name through its namespace's own hosts file.
        etc = Path("/etc/netns") / net.home.name
        etc.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, etc, True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{net.hub_addr} {RELAY_NAME}\n")

        hub_keys, home_keys = wg_keypair(), wg_keypair()
        hub_conf = write_meshguard_config(
            logdir / "hub.conf",
            "\n".join(
                [
                    "[Interface]",
                    f"PrivateKey = {hub_keys.private}",
                    f"ListenPort = {PORT}",
                    "Address = 10.77.0.1/24",
                    f"RelayListen = 0.0.0.0:{RELAY_PORT}",
                    f"RelayCertificate = {issued.certificate}",
                    f"RelayKey = {issued.key}",
                    "",
                    "[Peer]",
                    f"PublicKey = {home_keys.public}",
                    "AllowedIPs = 10.77.0.2/32",
                ]
            )
            + "\n",
        )
        home_conf = write_meshguard_config(
            logdir / "home.conf",
            "\n".join(
                [
                    "[Interface]",
                    f"PrivateKey = {home_keys.private}",
                    "Address = 10.77.0.2/24",
                    f"Relay = tls://{RELAY_NAME}:{RELAY_PORT}",
                    f"RelayCA = {ca.path}",
                    "",
                    "[Peer]",
                    f"PublicKey = {hub_keys.public}",
                    "AllowedIPs = 10.77.0.1/32",
                    f"Endpoint = {net.hub_addr}:{PORT}",
                    "PersistentKeepalive = 5",
                    "Introducer = yes",
                ]
            )
            + "\n",
        )
        block_udp(tb, net.router)
        hub_if, home_if = tb.ifname("hub"), tb.ifname("home")
        hub = start_meshguard(tb, net.hub, hub_conf, hub_if)
        start_meshguard(tb, net.home, home_conf, home_if)

        def hub_path() -> str:
            return str(status_peer(read_status(home_if), hub_keys.public).get("path"))

        # UDP is dropped at the router: the pair meets through the TLS relay.
        tb.wait_for(lambda: tb.ping(net.home, "10.77.0.1"), timeout=40, what="ping via relay")
        self.assertEqual(hub_path(), f"tls-relay via {RELAY_NAME}:{RELAY_PORT}")
        self.assertTrue(tb.ping(net.hub, "10.77.0.2", count=3))
        self.assertTrue(
            tb.tcp_transfer(net.hub, net.home, "10.77.0.1", 50 * 1024 * 1024, timeout=120)
        )
        self.assertTrue(tb.tcp_transfer(net.home, net.hub, "10.77.0.2", 5 * 1024 * 1024))

        # UDP passes again: the pair moves to UDP on its own.
        unblock_udp(tb, net.router)
        tb.wait_for(lambda: not hub_path().startswith("tls-relay"), timeout=30, what="UDP path")
        self.assertEqual(
            status_peer(read_status(home_if), hub_keys.public)["endpoint"][0], net.hub_addr
        )
        self.assertTrue(tb.ping(net.home, "10.77.0.1", count=3))

        # UDP blocked again, and the relay node killed and restarted: the home's client
        # reconnects with backoff and traffic flows through the relay again.
        block_udp(tb, net.router)
        tb.stop(hub)
        hub = start_meshguard(tb, net.hub, hub_conf, hub_if)
        tb.wait_for(lambda: tb.ping(net.home, "10.77.0.1"), timeout=60, what="ping after restart")
        self.assertEqual(hub_path(), f"tls-relay via {RELAY_NAME}:{RELAY_PORT}")
