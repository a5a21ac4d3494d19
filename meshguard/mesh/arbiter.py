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

The TLS relay's logic (:mod:`meshguard.relay.paths`) detects when UDP fails for any peer,
configured ones too, and asks to carry it (:meth:`PathArbiter.tls_take`), or gives it back
(:meth:`PathArbiter.tls_release`); the arbiter accepts by its ranking (a proven UDP path beats
the relay), then writes the decision as ``peer.path_kind`` (``PATH_TLS``), which the device
sends by through the relay's registered transport: no stand-in endpoints, no send wrappers.
``peer.endpoint`` stays the last UDP endpoint, which is what ``wg show`` reports.

One explicit exception to the ranking, :data:`TLS_REPLACES_MEMBER`: a peer a TLS relay reaches
is not forwarded by a member (docs/relay.md): forwarding inside our session with that member
encrypts twice and is capped at its forwarding rate, and when our own session with the member
runs over the same TLS relay, forwarding only adds a hop.

Sans-I/O: it reads ``now`` from its callers and writes only peer fields.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import AlreadyRegisteredError, Carrier, Endpoint
from meshguard.core.keytext import key_text
from meshguard.core.peer import PATH_MEMBER, PATH_TLS, PATH_UDP, Peer

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

#: A peer a TLS relay reaches goes through the relay rather than a forwarding member (see the
#: module docstring); False would apply :data:`RANK` (member above TLS relay) as it stands.
TLS_REPLACES_MEMBER = True

#: The round-trip time recorded for a proof that measured none (the TLS logic's UDP answer).
UNMEASURED_RTT = 1.0

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


class State(enum.Enum):
    """The one state of a peer's path (``PathArbiter.state_of``)."""

    #: No way to reach it: no endpoint, nothing proven, nobody forwards.
    UNREACHED = "unreached"
    #: Straight over UDP to ``peer.endpoint`` (kind lan, direct, direct-v6 or mapped).
    UDP = "udp"
    #: Forwarded by the member ``peer.relay``.
    MEMBER = "member"
    #: Carried by a TLS relay link.
    TLS_RELAY = "tls-relay"


def state_of_kind(kind: str) -> State:
    if kind in UDP_KINDS:
        return State.UDP
    if kind == MEMBER:
        return State.MEMBER
    if kind == TLS_RELAY:
        return State.TLS_RELAY
    return State.UNREACHED


_U, _D, _M, _T = State.UNREACHED, State.UDP, State.MEMBER, State.TLS_RELAY
_ALL = frozenset({_U, _D, _M, _T})

#: The transition table: for each event, the (from, to) state pairs it may cause. Which target
#: an event picks comes from the ranking (:data:`RANK`, :data:`TLS_REPLACES_MEMBER`); a pair not
#: listed is refused (counted in ``PathArbiter.refused``, nothing moves), so no source can
#: move a peer in a way the policy does not name. UDP -> UDP is a move to another endpoint.
TRANSITIONS: dict[str, frozenset[tuple[State, State]]] = {
    # The mesh's reports (offer_member, proven, failed): the ranking's decision, any move but
    # onto a TLS relay, which only the TLS logic asks for.
    "decide": frozenset((a, b) for a in _ALL for b in (_U, _D, _M)),
    # The TLS logic: UDP failed or the peer came through the relay (or its relay changed).
    "tls-take": frozenset({(_U, _T), (_D, _T), (_M, _T), (_T, _T)}),
    # The TLS logic lets go: back to the UDP endpoint, or none known.
    "tls-release": frozenset({(_T, _D), (_T, _U)}),
    # WireGuard roaming of a peer no proof decides for: its endpoint follows.
    "roam": frozenset({(_U, _D), (_D, _D)}),
    # The user's endpoint (configuration, UAPI) or a name's new address.
    "configure": frozenset({(_U, _D), (_D, _D)}),
    # A peer we cannot reach otherwise reached us through a member: answer the same way.
    "relayed": frozenset({(_U, _M)}),
    # A learned member that left the mesh, or any peer the device removed.
    "forget": frozenset((a, _U) for a in _ALL),
    # The user configured a learned member by hand: a member relay, which only the mesh keeps,
    # ends (back to the last UDP endpoint, or none known).
    "take-over": frozenset({(_M, _D), (_M, _U)}),
}


@dataclass
class PeerPath:
    """What the arbiter knows of one learned member beside its state: proofs, offers, notes."""

    peer: Peer
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
    """Decides and records every peer's path (see the module docstring): one explicit state
    per peer (:class:`State`, in ``paths``), moved only through :meth:`_enter` by the events
    of :data:`TRANSITIONS`.

    Why not Automat: its transitions are fixed per (state, input), while the target here is
    computed from data at each event (proofs and their age, round-trip times, which members
    offer, whether a TLS relay reaches the peer), and status reads the state directly. An
    enum with one table of allowed transitions keeps both explicit and testable.
    """

    def __init__(self, *, on_move: MoveObserver | None = None) -> None:
        #: Learned members' proofs and offers (configured peers have none).
        self.peers: dict[bytes, PeerPath] = {}
        #: Every peer's current path, the state machine's state (absent: not reached, or a
        #: configured peer at ``peer.endpoint`` that never moved).
        self.paths: dict[bytes, Path] = {}
        self.observers: list[MoveObserver] = [on_move] if on_move is not None else []
        self.tls: TlsView = _NoTls()
        #: Told ``(peer, endpoint, now)`` when a UDP path is proven while a TLS relay holds the
        #: peer: the TLS logic leaves the relay and tells the peer (TLS_UDP_SWITCH).
        self.udp_proven_listeners: list[Callable[[Peer, Endpoint, float], None]] = []
        self.moves = 0
        #: Moves the transition table refused (a source asked for what the policy does not name).
        self.refused = 0

    # ------------------------------------------------------------------ wiring

    def add_observer(self, observer: MoveObserver) -> None:
        """Told of every move once, with its reason."""
        self.observers.append(observer)

    def set_tls(self, view: TlsView) -> None:
        """The TLS relay's path logic (one per node): asked what it reaches."""
        if not isinstance(self.tls, _NoTls):
            raise AlreadyRegisteredError("the path arbiter already has a TLS relay logic")
        self.tls = view

    def add_udp_proven_listener(self, listener: Callable[[Peer, Endpoint, float], None]) -> None:
        self.udp_proven_listeners.append(listener)

    # ------------------------------------------------------------------ the state machine

    def current_path(self, peer: Peer) -> Path:
        """The path the peer is on now."""
        path = self.paths.get(peer.public_key)
        if path is not None:
            return path
        if peer.endpoint is not None and peer.public_key not in self.peers:
            return Path(udp_kind(peer.endpoint, False), peer.endpoint)  # configured
        return NO_PATH

    def state_of(self, peer: Peer) -> State:
        return state_of_kind(self.current_path(peer).kind)

    def _enter(self, peer: Peer, new: Path, event: str, reason: str, now: float) -> bool:
        """The one writer of a peer's path: checks the transition against the table, writes
        the peer's fields the device sends by, records the state and tells the observers once.
        False when the table refused it (nothing changed)."""
        old = self.current_path(peer)
        old_state, new_state = state_of_kind(old.kind), state_of_kind(new.kind)
        if (old_state, new_state) not in TRANSITIONS[event]:
            self.refused += 1
            return False
        if new_state is State.UDP:
            peer.relay = None
            peer.path_kind = PATH_UDP
            peer.endpoint = new.endpoint
        elif new_state is State.MEMBER:
            peer.relay = new.via
            peer.path_kind = PATH_MEMBER
        elif new_state is State.TLS_RELAY:
            peer.relay = None  # one layer of encryption: no member forwards inside it
            peer.path_kind = PATH_TLS
        elif old_state is not State.UDP:
            # Unreached: a relay path we decided ends (the device's own answer-through-the-
            # same-member rule for a peer we never moved stands until we decide).
            if old_state is not State.UNREACHED:
                peer.relay = None
                peer.path_kind = PATH_UDP
        if new == old:
            return True
        key = peer.public_key
        if new == NO_PATH:
            self.paths.pop(key, None)
        else:
            self.paths[key] = new
        record = self.peers.get(key)
        if record is not None:
            if RANK[new.kind] > RANK[old.kind]:
                record.moved_up_at = now
            record.reason = reason
        self.moves += 1
        self._notify(peer, old, new, reason)
        return True

    # ------------------------------------------------------------------ records

    def track(self, peer: Peer) -> PeerPath:
        record = self.peers.get(peer.public_key)
        if record is None or record.peer is not peer:
            record = self.peers[peer.public_key] = PeerPath(peer)
        return record

    def removed(self, peer: Peer) -> None:
        """The device removed ``peer`` (UAPI ``remove``, a reload without it, a replace, a
        learned member that left: ``Device.add_peer_removed_listener``). Its path, proofs,
        offers and notes go with it, so nothing is kept for a peer that is gone and the same
        key added again starts afresh; a path we had decided ends with one logged move."""
        key = peer.public_key
        record = self.peers.get(key)
        if record is not None and record.peer is not peer:
            return  # already replaced by a newer peer under that key: its state stays
        if key in self.paths:
            self._enter(peer, NO_PATH, "forget", "removed", 0.0)
        self.peers.pop(key, None)
        self.paths.pop(key, None)

    #: A learned member that left the mesh (the punching source's word for it; the device's
    #: removal has usually dropped it already).
    forget = removed

    def user_configured(self, peer: Peer) -> None:
        """The user configured a learned member by hand (config or UAPI): from now on it is a
        configured peer, with WireGuard roaming and the user's endpoint. The mesh's proofs,
        offers and notes go; a member relay path ends, since nothing would ever move a
        configured peer off it (the user's endpoint would be ignored): back to the last UDP
        endpoint, or unreached. A UDP path stays where it is (roaming moves it from there); a
        TLS relay keeps the peer (its logic serves configured peers too)."""
        self.peers.pop(peer.public_key, None)
        if self.state_of(peer) is State.MEMBER:
            endpoint = peer.endpoint
            new = Path(udp_kind(endpoint, False), endpoint) if endpoint is not None else NO_PATH
            self._enter(peer, new, "take-over", "configured by hand", 0.0)

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
        """An authenticated datagram from ``peer`` came straight from ``source``: the device's
        roaming, which the arbiter owns (``Device.set_roaming_handler``).

        A learned member whose UDP path the mesh decided from proofs stays on it (a better
        proven one is taken at the next decision; datagrams in flight over another path do
        not pull it); one that is not on UDP notes the source as its endpoint (a candidate,
        where the handshake found it). While a TLS relay carries a peer, the endpoint follows
        silently (it is where UDP probes go). Any other peer roams as WireGuard does: the
        endpoint follows, a move logged once."""
        path = self.current_path(peer)
        learned = peer.public_key in self.peers
        if path.kind in UDP_KINDS and learned and path.endpoint is not None:
            peer.endpoint = path.endpoint
            return
        if learned or path.kind == TLS_RELAY or path.kind == MEMBER:
            peer.endpoint = source
            return
        if source != peer.endpoint:
            self._enter(
                peer,
                Path(udp_kind(source, False), source),
                "roam",
                "roaming: an authenticated datagram came from there",
                now,
            )

    #: The device's roaming owner.
    roamed = heard_from

    def relayed(self, peer: Peer, via: Peer | Carrier, now: float) -> None:
        """An authenticated datagram from ``peer`` came through ``via`` (the device's relayed
        listener): a peer we have no way to reach yet answers through the same member."""
        if (
            isinstance(via, Peer)
            and via is not peer
            and peer.endpoint is None
            and self.state_of(peer) is State.UNREACHED
            and peer.path_kind is PATH_UDP
        ):
            self._enter(
                peer, Path(MEMBER, via=via), "relayed", "it reached us through this member", now
            )

    def configured(self, peer: Peer, endpoint: Endpoint | None, reason: str) -> None:
        """An endpoint the user set (``Endpoint =`` in the file, UAPI ``endpoint=``) or that a
        name resolved to (``reason`` says which): the user's word, applied at once and logged
        once. A relay that carries the peer keeps it (the endpoint is where it probes)."""
        if endpoint is None or self.state_of(peer) in (State.TLS_RELAY, State.MEMBER):
            peer.endpoint = endpoint
            return
        self._enter(peer, Path(udp_kind(endpoint, False), endpoint), "configure", reason, 0.0)

    def try_endpoint(self, peer: Peer, endpoint: Endpoint, now: float) -> None:
        """Nobody forwards for ``peer`` and nothing is proven: let the handshake itself try
        ``endpoint`` (the punching source cycles through the candidates). Not a move: the
        peer stays unreached until a proof."""
        self.track(peer)
        if self.state_of(peer) is State.UNREACHED:
            peer.endpoint = endpoint

    def holds_tls(self, peer: Peer) -> bool:
        """Whether the peer is on a TLS relay now."""
        return self.current_path(peer).kind == TLS_RELAY

    def tls_take(self, peer: Peer, link: str, now: float, reason: str) -> bool:
        """The TLS relay's logic would carry ``peer`` over the relay ``link``: UDP failed (its
        evidence, a handshake or data unanswered for seconds, is fresher than any proof), or the
        peer reached us only through it. Earlier UDP proofs no longer count: a UDP path proven
        from now on beats the relay again (ranking). Accepted over a member path by
        :data:`TLS_REPLACES_MEMBER`. False when refused."""
        if not TLS_REPLACES_MEMBER and self.state_of(peer) is State.MEMBER:
            self.refused += 1
            return False
        if not self._enter(peer, Path(TLS_RELAY, link=link), "tls-take", reason, now):
            return False
        record = self.peers.get(peer.public_key)
        if record is not None:
            record.proven.clear()
        return True

    def tls_release(
        self,
        peer: Peer,
        endpoint: Endpoint | None,
        reason: str,
        now: float,
        *,
        answered: bool = False,
    ) -> None:
        """The TLS relay's logic lets ``peer`` go: back to UDP at ``endpoint`` (the one it
        found working, or the last one), where the usual rules try again; a learned member's
        next decision may pick a member relay instead. ``answered``: UDP at ``endpoint`` just
        answered the TLS logic's probe (or the peer's): that counts as a proof, so the next
        decision (a member's offer) does not drop the path it found working."""
        if not self.holds_tls(peer):
            return
        new = Path(udp_kind(endpoint, False), endpoint) if endpoint is not None else NO_PATH
        record = self.peers.get(peer.public_key)
        if record is not None and endpoint is not None and endpoint in record.proven:
            new = record.proven[endpoint][0]  # the mesh proved it: its kind (LAN, ...) stands
        if answered and endpoint is not None:
            # No round-trip time measured: ranked last within its kind until the mesh's own
            # check measures one (or the proof ages out after HOLD_DOWN["proven_for"]).
            self.track(peer).proven[endpoint] = (new, UNMEASURED_RTT, now)
        self._enter(peer, new, "tls-release", reason, now)

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
        """The ranking: a fresh proof beats any relay; without one, a member that forwards
        (unless a TLS relay reaches the peer: :data:`TLS_REPLACES_MEMBER`), else none. A TLS
        relay's hold is left only for a proof or a member when no TLS relay reaches it."""
        peer = record.peer
        current = self.current_path(peer)
        best = self.best_udp(peer, now)
        if best is not None:
            new = best[0]
        elif current.kind == TLS_RELAY:
            relay = self._relay_path(record)
            new = relay if relay.kind == MEMBER else current
        elif current.kind == MEMBER and current.via in record.members:
            new = current if not self._tls_replaces_member(peer) else NO_PATH
        else:
            new = self._relay_path(record)
        self._enter(peer, new, "decide", reason, now)

    def _relay_path(self, record: PeerPath) -> Path:
        if self._tls_replaces_member(record.peer):
            return NO_PATH  # the TLS relay's logic moves it there itself
        for relay in record.members:
            if not relay.removed and relay.keypairs.current is not None:
                return Path(MEMBER, via=relay)
        return NO_PATH

    def _tls_replaces_member(self, peer: Peer) -> bool:
        return TLS_REPLACES_MEMBER and self.tls.reaches(peer)

    def _notify(self, peer: Peer, old: Path, new: Path, reason: str) -> None:
        for observer in self.observers:
            try:
                observer(peer, old, new, reason)
            except Exception:
                pass  # an observer's bug never breaks the path logic

    # ------------------------------------------------------------------ status

    def kind_of(self, peer: Peer) -> str:
        """What carries ``peer`` now, as status reports it."""
        return self.current_path(peer).kind

    def status(self, peer: Peer) -> dict[str, Any]:
        """The status contract: ``path_kind``, ``path_via`` and ``not_direct_reason``."""
        path = self.current_path(peer)
        kind = path.kind
        record = self.peers.get(peer.public_key)
        via: str | None = None
        if kind == TLS_RELAY:
            via = path.link
        elif kind == MEMBER and path.via is not None:
            via = key_text(path.via.public_key)
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
