"""A public introducer and one meshguard member per home host, over :func:`tests.netns.nat_homes`.

A library for the NAT matrix tests (no ``TestCase`` here): it writes the configs, starts the
nodes and reads what their status says about each pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshguard.app.status_client import read_status
from tests.netns import (
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
) -> Mesh:
    """An introducer on the public host (listing every member) and a member on every home
    host, each with the introducer as its only configured peer (``Introducer = yes``)."""
    logdir = Path(tb.log_dir)
    intro = wg_keypair()
    hosts = [host for home in net.homes for host in home.hosts]
    keys = [wg_keypair() for _ in hosts]
    addresses = [f"10.98.0.{i + 2}" for i in range(len(hosts))]
    lines = [
        "[Interface]",
        f"PrivateKey = {intro.private}",
        f"ListenPort = {PORT}",
        "Address = 10.98.0.1/24",
        *(introducer_extra or []),
    ]
    for key, address in zip(keys, addresses, strict=True):
        lines += ["", "[Peer]", f"PublicKey = {key.public}", f"AllowedIPs = {address}/32"]
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
                "",
                "[Peer]",
                f"PublicKey = {intro.public}",
                "AllowedIPs = 10.98.0.1/32",
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
