"""A node running as an unprivileged user keeps working after start (real namespaces).

Two ways to run without root hold only ``CAP_NET_ADMIN``: ``setpriv`` with the capability
ambient (what systemd's ``AmbientCapabilities=`` does, examples/meshguard@.service), and
``twistd --uid/--gid`` started as root (meshguard/capabilities.py keeps the capability across
twistd's user switch). Each node is checked to run as ``nobody`` with no capability but
``CAP_NET_ADMIN``, to route a member its introducer told it about, and then to apply a reload
(SIGHUP): a new route, a new address and a new MTU.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from tests.netns import (
    REPO_ROOT,
    MeshguardPeer,
    Testbed,
    meshguard_config_text,
    meshguard_env,
    require_root_netns,
    start_meshguard,
    twistd_argv,
    two_hosts,
    wg_keypair,
    write_meshguard_config,
)

NOBODY = 65534
PORT = 51820
CAP_NET_ADMIN_MASK = 1 << 12


class UnprivilegedNodeTests(TestCase):
    def setUp(self) -> None:
        require_root_netns(self, binaries=("ip", "setpriv", "ping"))
        self.tb = Testbed(self)
        self.hosts = two_hosts(self.tb)
        self.a_key, self.b_key, self.c_key = wg_keypair(), wg_keypair(), wg_keypair()
        # The unprivileged node's files live where nobody can read and write them.
        self.home = Path(tempfile.mkdtemp(prefix="mg-unpriv-"))
        self.addCleanup(shutil.rmtree, self.home, True)
        for sub in ("uapi", "status"):
            (self.home / sub).mkdir()
            os.chown(self.home / sub, NOBODY, NOBODY)
        os.chown(self.home, NOBODY, NOBODY)
        b_if = self.tb.ifname("ub")
        b_conf = write_meshguard_config(
            self.tb.log_dir / f"{b_if}.conf",
            meshguard_config_text(
                self.b_key.private,
                listen_port=PORT,
                addresses=["10.99.0.2/24"],
                peers=[
                    MeshguardPeer(
                        self.a_key.public,
                        allowed_ips=["10.99.0.1/32", "10.99.7.1/32"],
                        endpoint=f"{self.hosts.a_addr}:{PORT}",
                    ),
                    # A member B introduces to A: A learns it and routes its AllowedIPs.
                    MeshguardPeer(self.c_key.public, allowed_ips=["10.98.0.3/32"]),
                ],
            ),
        )
        start_meshguard(self.tb, self.hosts.b, b_conf, b_if)
        # C: a member of B's, behind B on its own link, that B lists to A.
        c = self.tb.netns("c")
        self.tb.veth(c, "eth0", self.hosts.b, "eth1")
        self.tb.addr(c, "eth0", "10.0.1.1/24")
        self.tb.addr(self.hosts.b, "eth1", "10.0.1.2/24")
        c_if = self.tb.ifname("uc")
        c_text = meshguard_config_text(
            self.c_key.private,
            listen_port=PORT,
            addresses=["10.98.0.3/24"],
            peers=[
                MeshguardPeer(
                    self.b_key.public,
                    allowed_ips=["10.99.0.2/32"],
                    endpoint=f"10.0.1.2:{PORT}",
                    persistent_keepalive=25,
                )
            ],
        )
        c_conf = write_meshguard_config(
            self.tb.log_dir / f"{c_if}.conf", c_text + "Introducer = yes\n"
        )
        start_meshguard(self.tb, c, c_conf, c_if)
        # 10.99.5.1 on B stands for a network behind B that A learns a route to on reload.
        self.tb.ip(self.hosts.b, "addr", "add", "10.99.5.1/32", "dev", "lo")

    def a_config(self, *, reloaded: bool) -> str:
        return meshguard_config_text(
            self.a_key.private,
            listen_port=PORT,
            addresses=["10.99.0.1/24", *(["10.99.7.1/32"] if reloaded else [])],
            mtu=1380 if reloaded else 1420,
            peers=[
                MeshguardPeer(
                    self.b_key.public,
                    allowed_ips=["10.99.0.2/32", *(["10.99.5.0/24"] if reloaded else [])],
                    endpoint=f"{self.hosts.b_addr}:{PORT}",
                )
            ],
        )

    def write_a_config(self, path: Path, *, reloaded: bool) -> None:
        # B is A's introducer (the last and only [Peer] section).
        path.write_text(self.a_config(reloaded=reloaded) + "Introducer = yes\n")
        path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)

    def start_a(self, wrap: list[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
        a_if = self.tb.ifname("ua")
        conf = self.home / f"{a_if}.conf"
        self.write_a_config(conf, reloaded=False)
        dirs = ["--uapi-dir", str(self.home / "uapi"), "--status-dir", str(self.home / "status")]
        argv = [*twistd_argv(conf, a_if), *dirs]
        if wrap and wrap[0] == "--uid":
            argv = [argv[0], *wrap[1:], *argv[1:]]
        else:
            # The interpreter with twistd's entry point (its script may be unreadable to nobody).
            run = (
                "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
            )
            argv = [*wrap, sys.executable, "-c", run, *argv[1:]]
        proc = self.tb.spawn(self.hosts.a, argv, env=meshguard_env(), cwd=REPO_ROOT)
        self.tb.wait_for(
            lambda: proc.poll() is not None or (self.home / "uapi" / f"{a_if}.sock").exists(),
            timeout=20,
            what="unprivileged node's UAPI socket",
        )
        self.assertIsNone(proc.poll(), self.tb.log_tail(proc))
        return proc, a_if, conf

    def status_of(self, pid: int) -> dict[str, str]:
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields

    def check_node(self, wrap: list[str]) -> None:
        proc, a_if, conf = self.start_a(wrap)
        a, b = self.hosts.a, self.hosts.b
        self.tb.wait_for(
            lambda: self.tb.ping(a, "10.99.0.2", timeout=1),
            timeout=20,
            what="ping through the unprivileged node's tunnel",
        )
        # It runs as nobody, holding CAP_NET_ADMIN and nothing else.
        status = self.status_of(proc.pid)
        self.assertEqual(status["Uid"].split()[1], str(NOBODY), status["Uid"])
        self.assertEqual(int(status["CapEff"], 16), CAP_NET_ADMIN_MASK, status["CapEff"])
        # A learned member's route, added after start.
        self.tb.wait_for(
            lambda: "10.98.0.3" in self.tb.ip(a, "route", "show", "dev", a_if),
            timeout=20,
            what="route to the member B introduced",
        )
        self.tb.wait_for(
            lambda: self.tb.ping(a, "10.98.0.3", timeout=1),
            timeout=15,
            what="ping to the learned member (relayed by B)",
        )
        # Reload: a new AllowedIPs range (a route), a new address and a new MTU.
        self.write_a_config(conf, reloaded=True)
        os.kill(proc.pid, signal.SIGHUP)

        def applied() -> bool:
            routes = self.tb.ip(a, "route", "show", "dev", a_if)
            link = self.tb.ip(a, "-o", "link", "show", "dev", a_if)
            addrs = self.tb.ip(a, "-o", "addr", "show", "dev", a_if)
            return "10.99.5.0/24" in routes and " mtu 1380 " in link and "10.99.7.1/32" in addrs

        self.tb.wait_for(applied, timeout=10, what="reload applied by the unprivileged node")
        log = self.tb.log_tail(proc, 20000)
        self.assertNotIn("partly applied", log)
        self.assertIsNone(re.search(r"without CAP_NET_ADMIN", log), log[-2000:])
        self.assertTrue(self.tb.ping(a, "10.99.5.1", timeout=2), "new route does not carry")
        self.assertTrue(
            self.tb.ping(b, "10.99.7.1", timeout=2), "the reloaded address is not reachable"
        )
        self.assertIsNone(proc.poll())

    def test_setpriv_ambient_net_admin(self) -> None:
        """As systemd's User= + AmbientCapabilities=CAP_NET_ADMIN would start it: the process
        begins as nobody holding the capability (ambient).

        ``setpriv`` execs the interpreter as nobody, which needs an interpreter and packages
        nobody can read (a system install, as on CI; otherwise the test is skipped, failed on
        CI), and a ``/dev/net/tun`` others may open, as a stock host has (0666)."""
        setpriv = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
            "--",
        ]
        probe = subprocess.run(
            [*setpriv, sys.executable, "-c", "import twisted.scripts.twistd, meshguard.tap"],
            capture_output=True,
            env={**os.environ, **meshguard_env()},
            cwd=REPO_ROOT,
            check=False,
        )
        if probe.returncode != 0:
            reason = f"nobody cannot run {sys.executable} with twisted: {probe.stderr[-300:]!r}"
            if os.environ.get("CI") == "true":
                self.fail(reason)
            raise SkipTest(reason)
        if not os.stat("/dev/net/tun").st_mode & 0o006 and shutil.which("unshare"):
            # Opening it is a file permission check (0666 on a stock host), not a capability.
            # Where the host has it 0600 (some containers), the node gets a stock one: the same
            # device, 0666, bound over /dev/net/tun in a private mount namespace of its own.
            device = str(self.home / "tun")
            setpriv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mknod -m 666 "$0" c 10 200 && mount --bind "$0" /dev/net/tun && exec "$@"',
                device,
                *setpriv,
            ]
        self.check_node(setpriv)

    def test_twistd_uid_switch(self) -> None:
        """Started as root with ``twistd --uid/--gid``: the capability survives the switch."""
        self.check_node(["--uid", "--uid", str(NOBODY), "--gid", str(NOBODY)])
