"""``meshguard netcheck [NAME] [--json]``: what the network lets this node do, from the node.

A running node already knows the answers (docs/operations.md): its peers' HELLOs say how they
see us (our public endpoints, and whether the NAT mapping changes with the destination), the
keepalive policy measured the mapping's lifetime and checked the filtering, path MTU discovery
found each path's MTU, the TLS relay links say whom they reach. This module reads them from the
status document and asks the network only one thing itself: how long a TCP connection to each
TLS relay takes. Without a running node there is nothing to ask; netcheck says so.
"""

from __future__ import annotations

import ipaddress
import socket
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshguard.adapters.path_view import Network, path_view, peer_label

#: ``connect(host, port, timeout) -> seconds``; raises OSError when it cannot connect.
Connector = Callable[[str, int, float], float]


def tcp_connect_time(host: str, port: int, timeout: float) -> float:
    """Seconds a TCP connection to ``host:port`` takes to open (closed at once)."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout):
        return time.monotonic() - start


def _endpoint_text(endpoint: object) -> str | None:
    if not isinstance(endpoint, list | tuple) or len(endpoint) != 2:
        return None
    host, port = endpoint
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _version(endpoint: object) -> int | None:
    if not isinstance(endpoint, list | tuple) or not endpoint or not isinstance(endpoint[0], str):
        return None
    try:
        return ipaddress.ip_address(endpoint[0].split("%", 1)[0]).version
    except ValueError:
        return None


def _relay_address(name: str) -> tuple[str, int] | None:
    host, _, port = name.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _short_label(peer: Mapping[str, Any]) -> str:
    label = peer_label(peer)
    return label[:8] if label == peer.get("public_key") else label


def netcheck_report(
    document: Mapping[str, Any],
    networks: Iterable[Network] = (),
    connect: Connector | None = tcp_connect_time,
    timeout: float = 3.0,
    port_mapping: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict (``--json`` prints it as is). ``port_mapping`` is what
    :func:`meshguard.adapters.portmap_probe.probe_port_mapping` found, if it was asked."""
    node = document.get("node") if isinstance(document.get("node"), dict) else {}
    assert isinstance(node, dict)
    peers = [p for p in document.get("peers", []) if isinstance(p, dict)]
    networks = list(networks)
    observed = {
        _short_label(p): _endpoint_text(p.get("observed_self"))
        for p in peers
        if _endpoint_text(p.get("observed_self"))
    }
    observed_raw = [p["observed_self"] for p in peers if _endpoint_text(p.get("observed_self"))]
    public4 = sorted({t for e in observed_raw if _version(e) == 4 and (t := _endpoint_text(e))})
    public6 = sorted({t for e in observed_raw if _version(e) == 6 and (t := _endpoint_text(e))})
    udp_peers = [
        p
        for p in peers
        if p.get("endpoint") and path_view(p, networks).kind not in ("member", "tls-relay")
    ]
    udp_handshakes = [p for p in udp_peers if p.get("last_handshake")]
    if observed or any(path_view(p, networks).direct for p in udp_handshakes):
        udp = "yes"
    elif udp_peers or any(path_view(p, networks).kind == "tls-relay" for p in peers):
        udp = "no"
    else:
        udp = "unknown"

    nat = node.get("nat", "unknown")
    mapping = node.get("nat_mapping", "unknown")
    if udp == "no":
        kind = "UDP blocked (no peer answers over UDP)"
    elif nat == "no":
        kind = "no NAT (peers see our own address)"
    elif mapping == "endpoint-independent":
        kind = "easy NAT (one mapping for every destination)"
    elif mapping == "endpoint-dependent":
        kind = "hard NAT (mapping varies by destination)"
    elif nat == "yes":
        kind = "NAT of unknown kind (needs 2 meshguard peers outside)"
    else:
        kind = "unknown (no meshguard peer said how it sees us yet)"
    varies = {"endpoint-dependent": "yes", "endpoint-independent": "no", "none": "no"}.get(
        str(mapping), "unknown"
    )
    if nat == "no":
        varies = "no"

    lifetime = node.get("nat_lifetime")
    lifetime_text = None
    if isinstance(lifetime, int | float) and not isinstance(lifetime, bool):
        at_least = node.get("nat_lifetime_at_least")
        lifetime_text = f"{'at least ' if at_least else ''}{lifetime:g} s"

    probed = bool(document.get("probed"))
    path_mtus = {
        _short_label(p): p.get("path_mtu")
        for p in peers
        if not probed and (p.get("introducer") or p.get("member") == "configured")
    }

    relays: dict[str, Any] = {}
    for name, present in sorted((node.get("tls_relays") or {}).items()):
        entry: dict[str, Any] = {"members_present": present}
        address = _relay_address(str(name))
        if connect is not None and address is not None:
            try:
                entry["tcp_connect_ms"] = round(connect(address[0], address[1], timeout) * 1000, 1)
                entry["reachable"] = True
            except OSError as e:
                entry["reachable"] = False
                entry["error"] = str(e) or type(e).__name__
        relays[str(name)] = entry

    return {
        "interface": document.get("interface"),
        "source": "probe" if probed else "node",
        "udp": udp,
        "public_ipv4": public4,
        "public_ipv6": public6,
        "seen_by": observed,
        "nat": nat,
        "nat_kind": kind,
        "mapping_varies_by_destination": varies,
        "filtering": node.get("nat_filtering", "unknown (checked only with keepalive auto)"),
        "nat_mapping_lifetime": lifetime_text,
        "port_mapping": _port_mapping_text(port_mapping),
        "port_mapping_offered": list(port_mapping.get("offered", [])) if port_mapping else [],
        "path_mtu": path_mtus,
        "tls_relays": relays,
    }


def _port_mapping_text(found: Mapping[str, Any] | None) -> str:
    if found is None:
        return "not checked"
    gateway = found.get("gateway")
    if gateway is None:
        return "unknown (no IPv4 default gateway)"
    offered = found.get("offered") or []
    if not offered:
        return f"none offered by {gateway}"
    return f"{', '.join(offered)} offered by {gateway} (meshguard does not map yet)"


def format_netcheck(report: Mapping[str, Any]) -> str:
    """The report as lines a person reads."""
    if report.get("source") == "probe":
        lines = [f"netcheck of {report.get('interface')}"]
    else:
        lines = [f"netcheck of {report.get('interface')} (answers from the running node)"]

    def row(label: str, value: object) -> None:
        lines.extend(
            textwrap.wrap(
                f"  {label + ':':<26}{value}",
                width=80,
                subsequent_indent=" " * 28,
                break_on_hyphens=False,
            )
        )

    row("UDP", {"yes": "yes", "no": "blocked", "unknown": "unknown"}.get(report["udp"], "?"))
    row("public IPv4", ", ".join(report["public_ipv4"]) or "-")
    row("public IPv6", ", ".join(report["public_ipv6"]) or "-")
    row("NAT", report["nat_kind"])
    row("mapping varies by dest.", report["mapping_varies_by_destination"])
    row("filtering", report["filtering"])
    row("mapping lifetime", report["nat_mapping_lifetime"] or "not measured")
    row("port mapping", report["port_mapping"])
    if report.get("source") == "probe":
        row("path MTU", "measured by a running node only")
    for label, mtu in report["path_mtu"].items():
        row(f"path MTU to {label[:14]}", f"{mtu}" if mtu else "not found yet")
    if not report["tls_relays"]:
        row("TLS relays", "none configured")
    for name, entry in report["tls_relays"].items():
        if entry.get("reachable") is False:
            text = f"unreachable ({entry.get('error')})"
        elif "tcp_connect_ms" in entry:
            text = f"reachable, TCP connect {entry['tcp_connect_ms']} ms"
        else:
            text = "not checked"
        if entry.get("members_present") is not None:
            text += f", {entry['members_present']} members present"
        row(f"relay {name}", text)
    return "\n".join(lines)
