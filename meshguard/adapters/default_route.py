"""Sending everything through the tunnel without a routing loop, the way wg-quick does it.

A peer with ``AllowedIPs = 0.0.0.0/0`` (or ``::/0``) cannot simply get a default route into the
interface: the encrypted datagrams to that peer's own endpoint would follow it back into the
tunnel. wg-quick's answer, kept here so existing configs behave the same: our UDP socket marks its
packets with a firewall mark; a policy rule sends every *unmarked* packet to a table whose default
route is the tunnel; the marked (encrypted) ones stay in the main table. A second rule lets the
main table's more specific routes (the LAN, the host's own subnets) win over the tunnel's default
(``suppress_prefixlength 0``).
"""

from __future__ import annotations

from collections.abc import Callable

from meshguard.adapters.link import LinkError, Runner, run_command

#: wg-quick's table and mark when the config sets no FwMark.
DEFAULT_TABLE = 51820


class DefaultRoute:
    """The routes and rules that send all traffic of one IP version through one interface."""

    def __init__(self, interface: str, table: int = DEFAULT_TABLE, runner: Runner | None = None):
        self.interface = interface
        self.table = table
        self._run: Runner = runner if runner is not None else run_command
        self.installed: set[int] = set()

    def _ip(self, version: int, *args: str, check: bool = True) -> None:
        argv = ["ip", f"-{version}", *args]
        result = self._run(argv)
        if check and result.returncode != 0:
            raise LinkError(f"{' '.join(argv)!r} failed: {result.stderr.strip()}")

    def install(self, version: int, set_fwmark: Callable[[int], None]) -> None:
        """Route all of ``version``'s traffic into the tunnel; ``set_fwmark`` marks our socket."""
        if version in self.installed:
            return
        set_fwmark(self.table)
        table = str(self.table)
        default = "0.0.0.0/0" if version == 4 else "::/0"
        self._ip(version, "route", "add", default, "dev", self.interface, "table", table)
        self._ip(version, "rule", "add", "not", "fwmark", table, "table", table)
        self._ip(version, "rule", "add", "table", "main", "suppress_prefixlength", "0")
        self.installed.add(version)
        if version == 4:
            # Marked replies must pass reverse-path filtering, as wg-quick arranges.
            self._run(["sysctl", "-q", "-w", "net.ipv4.conf.all.src_valid_mark=1"])

    def remove(self, versions: tuple[int, ...] = (4, 6)) -> None:
        """Remove the rules and routes of ``versions`` (all, by default)."""
        table = str(self.table)
        for version in sorted(self.installed.intersection(versions)):
            default = "0.0.0.0/0" if version == 4 else "::/0"
            self._ip(version, "route", "del", default, "dev", self.interface, "table", table,
                     check=False)  # fmt: skip
            self._ip(version, "rule", "del", "not", "fwmark", table, "table", table, check=False)
            self._ip(
                version, "rule", "del", "table", "main", "suppress_prefixlength", "0", check=False
            )
            self.installed.discard(version)
