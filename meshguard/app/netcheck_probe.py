"""``meshguard netcheck --config FILE`` without a running node: probe through the introducers.

With no node to ask, netcheck does for a few seconds what a node does first: it binds the
config's ``ListenPort`` (so the NAT maps the port the node will use), makes a WireGuard session
with each introducer under the node's own key, and reads their HELLOs, which say how each sees
us. That answers whether UDP works, our public endpoints and whether the NAT's mapping varies by
destination; it also times a TCP connection to each TLS relay. It yields a status-shaped
document that :func:`meshguard.app.netcheck.netcheck_report` reads like a node's.

It uses the node's key, so it must never run beside the node: the CLI only probes when no node
answers on the interface's control socket.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from meshguard.codecs.config import Config
from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.keytext import key_text
from meshguard.mesh.agent import MeshAgent

#: How long the probe waits for every introducer to answer.
DEFAULT_DURATION = 6.0


class _Sockets:
    """One UDP socket per address family, on the config's port when it is free."""

    def __init__(self, port: int) -> None:
        self.v4 = self._open(socket.AF_INET, "0.0.0.0", port)
        self.port = self.v4.getsockname()[1]
        try:
            self.v6: socket.socket | None = self._open(socket.AF_INET6, "::", self.port)
        except OSError:
            self.v6 = None

    @staticmethod
    def _open(family: int, host: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError:
            if not port:
                sock.close()
                raise
            sock.bind((host, 0))  # the port is taken: still probe, from another port
        sock.setblocking(False)
        return sock

    def all(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        host = endpoint[0].split("%", 1)[0]
        sock = self.v6 if ":" in host else self.v4
        if sock is None:
            return
        try:
            sock.sendto(data, endpoint)
        except OSError:
            pass  # unreachable now: the report says no answer

    def write_packet(self, packet: bytes) -> None:
        pass  # no TUN: the probe carries no traffic

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def _local_addresses() -> list[str]:
    from meshguard.app.service import host_addresses

    return host_addresses(exclude="")


def probe(
    config: Config,
    *,
    duration: float = DEFAULT_DURATION,
    clock: Callable[[], float] = time.time,
    random: Callable[[int], bytes] = os.urandom,
    local_addresses: Callable[[], list[str]] = _local_addresses,
) -> dict[str, Any]:
    """Probe through the config's introducers (else every peer with an endpoint); return a
    status-shaped document (``interface``, ``node``, ``peers``)."""
    from meshguard.adapters.endpoint_names import resolve_endpoint

    interface = config.interface
    if interface.private_key is None:
        raise ValueError(f"{config.path}: no PrivateKey; netcheck needs the node's key")
    targets = [p for p in config.peers if p.introducer and p.endpoint is not None]
    if not targets:
        targets = [p for p in config.peers if p.endpoint is not None]
    sockets = _Sockets(interface.listen_port or 0)
    try:
        addresses = local_addresses()
        local = [(a, sockets.port) for a in addresses]
        device = Device(sockets, random)
        agent = MeshAgent(device, local_endpoints=lambda: local)
        start = clock()
        device.set_private_key(interface.private_key, start)
        peers = []
        for target in targets:
            assert target.endpoint is not None
            peer = device.add_peer(target.public_key)
            endpoint = resolve_endpoint(target.endpoint)
            if peer is None or endpoint is None:
                continue
            if target.preshared_key is not None:
                device.set_preshared_key(peer, target.preshared_key)
            device.set_endpoint(peer, endpoint)
            peers.append((target, peer))
        device.up(start)
        for _, peer in peers:
            device.send_initiation(peer, start, retry=False)
        end = start + duration if peers else start
        while (now := clock()) < end:
            if peers and all(
                (state := agent.peers.get(peer.public_key)) is not None
                and state.observed_self is not None
                for _, peer in peers
            ):
                break
            deadlines = [end]
            deadlines.extend(d for d in (device.next_deadline(), agent.next_deadline()) if d)
            wait = max(0.0, min(deadlines) - now)
            readable, _, _ = select.select(sockets.all(), [], [], min(wait, 0.2))
            now = clock()
            for sock in readable:
                try:
                    data, source = sock.recvfrom(65535)
                except OSError:
                    continue
                device.datagram_received(data, (source[0], source[1]), now)
            deadline = device.next_deadline()
            if deadline is not None and deadline <= now:
                device.run_timers(now)
            agent.run_timers(now)
    finally:
        sockets.close()
    return _document(config, sockets.port, addresses, peers, agent)


def _document(
    config: Config,
    port: int,
    addresses: list[str],
    peers: list[tuple[Any, Any]],
    agent: MeshAgent,
) -> dict[str, Any]:
    local = {(a, port) for a in addresses}
    observed: dict[str, Endpoint] = {}
    entries = []
    for target, peer in peers:
        state = agent.peers.get(peer.public_key)
        seen = state.observed_self if state is not None else None
        if seen is not None:
            observed[key_text(peer.public_key)] = seen
        entries.append(
            {
                "public_key": key_text(peer.public_key),
                "endpoint": list(peer.endpoint) if peer.endpoint is not None else None,
                "path": "direct" if peer.last_handshake_time else "none",
                "last_handshake": peer.last_handshake_time or None,
                "observed_self": list(seen) if seen is not None else None,
                "introducer": bool(target.introducer),
                "meshguard": peer.is_meshguard,
            }
        )
    natted = {k: e for k, e in observed.items() if e not in local}
    if not observed:
        nat, mapping = "unknown", "unknown"
    elif not natted:
        nat, mapping = "no", "none"
    elif len(natted) >= 2:
        nat = "yes"
        mapping = "endpoint-independent" if len(set(natted.values())) == 1 else "endpoint-dependent"
    else:
        nat, mapping = "yes", "unknown"
    relays = {_relay_name(host, relay_port): None for host, relay_port in config.interface.relays}
    return {
        "interface": f"{os.path.basename(config.path)} (probed, no node running)",
        "listen_port": port,
        "node": {"nat": nat, "nat_mapping": mapping, "tls_relays": relays},
        "peers": entries,
        "probed": True,
    }


def _relay_name(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"
