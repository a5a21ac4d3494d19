"""The README's "install and run" command, as written there, brings up the demo node.

The command is read from README.md (so the document cannot drift from what works): its
``pip install`` step is left out (the suite runs on the installed package) and the example paths
point at a copy of examples/demo.conf named after a unique interface, in a fresh namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.netns import REPO_ROOT, Testbed, meshguard_env, require_root_netns

INSTALL = "python3 -m pip install . && "


def readme_run_command() -> str:
    """The one-line command in the first code block under "Install and run a node"."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Install and run a node", 1)[1]
    match = re.search(r"```\n(.+?)\n```", section, re.S)
    assert match is not None, "README.md: no code block under 'Install and run a node'"
    command = match.group(1).strip()
    assert "\n" not in command, "README.md: the run command should be one line"
    return command


class ReadmeQuickstartTests(TestCase):
    timeout = 90

    def test_command_shape(self) -> None:
        """Install, make the demo key with a private umask, run twistd on the demo config."""
        command = readme_run_command()
        self.assertTrue(command.startswith(INSTALL), command)
        self.assertIn("(umask 077; meshguard genkey > examples/demo.key)", command)
        self.assertIn("twistd -n --pidfile= meshguard --config examples/demo.conf", command)

    def test_run_command_brings_up_the_demo_node(self) -> None:
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        ns = tb.netns("readme")
        ifname = tb.ifname("demo")
        workdir = Path(tb.log_dir) / "examples"
        workdir.mkdir()
        shutil.copy(REPO_ROOT / "examples" / "demo.conf", workdir / f"{ifname}.conf")
        command = readme_run_command().removeprefix(INSTALL)
        command = command.replace("examples/demo.key", str(workdir / "demo.key"))
        command = command.replace("examples/demo.conf", str(workdir / f"{ifname}.conf"))
        bindir = str(Path(sys.executable).parent)
        env = meshguard_env({"PATH": bindir + os.pathsep + os.environ.get("PATH", "")})
        proc = tb.spawn(ns, ["sh", "-c", command], env=env, cwd=REPO_ROOT)

        def up() -> bool:
            if proc.poll() is not None:
                self.fail(f"the README command exited: {tb.log_tail(proc)}")
            return tb.run(ns, ["wg", "show", ifname], check=False).returncode == 0

        tb.wait_for(up, timeout=30, what="the demo node from the README command")
        self.assertEqual((workdir / "demo.key").stat().st_mode & 0o777, 0o600)
        shown = tb.run(ns, ["wg", "show", ifname]).stdout
        self.assertIn("4bsrtJ4NFGL9g15e8VNFJxgKNgr09L8VqtAu3HcJIDo=", shown)
        self.assertIn("listening port: 51820", shown)
        status = tb.run(ns, [f"{bindir}/meshguard", "status", ifname], env=env).stdout
        self.assertIn(ifname, status)
        self.assertIn("10.77.0.1/24", tb.ip(ns, "-o", "addr", "show", "dev", ifname))
        # SIGTERM reaches the shell and twistd (one session); the shell may exit first.
        tb.stop(proc)
        tb.wait_for(
            lambda: (
                tb.run(ns, ["ip", "link", "show", ifname], check=False).returncode != 0
                and not tb.uapi_socket(ifname).exists()
            ),
            timeout=10,
            what="the demo node's interface and socket gone after SIGTERM",
        )
