"""Mesh pings for ``meshguard ping``: an 8-byte nonce out over the peer's current path, echoed.

Unlike hole punching's PATH_PING (sent to one candidate endpoint, answered only over straight
UDP), an operator ping goes and comes back over whatever path the pair uses now, relays
included, so it measures what the user's traffic gets. The answer records how it arrived
(``Peer.arrived_via``): the member that forwarded it, the TLS relay that carried it, or the UDP
endpoint it came from, from which the adapter names the path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent

NONCE = 8
#: Outstanding pings kept; the oldest is forgotten past this (its answer then counts as junk).
MAX_PENDING = 256


@dataclass(frozen=True)
class PingAnswer:
    """One answer: its round-trip time and how it reached us."""

    rtt: float
    #: The member that forwarded the answer to us, if a member relayed it.
    relay: bytes | None
    #: Where the answer came from (``None`` when relayed).
    endpoint: Endpoint | None
    #: The TLS relay that carried the answer, if one did.
    tls_relay: str | None = None


@dataclass
class _Pending:
    key: bytes
    sent: float
    on_answer: Callable[[PingAnswer], None]


class Pinger:
    """Sends operator pings and answers the peers' ones (a :class:`MeshFeature`)."""

    kinds: tuple[int, ...] = (kinds.OPERATOR_PING, kinds.OPERATOR_PONG)

    def __init__(self, agent: MeshAgent) -> None:
        self.device = agent.device
        self.pending: dict[bytes, _Pending] = {}
        self.answered = 0
        self.dropped = 0

    def ping(self, peer: Peer, now: float, on_answer: Callable[[PingAnswer], None]) -> bytes | None:
        """Send one ping; return its nonce (to :meth:`forget` it on timeout), or None when no
        session can carry it now."""
        nonce = self.device.random(NONCE)
        if not self.device.send_control(peer, kinds.OPERATOR_PING, nonce, now):
            return None
        if len(self.pending) >= MAX_PENDING:
            del self.pending[next(iter(self.pending))]
        self.pending[nonce] = _Pending(peer.public_key, now, on_answer)
        return nonce

    def forget(self, nonce: bytes) -> None:
        self.pending.pop(nonce, None)

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        if len(body) != NONCE:
            self.dropped += 1
            return
        if kind == kinds.OPERATOR_PING:
            if self.device.send_control(peer, kinds.OPERATOR_PONG, body, now):
                self.answered += 1
            return
        pending = self.pending.get(body)
        if pending is None or pending.key != peer.public_key:
            self.dropped += 1  # late, unknown, or another peer's nonce
            return
        del self.pending[body]
        via = peer.arrived_via
        answer = PingAnswer(
            rtt=max(0.0, now - pending.sent),
            relay=via.public_key if isinstance(via, Peer) else None,
            endpoint=peer.endpoint if via is None else None,
            tls_relay=via.name if via is not None and not isinstance(via, Peer) else None,
        )
        pending.on_answer(answer)

    def session_started(self, peer: Peer, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None  # timeouts belong to the asker (the control socket's request)

    def run_timers(self, now: float) -> None:
        pass

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        return {}
