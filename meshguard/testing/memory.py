"""An in-memory network that joins sans-I/O devices, for tests and simulations.

It delivers datagrams between endpoints in the order they were sent, with hooks to drop,
duplicate or reorder them, and it advances time deadline by deadline so that every protocol timer
fires at the instant it asked for. Nothing here touches sockets or the wall clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from meshguard.core.device import Device
from meshguard.core.icmp import echo_reply
from meshguard.core.interfaces import Endpoint, RandomBytes

#: Decides the fate of a datagram: return False to drop it.
Filter = Callable[[bytes, Endpoint, Endpoint], bool]


class PathMTULimit:
    """A filter that drops datagrams whose IP packet (UDP + IP headers added) exceeds ``mtu``,
    as a link with that MTU behind a router that drops ICMP "too big" would. ``mtu`` may be
    changed while a test runs; ``None`` lets everything through."""

    def __init__(self, mtu: int | None) -> None:
        self.mtu = mtu
        self.dropped = 0

    def __call__(self, data: bytes, source: Endpoint, destination: Endpoint) -> bool:
        if self.mtu is None:
            return True
        size = len(data) + (48 if ":" in destination[0] else 28)
        if size > self.mtu:
            self.dropped += 1
            return False
        return True


class Timed(Protocol):
    """Something with its own deadlines that the network drives (a mesh agent, say)."""

    def next_deadline(self) -> float | None: ...

    def run_timers(self, now: float) -> None: ...


@dataclass
class MemoryNode:
    """One device's attachment to the network: its endpoint and what it wrote to its TUN."""

    network: MemoryNetwork
    endpoint: Endpoint
    device: Device = field(init=False)
    written: list[bytes] = field(default_factory=list)
    sent: list[tuple[bytes, Endpoint]] = field(default_factory=list)
    #: Answer ICMP echo requests written to the TUN side, as the host's stack would.
    answers_echo: bool = False

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        self.sent.append((data, endpoint))
        self.network.queue.append((data, self.endpoint, endpoint))

    def write_packet(self, packet: bytes) -> None:
        self.written.append(packet)
        if self.answers_echo and (reply := echo_reply(packet)) is not None:
            self.device.packet_from_tun(reply, self.network.now)


class MemoryNetwork:
    """Devices joined by a perfect (unless told otherwise) datagram network."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.nodes: dict[Endpoint, MemoryNode] = {}
        self.queue: deque[tuple[bytes, Endpoint, Endpoint]] = deque()
        self.filters: list[Filter] = []
        self.delivered = 0
        self.dropped = 0
        #: Simulated NATs (see :class:`MemoryNAT`) and plain sockets (:meth:`open_socket`).
        self.nats: list[MemoryNAT] = []
        self.sockets: dict[Endpoint, MemorySocket] = {}
        #: Extra deadline owners (mesh agents) run by :meth:`advance` beside the devices.
        self.timed: list[Timed] = []
        self._next_port = 40000

    def add(
        self, endpoint: Endpoint, random: RandomBytes, *, mtu: int = 1420, **kwargs: object
    ) -> MemoryNode:
        node = MemoryNode(self, endpoint)
        node.device = Device(node, random, mtu=mtu, **kwargs)  # type: ignore[arg-type]
        self.nodes[endpoint] = node
        return node

    def move(self, node: MemoryNode, endpoint: Endpoint) -> None:
        """The node roams to a new endpoint (another address or port)."""
        del self.nodes[node.endpoint]
        node.endpoint = endpoint
        self.nodes[endpoint] = node

    def flush(self, limit: int = 100_000) -> None:
        """Deliver queued datagrams (and whatever they cause) until the network is quiet."""
        count = 0
        while self.queue:
            count += 1
            if count > limit:
                raise RuntimeError("the in-memory network did not go quiet")
            data, source, destination = self.queue.popleft()
            if not all(f(data, source, destination) for f in self.filters):
                self.dropped += 1
                continue
            if self.nats:
                translated = self._translate(source, destination)
                if translated is None:
                    self.dropped += 1
                    continue
                source, destination = translated
            node = self.nodes.get(destination)
            if node is None:
                sock = self.sockets.get(destination)
                if sock is None:
                    self.dropped += 1
                    continue
                self.delivered += 1
                sock.received.append((data, source))
                if sock.on_datagram is not None:
                    sock.on_datagram(data, source, self.now)
                continue
            self.delivered += 1
            node.device.datagram_received(data, source, self.now)

    def next_deadline(self) -> float | None:
        deadlines = [d for n in self.nodes.values() if (d := n.device.next_deadline()) is not None]
        deadlines.extend(d for t in self.timed if (d := t.next_deadline()) is not None)
        return min(deadlines) if deadlines else None

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing every timer at its own instant."""
        self.flush()
        end = self.now + seconds
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            for node in list(self.nodes.values()):
                node.device.run_timers(self.now)
            for timed in list(self.timed):
                if (due := timed.next_deadline()) is not None and due <= self.now:
                    timed.run_timers(self.now)
            self.flush()
        self.now = end

    def send(self, node: MemoryNode, packet: bytes) -> None:
        """Inject an IP packet into ``node``'s TUN side and deliver what follows."""
        node.device.packet_from_tun(packet, self.now)
        self.flush()

    # ------------------------------------------------------------------ sockets and NATs

    def open_socket(self, host: str) -> MemorySocket:
        """A plain UDP socket on ``host`` with a fresh port (a node's secondary socket)."""
        while (host, self._next_port) in self.nodes or (host, self._next_port) in self.sockets:
            self._next_port += 1
        sock = MemorySocket(self, (host, self._next_port))
        self._next_port += 1
        self.sockets[sock.endpoint] = sock
        return sock

    def add_nat(self, nat: MemoryNAT) -> MemoryNAT:
        self.nats.append(nat)
        return nat

    def _translate(
        self, source: Endpoint, destination: Endpoint
    ) -> tuple[Endpoint, Endpoint] | None:
        """Apply the NATs on the way: outbound rewrites the source, inbound the destination."""
        inside = next((n for n in self.nats if source[0] in n.inside), None)
        outside = next((n for n in self.nats if destination[0] in n.inside), None)
        if inside is not None and inside is outside:
            return source, destination  # both behind the same NAT: the LAN, no translation
        if inside is not None:
            source = inside.outbound(source, destination, self.now)
        target = next((n for n in self.nats if n.public_host == destination[0]), None)
        if target is not None:
            private = target.inbound(source, destination, self.now)
            if private is None:
                return None
            destination = private
        return source, destination


@dataclass
class MemorySocket:
    """A UDP socket outside any device: what it received, and an optional callback."""

    network: MemoryNetwork
    endpoint: Endpoint
    received: list[tuple[bytes, Endpoint]] = field(default_factory=list)
    on_datagram: Callable[[bytes, Endpoint, float], None] | None = None

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        self.network.queue.append((data, self.endpoint, endpoint))

    def close(self) -> None:
        self.network.sockets.pop(self.endpoint, None)


@dataclass
class _Flow:
    public_port: int
    last_used: float
    #: An inbound packet passed on this flow (Linux conntrack's "seen reply").
    replied: bool = False


class MemoryNAT:
    """A NAT with a public address, idle-timed mappings and address+port-dependent filtering.

    Each (private endpoint, remote endpoint) flow has its own idle timer of ``lifetime`` seconds,
    refreshed by outbound packets and, if ``inbound_refreshes`` (Linux conntrack does), inbound
    ones; an inbound packet passes only on a live flow from that remote. With
    ``endpoint_dependent`` every flow gets its own public port ("hard" NAT); otherwise a private
    endpoint keeps one public port while any of its flows lives, and gets a new one once all
    expired (so a peer sees the port change). With ``preserve_port`` a new mapping takes the
    private port itself whenever no live mapping holds it, as Linux masquerade does: an expired
    mapping comes back on the same public port, and no peer sees a change.

    ``replied_lifetime`` gives a flow that has let in a reply another idle lifetime, as Linux
    conntrack does (``nf_conntrack_udp_timeout`` 30 s until a reply is seen,
    ``nf_conntrack_udp_timeout_stream`` 120 s after): ``MemoryNAT(..., 30, replied_lifetime=120)``.
    """

    def __init__(
        self,
        public_host: str,
        inside: set[str],
        lifetime: float,
        *,
        endpoint_dependent: bool = False,
        inbound_refreshes: bool = True,
        first_port: int = 20000,
        filtering: str = "port",
        preserve_port: bool = False,
        replied_lifetime: float | None = None,
    ) -> None:
        if filtering not in ("port", "address", "none"):
            raise ValueError("filtering is 'port', 'address' or 'none'")
        #: Which inbound packets a live mapping admits: only from a remote endpoint it sent to
        #: (``port``), from any port of a host it sent to (``address``), or from anyone
        #: (``none``: endpoint-independent filtering, a "full cone").
        self.filtering = filtering
        self.public_host = public_host
        self.inside = inside
        self.lifetime = lifetime
        self.endpoint_dependent = endpoint_dependent
        self.inbound_refreshes = inbound_refreshes
        self.preserve_port = preserve_port
        self.replied_lifetime = replied_lifetime
        self._flows: dict[tuple[Endpoint, Endpoint], _Flow] = {}
        self._next_port = first_port
        self.expired_drops = 0
        self.created = 0
        #: Port mappings the gateway granted (PCP, NAT-PMP, UPnP-IGD): public port -> private
        #: endpoint, open to anyone, as miniupnpd's DNAT rule is.
        self.forwards: dict[int, Endpoint] = {}

    def forward(self, public_port: int, private: Endpoint) -> None:
        """Map ``public_port`` to ``private`` (a granted port mapping): inbound from anyone
        passes, and the replies leave from that port (conntrack's entry of the inbound flow)."""
        self.forwards[public_port] = private

    def _alive(self, flow: _Flow, now: float) -> bool:
        if flow.replied and self.replied_lifetime is not None:
            return now - flow.last_used < self.replied_lifetime
        return now - flow.last_used < self.lifetime

    def outbound(self, source: Endpoint, destination: Endpoint, now: float) -> Endpoint:
        key = (source, destination)
        flow = self._flows.get(key)
        if flow is None or not self._alive(flow, now):
            port = None
            if not self.endpoint_dependent:
                port = next(
                    (
                        f.public_port
                        for (private, _), f in self._flows.items()
                        if private == source and self._alive(f, now)
                    ),
                    None,
                )
            if port is None and self.preserve_port and not self._taken(source[1], now):
                port = source[1]
            if port is None:
                port = self._next_port
                self._next_port += 1
                while self.preserve_port and self._taken(port, now):
                    port = self._next_port
                    self._next_port += 1
            flow = self._flows[key] = _Flow(port, now)
            self.created += 1
        flow.last_used = now
        return (self.public_host, flow.public_port)

    def _taken(self, port: int, now: float) -> bool:
        return any(f.public_port == port and self._alive(f, now) for f in self._flows.values())

    def inbound(self, remote: Endpoint, destination: Endpoint, now: float) -> Endpoint | None:
        filtering = self.filtering
        for (private, flow_remote), flow in self._flows.items():
            if flow.public_port == destination[1] and (
                flow_remote == remote
                or (filtering == "address" and flow_remote[0] == remote[0])
                or filtering == "none"
            ):
                if not self._alive(flow, now):
                    continue
                flow.replied = True
                if self.inbound_refreshes:
                    flow.last_used = now
                return private
        forwarded = self.forwards.get(destination[1])
        if forwarded is not None:
            self._flows[(forwarded, remote)] = _Flow(destination[1], now, replied=True)
            self.created += 1
            return forwarded
        self.expired_drops += 1
        return None

    def reboot(self, public_host: str | None = None) -> None:
        """The router restarts: every mapping is forgotten, perhaps with a new public address."""
        self._flows.clear()
        if public_host is not None:
            self.public_host = public_host

    def mapped(self, source: Endpoint, remote: Endpoint, now: float) -> Endpoint | None:
        """The live public endpoint of a flow, for assertions."""
        flow = self._flows.get((source, remote))
        if flow is None or not self._alive(flow, now):
            return None
        return (self.public_host, flow.public_port)


class MemoryProbeSockets:
    """Secondary sockets on one host of a `MemoryNetwork` (for the keepalive policy's probes)."""

    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self.network = network
        self.host = host
        self.opened = 0

    def open(
        self, toward: Endpoint, receive: Callable[[bytes, Endpoint, float], None]
    ) -> MemorySocket:
        sock = self.network.open_socket(self.host)
        sock.on_datagram = receive
        self.opened += 1
        return sock
