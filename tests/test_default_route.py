"""A peer that takes all traffic: wg-quick's fwmark and policy rules, recorded."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.default_route import DefaultRoute
from meshguard.adapters.link import CommandResult


class DefaultRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.commands: list[list[str]] = []

        def runner(argv: Sequence[str]) -> CommandResult:
            self.commands.append(list(argv))
            return CommandResult(0, "", "")

        self.marks: list[int] = []
        self.route = DefaultRoute("mg0", 51820, runner=runner)

    def test_install_v4(self) -> None:
        """The socket is marked first, then the table's default route and the two rules."""
        self.route.install(4, self.marks.append)
        self.assertEqual(self.marks, [51820])
        self.assertEqual(
            self.commands[:3],
            [
                ["ip", "-4", "route", "add", "0.0.0.0/0", "dev", "mg0", "table", "51820"],
                ["ip", "-4", "rule", "add", "not", "fwmark", "51820", "table", "51820"],
                ["ip", "-4", "rule", "add", "table", "main", "suppress_prefixlength", "0"],
            ],
        )

    def test_install_once_and_remove(self) -> None:
        self.route.install(6, self.marks.append)
        self.route.install(6, self.marks.append)
        self.assertEqual(len(self.marks), 1)
        self.commands.clear()
        self.route.remove()
        self.assertIn(
            ["ip", "-6", "rule", "del", "not", "fwmark", "51820", "table", "51820"], self.commands
        )
        self.assertEqual(self.route.installed, set())
