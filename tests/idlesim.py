"""What an idle home sends behind a simulated NAT, by kind (the in-memory side of issue 17).

A home behind a :class:`MemoryNAT` and a public hub, each wired as the node wires a mesh node
(agent, keepalive policy, membership/paths/relaying, path MTU), ``PersistentKeepalive = auto``
on both sides (or a fixed number at home). Every datagram the home's host puts on the wire,
from its tunnel port or a secondary socket, is recorded with its time and sorted into kinds by
its first bytes, as a capture on the router's WAN would.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint
from meshguard.mesh import keepalive as K
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.pmtu import PathMTUDiscovery
from meshguard.mesh.stack import MeshStack
from meshguard.testing.memory import MemoryNAT, MemoryNetwork, MemoryNode, MemoryProbeSockets
from tests.packets import ipv4

HOME = ("192.168.1.2", 51820)
HUB = ("198.51.100.2", 51820)
PUBLIC = "203.0.113.2"
KINDS = ("keepalive", "control", "handshake", "probe")


def kind_of(data: bytes) -> str:
    """The kind of a datagram from the home, by its first bytes (a WAN capture's view)."""
    head = data[:4]
    if head in (b"\x01\x00\x00\x00", b"\x02\x00\x00\x00", b"\x03\x00\x00\x00"):
        return "handshake"
    if head == b"\x04\x00\x00\x00":
        # An idle tunnel carries no data: an empty one is a keepalive, one of 48 bytes a
        # keepalive request (an empty control message, mesh/keepalive_acks.py), any other
        # mesh control.
        return "keepalive" if len(data) in (32, 48) else "control"
    return "probe"


class Node:
    """A device wired like meshguard.app.node wires the mesh core."""

    def __init__(self, net: MemoryNetwork, endpoint: Endpoint, rng: random.Random) -> None:
        self.node: MemoryNode = net.add(endpoint, rng.randbytes)
        self.key = generate_private_key(rng.randbytes)
        self.public = public_key(self.key)
        self.address = f"10.9.0.{len(net.nodes)}"
        self.agent = MeshAgent(self.node.device, local_endpoints=lambda: [endpoint])
        self.policy = K.KeepalivePolicy(
            self.node.device, self.agent, rng.randbytes, MemoryProbeSockets(net, endpoint[0])
        )
        self.agent.add_feature(self.policy)
        self.stack = MeshStack(self.agent)
        self.stack.paths.idle_check_interval = self.policy.path_check_interval
        self.pmtu = PathMTUDiscovery(self.node.device, mark_dirty=lambda: None)
        self.agent.add_feature(self.pmtu)
        net.timed.append(self.agent)
        self.node.device.set_private_key(self.key, net.now)


@dataclass
class Capture:
    """Datagrams from one host: (time, kind), in order."""

    host: str
    sent: list[tuple[float, str]] = field(default_factory=list)

    def between(self, start: float, end: float) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for when, kind in self.sent:
            if start <= when < end:
                counts[kind] += 1
        return counts


class IdleHome:
    """Home behind ``nat`` (None: public) and a public hub; ``keepalive`` is the home's
    setting for the hub (``"auto"`` or a number)."""

    def __init__(self, nat: MemoryNAT | None, keepalive: str = "auto", seed: int = 7) -> None:
        rng = random.Random(seed)
        self.net = MemoryNetwork()
        self.nat = self.net.add_nat(nat) if nat is not None else None
        self.capture = Capture(HOME[0])
        capture, net = self.capture, self.net

        def record(data: bytes, source: Endpoint, destination: Endpoint) -> bool:
            if source[0] == capture.host:
                capture.sent.append((net.now, kind_of(data)))
            return True

        self.net.filters.append(record)
        self.home = Node(self.net, HOME, rng)
        self.hub = Node(self.net, HUB, rng)
        now = self.net.now
        home_peer = self.home.node.device.add_peer(self.hub.public)
        hub_peer = self.hub.node.device.add_peer(self.home.public)
        assert home_peer is not None and hub_peer is not None
        self.home.node.device.set_endpoint(home_peer, HUB)
        self.home.node.device.replace_allowed_ips(
            home_peer, [ipaddress.ip_network(f"{self.hub.address}/32")]
        )
        self.hub.node.device.replace_allowed_ips(
            hub_peer, [ipaddress.ip_network(f"{self.home.address}/32")]
        )
        self.hub.policy.configure_auto({self.home.public}, now)
        if keepalive == "auto":
            self.home.policy.configure_auto({self.hub.public}, now)
        else:
            self.home.node.device.set_persistent_keepalive(home_peer, int(keepalive), now)
        for member in (self.home, self.hub):
            member.node.device.up(now)
        self.net.flush()
        # The user's first packet (a ping to the hub) starts the session, as on a real machine.
        self.net.send(self.home.node, ipv4(self.home.address, self.hub.address, b"hello"))

    def measured(self) -> bool:
        return self.home.policy.nat.measurement == "measured"

    def warm_up(self, limit: float = 1800.0, after: float = 0.0) -> float:
        """Run until the home measured its NAT (at most ``limit`` s), then ``after`` more
        seconds; returns the time the measurement took."""
        start = self.net.now
        while not self.measured() and self.net.now - start < limit:
            self.net.advance(1.0)
        took = self.net.now - start
        self.net.advance(after)
        return took

    def idle(self, seconds: float) -> dict[str, int]:
        """Let ``seconds`` pass with no traffic; what the home sent meanwhile, by kind."""
        start = self.net.now
        self.net.advance(seconds)
        return self.capture.between(start, self.net.now)

    def hub_reaches_home(self) -> bool:
        """The hub sends one packet to the home's tunnel address; did the home get it?"""
        before = len(self.home.node.written)
        self.net.send(self.hub.node, ipv4(self.hub.address, self.home.address, b"wake up"))
        self.net.advance(10.0)  # room for a handshake and its retry
        return len(self.home.node.written) > before

    @property
    def interval(self) -> int:
        return self.home.node.device.peers[self.hub.public].persistent_keepalive
