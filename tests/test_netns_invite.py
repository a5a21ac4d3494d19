"""Invitations for real: a public introducer and three homes behind NATs, from ``mesh init`` and
one ``invite``/``join`` per home to every home pinging every other by name; an unsigned member
injected by the introducer is ignored; a removed member is cut off everywhere."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from tests.netns import (
    Namespace,
    Testbed,
    meshguard_env,
    nat_homes,
    require_root_netns,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)

PORT = 51820
NETNS_ETC = Path("/etc/netns")


def meshguard_cli(tb: Testbed, ns: Namespace, *args: str, check: bool = True) -> Any:
    return tb.run(
        ns, [sys.executable, "-m", "meshguard.app.cli", *args], timeout=30, env=meshguard_env(),
        check=check,
    )  # fmt: skip


def peer_keys(status: dict[str, Any]) -> set[str]:
    return {p["public_key"] for p in status["peers"]}


class InvitationMeshTests(TestCase):
    timeout = 300

    def test_three_homes_join_by_invitation_and_ping_by_name(self) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False), (1, False), (1, True)], extra_public=1)
        logdir = Path(tb.log_dir)
        state, etc = logdir / "state", logdir / "etc"
        timings: dict[str, float] = {}

        # The admin, on the public node: make the mesh and its first introducer.
        zero = started = time.monotonic()
        meshguard_cli(
            tb, net.public, "mesh", "init", "home", "--prefix", "10.99.0.0/24",
            "--endpoint", f"{net.public_address}:{PORT}", "--state-dir", str(state),
            "--config-dir", str(etc),
        )  # fmt: skip
        timings["mesh init"] = time.monotonic() - started
        hub_config = etc / "home.conf"

        # A hostile twist: the introducer's config also lists a plain peer (a meshguard node
        # outside the authority) that it will announce to every home without a record.
        evil_ns = Namespace(f"{tb.prefix}-pub2")
        evil = wg_keypair()
        hub_text = hub_config.read_text()
        hub_private = next(
            line.split("=", 1)[1].strip()
            for line in hub_text.splitlines()
            if line.startswith("PrivateKey")
        )
        hub_public = tb.run(None, ["wg", "pubkey"], input=hub_private + "\n").stdout.strip()
        hub_config.write_text(
            hub_text + f"\n[Peer]\nPublicKey = {evil.public}\nAllowedIPs = 10.99.0.66/32\n"
        )
        hub_if = tb.ifname("hub")
        start_meshguard(tb, net.public, hub_config, hub_if)
        evil_if = tb.ifname("ev")
        evil_config = write_meshguard_config(
            logdir / "evil.conf",
            f"[Interface]\nPrivateKey = {evil.private}\nListenPort = {PORT}\n"
            f"Address = 10.99.0.66/24\n\n[Peer]\nPublicKey = {hub_public}\n"
            f"AllowedIPs = 10.99.0.1/32\nEndpoint = {net.public_address}:{PORT}\n"
            "PersistentKeepalive = 5\n",
        )
        evil_started = time.monotonic()
        start_meshguard(tb, evil_ns, evil_config, evil_if)
        timings["(test only) starting the injected node"] = time.monotonic() - evil_started

        # One invitation and one join per home.
        homes = [home.hosts[0][0] for home in net.homes]
        names = ["alice", "bob", "carol"]
        ifnames: list[str] = []
        lines: list[str] = []
        for index, (ns, name) in enumerate(zip(homes, names, strict=True)):
            started = time.monotonic()
            line = meshguard_cli(tb, net.public, "invite", name, "--state-dir", str(state))
            line = line.stdout.strip()
            lines.append(line)
            config = logdir / f"{name}.conf"
            meshguard_cli(tb, ns, "join", line, "--config", str(config))
            timings[f"invite + join {name}"] = time.monotonic() - started
            node_started = time.monotonic()
            self.assertEqual(config.stat().st_mode & 0o777, 0o600)
            ifname = tb.ifname(f"m{index}")
            start_meshguard(tb, ns, config, ifname)
            timings[f"start {name}'s node"] = time.monotonic() - node_started
            ifnames.append(ifname)
            # Each home resolves the mesh's names through its own node's DNS.
            etc_dir = NETNS_ETC / ns.name
            etc_dir.mkdir(parents=True, exist_ok=True)
            self.addCleanup(shutil.rmtree, etc_dir, True)
            (etc_dir / "resolv.conf").write_text(f"nameserver 10.99.0.{index + 2}\n")
        joined = time.monotonic()

        def ping(ns: Namespace, host: str) -> bool:
            argv = ["ping", "-c", "1", "-W", "1", host]
            return tb.run(ns, argv, check=False, timeout=5).returncode == 0

        def all_by_name() -> bool:
            return all(
                ping(ns, f"{other}.home")
                for ns, me in zip(homes, names, strict=True)
                for other in names
                if other != me
            )

        tb.wait_for(all_by_name, timeout=60, what="every home pings every other by name")
        timings["last join to all pinging by name"] = time.monotonic() - joined
        timings["zero to all pinging by name (all commands, node start-ups)"] = (
            time.monotonic() - zero - timings["(test only) starting the injected node"]
        )
        self.assertTrue(ping(homes[0], "hub.home"))

        # Alice and Bob sit behind NATs that keep one mapping per socket: they go direct.
        bob_key = read_status(ifnames[1])["public_key"]

        def direct() -> bool:
            ping(homes[0], "bob.home")
            peers = read_status(ifnames[0])["peers"]
            return any(p["public_key"] == bob_key and p["path"] == "direct" for p in peers)

        tb.wait_for(direct, timeout=40, what="alice reaches bob directly")

        # Names in status; the injected unsigned member was refused everywhere.
        for ifname, me in zip(ifnames, names, strict=True):
            status = read_status(ifname)
            self.assertEqual(status["node"]["name"], me)
            shown = {p.get("name") for p in status["peers"]}
            self.assertEqual(shown, {"hub", *(n for n in names if n != me)})
            self.assertNotIn(evil.public, peer_keys(status))
        tb.wait_for(
            lambda: all(read_status(i)["node"]["members_refused"] > 0 for i in ifnames),
            timeout=20,
            what="every home refused the unsigned member",
        )
        self.assertFalse(ping(homes[0], "10.99.0.66"))

        # A used invitation cannot be used again.
        again = meshguard_cli(
            tb, homes[2], "join", lines[2], "--config", str(logdir / "again.conf"), check=False
        )
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("already used", again.stderr)
        self.assertFalse((logdir / "again.conf").exists())

        # Remove carol: every node drops her within a bounded time; she reaches nobody.
        carol_key = read_status(ifnames[2])["public_key"]
        started = time.monotonic()
        meshguard_cli(tb, net.public, "members", "remove", "carol", "--state-dir", str(state))

        def carol_gone() -> bool:
            return all(carol_key not in peer_keys(read_status(i)) for i in (hub_if, *ifnames[:2]))

        tb.wait_for(carol_gone, timeout=15, what="carol removed from every node")
        timings["remove to cut off everywhere"] = time.monotonic() - started
        self.assertFalse(ping(homes[2], "10.99.0.2"))
        self.assertFalse(ping(homes[0], "10.99.0.4"))
        self.assertTrue(ping(homes[0], "bob.home"))
        (logdir / "timings.txt").write_text(
            "".join(f"{k}: {v:.2f} s\n" for k, v in timings.items())
        )
        print(timings)
