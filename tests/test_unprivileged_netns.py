"""A node running as an unprivileged user keeps working after start (real namespaces).

Two ways to run without root hold only ``CAP_NET_ADMIN``: ``setpriv`` with the capability
ambient (what systemd's ``AmbientCapabilities=`` does, examples/meshguard@.service), and
``twistd --uid/--gid`` started as root (meshguard/adapters/capabilities.py keeps the capability
across twistd's user switch). Each node is checked to run as ``nobody`` with no capability but
``CAP_NET_ADMIN``, to route a member its introducer told it about, and then to apply a reload
(SIGHUP): a new route, a new address and a new MTU. And each, beside the same node run as root
for reference, has its interface moved to another namespace: traffic flows there, a reload
applies its peers (the link part fails, said once), and deleting the interface there ends the
node with nothing left behind.

Where the interpreter or the checkout lies under a directory nobody may search (``/root``),
the node runs in a private mount namespace that binds just those directories back over an
empty tmpfs, so these cases run (and fail, on CI) instead of skipping.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from twisted.trial.unittest import SkipTest, TestCase

from tests.netns import (
    REPO_ROOT,
    MeshguardPeer,
    Testbed,
    meshguard_config_text,
    meshguard_env,
    require_root_netns,
    start_meshguard,
    two_hosts,
    wg_keypair,
    write_meshguard_config,
)

NOBODY = 65534
PORT = 51820
CAP_NET_ADMIN_MASK = 1 << 12
UID_SWITCH = ("--uid", str(NOBODY), "--gid", str(NOBODY))


def exposing_mounts(paths: Iterable[Path], stage: Path) -> list[str]:
    """Shell commands (run as root in a private mount namespace) that let any user reach
    ``paths`` without changing a file of the host: a directory above them that others may not
    search (``/root`` holding a pyenv interpreter or a checkout) is covered by an empty tmpfs
    (0755) on which only ``paths`` are bound back, at their own paths. Each path is bound to a
    directory under ``stage`` first, while it can still be reached."""
    wanted = sorted({p.resolve() for p in paths if p.exists()})
    wanted = [p for p in wanted if not any(q in p.parents for q in wanted)]
    hidden: dict[Path, list[Path]] = {}
    for path in wanted:
        closed = [d for d in reversed(path.parents) if not os.stat(d).st_mode & 0o001]
        if closed:
            hidden.setdefault(closed[0], []).append(path)
    commands: list[str] = []
    for i, (closed_dir, inside) in enumerate(sorted(hidden.items())):
        staged = [stage / f"{i}.{j}" for j in range(len(inside))]
        for path, spare in zip(inside, staged, strict=True):
            commands += [f"mkdir -p {_q(spare)}", f"mount --bind {_q(path)} {_q(spare)}"]
        commands.append(f"mount -t tmpfs -o mode=0755 meshguard-test {_q(closed_dir)}")
        for path, spare in zip(inside, staged, strict=True):
            commands += [f"mkdir -p {_q(path)}", f"mount --bind {_q(spare)} {_q(path)}"]
    return commands


def _q(path: Path) -> str:
    return shlex.quote(str(path))


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

    def start_a(
        self, prefix: list[str], twistd_options: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[bytes], str, Path]:
        """Node A: ``prefix`` (setpriv, a private mount namespace) then this interpreter with
        twistd's entry point (its script may be unreadable to nobody), ``twistd_options``
        (``--uid``/``--gid``) and ``meshguard``."""
        a_if = self.tb.ifname("ua")
        conf = self.home / f"{a_if}.conf"
        self.write_a_config(conf, reloaded=False)
        run = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
        argv = [*prefix, sys.executable, "-c", run, *twistd_options, "-n", "--pidfile="]
        argv += ["meshguard", "--config", str(conf), "--interface", a_if]
        argv += ["--uapi-dir", str(self.home / "uapi"), "--status-dir", str(self.home / "status")]
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

    def check_node(self, prefix: list[str], twistd_options: tuple[str, ...] = ()) -> None:
        proc, a_if, conf = self.start_a(prefix, twistd_options)
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
        # Modules imported only when needed (miniupnpc for UPnP) load after the user switch.
        self.assertNotIn("No module named", log)
        self.assertIsNone(re.search(r"without CAP_NET_ADMIN", log), log[-2000:])
        self.assertTrue(self.tb.ping(a, "10.99.5.1", timeout=2), "new route does not carry")
        self.assertTrue(
            self.tb.ping(b, "10.99.7.1", timeout=2), "the reloaded address is not reachable"
        )
        self.assertIsNone(proc.poll())

    def check_interface_move(
        self,
        prefix: list[str],
        twistd_options: tuple[str, ...] = (),
        *,
        unprivileged: bool = True,
    ) -> None:
        """The interface moves to another namespace while the node runs, as for root
        (docs/running.md): it keeps carrying traffic there through the TUN descriptor and the
        UDP socket left behind; deleting it there ends the node, which removes its sockets and
        leaves no interface anywhere."""
        proc, a_if, conf = self.start_a(prefix, twistd_options)
        a, b = self.hosts.a, self.hosts.b
        self.tb.wait_for(
            lambda: self.tb.ping(a, "10.99.0.2", timeout=1),
            timeout=20,
            what="ping through the node's tunnel before the move",
        )
        if unprivileged:
            self.assertEqual(int(self.status_of(proc.pid)["CapEff"], 16), CAP_NET_ADMIN_MASK)
        # The administrator (root) moves it: the node itself holds no capability in the target.
        m = self.tb.netns("m")
        self.tb.ip(a, "link", "set", "dev", a_if, "netns", m.name)
        self.assertNotIn(a_if, self.tb.ip(a, "-o", "link", "show"))
        self.tb.addr(m, a_if, "10.99.0.1/24")
        self.tb.up(m, a_if)
        self.tb.wait_for(
            lambda: self.tb.ping(m, "10.99.0.2", timeout=1),
            timeout=15,
            what="ping from the namespace the interface moved to",
        )
        self.assertTrue(self.tb.ping(b, "10.99.0.1", timeout=2), "peer cannot reach the moved side")
        self.assertTrue(self.tb.tcp_transfer(b, m, "10.99.0.2", 2_000_000, timeout=30))
        self.assertIsNone(proc.poll(), self.tb.log_tail(proc))
        # A reload after the move: the peers part (B's new AllowedIPs) is applied; the link part
        # (address, MTU, route) cannot be, since the interface is no longer in the node's
        # namespace: that is said once and the node keeps running. Routes there are the
        # administrator's, as for root.
        self.write_a_config(conf, reloaded=True)
        os.kill(proc.pid, signal.SIGHUP)
        self.tb.wait_for(
            lambda: "reload partly applied" in self.tb.log_tail(proc, 20000),
            timeout=10,
            what="reload after the move",
        )
        self.tb.ip(m, "route", "add", "10.99.5.0/24", "dev", a_if)
        self.tb.wait_for(
            lambda: self.tb.ping(m, "10.99.5.1", timeout=1),
            timeout=10,
            what="ping over the AllowedIPs the reload added",
        )
        self.assertIsNone(proc.poll(), self.tb.log_tail(proc))
        uapi = self.home / "uapi" / f"{a_if}.sock"
        status = self.home / "status" / f"{a_if}.sock"
        self.assertTrue(uapi.exists())
        self.tb.ip(m, "link", "del", "dev", a_if)
        self.tb.wait_for(lambda: proc.poll() is not None, timeout=15, what="node exit")
        log = self.tb.log_tail(proc, 20000)
        self.assertEqual(proc.returncode, 0, log[-3000:])
        self.assertIn("is gone", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("No module named", log)
        self.assertFalse(uapi.exists(), "UAPI socket left behind")
        self.assertFalse(status.exists(), "status socket left behind")
        for ns in (a, m):
            self.assertNotIn(a_if, self.tb.ip(ns, "-o", "link", "show"))

    def for_nobody(self, *, setpriv: bool) -> list[str]:
        """The command prefix that runs the node as nobody on this host: ``setpriv`` to nobody
        with ``CAP_NET_ADMIN`` ambient (when ``setpriv``; else twistd switches user itself),
        wrapped, when the host needs it, in a private mount namespace that lets nobody reach
        the interpreter, the packages, the repository and ``/dev/net/tun`` without changing
        any file of the host.

        Opening ``/dev/net/tun`` is a file permission check (0666 on a stock host), not a
        capability: where the host has it 0600 (some containers), a setpriv-started node gets
        the same device with mode 0666 bound over it (twistd ``--uid`` opens it as root). An
        interpreter or checkout under a directory others may not search (``/root``) is reached
        through an empty tmpfs over that directory with only the needed directories bound back
        (the node imports some modules only when it needs them, after becoming nobody). Fails
        on CI (CI=true) when nobody still cannot import the node; skips elsewhere."""
        to_nobody = [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin",
            "--",
        ]
        mounts: list[str] = []
        if setpriv and not os.stat("/dev/net/tun").st_mode & 0o006:
            device = shlex.quote(str(self.home / "tun"))
            mounts += [f"rm -f {device}", f"mknod -m 666 {device} c 10 200"]
            mounts.append(f"mount --bind {device} /dev/net/tun")
        needed = [Path(sys.prefix), Path(sys.base_prefix), REPO_ROOT]
        needed += [Path(p) for p in site.getsitepackages()]
        mounts += exposing_mounts(needed, self.home / "stage")
        prefix: list[str] = []
        if mounts:
            if shutil.which("unshare") is None:
                self.unrunnable("unshare (util-linux) is needed to give nobody a stock host")
            script = " && ".join([*mounts, 'exec "$@"'])
            prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        probe = subprocess.run(
            [
                *prefix,
                *to_nobody,
                sys.executable,
                "-c",
                "import twisted.scripts.twistd, meshguard.app.tap, miniupnpc",
            ],
            capture_output=True,
            env={**os.environ, **meshguard_env()},
            cwd=REPO_ROOT,
            check=False,
            timeout=60,
        )
        if probe.returncode != 0:
            self.unrunnable(
                f"nobody cannot run {sys.executable} with twisted: {probe.stderr[-300:]!r}"
            )
        return [*prefix, *to_nobody] if setpriv else prefix

    def unrunnable(self, reason: str) -> NoReturn:
        if os.environ.get("CI") == "true":
            self.fail(reason)
        raise SkipTest(reason)

    def test_setpriv_ambient_net_admin(self) -> None:
        """As systemd's User= + AmbientCapabilities=CAP_NET_ADMIN would start it: the process
        begins as nobody holding the capability (ambient).

        ``setpriv`` execs the interpreter as nobody, which needs an interpreter and packages
        nobody can read and a ``/dev/net/tun`` others may open, as a stock host has (0666):
        :meth:`for_nobody` provides both where this host lacks them."""
        self.check_node(self.for_nobody(setpriv=True))

    def test_setpriv_interface_moved(self) -> None:
        """The setpriv-started node (as systemd's unit) follows its interface's move."""
        self.check_interface_move(self.for_nobody(setpriv=True))

    def test_twistd_uid_interface_moved(self) -> None:
        """The ``twistd --uid/--gid`` node follows its interface's move."""
        self.check_interface_move(self.for_nobody(setpriv=False), UID_SWITCH)

    def test_root_interface_moved(self) -> None:
        """The same move with the node running as root: the reference the others match."""
        self.check_interface_move([], unprivileged=False)

    def test_twistd_uid_switch(self) -> None:
        """Started as root with ``twistd --uid/--gid``: the capability survives the switch."""
        self.check_node(self.for_nobody(setpriv=False), UID_SWITCH)
