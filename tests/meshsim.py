"""A deterministic mesh of meshguard members behind simulated NATs, for the mesh tests.

One public introducer lists every member; members list only the introducer (``Introducer =
yes``). Time moves in small ticks so that large meshes stay cheap to simulate; everything is
driven by one seeded random source.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from meshguard.core.crypto import generate_private_key, public_key
from meshguard.core.interfaces import Endpoint
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.stack import MeshStack
from meshguard.testing.memory import MemoryNAT, MemoryNetwork, MemoryNode
from tests.packets import ipv4

PORT = 51820
INTRODUCER_HOST = "198.51.100.1"


@dataclass
class SimMember:
    name: str
    node: MemoryNode
    agent: MeshAgent
    stack: MeshStack
    key: bytes
    address: str
    nat: MemoryNAT | None
    lan_host: str

    @property
    def public_key(self) -> bytes:
        return public_key(self.key)


class MeshSim:
    """An introducer plus members; ``run`` advances time, ``ping`` checks a pair end to end."""

    def __init__(self, seed: int = 1, *, loss: float = 0.0, forwarding: bool = True) -> None:
        self.rng = random.Random(seed)
        self.net = MemoryNetwork()
        self.loss = loss
        if loss:
            loss_rng = random.Random(seed + 1)
            self.net.filters.append(lambda data, src, dst: loss_rng.random() >= loss)
        self.members: list[SimMember] = []
        self.introducer = self._make("introducer", INTRODUCER_HOST, None, forwarding=forwarding)

    def _make(
        self, name: str, host: str, nat: MemoryNAT | None, *, forwarding: bool = True
    ) -> SimMember:
        node = self.net.add((host, PORT), self.rng.randbytes)
        lan = [(host, PORT)] if nat is not None else []
        agent = MeshAgent(node.device, local_endpoints=lambda: lan)
        stack = MeshStack(agent, forwarding=forwarding)
        key = generate_private_key(self.rng.randbytes)
        node.device.set_private_key(key, self.net.now)
        index = len(self.members) + (1 if self.members or name != "introducer" else 0)
        address = f"10.99.{index // 250}.{index % 250 + 1}"
        member = SimMember(name, node, agent, stack, key, address, nat, host)
        return member

    def add_member(self, nat: MemoryNAT | None, host: str) -> SimMember:
        """A member at ``host`` (a private address behind ``nat``, or a public one)."""
        member = self._make(f"m{len(self.members) + 1}", host, nat)
        self.members.append(member)
        intro = self.introducer
        peer = intro.node.device.add_peer(member.public_key)
        assert peer is not None
        intro.node.device.replace_allowed_ips(peer, [ipaddress.ip_network(member.address)])
        back = member.node.device.add_peer(intro.public_key)
        assert back is not None
        member.node.device.set_endpoint(back, (INTRODUCER_HOST, PORT))
        member.node.device.replace_allowed_ips(back, [ipaddress.ip_network(intro.address)])
        member.node.device.set_persistent_keepalive(back, 25, self.net.now)
        member.stack.configure({intro.public_key}, True, self.net.now)
        return member

    def start(self) -> None:
        for member in self.nodes:
            member.node.device.up(self.net.now)

    @property
    def nodes(self) -> list[SimMember]:
        return [self.introducer, *self.members]

    def run(self, seconds: float, tick: float = 0.05) -> None:
        end = self.net.now + seconds
        net = self.net
        while net.now < end:
            net.now = min(end, net.now + tick)
            for member in self.nodes:
                device = member.node.device
                deadline = device.next_deadline()
                if deadline is not None and deadline <= net.now:
                    device.run_timers(net.now)
                member.agent.run_timers(net.now)
            net.flush()

    def ping(self, a: SimMember, b: SimMember) -> bool:
        """Send one packet from a to b (through whatever path a uses); did it arrive?"""
        before = len(b.node.written)
        packet = ipv4(a.address, b.address, b"ping")
        a.node.device.packet_from_tun(packet, self.net.now)
        self.net.flush()
        return len(b.node.written) > before and b.node.written[-1] == packet

    def path(self, a: SimMember, b: SimMember) -> str:
        state = a.stack.paths.states.get(b.public_key)
        return state.kind if state is not None else "none"

    def endpoint_of(self, a: SimMember, b: SimMember) -> Endpoint | None:
        peer = a.node.device.peers.get(b.public_key)
        return peer.endpoint if peer is not None else None
