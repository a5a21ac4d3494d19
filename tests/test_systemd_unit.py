"""examples/meshguard@.service: systemd accepts it, and it runs the node unprivileged with only
``CAP_NET_ADMIN``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

UNIT = Path(__file__).resolve().parent.parent / "examples" / "meshguard@.service"


def settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


class UnitTests(SynchronousTestCase):
    def test_systemd_analyze_verify(self) -> None:
        """``systemd-analyze verify`` finds nothing wrong with an instance of the unit."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            if os.environ.get("CI") == "true":
                self.fail("systemd-analyze is missing (Debian package systemd, see .ci/run)")
            raise SkipTest("systemd-analyze is not installed")
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        instance = directory / "meshguard@mg0.service"
        shutil.copy(UNIT, instance)
        cp = subprocess.run(
            [tool, "verify", str(instance)], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(cp.returncode, 0, cp.stdout + cp.stderr)
        self.assertNotIn("meshguard@mg0.service:", cp.stderr, cp.stderr)

    def test_only_net_admin_and_no_root(self) -> None:
        unit = settings()
        self.assertEqual(unit["User"], ["meshguard"])
        self.assertEqual(unit["AmbientCapabilities"], ["CAP_NET_ADMIN"])
        self.assertEqual(unit["CapabilityBoundingSet"], ["CAP_NET_ADMIN"])
        self.assertEqual(unit["NoNewPrivileges"], ["yes"])
        self.assertEqual(unit["DeviceAllow"], ["/dev/net/tun rw"])
        self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertIn("--config /etc/meshguard/%i.conf", unit["ExecStart"][0])
        self.assertEqual(unit["LimitCORE"], ["0"])
