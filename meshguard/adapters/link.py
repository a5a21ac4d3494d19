"""Interface configuration through the ``ip`` command.

Run at startup, shutdown and reload only, so a synchronous subprocess with a timeout is fine and
keeps the semantics exactly those an operator gets by typing the same ``ip`` commands. The runner
is injected so unit tests record argv lists instead of touching the host.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = ["CommandResult", "Link", "LinkError", "Runner", "run_command", "split_default"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds one ``ip`` invocation may take before we call it failed.
COMMAND_TIMEOUT = 10.0


class LinkError(Exception):
    """An ``ip`` command failed; the message names the command and its stderr."""


class CommandResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


#: Runs one argv list and returns its result; raises ``OSError`` if it cannot be started.
Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """The real runner: no shell, captured output, bounded by ``COMMAND_TIMEOUT``."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        return CommandResult(-1, "", f"timed out after {e.timeout:g} s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def split_default(network: IPNetwork) -> list[IPNetwork]:
    """Replace a default route by its two halves; other networks are returned unchanged.

    ``0.0.0.0/1`` + ``128.0.0.0/1`` (``::/1`` + ``8000::/1``) are more specific than the main
    table's default route, so they win without deleting it, and removing them restores the old
    routing exactly. This is the simple alternative to wg-quick's fwmark + policy-rule scheme; its
    price is that traffic to the peers' own endpoints also matches the halves, so the caller must
    give each endpoint a more specific route outside the tunnel (or use a fwmark and rule).
    """
    if network.prefixlen != 0:
        return [network]
    return list(network.subnets(prefixlen_diff=1))


class Link:
    """One network interface, configured with ``ip``."""

    def __init__(self, name: str, runner: Runner | None = None) -> None:
        self.name = name
        self._runner: Runner = runner if runner is not None else run_command

    def _run(self, *args: str) -> str:
        argv = ["ip", *args]
        try:
            result = self._runner(argv)
        except OSError as e:
            raise LinkError(f"cannot run {' '.join(argv)!r}: {e.strerror or e}") from e
        if result.returncode != 0:
            detail = result.stderr.strip() or f"exit status {result.returncode}"
            raise LinkError(f"{' '.join(argv)!r} failed: {detail}")
        return result.stdout

    def set_mtu(self, mtu: int) -> None:
        self._run("link", "set", "dev", self.name, "mtu", str(mtu))

    def set_up(self) -> None:
        self._run("link", "set", "dev", self.name, "up")

    def set_down(self) -> None:
        self._run("link", "set", "dev", self.name, "down")

    def delete(self) -> None:
        self._run("link", "del", "dev", self.name)

    def add_address(self, address: IPInterface) -> None:
        """Add an address; IPv6 with ``nodad`` so it is usable at once (a tunnel has no peers
        on-link to collide with)."""
        args = ["address", "add", str(address), "dev", self.name]
        if address.version == 6:
            args.append("nodad")
        self._run(*args)

    def remove_address(self, address: IPInterface) -> None:
        self._run("address", "del", str(address), "dev", self.name)

    def add_route(self, network: IPNetwork, table: str | None = None) -> None:
        """Route ``network`` into this interface, in the main table when ``table`` is None.

        A default route (``/0``) becomes its two halves (see ``split_default``).
        """
        for part in split_default(network):
            self._run("route", "add", str(part), "dev", self.name, *self._table(table))

    def remove_route(self, network: IPNetwork, table: str | None = None) -> None:
        for part in split_default(network):
            self._run("route", "del", str(part), "dev", self.name, *self._table(table))

    @staticmethod
    def _table(table: str | None) -> tuple[str, ...]:
        return ("table", table) if table is not None else ()

    def mtu(self) -> int:
        """This interface's MTU."""
        return _device_mtu(self._run("-o", "link", "show", "dev", self.name), self.name)

    def route_mtu_toward(self, address: IPAddress, fwmark: int = 0) -> int | None:
        """The MTU on the path toward ``address``: the route's ``mtu`` if set, else the outgoing
        device's; None when there is no route. ``fwmark`` asks about the route the tunnel's own
        UDP datagrams take under policy routing."""
        args = ["-o", "route", "get", str(address)]
        if fwmark:
            args += ["mark", str(fwmark)]
        try:
            out = self._run(*args)
        except LinkError:
            return None
        tokens = out.replace("\\", " ").split()
        route_mtu = _value_after(tokens, "mtu", skip=("lock",))
        if route_mtu is not None and route_mtu.isdigit():
            return int(route_mtu)
        device = _value_after(tokens, "dev")
        if device is None:
            return None
        return _device_mtu(self._run("-o", "link", "show", "dev", device), device)


def _value_after(tokens: list[str], key: str, skip: tuple[str, ...] = ()) -> str | None:
    for i, token in enumerate(tokens[:-1]):
        if token == key:
            j = i + 1
            while j < len(tokens) - 1 and tokens[j] in skip:
                j += 1
            return tokens[j]
    return None


def _device_mtu(output: str, name: str) -> int:
    value = _value_after(output.split(), "mtu")
    if value is None or not value.isdigit():
        raise LinkError(f"no MTU in 'ip link show dev {name}' output: {output.strip()!r}")
    return int(value)


def host_address_infos(exclude: str | None = None) -> list[dict[str, Any]]:
    """Every ``addr_info`` entry of ``ip -j addr show`` on interfaces other than ``exclude``
    and ``lo``: the one reading of the host's addresses (LAN candidates, LAN subnets). Empty
    when ``ip`` cannot be asked or answers something else than JSON links."""
    try:
        output = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        links = json.loads(output)
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    infos: list[dict[str, Any]] = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict) or link.get("ifname") in (exclude, "lo"):
            continue
        infos.extend(info for info in link.get("addr_info", []) if isinstance(info, dict))
    return infos
