"""``Endpoint = name:port`` on a real network: when the peer moves and its name follows, meshguard
finds it again by resolving the name once the peer goes quiet (no restart, no roaming help)."""

from __future__ import annotations

import shutil
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    MeshguardPeer,
    Testbed,
    meshguard_config_text,
    require_root_netns,
    start_meshguard,
    two_hosts,
    wg_dump,
    wg_keypair,
    write_meshguard_config,
)

NAME = "peer-b.mesh.test"
GO_PORT = 51821


class DnsEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)

    def write_hosts(self, etc: Path, address: str) -> None:
        # In place (same inode): the running node sees it through its bind mount.
        with (etc / "hosts").open("w") as f:
            f.write(f"127.0.0.1 localhost\n{address} {NAME}\n")

    def test_a_moved_peer_is_found_again_through_its_name(self) -> None:
        """wireguard-go (which does not know meshguard's endpoint, so cannot roam back) moves
        to a new address and its name is updated: meshguard's handshakes to the old address go
        unanswered, it resolves the name again and the tunnel works at the new address."""
        tb = self.tb
        hosts = two_hosts(tb)
        etc = Path("/etc/netns") / hosts.a.name
        etc.mkdir(parents=True, exist_ok=True)
        self.addCleanup(shutil.rmtree, etc, True)
        self.write_hosts(etc, hosts.b_addr)

        mg_if, go_if = tb.ifname("mg"), tb.ifname("go")
        mg_key, go_key = wg_keypair(), wg_keypair()
        tb.start_wireguard_go(hosts.b, go_if)
        tb.wg_set_interface(hosts.b, go_if, go_key.private, GO_PORT)
        tb.wg_set_peer(hosts.b, go_if, mg_key.public, allowed_ips=("10.99.0.1/32",))
        tb.addr(hosts.b, go_if, "10.99.0.2/24")
        tb.up(hosts.b, go_if)
        text = meshguard_config_text(
            mg_key.private,
            listen_port=51820,
            addresses=("10.99.0.1/24",),
            peers=[
                MeshguardPeer(
                    go_key.public, allowed_ips=("10.99.0.2/32",), endpoint=f"{NAME}:{GO_PORT}"
                )
            ],
        )
        config = write_meshguard_config(tb.log_dir / f"{mg_if}.conf", text)
        start_meshguard(tb, hosts.a, config, mg_if)
        tb.wait_for(lambda: tb.ping(hosts.a, "10.99.0.2", timeout=1), timeout=15, what="ping")
        status = read_status(mg_if)
        self.assertEqual(status["peers"][0]["endpoint_name"], f"{NAME}:{GO_PORT}")

        tb.ip(hosts.b, "addr", "del", f"{hosts.b_addr}/24", "dev", hosts.b_dev)
        tb.addr(hosts.b, hosts.b_dev, "10.0.0.3/24")
        # wireguard-go forgets meshguard's endpoint and session, so it cannot announce its new
        # address (its keepalive from there would let meshguard roam without DNS).
        tb.wg(hosts.b, "set", go_if, "peer", mg_key.public, "remove")
        tb.wg_set_peer(hosts.b, go_if, mg_key.public, allowed_ips=("10.99.0.1/32",))
        self.write_hosts(etc, "10.0.0.3")
        # Quiet after ~15 s of data without an answer plus ~15 s of unanswered handshakes,
        # noticed within 5 s; then one handshake.
        tb.wait_for(
            lambda: tb.ping(hosts.a, "10.99.0.2", timeout=1), timeout=75, what="ping after move"
        )
        _, peers = wg_dump(tb, hosts.a, mg_if)
        self.assertEqual(peers[0][2], f"10.0.0.3:{GO_PORT}")
        log = next(tb.log_dir.glob("*-twistd.log")).read_text()
        self.assertIn(f"{NAME} now resolves to 10.0.0.3:{GO_PORT}", log)
