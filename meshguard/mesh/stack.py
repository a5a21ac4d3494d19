"""The mesh features a node runs, wired together: membership, paths and relaying."""

from __future__ import annotations

from meshguard.core.peer import Peer
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.arbiter import PathArbiter
from meshguard.mesh.forwarding import RATE, Relaying
from meshguard.mesh.members import Membership
from meshguard.mesh.paths import Paths


class MeshStack:
    """Membership, hole punching and relaying on one agent, configured together."""

    def __init__(self, agent: MeshAgent, *, forwarding: bool = True) -> None:
        self.agent = agent
        self.membership = Membership(agent, forwarding=forwarding)
        #: The one owner of every learned member's path (mesh/arbiter.py).
        self.arbiter = PathArbiter()
        # WireGuard's roaming moves a peer's endpoint: the arbiter decides it.
        agent.device.set_roaming_handler(self.arbiter.roamed)
        agent.device.add_relayed_listener(self.arbiter.relayed)
        # A peer removed from the device (UAPI, config, a member that left) leaves the arbiter.
        agent.device.add_peer_removed_listener(self.arbiter.removed)
        self.paths = Paths(agent, self.membership, arbiter=self.arbiter)
        self.relaying = Relaying(agent, forwarding=forwarding, trusted=self._trusted_relay)
        agent.add_feature(self.membership)
        agent.add_feature(self.paths)
        agent.add_feature(self.relaying)

    def _trusted_relay(self, peer: Peer) -> bool:
        # Datagrams authenticate end to end anyway; taking them only from peers our user
        # configured keeps a learned member from feeding us traffic under another's name.
        return not self.membership.is_learned(peer)

    def configure(
        self,
        introducers: set[bytes],
        forwarding: bool,
        now: float,
        forwarding_rate: float | None = RATE,
    ) -> None:
        """Apply the config's mesh settings (``Introducer = yes`` peers, ``Forwarding``,
        ``ForwardingRate``)."""
        self.membership.configure(introducers, forwarding, now)
        self.relaying.forwarding = forwarding
        if forwarding_rate != self.relaying.rate:
            self.relaying.set_rate(forwarding_rate)

    def user_configured(self, key: bytes) -> None:
        """The user configured this peer by hand: learned information no longer applies."""
        if key in self.membership.learned:
            self.membership.user_configured(key)
            self.paths.states.pop(key, None)
            peer = self.agent.device.peers.get(key)
            if peer is not None:
                self.arbiter.user_configured(peer)
        elif key in self.membership.enrolled:
            self.membership.user_configured(key)
