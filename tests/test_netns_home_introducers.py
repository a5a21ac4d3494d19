"""A home mesh with two introducers, each with its own SQLite store: members joined through
either are learned everywhere, each store ends up holding both members' signed records, and a
removal made on one introducer reaches the other through the mesh."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from meshguard.adapters.store import SqliteStore
from meshguard.app.status_client import read_status
from meshguard.codecs.config import load_config
from tests.netns import Namespace, Testbed, nat_homes, require_root_netns, start_meshguard
from tests.test_netns_invite import meshguard_cli, peer_keys

PORT = 51820


class HomeIntroducersTests(TestCase):
    timeout = 300

    def test_two_introducers_exchange_records_and_revocations_through_the_mesh(self) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False), (1, False)], extra_public=1)
        logdir = Path(tb.log_dir)
        state, state2, etc = logdir / "state", logdir / "state2", logdir / "etc"
        hub2_ns = Namespace(f"{tb.prefix}-pub2")
        meshguard_cli(
            tb, net.public, "mesh", "init", "home", "--prefix", "10.99.0.0/24",
            "--endpoint", f"{net.public_address}:{PORT}", "--state-dir", str(state),
            "--config-dir", str(etc),
        )  # fmt: skip
        store2 = logdir / "hub2" / "home.db"
        made = meshguard_cli(
            tb, net.public, "mesh", "introducer", "hub2", "--endpoint", f"198.51.101.2:{PORT}",
            "--store", f"sqlite:{store2}", "--admin-dir", str(state2),
            "--config", str(etc / "hub2.conf"), "--state-dir", str(state),
        )  # fmt: skip
        block = made.stdout.split("then send it SIGHUP:\n", 1)[1]
        hub_config = etc / "home.conf"
        hub_config.write_text(hub_config.read_text() + block)
        hub_if, hub2_if = tb.ifname("h1"), tb.ifname("h2")
        start_meshguard(tb, net.public, hub_config, hub_if)
        start_meshguard(tb, hub2_ns, etc / "hub2.conf", hub2_if)

        # Alice is invited from the first introducer's store, Bob from the second's.
        homes = [home.hosts[0][0] for home in net.homes]
        ifnames, addresses = [], []
        for index, (name, admin) in enumerate((("alice", state), ("bob", state2))):
            line = meshguard_cli(tb, net.public, "invite", name, "--state-dir", str(admin))
            config = logdir / f"{name}.conf"
            meshguard_cli(tb, homes[index], "join", line.stdout.strip(), "--config", str(config))
            ifnames.append(tb.ifname(f"m{index}"))
            addresses.append(str(load_config(str(config)).interface.addresses[0].ip))
            start_meshguard(tb, homes[index], config, ifnames[-1])
        alice_key = read_status(ifnames[0])["public_key"]
        bob_key = read_status(ifnames[1])["public_key"]

        def ping(ns: Namespace, host: str) -> bool:
            argv = ["ping", "-c", "1", "-W", "1", host]
            return tb.run(ns, argv, check=False, timeout=5).returncode == 0

        try:
            tb.wait_for(
                lambda: ping(homes[0], addresses[1]) and ping(homes[1], addresses[0]),
                timeout=60,
                what="alice and bob reach each other",
            )
        except Exception:
            import json

            for i in (hub_if, hub2_if, *ifnames):
                print(json.dumps(read_status(i), indent=1))
            raise

        def stored(path: Path) -> set[str]:
            return set(SqliteStore(str(path)).snapshot().records)

        store1 = state / "home.db"
        tb.wait_for(
            lambda: stored(store1) == stored(store2) and len(stored(store1)) == 4,
            timeout=30,
            what="both stores hold hub, hub2, alice and bob",
        )

        # Bob is removed through the first introducer's store (which learned him through the
        # mesh); the second introducer hears the revocation through the mesh and cuts him off.
        meshguard_cli(tb, net.public, "members", "remove", "bob", "--state-dir", str(state))
        tb.wait_for(
            lambda: all(
                bob_key not in peer_keys(read_status(i)) for i in (hub_if, hub2_if, ifnames[0])
            ),
            timeout=20,
            what="bob removed from both introducers and from alice",
        )
        tb.wait_for(
            lambda: len(SqliteStore(str(store2)).snapshot().revocations) == 1,
            timeout=10,
            what="the second introducer's store holds the revocation",
        )
        # Each store allocates from its own half of the prefix: no address is given twice.
        self.assertEqual(addresses, ["10.99.0.3", "10.99.0.129"])
        self.assertFalse(ping(homes[1], addresses[0]))
        self.assertIn(alice_key, peer_keys(read_status(hub2_if)))
