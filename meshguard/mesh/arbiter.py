"""The path arbiter: the one place that says how a learned member is reached, and why.

Hole punching (:mod:`meshguard.mesh.paths`) and the member relays *report* to it: a relay
member that can forward (``offer_member``), a UDP path a PATH_PONG proved (``proven``), a
proven path that stopped answering (``failed``), an authenticated datagram that came over some
UDP path (``heard_from``). The arbiter ranks what it knows by one policy, moves the peer (it
alone writes ``peer.endpoint`` and ``peer.relay`` for learned members), logs each move once with
its reason, and answers status: the path's kind, who carries it, and, while it is not direct,
why not, in words a user can act on.

Policy (:data:`RANK`): LAN > direct (IPv6 a notch above IPv4) > a mapped port > via a member > a
TLS relay > none; within one kind the lower round-trip time wins. A path that failed is not
chosen again before it is proven anew; after a move up, a datagram arriving over a worse path
does not pull the peer down (:data:`HOLD_DOWN`).

The TLS relay's logic (:mod:`meshguard.relay.paths`) moves any peer, configured ones too, onto
or off a TLS relay through :meth:`PathArbiter.tls_move`, so those moves are written, logged and
reported here as well; while it holds a peer, the arbiter leaves that peer's endpoint to it.

Sans-I/O: it reads ``now`` from its callers and writes only peer fields.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import Endpoint
from meshguard.core.keytext import key_text
from meshguard.core.peer import Peer

LAN = "lan"
DIRECT = "direct"
DIRECT_V6 = "direct-v6"
MAPPED = "mapped"
MEMBER = "member"
TLS_RELAY = "tls-relay"
NONE = "none"

#: The ranking policy: higher is better.
RANK: dict[str, int] = {
    LAN: 60,
    DIRECT: 50,
    # IPv6 a notch above: no NAT mapping to keep alive or lose, only a firewall's state.
    DIRECT_V6: 51,
    MAPPED: 45,
    MEMBER: 20,
    TLS_RELAY: 10,
    NONE: 0,
}

#: Hold-down times (seconds), one table for every rule that keeps a decision for a while.
HOLD_DOWN: dict[str, float] = {
    # After moving up to a UDP path, datagrams still in flight over the old (worse) path do not
    # pull the peer back down.
    "after_move_up": 3.0,
    # A proven UDP path counts this long after its last answer (the punching source checks the
    # chosen one every 4 s and calls it failed after 10 s without an answer).
    "proven_for": 14.0,
}

#: Kinds whose path is a UDP endpoint of the peer itself.
UDP_KINDS = frozenset({LAN, DIRECT, DIRECT_V6, MAPPED})


def udp_kind(endpoint: Endpoint, lan: bool) -> str:
    """The kind of a UDP path to ``endpoint``: LAN if a LAN source named it, else direct
    (``direct-v6`` for an IPv6 address)."""
    if lan:
        return LAN
    try:
        version = ipaddress.ip_address(endpoint[0].split("%", 1)[0]).version
    except ValueError:
        return DIRECT
    return DIRECT_V6 if version == 6 else DIRECT


@dataclass(frozen=True)
class Path:
    """One way to reach a peer: a UDP endpoint (``endpoint``) or a relay (``via``)."""

    kind: str
    endpoint: Endpoint | None = None
    via: Peer | None = None
    #: The TLS relay's name (``host:port``) for a ``tls-relay`` path.
    link: str | None = None

    def describe(self) -> str:
        if self.kind == TLS_RELAY:
            return f"tls-relay via {self.link}"
        if self.kind in UDP_KINDS and self.endpoint is not None:
            return f"{self.kind} {_endpoint_text(self.endpoint)}"
        if self.via is not None:
            return f"via member {self.via.short_name}"
        return self.kind


NO_PATH = Path(NONE)


class MoveObserver(Protocol):
    """Told of every move, once, with its reason (the node logs it; tests record it)."""

    def __call__(self, peer: Peer, old: Path, new: Path, reason: str) -> None: ...


class TlsView(Protocol):
    """What the arbiter asks of the TLS relay's path logic (``meshguard.relay.paths``)."""

    def reaches(self, peer: Peer) -> bool:
        """Whether a TLS relay reaches the peer (then no member need forward for it)."""
        ...


class _NoTls:
    def reaches(self, peer: Peer) -> bool:
        return False


@dataclass
class PeerPath:
    """The arbiter's record of one learned member: one state (``current``) and its reasons."""

    peer: Peer
    current: Path = NO_PATH
    #: Proven UDP paths: (path, round-trip time, when last proven).
    proven: dict[Endpoint, tuple[Path, float, float]] = field(default_factory=dict)
    #: Member relays that offered to forward, best first.
    members: list[Peer] = field(default_factory=list)
    moved_up_at: float = float("-inf")
    #: Why the peer is not direct, as the punching source last explained it.
    punch_note: str | None = None
    #: The last move's reason.
    reason: str = "not reached yet"


class PathArbiter:
    """Decides and records every learned member's path (see the module docstring)."""

    def __init__(self, *, on_move: MoveObserver | None = None) -> None:
        self.peers: dict[bytes, PeerPath] = {}
        self.observers: list[MoveObserver] = [on_move] if on_move is not None else []
        self.tls: TlsView = _NoTls()
        #: Peers the TLS relay's logic has on a relay now, and that path.
        self.tls_held: dict[bytes, Path] = {}
        #: Told ``(peer, endpoint, now)`` when a UDP path is proven while a TLS relay holds the
        #: peer: the TLS logic leaves the relay and tells the peer (TLS_UDP_SWITCH).
        self.udp_proven_listeners: list[Callable[[Peer, Endpoint, float], None]] = []
        self.moves = 0

    # ------------------------------------------------------------------ records

    def track(self, peer: Peer) -> PeerPath:
        record = self.peers.get(peer.public_key)
        if record is None or record.peer is not peer:
            record = self.peers[peer.public_key] = PeerPath(peer)
        return record

    def forget(self, peer: Peer) -> None:
        record = self.peers.pop(peer.public_key, None)
        if record is not None and record.current != NO_PATH:
            self._notify(peer, record.current, NO_PATH, "no longer a member")

    # ------------------------------------------------------------------ reports from sources

    def offer_member(self, peer: Peer, relays: list[Peer], now: float) -> None:
        """Members that would forward for ``peer`` (best first); with no UDP path proven the
        peer goes through the first, unless a TLS relay reaches it (one layer of encryption,
        no member's rate limit)."""
        record = self.track(peer)
        record.members = list(relays)
        self._decide(record, now, "a member offers to forward")

    def proven(self, peer: Peer, path: Path, rtt: float, now: float) -> None:
        """A PATH_PONG proved ``path`` both ways, with this round-trip time."""
        assert path.endpoint is not None
        record = self.track(peer)
        record.proven[path.endpoint] = (path, rtt, now)
        record.punch_note = None
        if self.holds_tls(peer):
            for listener in self.udp_proven_listeners:
                listener(peer, path.endpoint, now)
        self._decide(record, now, f"a ping to {_endpoint_text(path.endpoint)} was answered")

    def failed(self, peer: Peer, endpoint: Endpoint, now: float, reason: str) -> None:
        """A proven UDP path stopped answering: never chosen again until proven anew."""
        record = self.track(peer)
        record.proven.pop(endpoint, None)
        self._decide(record, now, reason)

    def heard_from(self, peer: Peer, source: Endpoint, now: float) -> None:
        """An authenticated datagram from ``peer`` came straight from ``source`` (the device
        roamed ``peer.endpoint`` to it). Keep the decided path unless this one is as good."""
        record = self.peers.get(peer.public_key)
        if record is None or self.holds_tls(peer):
            return
        current = record.current
        if current.kind not in UDP_KINDS or current.endpoint is None:
            return
        if source == current.endpoint:
            return
        known = record.proven.get(source)
        if known is not None and RANK[known[0].kind] > RANK[current.kind]:
            return  # a better proven path: the next decision takes it
        peer.endpoint = current.endpoint

    def try_endpoint(self, peer: Peer, endpoint: Endpoint, now: float) -> None:
        """Nobody forwards for ``peer`` and nothing is proven: let the handshake itself try
        ``endpoint`` (the punching source cycles through the candidates)."""
        record = self.track(peer)
        if record.current.kind == NONE and peer.relay is None and not self.holds_tls(peer):
            peer.endpoint = endpoint

    def holds_tls(self, peer: Peer) -> bool:
        """Whether the TLS relay's logic has ``peer`` on a relay now."""
        return peer.public_key in self.tls_held

    def tls_move(
        self, peer: Peer, endpoint: Endpoint | None, link: str | None, reason: str
    ) -> None:
        """The TLS relay's logic moves ``peer`` onto the relay ``link`` (``endpoint``: the
        stand-in address it sends to there) or, with ``link`` None, back to the UDP
        ``endpoint``. Written, logged once and reported here."""
        key = peer.public_key
        old = self.tls_held.get(key)
        if old is None:
            old = Path(udp_kind(peer.endpoint, False), peer.endpoint) if peer.endpoint else NO_PATH
        if link is not None:
            new = Path(TLS_RELAY, endpoint, link=link)
            self.tls_held[key] = new
            peer.relay = None  # one layer of encryption: no member forwards inside it
            record = self.peers.get(key)
            if record is not None and record.current.kind == MEMBER:
                record.current = NO_PATH
        else:
            self.tls_held.pop(key, None)
            new = Path(udp_kind(endpoint, False), endpoint) if endpoint is not None else NO_PATH
            record = self.peers.get(key)
            if record is not None and endpoint is not None and endpoint in record.proven:
                # The mesh proved this path: it is the member's decided path from now on (and
                # the move is logged here, once).
                new = record.current = record.proven[endpoint][0]
                record.reason = reason
        peer.endpoint = endpoint
        if new != old:
            self.moves += 1
            self._notify(peer, old, new, reason)

    def tls_keep(self, peer: Peer, endpoint: Endpoint | None) -> None:
        """The TLS relay's logic keeps its choice against roaming (a datagram in flight over
        the other path): the endpoint goes back, nothing moves."""
        peer.endpoint = endpoint

    def explain(self, peer: Peer, note: str | None) -> None:
        """The punching source says why no direct path is found yet (None: nothing to say)."""
        self.track(peer).punch_note = note

    # ------------------------------------------------------------------ the decision

    def best_udp(self, peer: Peer, now: float) -> tuple[Path, float] | None:
        """The best UDP path proven lately, with its round-trip time."""
        record = self.peers.get(peer.public_key)
        if record is None:
            return None
        fresh = [
            (path, rtt)
            for path, rtt, at in record.proven.values()
            if now - at <= HOLD_DOWN["proven_for"]
        ]
        if not fresh:
            return None
        return max(fresh, key=lambda item: (RANK[item[0].kind], -item[1]))

    def _decide(self, record: PeerPath, now: float, reason: str) -> None:
        peer = record.peer
        best = self.best_udp(peer, now)
        if best is not None:
            new = best[0]
        elif record.current.kind in UDP_KINDS:
            new = self._relay_path(record)
        elif record.current.kind == MEMBER and record.current.via in record.members:
            new = record.current if not self.tls.reaches(peer) else NO_PATH
        else:
            new = self._relay_path(record)
        self._move(record, new, now, reason)

    def _relay_path(self, record: PeerPath) -> Path:
        if self.tls.reaches(record.peer):
            return NO_PATH  # the TLS relay's logic moves it there itself
        for relay in record.members:
            if not relay.removed and relay.keypairs.current is not None:
                return Path(MEMBER, via=relay)
        return NO_PATH

    def _move(self, record: PeerPath, new: Path, now: float, reason: str) -> None:
        old = record.current
        peer = record.peer
        if new.kind in UDP_KINDS:
            peer.relay = None
            peer.endpoint = new.endpoint
        elif new.kind == MEMBER:
            if not self.holds_tls(peer):
                peer.relay = new.via
        elif old.kind == MEMBER:
            peer.relay = None
        if new == old:
            return
        if RANK[new.kind] > RANK[old.kind]:
            record.moved_up_at = now
        record.current = new
        record.reason = reason
        self.moves += 1
        self._notify(peer, old, new, reason)

    def _notify(self, peer: Peer, old: Path, new: Path, reason: str) -> None:
        for observer in self.observers:
            try:
                observer(peer, old, new, reason)
            except Exception:
                pass  # an observer's bug never breaks the path logic

    # ------------------------------------------------------------------ status

    def kind_of(self, peer: Peer) -> str:
        """What carries ``peer`` now, as status reports it (TLS first: it overrides)."""
        if self.holds_tls(peer):
            return TLS_RELAY
        record = self.peers.get(peer.public_key)
        return record.current.kind if record is not None else NONE

    def status(self, peer: Peer) -> dict[str, Any]:
        """The status contract: ``path_kind``, ``path_via`` and ``not_direct_reason``."""
        kind = self.kind_of(peer)
        record = self.peers.get(peer.public_key)
        if record is None and kind == NONE and peer.endpoint is not None:
            kind = udp_kind(peer.endpoint, False)  # a configured peer at its endpoint
        via: str | None = None
        if kind == TLS_RELAY:
            via = self.tls_held[peer.public_key].link
        elif kind == MEMBER and record is not None and record.current.via is not None:
            via = key_text(record.current.via.public_key)
        return {
            "path_kind": kind,
            "path_via": via,
            "not_direct_reason": self.not_direct_reason(peer, kind, record),
            "path_reason": record.reason if record is not None else None,
        }

    def not_direct_reason(self, peer: Peer, kind: str, record: PeerPath | None) -> str | None:
        if kind in UDP_KINDS:
            return None
        if record is None:
            if kind == TLS_RELAY:
                return "UDP to its endpoint failed; probing UDP while the TLS relay carries it"
            return "no endpoint: set one (Endpoint = host:port) or wait for it to reach us"
        if record.punch_note is not None:
            return record.punch_note
        if kind == TLS_RELAY:
            return "UDP to it failed; probing UDP while the TLS relay carries it"
        return "no direct path proven yet; hole punching is under way"


def _endpoint_text(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
