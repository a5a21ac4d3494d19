"""A node that cannot start says why in one line on stderr, exits non-zero, and leaves nothing.

Each case runs ``twistd -n --pidfile= meshguard --config FILE`` in a fresh namespace and checks
the exit status, that stderr is exactly one ``meshguard: ...`` line naming the problem (with
file and line for config errors), and that no interface, UAPI socket or status socket is left.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.netns import (
    MeshguardPeer,
    Testbed,
    meshguard_config_text,
    meshguard_env,
    require_root_netns,
    twistd_argv,
    wg_keypair,
    write_meshguard_config,
)

STATUS_DIR = Path("/var/run/meshguard")


class StartupErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_root_netns(self)
        self.tb = Testbed(self)
        self.ns = self.tb.netns("bad")
        self.ifname = self.tb.ifname("bad")
        self.key = wg_keypair()

    def config(self, text: str) -> Path:
        return write_meshguard_config(self.tb.log_dir / f"{self.ifname}.conf", text)

    def start(self, config: Path, wrap: list[str] | None = None) -> str:
        """Run the node to its exit; return its one stderr line after checking the rest."""
        argv = twistd_argv(config, self.ifname)
        if wrap is not None:
            argv = [*wrap[:-1], f"{wrap[-1]} {shlex.join(argv)}"]
        done = self.tb.run(self.ns, argv, timeout=30, check=False, env=meshguard_env())
        self.assertNotEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"want one line on stderr, got: {done.stderr!r}")
        self.assertTrue(lines[0].startswith("meshguard: "), lines[0])
        self.assert_nothing_left()
        return lines[0]

    def assert_nothing_left(self) -> None:
        links = self.tb.ip(self.ns, "-o", "link", "show")
        self.assertEqual([line.split(":")[1].strip() for line in links.splitlines()], ["lo"])
        self.assertFalse(self.tb.uapi_socket(self.ifname).exists())
        self.assertFalse((STATUS_DIR / f"{self.ifname}.sock").exists())
        self.assertFalse(self.tb.listening(self.ns, 51820, "udp"))

    def good_text(self) -> str:
        return meshguard_config_text(
            self.key.private,
            listen_port=51820,
            addresses=("10.99.0.1/24",),
            peers=[MeshguardPeer(wg_keypair().public, allowed_ips=("10.99.0.2/32",))],
        )

    def test_broken_key(self) -> None:
        """A PrivateKey that is not a key: file, line and the key's name."""
        config = self.config(self.good_text().replace(self.key.private, "not-a-key"))
        line = self.start(config)
        self.assertIn(f"{config}:2:", line)
        self.assertIn("PrivateKey", line)

    def test_duplicate_peer(self) -> None:
        """The same PublicKey in two [Peer] sections: both lines are named."""
        other = wg_keypair().public
        text = meshguard_config_text(
            self.key.private,
            peers=[
                MeshguardPeer(other, allowed_ips=("10.1.0.0/16",)),
                MeshguardPeer(other, allowed_ips=("10.2.0.0/16",)),
            ],
        )
        config = self.config(text)
        line = self.start(config)
        self.assertIn(f"{config}:", line)
        self.assertIn("duplicate peer", line)

    def test_unknown_key(self) -> None:
        """An unknown key: file, line, key and section."""
        config = self.config(self.good_text().replace("[Peer]", "Frobnicate = 1\n\n[Peer]", 1))
        line = self.start(config)
        self.assertIn(f"{config}:6:", line)
        self.assertIn("Frobnicate", line)
        self.assertIn("[Interface]", line)

    def test_missing_file(self) -> None:
        """A config path that does not exist."""
        missing = self.tb.log_dir / f"{self.ifname}.conf"
        line = self.start(missing)
        self.assertIn(str(missing), line)
        self.assertIn("No such file", line)

    def test_no_tun_device(self) -> None:
        """No /dev/net/tun (hidden by a tmpfs in a private mount namespace)."""
        require_root_netns(self, ("unshare", "mount"))
        config = self.config(self.good_text())
        hide = "mount -t tmpfs none /dev/net && exec"
        line = self.start(config, wrap=["unshare", "-m", "sh", "-c", hide])
        self.assertIn("/dev/net/tun", line)

    def test_port_in_use(self) -> None:
        """The ListenPort is taken (IPv4 here): the port is named; the TUN device it had
        already created is removed again."""
        blocker = self.tb.spawn(self.ns, [sys.executable, "-c", _HOLD_PORT, "51820"])
        self.tb.wait_for(
            lambda: self.tb.listening(self.ns, 51820, "udp"), timeout=10, what="port holder"
        )
        config = self.config(self.good_text())
        argv = twistd_argv(config, self.ifname)
        done = self.tb.run(self.ns, argv, timeout=30, check=False, env=meshguard_env())
        self.assertNotEqual(done.returncode, 0)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        self.assertEqual(lines, ["meshguard: UDP port 51820 is already in use"])
        self.tb.stop(blocker)
        self.assert_nothing_left()

    def test_daemon_mode_reports_and_exits(self) -> None:
        """Without -n, twistd's waiting parent gets the reason and exits 1 (a start-up failure
        after daemonizing must not leave it waiting forever)."""
        self.tb.spawn(self.ns, [sys.executable, "-c", _HOLD_PORT, "51820"])
        self.tb.wait_for(
            lambda: self.tb.listening(self.ns, 51820, "udp"), timeout=10, what="port holder"
        )
        config = self.config(self.good_text())
        argv = twistd_argv(config, self.ifname)
        argv.remove("-n")
        argv[argv.index("--pidfile=")] = f"--pidfile={self.tb.log_dir / 'twistd.pid'}"
        argv.insert(1, f"--logfile={self.tb.log_dir / 'twistd.log'}")
        done = self.tb.run(self.ns, argv, timeout=30, check=False, env=meshguard_env())
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("meshguard: UDP port 51820 is already in use", done.stderr)
        log = (self.tb.log_dir / "twistd.log").read_text()
        self.assertIn("meshguard: UDP port 51820 is already in use", log)
        links = self.tb.ip(self.ns, "-o", "link", "show")
        self.assertEqual([line.split(":")[1].strip() for line in links.splitlines()], ["lo"])
        self.assertFalse(self.tb.uapi_socket(self.ifname).exists())


# Holds the port until the test's cleanup kills it (no timer: it waits for a signal).
_HOLD_PORT = """
import signal, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
signal.pause()
"""
