"""Two introducers on one real etcd: one is killed, a new member still joins through the other
and the members already there learn it."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from meshguard.codecs.config import load_config
from tests.etcd import etcd_argv, require_etcd
from tests.netns import Namespace, Testbed, nat_homes, require_root_netns, start_meshguard
from tests.test_netns_invite import NETNS_ETC, meshguard_cli

PORT = 51820
HEALTH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    body = urllib.request.urlopen(sys.argv[1] + '/health', timeout=1).read()\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
    "sys.exit(0 if b'true' in body else 1)\n"
)


class EtcdIntroducersTests(TestCase):
    timeout = 300

    def test_a_member_joins_through_the_second_introducer_after_the_first_dies(self) -> None:
        require_root_netns(self)
        etcd = require_etcd(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, False), (1, False), (1, False)], extra_public=2)
        logdir = Path(tb.log_dir)
        state, etc = logdir / "state", logdir / "etc"
        hub2_ns = Namespace(f"{tb.prefix}-pub2")
        etcd_ns = Namespace(f"{tb.prefix}-pub3")
        etcd_url = "http://198.51.102.2:2379"
        tb.spawn(etcd_ns, etcd_argv(etcd, str(logdir / "etcd"), "198.51.102.2", 2379, 2380))
        tb.wait_for(
            lambda: (
                tb.run(etcd_ns, [sys.executable, "-c", HEALTH, etcd_url], check=False).returncode
                == 0
            ),
            timeout=30,
            what="etcd to answer",
        )

        meshguard_cli(
            tb, net.public, "mesh", "init", "fleet", "--prefix", "10.99.0.0/24",
            "--endpoint", f"{net.public_address}:{PORT}", "--store", f"etcd:{etcd_url}",
            "--name", "hub1", "--state-dir", str(state), "--config-dir", str(etc),
        )  # fmt: skip
        meshguard_cli(
            tb, hub2_ns, "mesh", "introducer", "hub2", "--endpoint", f"198.51.101.2:{PORT}",
            "--config", str(etc / "hub2.conf"), "--state-dir", str(state),
        )  # fmt: skip
        hub1_if, hub2_if = tb.ifname("h1"), tb.ifname("h2")
        hub1 = start_meshguard(tb, net.public, etc / "fleet.conf", hub1_if)
        start_meshguard(tb, hub2_ns, etc / "hub2.conf", hub2_if)

        homes = [home.hosts[0][0] for home in net.homes]
        names = ["alice", "bob", "carol"]

        def enlist(index: int) -> None:
            ns, name = homes[index], names[index]
            line = meshguard_cli(tb, hub2_ns, "invite", name, "--state-dir", str(state))
            config = logdir / f"{name}.conf"
            meshguard_cli(tb, ns, "join", line.stdout.strip(), "--config", str(config))
            parsed = load_config(str(config))
            self.assertEqual(len([p for p in parsed.peers if p.introducer]), 2)
            start_meshguard(tb, ns, config, tb.ifname(f"m{index}"))
            etc_dir = NETNS_ETC / ns.name
            etc_dir.mkdir(parents=True, exist_ok=True)
            self.addCleanup(shutil.rmtree, etc_dir, True)
            own = parsed.interface.addresses[0].ip
            (etc_dir / "resolv.conf").write_text(f"nameserver {own}\n")

        def ping(ns: Namespace, host: str) -> bool:
            argv = ["ping", "-c", "1", "-W", "1", host]
            return tb.run(ns, argv, check=False, timeout=5).returncode == 0

        enlist(0)
        enlist(1)
        tb.wait_for(
            lambda: ping(homes[0], "bob.fleet") and ping(homes[1], "alice.fleet"),
            timeout=60,
            what="alice and bob reach each other by name",
        )

        # The first introducer dies (SIGKILL: no goodbye); carol joins with a line that lists
        # it first, so her join falls through to the second introducer.
        hub1.send_signal(signal.SIGKILL)
        hub1.wait()
        enlist(2)
        tb.wait_for(
            lambda: all(
                ping(homes[a], f"{names[b]}.fleet") for a in range(3) for b in range(3) if a != b
            ),
            timeout=90,
            what="carol and the others reach each other by name through the second introducer",
        )
