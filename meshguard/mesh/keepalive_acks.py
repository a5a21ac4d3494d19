"""Acknowledged keepalives: a lost keepalive is noticed and sent again, so it costs no mapping.

A NAT mapping survives as long as no idle gap exceeds its lifetime. With plain WireGuard
keepalives nobody learns that one was lost, so the interval must leave room for a loss: half the
lifetime known alive (two intervals fit in it). Between two meshguard nodes the keepalive can be
answered instead: in the slot of the persistent keepalive (``agent.keepalive_slot``) the node
sends a ``KEEPALIVE_REQUEST`` control message (it refreshes the mapping exactly as the empty
keepalive would, and re-arms the keepalive timer, so the device's own keepalive never goes), and
the peer answers with an empty transport message, a plain WireGuard keepalive, which nobody
answers: two nodes asking each other never ping-pong. When nothing authenticated arrives from the
peer within ``ACK_WAIT`` the request is sent again, at most ``ACK_RESENDS`` times. A lost
keepalive then leaves the mapping idle for at most one interval plus those resends, and the
interval can come much closer to the lifetime (the policy's choice, see
:func:`meshguard.mesh.keepalive.interval_for`).

Only for ``auto`` peers whose HELLO lists :data:`CAPABILITY` (the keepalive policy lists it
among its features). A stock WireGuard peer, or a meshguard version without
acknowledgements, keeps the plain keepalive and the half-lifetime interval. A peer that stops
answering (``UNANSWERED_LIMIT`` slots in a row without any authenticated datagram after all
resends) is treated as one that cannot answer (it still gets requests) until it answers again,
and the owner is told both times so it can choose the interval again. A slot whose session will
have expired carries the device's handshake initiation instead (the response answers it; the
device retransmits it itself).

The answering side spends at most one datagram per peer and ``ANSWER_GAP`` on it, only on a
session that can send, and never starts a handshake for it. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from meshguard.core.device import Device
from meshguard.core.peer import PERSISTENT_KEEPALIVE, Peer
from meshguard.core.sent import CONTROL, KEEPALIVE
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    KEEPALIVE_SLOT_LEAD,
    MeshAgent,
    keepalive_slot,
)

#: The capability in HELLO's feature list (``capabilities`` of the keepalive policy).
CAPABILITY: Final = "KeepaliveAcks"
#: How long to wait for an answer before sending the request again, and how often to resend.
ACK_WAIT: Final = 2.0
ACK_RESENDS: Final = 2
#: Slots in a row that got no answer after all resends: the peer is taken not to answer.
UNANSWERED_LIMIT: Final = 2
#: Answering side: at most one answer per peer this often (resends come ACK_WAIT apart).
ANSWER_GAP: Final = 1.0
#: A slot this close counts as due.
SLOT_SLACK: Final = 0.05
#: A request goes only on a session that can still carry the resends and the answer.
SESSION_SLACK: Final = ACK_WAIT * (ACK_RESENDS + 1)


@dataclass
class _Pending:
    """A request of ours waiting for any authenticated datagram from the peer."""

    rx_mark: int
    due: float
    sends: int
    #: Our own keepalive request (not another feature's request watched for an answer): only
    #: its answer shows the peer answers keepalive requests.
    own: bool = True


class KeepaliveAcks:
    """Both sides of acknowledged keepalives, one machine per node, driven by the keepalive
    policy (which hands it ``KEEPALIVE_REQUEST`` and runs its timers after the self-check's)."""

    def __init__(
        self,
        device: Device,
        agent: MeshAgent,
        *,
        managed: Callable[[], Iterable[bytes]],
        changed: Callable[[float], None],
        count: Callable[[str], None],
    ) -> None:
        """``managed()`` are the peers whose keepalive auto chooses (only theirs are
        acknowledged); ``changed(now)`` is told when a peer starts or stops counting as one that
        answers (its interval depends on it); ``count(name)`` bumps a counter."""
        self.device = device
        self.agent = agent
        self._managed = managed
        self._changed = changed
        self._count = count
        self._pending: dict[bytes, _Pending] = {}
        #: Slots in a row that no answer followed, per peer.
        self._unanswered: dict[bytes, int] = {}
        #: A slot we leave to the device (the session cannot carry a request): the keepalive
        #: deadline it was seen at, so it is not looked at again.
        self._skipped: dict[bytes, float] = {}
        #: Answering side: when we last answered each peer.
        self._answered: dict[bytes, float] = {}
        #: Per peer: requests sent (first tries), answered, resends, slots left unanswered.
        self.stats: dict[bytes, dict[str, int]] = {}

    # ------------------------------------------------------------------ who

    def speaks(self, peer: Peer) -> bool:
        """Whether ``peer`` said in HELLO that it answers keepalive requests."""
        if not peer.is_meshguard:
            return False
        state = self.agent.peers.get(peer.public_key)
        return state is not None and CAPABILITY in state.features

    def capable(self, peer: Peer) -> bool:
        """Whether ``peer`` answers keepalive requests: it says so, and has not stopped (the
        interval toward it may leave less room for a lost keepalive)."""
        return self.speaks(peer) and self._unanswered.get(peer.public_key, 0) < UNANSWERED_LIMIT

    def _eligible(self) -> list[Peer]:
        peers: list[Peer] = []
        for key in self._managed():
            peer = self.device.peers.get(key)
            if (
                peer is not None
                and peer.persistent_keepalive > 0
                and peer.endpoint is not None
                and peer.sends_over_udp
                and self.speaks(peer)
            ):
                peers.append(peer)
        return peers

    def _stat(self, key: bytes, name: str) -> None:
        stats = self.stats.setdefault(key, {"sent": 0, "answered": 0, "resent": 0, "unanswered": 0})
        stats[name] += 1

    # ------------------------------------------------------------------ our side

    def watch(self, peer: Peer, now: float) -> None:
        """Another feature sent a request of its own in the keepalive slot (the self-check's,
        answered by an acknowledgement): resend a keepalive request if no answer comes."""
        if self.speaks(peer) and peer.public_key not in self._pending:
            self._pending[peer.public_key] = _Pending(peer.rx_bytes, now + ACK_WAIT, 1, own=False)
            self._stat(peer.public_key, "sent")
            self.agent.dirty = True

    def _send(self, peer: Peer, now: float) -> bool:
        if not self.device.send_control(peer, kinds.KEEPALIVE_REQUEST, b"", now):
            return False
        # It is the keepalive, in the counts a user reads (``meshguard status``: sent by kind).
        peer.sent.relabel(CONTROL, KEEPALIVE)
        self.agent.dirty = True
        return True

    def _slot(self, peer: Peer, now: float) -> None:
        key = peer.public_key
        deadline = peer.timers.deadlines[PERSISTENT_KEEPALIVE]
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now + SESSION_SLACK):
            # The session ends before an answer could come: the device's keepalive starts a
            # handshake in this slot (its response answers it; the device retransmits).
            if deadline is not None:
                self._skipped[key] = deadline
            return
        if not self._send(peer, now):
            if deadline is not None:
                self._skipped[key] = deadline
            return
        self._skipped.pop(key, None)
        self._pending[key] = _Pending(peer.rx_bytes, now + ACK_WAIT, 1)
        self._stat(key, "sent")
        self._keep_rhythm(peer, now)

    def _keep_rhythm(self, peer: Peer, sent_at: float) -> None:
        """The request went KEEPALIVE_SLOT_LEAD before the keepalive was due, and sending (and
        then the answer) re-armed the timer a whole interval from then: move it so the next slot
        comes a whole interval after this request, not that lead (plus the round trip) sooner."""
        due = sent_at + peer.persistent_keepalive + KEEPALIVE_SLOT_LEAD
        current = peer.timers.deadlines[PERSISTENT_KEEPALIVE]
        if peer.persistent_keepalive and current is not None and current < due:
            self.device.timers.arm(peer, peer.timers, PERSISTENT_KEEPALIVE, due)

    def _judge(self, peer: Peer, pending: _Pending, now: float) -> None:
        key = peer.public_key
        if peer.rx_bytes != pending.rx_mark:
            del self._pending[key]
            self._stat(key, "answered")
            if pending.sends == 1:
                self._keep_rhythm(peer, pending.due - ACK_WAIT)
            if (pending.own or pending.sends > 1) and self._unanswered.pop(
                key, 0
            ) >= UNANSWERED_LIMIT:
                self._changed(now)
            return
        if pending.sends <= ACK_RESENDS and self._send(peer, now):
            pending.sends += 1
            pending.due = now + ACK_WAIT
            self._stat(key, "resent")
            self._count("keepalive_resent")
            return
        del self._pending[key]
        self._stat(key, "unanswered")
        self._count("keepalive_unanswered")
        self._unanswered[key] = self._unanswered.get(key, 0) + 1
        if self._unanswered[key] == UNANSWERED_LIMIT:
            self._changed(now)

    def next_deadline(self) -> float | None:
        deadlines = [p.due for p in self._pending.values()]
        for peer in self._eligible():
            key = peer.public_key
            if key in self._pending:
                continue
            slot = keepalive_slot(peer)
            if (
                slot is not None
                and self._skipped.get(key) != peer.timers.deadlines[PERSISTENT_KEEPALIVE]
            ):
                deadlines.append(slot)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for key, pending in list(self._pending.items()):
            peer = self.device.peers.get(key)
            if peer is None:
                del self._pending[key]
            elif pending.due <= now:
                self._judge(peer, pending, now)
        for peer in self._eligible():
            key = peer.public_key
            if key in self._pending:
                continue
            if self._skipped.get(key) == peer.timers.deadlines[PERSISTENT_KEEPALIVE]:
                continue
            slot = keepalive_slot(peer)
            if slot is not None and slot <= now + SLOT_SLACK:
                self._slot(peer, now)

    # ------------------------------------------------------------------ the peer's side

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        """A peer's keepalive request: answer with an empty keepalive (never answered)."""
        key = peer.public_key
        last = self._answered.get(key)
        if last is not None and now - last < ANSWER_GAP:
            self._count("keepalive_request_ignored")
            return
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now) or peer.endpoint is None:
            return
        self._answered[key] = now
        self.device.send_keepalive(peer, now)
        self._count("keepalive_requests_answered")

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        stats = self.stats.get(peer.public_key)
        if stats is None:
            return {}
        return {"keepalive_acks": dict(stats)}

    def forget(self, key: bytes) -> None:
        """A removed peer."""
        self._pending.pop(key, None)
        self._unanswered.pop(key, None)
        self._skipped.pop(key, None)
        self._answered.pop(key, None)
        self.stats.pop(key, None)
