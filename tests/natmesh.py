"""A public introducer and one meshguard member per home host, over :func:`tests.netns.nat_homes`.

A library for the NAT matrix tests (no ``TestCase`` here): it writes the configs, starts the
nodes and reads what their status says about each pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshguard.app.status_client import read_status
from tests.netns import (
    Keypair,
    MeshInternet,
    Namespace,
    Testbed,
    start_meshguard,
    wg_keypair,
    write_meshguard_config,
)

PORT = 51820


@dataclass
class Mesh:
    """The running nodes: the introducer, then the members in home order."""

    introducer_if: str
    introducer_key: str
    namespaces: list[Namespace]
    ifnames: list[str]
    keys: list[str]
    addresses: list[str]

    def peer(self, index: int, other: int) -> dict[str, Any]:
        """What member ``index``'s status says about member ``other`` ({} if absent)."""
        for peer in read_status(self.ifnames[index])["peers"]:
            if peer["public_key"] == self.keys[other]:
                return dict(peer)
        return {}

    def path(self, index: int, other: int) -> str:
        return str(self.peer(index, other).get("path", "absent"))

    def forwarded(self, x: int, y: int) -> int:
        """Bytes the introducer forwarded between members ``x`` and ``y``, both ways."""
        node = read_status(self.introducer_if)["node"]
        counts = node.get("relay_forwarded_by_pair", {})
        return int(counts.get(f"{self.keys[x]}>{self.keys[y]}", 0)) + int(
            counts.get(f"{self.keys[y]}>{self.keys[x]}", 0)
        )


def start_mesh(
    tb: Testbed,
    net: MeshInternet,
    *,
    member_extra: list[str] | None = None,
    introducer_extra: list[str] | None = None,
    subnet: str = "10.98.0",
    hosts: list[tuple[Namespace, str]] | None = None,
    member_extra_at: Callable[[int], list[str]] | None = None,
    introducer_peers: list[str] | None = None,
) -> Mesh:
    """An introducer on the public host (listing every member) and a member on every home
    host, each with the introducer as its only configured peer (``Introducer = yes``).

    ``subnet`` holds the tunnel addresses (the introducer is ``.1``); ``hosts`` picks the home
    hosts that run a member (all by default); ``member_extra_at(i)`` adds interface lines to
    member ``i``; ``introducer_peers`` adds config lines (more ``[Peer]`` sections, such as
    :func:`stock_peer_lines`) to the introducer."""
    logdir = Path(tb.log_dir)
    intro = wg_keypair()
    if hosts is None:
        hosts = [host for home in net.homes for host in home.hosts]
    keys = [wg_keypair() for _ in hosts]
    addresses = [f"{subnet}.{i + 2}" for i in range(len(hosts))]
    lines = [
        "[Interface]",
        f"PrivateKey = {intro.private}",
        f"ListenPort = {PORT}",
        f"Address = {subnet}.1/24",
        *(introducer_extra or []),
    ]
    for key, address in zip(keys, addresses, strict=True):
        lines += ["", "[Peer]", f"PublicKey = {key.public}", f"AllowedIPs = {address}/32"]
    lines += introducer_peers or []
    intro_if = tb.ifname("in")
    config = write_meshguard_config(logdir / "introducer.conf", "\n".join(lines) + "\n")
    start_meshguard(tb, net.public, config, intro_if)
    ifnames: list[str] = []
    for index, ((ns, _), key, address) in enumerate(zip(hosts, keys, addresses, strict=True)):
        text = "\n".join(
            [
                "[Interface]",
                f"PrivateKey = {key.private}",
                f"ListenPort = {PORT}",
                f"Address = {address}/24",
                *(member_extra or []),
                *(member_extra_at(index) if member_extra_at is not None else []),
                "",
                "[Peer]",
                f"PublicKey = {intro.public}",
                f"AllowedIPs = {subnet}.1/32",
                f"Endpoint = {net.public_address}:{PORT}",
                "PersistentKeepalive = 25",
                "Introducer = yes",
            ]
        )
        ifname = tb.ifname(f"m{index}")
        start_meshguard(tb, ns, write_meshguard_config(logdir / f"m{index}.conf", text), ifname)
        ifnames.append(ifname)
    return Mesh(
        intro_if,
        intro.public,
        [ns for ns, _ in hosts],
        ifnames,
        [k.public for k in keys],
        addresses,
    )


def status_peer(status: dict[str, Any], key: str) -> dict[str, Any]:
    """What a status document says about the peer with public key ``key`` ({} if absent)."""
    for peer in status["peers"]:
        if peer["public_key"] == key:
            return dict(peer)
    return {}


def stock_peer_lines(public: str, address: str, endpoint: str) -> list[str]:
    """The introducer's ``[Peer]`` section for a stock WireGuard peer outside the mesh."""
    return [
        "",
        "[Peer]",
        f"PublicKey = {public}",
        f"AllowedIPs = {address}/32",
        f"Endpoint = {endpoint}",
    ]


def start_stock_peer(
    tb: Testbed,
    ns: Namespace,
    keys: Keypair,
    *,
    introducer_key: str,
    introducer_endpoint: str,
    address: str,
    allowed_ips: str,
) -> str:
    """A wireguard-go peer of the introducer in ``ns`` (a plain WireGuard peer: no mesh);
    returns its interface name."""
    ifname = tb.ifname("wg")
    tb.start_wireguard_go(ns, ifname)
    key_file = Path(tb.log_dir) / "wgo.key"
    key_file.write_text(keys.private + "\n")
    tb.wg(ns, "set", ifname, "private-key", str(key_file), "listen-port", str(PORT))
    tb.wg(
        ns, "set", ifname, "peer", introducer_key, "allowed-ips", allowed_ips,
        "endpoint", introducer_endpoint,
    )  # fmt: skip
    tb.addr(ns, ifname, address)
    tb.up(ns, ifname)
    return ifname


def grid_markdown(
    labels: list[str],
    cell: Callable[[int, int], str],
    reasons: dict[tuple[int, int], object],
) -> str:
    """A NAT grid as the docs show it: a Markdown table of ``cell(x, y)`` for every pair of
    ``labels``, then why each relayed pair is not direct."""
    lines = [
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for x, label in enumerate(labels):
        lines.append(
            f"| **{label}** | " + " | ".join(cell(x, y) for y in range(len(labels))) + " |"
        )
    lines.append("")
    lines.append("Why the relayed pairs are not direct (status `not_direct_reason`):")
    lines.append("")
    for (x, y), reason in sorted(reasons.items()):
        lines.append(f"- {labels[x]} vs {labels[y]}: {reason}")
    return "\n".join(lines) + "\n"
