"""An in-memory network that joins sans-I/O devices, for tests and simulations.

It delivers datagrams between endpoints in the order they were sent, with hooks to drop,
duplicate or reorder them, and it advances time deadline by deadline so that every protocol timer
fires at the instant it asked for. Nothing here touches sockets or the wall clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint, RandomBytes

#: Decides the fate of a datagram: return False to drop it.
Filter = Callable[[bytes, Endpoint, Endpoint], bool]


@dataclass
class MemoryNode:
    """One device's attachment to the network: its endpoint and what it wrote to its TUN."""

    network: MemoryNetwork
    endpoint: Endpoint
    device: Device = field(init=False)
    written: list[bytes] = field(default_factory=list)
    sent: list[tuple[bytes, Endpoint]] = field(default_factory=list)

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        self.sent.append((data, endpoint))
        self.network.queue.append((data, self.endpoint, endpoint))

    def write_packet(self, packet: bytes) -> None:
        self.written.append(packet)


class MemoryNetwork:
    """Devices joined by a perfect (unless told otherwise) datagram network."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self.nodes: dict[Endpoint, MemoryNode] = {}
        self.queue: deque[tuple[bytes, Endpoint, Endpoint]] = deque()
        self.filters: list[Filter] = []
        self.delivered = 0
        self.dropped = 0

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
            node = self.nodes.get(destination)
            if node is None:
                self.dropped += 1
                continue
            self.delivered += 1
            node.device.datagram_received(data, source, self.now)

    def next_deadline(self) -> float | None:
        deadlines = [d for n in self.nodes.values() if (d := n.device.next_deadline()) is not None]
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
            self.flush()
        self.now = end

    def send(self, node: MemoryNode, packet: bytes) -> None:
        """Inject an IP packet into ``node``'s TUN side and deliver what follows."""
        node.device.packet_from_tun(packet, self.now)
        self.flush()
