"""How a peer is reached, in the words an operator uses: one reading of a peer's status entry.

``meshguard status``, ``meshguard ping``, ``meshguard netcheck`` and the Prometheus metrics all
answer "is my path direct, and why not" from the same status entry, so they go through
:func:`path_view` and never disagree. The path arbiter's explicit ``path_kind``/``path_via``
fields win; older nodes only give a ``path`` sentence (``direct``, ``relayed via KEY``,
``tls-relay via NAME``, ``none``) and the endpoint, which are read here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Every kind a view can have, best first (the order dashboards and tables use).
KINDS = ("lan", "direct", "direct-v6", "mapped", "member", "tls-relay", "none")
#: Kinds that are a straight UDP path between the two nodes.
DIRECT_KINDS = frozenset({"lan", "direct", "direct-v6", "mapped"})


@dataclass(frozen=True)
class PathView:
    """One peer's path: its kind, the relay it goes through (if any) and why it is not direct."""

    kind: str
    via: str | None = None
    reason: str | None = None

    @property
    def direct(self) -> bool:
        return self.kind in DIRECT_KINDS

    def text(self) -> str:
        """Short form for a table cell: ``direct``, ``member via hub``, ``tls-relay via r1``."""
        return f"{self.kind} via {self.via}" if self.via else self.kind


def _endpoint_address(
    endpoint: object,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(endpoint, list | tuple) or len(endpoint) != 2:
        return None
    host = endpoint[0]
    if not isinstance(host, str):
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _kind_of_endpoint(endpoint: object, local_networks: Iterable[Network]) -> str:
    """A UDP endpoint's kind: LAN when it is a private or link-local address on one of our own
    subnets, IPv6 direct, else direct."""
    address = _endpoint_address(endpoint)
    if address is None:
        return "direct"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_private or address.is_link_local:
        if any(address.version == n.version and address in n for n in local_networks):
            return "lan"
    return "direct-v6" if address.version == 6 else "direct"


def path_view(peer: Mapping[str, Any], local_networks: Iterable[Network] = ()) -> PathView:
    """Read a peer's status entry: explicit ``path_kind``/``path_via`` when the node gives
    them, else today's ``path`` sentence and ``endpoint``. ``local_networks`` are the subnets
    of this host (outside the tunnel) that tell a LAN endpoint from a public one."""
    reason = peer.get("not_direct_reason")
    reason = reason if isinstance(reason, str) and reason else None
    kind = peer.get("path_kind")
    if isinstance(kind, str) and kind in KINDS:
        via = peer.get("path_via")
        return PathView(kind, via if isinstance(via, str) and via else None, reason)
    path = peer.get("path")
    path = path if isinstance(path, str) else ("direct" if peer.get("endpoint") else "none")
    word, _, rest = path.partition(" via ")
    word = word.strip()
    if word == "relayed":
        return PathView("member", rest.strip() or None, reason)
    if word == "tls-relay":
        return PathView("tls-relay", rest.strip() or None, reason)
    if word == "none" or not peer.get("endpoint"):
        return PathView("none", None, reason)
    if word == "lan":
        return PathView("lan", None, reason)
    return PathView(_kind_of_endpoint(peer.get("endpoint"), list(local_networks)), None, reason)


def peer_label(peer: Mapping[str, Any]) -> str:
    """What to call a peer: its member name when the mesh knows one, else its public key."""
    name = peer.get("name")
    if isinstance(name, str) and name:
        return name
    return str(peer.get("public_key") or "?")


def host_networks(exclude: str | None = None) -> list[Network]:
    """This host's subnets outside the tunnel (``ip -j addr``), to tell LAN endpoints apart;
    empty when ``ip`` cannot be asked (every private endpoint then reads as direct)."""
    from meshguard.adapters.link import host_address_infos

    networks: list[Network] = []
    for info in host_address_infos(exclude):
        try:
            networks.append(
                ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
            )
        except (KeyError, TypeError, ValueError):
            continue
    return networks
