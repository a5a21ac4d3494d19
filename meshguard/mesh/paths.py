"""Paths to learned members: hole punching, path preference and fallback to a relay.

A learned member is first reached through a relay (an introducer that forwards), so the pair has
a WireGuard session at once. Over that session both sides then try each other's candidate
endpoints, LAN ones first, then the endpoints introducers observe, then endpoints pings came from:
a PATH_PING (an 8-byte nonce) sent straight to a candidate, answered by a PATH_PONG sent straight
back to where the ping came from. A pong proves the path both ways, and the pair moves to it.
Both sides punch at the same time because a CALL_ME_MAYBE through the introducer wakes the other
side, and because both learn of each other from the same list.

Preference is LAN > direct > relayed. A direct path is pinged every :data:`CHECK_INTERVAL`
seconds; without a pong for :data:`DEAD_AFTER` seconds it is dead and the pair falls back to the
relay at once, then punches again. A relayed pair retries punching every :data:`RETRY_INTERVAL`
seconds. So after a router reboot or a move, a pair is relayed within ``DEAD_AFTER`` seconds and
back on a direct path, where the NATs allow one, within about ``DEAD_AFTER + RECOVERY_BOUND``.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    MeshAgent,
    decode_json,
    encode_json,
    is_discard_only,
    parse_endpoint,
)
from meshguard.mesh.members import MAX_LOCAL, MemberInfo, Membership, parse_key
from meshguard.mesh.sources import DEFAULT_SOURCES, EndpointSource, gather

#: Seconds between punch rounds after a (re)start: quick at first, then backing off.
PUNCH_SCHEDULE = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
#: While relayed (or direct but not LAN with LAN candidates), try again this often.
RETRY_INTERVAL = 30.0
#: A direct path is pinged this often, and is dead after this long without a pong.
CHECK_INTERVAL = 4.0
DEAD_AFTER = 10.0
#: The documented bound for a pair to be back on a direct path once the NATs allow it again:
#: the punch schedule plus the introducer's change debounce, with margin.
RECOVERY_BOUND = 30.0
#: Endpoints that pings came from (peer-reflexive candidates) kept per member.
MAX_REFLEXIVE = 4
#: Outstanding pings kept per member.
MAX_PENDING = 32
#: A CALL_ME_MAYBE is relayed at most this often per (source, target) pair.
CALL_ME_MAYBE_GAP = 1.0

LAN, DIRECT, RELAYED, NONE = "lan", "direct", "relayed", "none"
_RANK = {LAN: 3, DIRECT: 2, RELAYED: 1, NONE: 0}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PathObserver(Protocol):
    """The shape :class:`meshguard.plugins.IPathObserver` gives inside the mesh core."""

    def member_changed(self, public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:
        """A learned member was added or changed (its AllowedIPs as installed), or is gone."""

    def path_changed(self, public_key: bytes, old: str, new: str, detail: str | None) -> None:
        """The path to a learned member changed kind (``lan``/``direct``/``relayed``/``none``);
        ``detail`` is the endpoint or the relay's key."""

    def rtt_measured(self, public_key: bytes, rtt: float) -> None:
        """A PATH_PONG on the chosen direct path measured the round-trip time (seconds)."""


@dataclass
class PathState:
    """What we know and try about the way to one learned member."""

    peer: Peer
    lan: list[Endpoint] = field(default_factory=list)
    observed: list[Endpoint] = field(default_factory=list)
    reflexive: list[Endpoint] = field(default_factory=list)
    kind: str = NONE
    #: The confirmed direct endpoint (LAN or public) while ``kind`` is LAN or DIRECT.
    direct: Endpoint | None = None
    last_pong: float = 0.0
    rtt: float | None = None
    round: int = 0
    next_punch: float | None = None
    next_check: float | None = None
    #: Nonce -> (endpoint, sent at).
    pending: dict[bytes, tuple[Endpoint, float]] = field(default_factory=dict)
    pings_sent: int = 0

    def candidates(self) -> list[Endpoint]:
        seen: list[Endpoint] = []
        for endpoint in self.lan + self.observed + self.reflexive:
            if endpoint not in seen:
                seen.append(endpoint)
        return seen

    def classify(self, endpoint: Endpoint) -> str:
        return LAN if endpoint in self.lan else DIRECT


class Paths:
    """PATH_PING / PATH_PONG / CALL_ME_MAYBE, and the choice of path for each learned member."""

    kinds: tuple[int, ...] = (kinds.CALL_ME_MAYBE, kinds.PATH_PING, kinds.PATH_PONG)

    def __init__(
        self,
        agent: MeshAgent,
        membership: Membership,
        *,
        sources: Sequence[EndpointSource] = DEFAULT_SOURCES,
    ) -> None:
        self.agent = agent
        self.device = agent.device
        self.membership = membership
        self.states: dict[bytes, PathState] = {}
        #: Where candidate endpoints come from (the node sets the plugins it finds).
        self.sources: list[EndpointSource] = list(sources)
        #: Told about members and path events (the node adds plugins and its route keeper).
        self.observers: list[PathObserver] = []
        #: Whether a TLS relay reaches this peer itself (set by :mod:`meshguard.relay`): then no
        #: member forwards for it, which would carry its traffic inside a second session.
        self.tls_relay_reaches: Callable[[Peer], bool] = lambda peer: False
        #: Whether the TLS relay's path logic has ``peer`` on a relay now: then a datagram that
        #: came over another path does not make us restore our direct endpoint (that logic owns
        #: the choice until it hears of a working UDP path, below).
        self.tls_relay_holds: Callable[[Peer], bool] = lambda peer: False
        #: Told ``(peer, endpoint, now)`` whenever a PATH_PONG proves a UDP path both ways, so
        #: the TLS relay's path logic leaves the relay at once instead of pulling the peer back
        #: with the next relayed datagram (two owners of one endpoint flap).
        self.direct_confirmed: Callable[[Peer, Endpoint, float], None] = (
            lambda peer, endpoint, now: None
        )
        #: Calls into sources and observers that raised (their bugs never break the paths).
        self.plugin_errors = 0
        self._cmm_last: dict[tuple[bytes, bytes], float] = {}
        self.dropped = 0
        self.control_sent = 0
        membership.listeners.append(self._member_changed)

    # ------------------------------------------------------------------ membership events

    def _member_changed(
        self, peer: Peer, info: MemberInfo | None, sources: set[bytes], now: float
    ) -> None:
        key = peer.public_key
        if info is None:
            state = self.states.pop(key, None)
            if state is not None:
                self._set_kind(state, NONE, None)
            self._notify(lambda observer: observer.member_changed(key, None))
            return
        allowed = self.device.allowed_ips.networks(peer)
        self._notify(lambda observer: observer.member_changed(key, allowed))
        state = self.states.get(key)
        created = state is None
        if state is None:
            state = self.states[key] = PathState(peer)
        reports = {
            introducer: view[key]
            for introducer, view in self.membership.views.items()
            if key in view
        }
        lan, observed, failures = gather(self.sources, key, reports)
        self.plugin_errors += failures
        new = [e for e in observed + lan if e not in state.candidates()]
        state.observed = observed
        state.lan = lan
        if state.kind in (NONE, RELAYED):
            relay = self._relay_for(peer)
            if relay is not None and peer.relay is None:
                peer.relay = relay
                self._set_kind(state, RELAYED, _b64(relay.public_key))
        if created or (new and state.kind != LAN):
            self._restart_punching(state, now)

    def _relay_for(self, peer: Peer) -> Peer | None:
        """An introducer that lists ``peer``, offers to forward and has a session with us."""
        if self.tls_relay_reaches(peer):
            return None
        sources = self.membership.learned.get(peer.public_key, set())
        for key in sorted(sources):
            if key not in self.membership.relaying_introducers:
                continue
            relay = self.device.peers.get(key)
            if relay is not None and relay.is_meshguard and relay.keypairs.current is not None:
                return relay
        return None

    # ------------------------------------------------------------------ punching

    def _restart_punching(self, state: PathState, now: float) -> None:
        state.round = 0
        state.next_punch = now
        self.agent.dirty = True

    def _punch(self, state: PathState, now: float) -> None:
        """One round: ping every candidate, and on some rounds ask the other side to punch too."""
        peer = state.peer
        if state.round % 4 == 0:
            self._call_me_maybe(peer, now)
        targets = state.candidates()
        if state.kind == DIRECT:
            targets = state.lan  # only an upgrade to LAN is left to find
        for endpoint in targets:
            self._ping(state, endpoint, now)
        delay = (
            PUNCH_SCHEDULE[state.round + 1]
            if state.round + 1 < len(PUNCH_SCHEDULE)
            else RETRY_INTERVAL
        )
        state.round += 1
        if state.kind == LAN or (state.kind == DIRECT and not state.lan):
            state.next_punch = None
        else:
            state.next_punch = now + delay * (0.9 + 0.2 * self._random_fraction())

    def _random_fraction(self) -> float:
        return int.from_bytes(self.device.random(2), "little") / 65536.0

    def _ping(self, state: PathState, endpoint: Endpoint, now: float) -> None:
        nonce = self.device.random(8)
        if len(state.pending) >= MAX_PENDING:
            oldest = min(state.pending, key=lambda n: state.pending[n][1])
            del state.pending[oldest]
        if self.device.send_control_to(state.peer, endpoint, kinds.PATH_PING, nonce, now):
            state.pending[nonce] = (endpoint, now)
            state.pings_sent += 1
            self.control_sent += 1

    def _call_me_maybe(self, peer: Peer, now: float) -> None:
        body = encode_json({"to": _b64(peer.public_key)})
        for key in sorted(self.membership.learned.get(peer.public_key, set())):
            introducer = self.device.peers.get(key)
            if introducer is not None and self.device.send_control(
                introducer, kinds.CALL_ME_MAYBE, body, now
            ):
                self.control_sent += 1

    # ------------------------------------------------------------------ control messages

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        if kind == kinds.CALL_ME_MAYBE:
            self._call_me_maybe_received(peer, body, now)
            return
        if (
            len(body) != 8
            or self.device.relayed_by is not None
            or peer.endpoint is None
            or self.membership.is_relay_endpoint(peer.endpoint)
        ):
            self.dropped += 1  # only what came straight over UDP tells of a UDP path
            return
        source = peer.endpoint  # roaming just set it to where this message came from
        state = self.states.get(peer.public_key)
        if kind == kinds.PATH_PING:
            self.device.send_control_to(peer, source, kinds.PATH_PONG, body, now)
            self.control_sent += 1
            if state is not None:
                if source not in state.candidates():
                    state.reflexive = ([source, *state.reflexive])[:MAX_REFLEXIVE]
                    if state.kind in (NONE, RELAYED) and state.next_punch is None:
                        self._restart_punching(state, now)
                self._keep_chosen(state, source)
            return
        if state is None:
            return
        sent = state.pending.pop(body, None)
        if sent is None:
            self.dropped += 1
            self._keep_chosen(state, source)
            return
        new_kind = state.classify(source)
        if source == state.direct or _RANK[new_kind] > _RANK[state.kind]:
            state.rtt = now - sent[1]
            state.last_pong = now
            rtt = state.rtt
            self._notify(lambda observer: observer.rtt_measured(peer.public_key, rtt))
            if source != state.direct or state.kind != new_kind:
                state.direct = source
                peer.relay = None
                self._set_kind(state, new_kind, f"{source[0]}:{source[1]}")
            if state.next_check is None:
                state.next_check = now + CHECK_INTERVAL
                self.agent.dirty = True
            if new_kind == LAN or not state.lan:
                state.next_punch = None
            self.direct_confirmed(peer, source, now)
        else:
            self._keep_chosen(state, source)

    def _keep_chosen(self, state: PathState, source: Endpoint) -> None:
        """Roaming follows every authenticated datagram; keep the path we chose if it is better
        than the one this message came over."""
        if state.direct is not None and source != state.direct:
            if self.tls_relay_holds(state.peer):
                return
            if _RANK[state.classify(source)] <= _RANK[state.kind]:
                state.peer.endpoint = state.direct

    def _call_me_maybe_received(self, peer: Peer, body: bytes, now: float) -> None:
        message = decode_json(body)
        if message is None:
            self.dropped += 1
            return
        if "to" in message:
            self._forward_call_me_maybe(peer, message, now)
            return
        # From an introducer: a member wants to punch to us now.
        if peer.public_key not in self.membership.introducers:
            self.dropped += 1
            return
        key = parse_key(message.get("from"))
        state = self.states.get(key) if key is not None else None
        if state is None:
            self.dropped += 1
            return
        observed = parse_endpoint(message.get("observed"))
        if observed is not None and observed not in state.observed:
            state.observed = ([observed, *state.observed])[:MAX_LOCAL]
        if state.kind != LAN and (state.next_punch is None or state.round > 2):
            self._restart_punching(state, now)

    def _forward_call_me_maybe(self, peer: Peer, message: dict[str, Any], now: float) -> None:
        """As an introducer: tell the target that ``peer`` wants to punch, with how we see it."""
        target_key = parse_key(message.get("to"))
        target = self.device.peers.get(target_key) if target_key is not None else None
        if (
            target is None
            or target is peer
            or self.membership.is_learned(peer)
            or self.membership.is_learned(target)
        ):
            self.dropped += 1
            return
        pair = (peer.public_key, target.public_key)
        if now - self._cmm_last.get(pair, -CALL_ME_MAYBE_GAP) < CALL_ME_MAYBE_GAP:
            self.dropped += 1
            return
        if len(self._cmm_last) > 4096:
            self._cmm_last.clear()
        self._cmm_last[pair] = now
        body = encode_json(
            {
                "from": _b64(peer.public_key),
                "observed": list(peer.endpoint)
                if peer.endpoint and not peer.relay and not is_discard_only(peer.endpoint)
                else None,
            }
        )
        if self.device.send_control(target, kinds.CALL_ME_MAYBE, body, now):
            self.control_sent += 1

    # ------------------------------------------------------------------ timers

    def session_started(self, peer: Peer, now: float) -> None:
        state = self.states.get(peer.public_key)
        if state is not None and state.kind in (NONE, RELAYED):
            self._restart_punching(state, now)

    def next_deadline(self) -> float | None:
        best: float | None = None
        for state in self.states.values():
            for deadline in (state.next_punch, state.next_check):
                if deadline is not None and (best is None or deadline < best):
                    best = deadline
        return best

    def run_timers(self, now: float) -> None:
        for state in list(self.states.values()):
            if state.next_check is not None and state.next_check <= now:
                self._check(state, now)
            if state.next_punch is not None and state.next_punch <= now:
                if state.peer.keypairs.current is None:
                    # No session yet: make one through the relay (or the best guess), then punch.
                    self._ensure_route(state)
                    self.device.send_initiation(state.peer, now, retry=False)
                    state.next_punch = now + 1.0
                else:
                    self._punch(state, now)

    def _ensure_route(self, state: PathState) -> None:
        peer = state.peer
        if peer.relay is None and state.direct is None:
            relay = self._relay_for(peer)
            if relay is not None:
                peer.relay = relay
                self._set_kind(state, RELAYED, _b64(relay.public_key))
            elif peer.endpoint is None and state.candidates():
                # Nobody forwards for us: the handshake itself has to punch.
                candidates = state.candidates()
                peer.endpoint = candidates[state.round % len(candidates)]
                state.round += 1

    def _check(self, state: PathState, now: float) -> None:
        if state.kind not in (LAN, DIRECT) or state.direct is None:
            state.next_check = None
            return
        if now - state.last_pong > DEAD_AFTER:
            # Dead: fall back to the relay at once and look for a direct path again.
            state.direct = None
            state.next_check = None
            relay = self._relay_for(state.peer)
            state.peer.relay = relay
            if relay is not None:
                self._set_kind(state, RELAYED, _b64(relay.public_key))
            else:
                self._set_kind(state, NONE, None)
            self._restart_punching(state, now)
            return
        self._ping(state, state.direct, now)
        state.next_check = now + CHECK_INTERVAL

    def _set_kind(self, state: PathState, kind: str, detail: str | None) -> None:
        old = state.kind
        state.kind = kind
        if old != kind or kind != RELAYED:
            key = state.peer.public_key
            self._notify(lambda observer: observer.path_changed(key, old, kind, detail))

    def _notify(self, event: Callable[[PathObserver], None]) -> None:
        for observer in self.observers:
            try:
                event(observer)
            except Exception:
                self.plugin_errors += 1  # an observer's bug never breaks the path logic

    # ------------------------------------------------------------------ status

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        state = self.states.get(peer.public_key)
        if state is None:
            return {}
        status: dict[str, Any] = {
            "path": state.kind,
            "rtt_ms": round(state.rtt * 1000, 1) if state.rtt is not None else None,
            "candidates": [f"{h}:{p}" for h, p in state.candidates()],
        }
        if state.kind == RELAYED and peer.relay is not None:
            status["path"] = f"relayed via {_b64(peer.relay.public_key)}"
            status["relay"] = _b64(peer.relay.public_key)
        return status

    def node_status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for state in self.states.values():
            counts[state.kind] = counts.get(state.kind, 0) + 1
        status: dict[str, Any] = {
            "paths": counts,
            "endpoint_sources": [source.name for source in self.sources],
        }
        if self.plugin_errors:
            status["plugin_errors"] = self.plugin_errors
        return status


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()
