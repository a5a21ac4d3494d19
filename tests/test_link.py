"""Link: the exact ip commands, error reporting, and a real run inside a test namespace."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from ipaddress import ip_address, ip_interface, ip_network
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters import link
from meshguard.adapters.link import CommandResult, Link, LinkError, run_command, split_default
from meshguard.adapters.tun import TunDevice
from tests.test_tun import FakeReactor, require_root


class RecordingRunner:
    """Records argv lists; answers from a script keyed by argv prefix, else success."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answers: dict[tuple[str, ...], CommandResult] = {}

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        for prefix, result in self.answers.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return result
        return CommandResult(0, "", "")


class LinkCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.runner = RecordingRunner()
        self.link = Link("mg0", runner=self.runner)

    def test_basic_commands(self) -> None:
        """Every command names the device with 'dev' (short names are not read as keywords)."""
        self.link.set_mtu(1420)
        self.link.set_up()
        self.link.set_down()
        self.link.delete()
        self.assertEqual(
            self.runner.calls,
            [
                ["ip", "link", "set", "dev", "mg0", "mtu", "1420"],
                ["ip", "link", "set", "dev", "mg0", "up"],
                ["ip", "link", "set", "dev", "mg0", "down"],
                ["ip", "link", "del", "dev", "mg0"],
            ],
        )

    def test_addresses(self) -> None:
        """IPv6 addresses are added with nodad so they work at once; IPv4 as given."""
        self.link.add_address(ip_interface("10.0.0.1/24"))
        self.link.add_address(ip_interface("fd00::1/64"))
        self.link.remove_address(ip_interface("fd00::1/64"))
        self.assertEqual(
            self.runner.calls,
            [
                ["ip", "address", "add", "10.0.0.1/24", "dev", "mg0"],
                ["ip", "address", "add", "fd00::1/64", "dev", "mg0", "nodad"],
                ["ip", "address", "del", "fd00::1/64", "dev", "mg0"],
            ],
        )

    def test_routes(self) -> None:
        """Routes go to the main table unless a table is named."""
        self.link.add_route(ip_network("10.1.0.0/16"))
        self.link.add_route(ip_network("fd01::/48"), table="51820")
        self.link.remove_route(ip_network("10.1.0.0/16"))
        self.assertEqual(
            self.runner.calls,
            [
                ["ip", "route", "add", "10.1.0.0/16", "dev", "mg0"],
                ["ip", "route", "add", "fd01::/48", "dev", "mg0", "table", "51820"],
                ["ip", "route", "del", "10.1.0.0/16", "dev", "mg0"],
            ],
        )

    def test_default_route_becomes_two_halves(self) -> None:
        """/0 is installed (and removed) as two /1 routes, leaving the main default alone."""
        self.link.add_route(ip_network("0.0.0.0/0"))
        self.link.add_route(ip_network("::/0"))
        self.link.remove_route(ip_network("0.0.0.0/0"))
        self.assertEqual(
            [call[3] for call in self.runner.calls],
            ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1", "0.0.0.0/1", "128.0.0.0/1"],
        )
        self.assertEqual(split_default(ip_network("10.0.0.0/8")), [ip_network("10.0.0.0/8")])

    def test_failure_names_command_and_stderr(self) -> None:
        """A failing command raises LinkError carrying the command and ip's stderr."""
        self.runner.answers[("ip", "link")] = CommandResult(1, "", 'Cannot find device "mg0"\n')
        with self.assertRaises(LinkError) as cm:
            self.link.set_up()
        message = str(cm.exception)
        self.assertIn("ip link set dev mg0 up", message)
        self.assertIn('Cannot find device "mg0"', message)

    def test_missing_ip_command(self) -> None:
        """If ip cannot be started at all, that is a LinkError too."""

        def runner(argv: Sequence[str]) -> CommandResult:
            raise FileNotFoundError(2, "No such file or directory")

        with self.assertRaises(LinkError) as cm:
            Link("mg0", runner=runner).set_up()
        self.assertIn("No such file or directory", str(cm.exception))

    def test_route_mtu_from_route(self) -> None:
        """A route (or cached PMTU) mtu wins over the device's, including 'mtu lock N'."""
        self.runner.answers[("ip", "-o", "route", "get")] = CommandResult(
            0, "192.0.2.9 via 10.0.0.1 dev eth0 src 10.0.0.2 uid 0 \\    cache  mtu lock 1280\n", ""
        )
        self.assertEqual(self.link.route_mtu_toward(ip_address("192.0.2.9")), 1280)

    def test_route_mtu_from_device(self) -> None:
        """Without a route mtu, the outgoing device's MTU is the answer; fwmark is passed."""
        self.runner.answers[("ip", "-o", "route", "get")] = CommandResult(
            0, "192.0.2.9 via 10.0.0.1 dev eth0 src 10.0.0.2 uid 0 \\    cache \n", ""
        )
        self.runner.answers[("ip", "-o", "link", "show")] = CommandResult(
            0, "2: eth0: <BROADCAST,UP> mtu 1500 qdisc fq state UP\\    link/ether ...\n", ""
        )
        self.assertEqual(self.link.route_mtu_toward(ip_address("192.0.2.9"), fwmark=7), 1500)
        self.assertEqual(
            self.runner.calls,
            [
                ["ip", "-o", "route", "get", "192.0.2.9", "mark", "7"],
                ["ip", "-o", "link", "show", "dev", "eth0"],
            ],
        )

    def test_route_mtu_no_route(self) -> None:
        """No route means no answer, not an exception."""
        self.runner.answers[("ip", "-o", "route", "get")] = CommandResult(
            2, "", "RTNETLINK answers: Network is unreachable\n"
        )
        self.assertIsNone(self.link.route_mtu_toward(ip_address("192.0.2.9")))

    def test_run_command_timeout(self) -> None:
        """A hung ip command becomes a failed result, not a hang."""

        def hang(*args: object, **kwargs: object) -> None:
            raise subprocess.TimeoutExpired(["ip"], link.COMMAND_TIMEOUT)

        with mock.patch.object(subprocess, "run", hang):
            result = run_command(["ip", "link"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("timed out", result.stderr)

    def test_run_command_real(self) -> None:
        """The real runner captures output and the exit status."""
        self.assertEqual(run_command(["true"]).returncode, 0)
        self.assertNotEqual(run_command(["false"]).returncode, 0)


class RealLinkTests(SynchronousTestCase):
    """Configure a real TUN interface inside a test namespace through Link."""

    def test_configure_in_namespace(self) -> None:
        """MTU, addresses, routes and route_mtu_toward against the kernel; delete removes it."""
        require_root()
        tag = f"{os.getpid() % 100000}{id(self) % 1000}"
        name, ns = f"mgl{tag}"[:15], f"mglink{tag}"
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False, timeout=10)
        tun = TunDevice(name, lambda packet, now: None, FakeReactor())
        tun.open()
        self.addCleanup(tun.close)
        subprocess.run(["ip", "link", "set", "dev", name, "netns", ns], check=True, timeout=10)

        def in_namespace(argv: Sequence[str]) -> CommandResult:
            return run_command(["ip", "netns", "exec", ns, *argv])

        dev = Link(name, runner=in_namespace)
        dev.set_mtu(1400)
        dev.set_up()
        dev.add_address(ip_interface("10.202.0.1/24"))
        dev.add_address(ip_interface("fd00:202::1/64"))
        dev.add_route(ip_network("0.0.0.0/0"))
        dev.add_route(ip_network("::/0"))
        self.assertEqual(dev.mtu(), 1400)
        self.assertEqual(dev.route_mtu_toward(ip_address("198.51.100.1")), 1400)
        self.assertEqual(dev.route_mtu_toward(ip_address("2001:db8::1")), 1400)
        routes = in_namespace(["ip", "route", "show", "dev", name]).stdout
        self.assertIn("0.0.0.0/1", routes)
        self.assertIn("128.0.0.0/1", routes)
        dev.remove_route(ip_network("0.0.0.0/0"))
        dev.remove_address(ip_interface("10.202.0.1/24"))
        self.assertRaises(LinkError, dev.remove_address, ip_interface("10.202.0.1/24"))
        dev.delete()
        self.assertIsNone(dev.route_mtu_toward(ip_address("198.51.100.1")))
        self.assertRaises(LinkError, dev.set_up)
