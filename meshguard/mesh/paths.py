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

import datetime
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import Endpoint
from meshguard.core.keytext import key_text
from meshguard.core.peer import Peer
from meshguard.mesh import arbiter as arb
from meshguard.mesh import birthday as bd
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    MeshAgent,
    decode_json,
    encode_json,
    parse_endpoint,
)
from meshguard.mesh.members import MAX_LOCAL, MemberInfo, Membership, parse_key
from meshguard.mesh.sources import DEFAULT_SOURCES, EndpointSource, gather_kinds

#: Seconds between punch rounds after a (re)start: quick at first, then backing off.
PUNCH_SCHEDULE = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
#: While relayed (or direct but not LAN with LAN candidates), try again this often.
RETRY_INTERVAL = 30.0
#: A direct path is pinged this often, and is dead after this long without a pong.
CHECK_INTERVAL = 4.0
DEAD_AFTER = 10.0
#: A direct path the arbiter falls back to when the current one died (another endpoint
#: proven lately) is dead at the first check more than this long after the fall-back without
#: a pong (12 s with checks every 4 s).
FALLBACK_JUDGED_AFTER = 2 * CHECK_INTERVAL
#: The documented bound for a pair to be back on a direct path once the NATs allow it again:
#: the punch schedule plus the introducer's change debounce, with margin.
RECOVERY_BOUND = 30.0
#: Endpoints that pings came from (peer-reflexive candidates) kept per member.
MAX_REFLEXIVE = 4
#: Outstanding pings kept per member.
MAX_PENDING = 32
#: A CALL_ME_MAYBE is relayed at most this often per (source, target) pair.
CALL_ME_MAYBE_GAP = 1.0
#: The hop limit of primers: enough to leave our own NAT, too little to reach the peer's.
PRIME_TTL = 2
#: With primers, full pings go to a member's candidates only this long after its last
#: CALL_ME_MAYBE (which it sends right after priming): its NAT then has its own mapping
#: toward us, so our ping cannot land first and clash with it (docs/nat-matrix.md).
PEER_PRIMED_FOR = 10.0
#: Rounds of pings to a primed member without a single pong before we go quiet toward it.
QUIET_AFTER_ROUNDS = 4
#: How long we then send it nothing over UDP (no primers, pings or calls): longer than a Linux
#: NAT keeps an unanswered UDP entry (30 s), so a clashing entry its packets left on our NAT
#: (after its router rebooted, say) and our own mismatched mapping both expire first.
QUIET_FOR = 35.0
#: A member's CALL_ME_MAYBE restarts our punch schedule at most this often (two sides
#: answering each other's calls would otherwise restart each other for ever).
CALL_RESTART_GAP = 60.0
#: A PATH_PING that came straight from a member while we have no direct path to it is
#: pinged back at once, quiet period or not, at most this often per member: it came through
#: the member's NAT, so that NAT holds a mapping toward us and our ping arrives there as a
#: reply (it can clash with nothing). This is how the side whose NAT let the other's ping in
#: proves the path too, without waiting out its quiet period (docs/nat-matrix.md).
PING_BACK_GAP = 1.0
#: After a member's direct path died and the member shows up at another public address (its
#: router rebooted or it moved), we send it nothing over UDP for this long from the first
#: punch round that sees the new address: QUIET_FOR, the life of an unanswered UDP entry with
#: margin. Until its own path to us died, the member kept sending to our endpoint from its new
#: address; on a NAT of ours that does not drop unsolicited input, each such packet left an
#: entry ``new address -> our port``, so our own first packet to that new address would need
#: the reverse of that tuple and get another port, and Linux masquerade then gives that port
#: to our later new flows too (to every member: docs/nat-matrix.md, "After simultaneous
#: reboots"). Waiting until those entries expired keeps our port the one introducers see.
#: Starting no earlier than our own path check found the path dead, so with CHECK_INTERVAL
#: for the member finding it up to one check later.
MOVED_QUIET_FOR = QUIET_FOR + CHECK_INTERVAL

#: When two members learn of each other at the same moment (both hear of the other from the
#: introducers' lists at once), only the one with the smaller public key (bytes compared)
#: initiates the handshake at once; the other waits this long and initiates only if no
#: handshake came or completed meanwhile. Both initiating at once crosses the initiations:
#: each side consumes the other's, which replaces its own handshake state, so each answer is
#: rejected and no session forms until the retransmit timer (REKEY_TIMEOUT + jitter, 5-10 s).
HANDSHAKE_YIELD = 1.0
#: A birthday spray whose session lapsed looks again this often for a renewed one.
SPRAY_PAUSE = 1.0

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
    #: The kind a source named for a candidate (``mapped``), told to the arbiter when a ping
    #: to that endpoint is answered.
    named: dict[Endpoint, str] = field(default_factory=dict)
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
    #: When the member last told us (CALL_ME_MAYBE) that it primed its NAT toward us.
    peer_primed: float | None = None
    #: When a CALL_ME_MAYBE from it last restarted our punch schedule.
    call_restart: float | None = None
    #: Rounds since the last restart in which we pinged a primed member.
    ready_rounds: int = 0
    #: Until when we keep quiet toward it (see :data:`QUIET_FOR`).
    quiet_until: float | None = None
    #: Since when our pings to it have gone unanswered (for status).
    unanswered_since: float | None = None
    #: The birthday technique (mesh/birthday.py): our attempts (extra sockets opened toward
    #: it), when the last began and toward which endpoint; our spray toward it, and when the
    #: last spray began.
    birthday_attempts: int = 0
    birthday_at: float | None = None
    birthday_toward: Endpoint | None = None
    spray: bd.Spray | None = None
    spray_at: float | None = None
    #: An attempt waits for a session to carry its BIRTHDAY message (it lapsed).
    birthday_pending: bool = False
    #: When we last pinged back a PATH_PING's source (see :data:`PING_BACK_GAP`).
    ping_back_at: float | None = None
    #: Its endpoint as an introducer saw it when it last sent us a CALL_ME_MAYBE: the freshest
    #: view after its router changed address (member lists follow later).
    called_from: Endpoint | None = None
    #: Idle path checks (``Paths.idle_check_interval``, issue 17): when the current idle
    #: cycle's ping went, and until when an answered one lets the path rest.
    idle_ping_at: float | None = None
    idle_until: float | None = None
    #: The public endpoint of a direct path that died, until a direct path is proven again
    #: or a move of the member away from that address was waited out (MOVED_QUIET_FOR).
    lost: Endpoint | None = None
    #: Until when we keep quiet because the member moved (see :data:`MOVED_QUIET_FOR`).
    moved_until: float | None = None
    #: Public hosts a direct path to it was proven at (the last few): a candidate at one of
    #: them is where it was, not where it moved to (a stale list entry after a reboot).
    proven_hosts: list[str] = field(default_factory=list)
    #: When we began to yield the first handshake to it (see :data:`HANDSHAKE_YIELD`), and
    #: whether that yield is over; both are cleared once a session exists.
    yield_from: float | None = None
    yield_done: bool = False

    def public_endpoint(self) -> Endpoint | None:
        """Its public IPv4 endpoint, freshest first (for the birthday technique)."""
        seen = [self.called_from] if self.called_from is not None else []
        return next((e for e in seen + self.observed if _public_v4(e)), None)

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

    kinds: tuple[int, ...] = (
        kinds.CALL_ME_MAYBE,
        kinds.PATH_PING,
        kinds.PATH_PONG,
        kinds.BIRTHDAY,
    )

    def __init__(
        self,
        agent: MeshAgent,
        membership: Membership,
        *,
        sources: Sequence[EndpointSource] = DEFAULT_SOURCES,
        arbiter: arb.PathArbiter | None = None,
    ) -> None:
        self.agent = agent
        #: Decides and writes each member's path from what punching proves (mesh/arbiter.py).
        self.arbiter = arbiter if arbiter is not None else arb.PathArbiter()
        self.arbiter.add_observer(self._moved)
        self.device = agent.device
        self.membership = membership
        self.states: dict[bytes, PathState] = {}
        #: Where candidate endpoints come from (the node sets the plugins it finds).
        self.sources: list[EndpointSource] = list(sources)
        #: Told about members and path events (the node adds plugins and its route keeper).
        self.observers: list[PathObserver] = []
        #: Sends a primer (an empty datagram with hop limit :data:`PRIME_TTL`) toward an
        #: endpoint, opening our NAT's mapping without reaching the peer's NAT; set by the node.
        #: Without one, pings go out at once (the in-memory networks have no conntrack).
        self.primer: Callable[[Endpoint], None] | None = None
        self.primers_sent = 0
        #: The hard side's extra sockets for the birthday technique; set by the node. Without
        #: it (in memory) neither side of the technique runs.
        self.birthday: bd.BirthdayIO | None = None
        self.birthday_probes_sent = 0
        self.birthday_hits = 0
        #: While a pair is idle, the time between its direct path's checks (a ping each), or
        #: None for CHECK_INTERVAL; set by the node to the keepalive policy's
        #: ``path_check_interval``, so an idle path's ping is that path's keepalive.
        self.idle_check_interval: Callable[[Peer, float], float | None] | None = None
        #: Calls into sources and observers that raised (their bugs never break the paths).
        self.plugin_errors = 0
        self._cmm_last: dict[tuple[bytes, bytes], float] = {}
        self.dropped = 0
        self.control_sent = 0
        #: First handshakes we left to the member with the smaller key, which started one.
        self.yielded_handshakes = 0
        #: Spray ticks skipped because no session could carry the pings (see ``_spray``).
        self.spray_pauses = 0
        membership.listeners.append(self._member_changed)

    # ------------------------------------------------------------------ membership events

    def _member_changed(
        self, peer: Peer, info: MemberInfo | None, sources: set[bytes], now: float
    ) -> None:
        key = peer.public_key
        if info is None:
            state = self.states.pop(key, None)
            if state is not None:
                self.arbiter.forget(peer)
                if self.birthday is not None and state.birthday_toward is not None:
                    self.birthday.release(state.birthday_toward)
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
        lan, observed, named, failures = gather_kinds(self.sources, key, reports)
        self.plugin_errors += failures
        new = [e for e in observed + lan if e not in state.candidates()]
        state.observed = observed
        state.lan = lan
        state.named = named
        self.arbiter.offer_member(peer, self._relays_for(peer), now)
        if created or (new and state.kind != LAN):
            self._restart_punching(state, now)

    def _relays_for(self, peer: Peer) -> list[Peer]:
        """Introducers that list ``peer``, offer to forward and have a session with us."""
        relays = []
        for key in sorted(self.membership.learned.get(peer.public_key, set())):
            if key not in self.membership.relaying_introducers:
                continue
            relay = self.device.peers.get(key)
            if relay is not None and relay.is_meshguard and relay.keypairs.current is not None:
                relays.append(relay)
        return relays

    # ------------------------------------------------------------------ punching

    def _restart_punching(self, state: PathState, now: float) -> None:
        state.round = 0
        state.ready_rounds = 0
        # A quiet period outlasts restarts (a rehandshake, a new candidate): cut short, the
        # entries it waits out would still be there.
        quiet = state.quiet_until
        state.next_punch = now if quiet is None or quiet <= now else quiet
        self.agent.dirty = True

    def _punch(self, state: PathState, now: float) -> None:
        """One round: prime our NAT toward every candidate, tell the other side (CALL_ME_MAYBE
        through the introducers), and ping the candidates once the other side has primed too.

        Two Linux NATs that do not drop unsolicited input clash otherwise: a ping that reaches
        the peer's NAT before the peer sent to us becomes a conntrack entry there, and the
        peer's own packets to us then leave from another port, for as long as our pings keep
        that entry alive. Primers die before they reach the peer's NAT.
        """
        peer = state.peer
        if self._moved_away(state, now):
            return
        targets = state.candidates()
        if state.kind == DIRECT:
            targets = state.lan  # only an upgrade to LAN is left to find
        primer = self.primer
        if primer is not None:
            for endpoint in targets:
                primer(endpoint)
                self.primers_sent += 1
            self._call_me_maybe(peer, now)
            ready = state.peer_primed is not None and now - state.peer_primed <= PEER_PRIMED_FOR
        else:
            if state.round % 4 == 0:
                self._call_me_maybe(peer, now)
            ready = True
        self._explain(state, targets, ready, now)
        if ready:
            if primer is not None and state.kind in (NONE, RELAYED):
                if state.ready_rounds >= QUIET_AFTER_ROUNDS:
                    # Both NATs were primed and no pong came: perhaps a clashing entry on a
                    # NAT. Let every entry we and it made expire, then start afresh.
                    state.ready_rounds = 0
                    state.round = 0
                    state.quiet_until = state.next_punch = now + QUIET_FOR
                    self._explain(state, targets, ready, now)
                    self._birthday_start(state, now)
                    return
                state.ready_rounds += 1
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

    def _moved_away(self, state: PathState, now: float) -> bool:
        """Whether to stay quiet toward a member whose direct path died and which now shows up
        at a public address we never reached it at (:data:`MOVED_QUIET_FOR`): the first round
        that sees it starts the quiet period; the rounds in it send nothing (no primer, ping
        or call, so the member does not ping us either). Its earlier addresses still listed
        (a stale candidate) are not a move."""
        if self.primer is None or state.kind not in (NONE, RELAYED):
            return False
        if state.moved_until is not None:
            if now < state.moved_until:
                state.next_punch = state.moved_until
                return True
            state.moved_until = None
            return False
        lost = state.lost
        if lost is None:
            return False
        seen = [state.called_from] if state.called_from is not None else []
        known = {lost[0], *state.proven_hosts}
        fresh = next(
            (e for e in seen + state.candidates() if _public_v4(e) and e[0] not in known), None
        )
        if fresh is None:
            return False
        state.lost = None
        state.moved_until = now + MOVED_QUIET_FOR
        state.quiet_until = max(state.quiet_until or 0.0, state.moved_until)
        state.round = state.ready_rounds = 0
        state.next_punch = state.moved_until
        self.arbiter.explain(
            state.peer,
            f"it moved from {lost[0]} to {fresh[0]}: quiet until {_clock(state.moved_until)} so "
            "that what it sent us from there before noticing expires on our NAT",
        )
        return True

    def _explain(self, state: PathState, targets: list[Endpoint], ready: bool, now: float) -> None:
        """Tell the arbiter, in words a user can act on, why this member is not direct."""
        if state.kind in (LAN, DIRECT):
            state.unanswered_since = None
            return
        if not targets:
            note = "no endpoint of it is known yet: its introducers report none"
        elif not ready:
            note = (
                "waiting for it to punch too: no CALL_ME_MAYBE from it through the introducers "
                f"for {PEER_PRIMED_FOR:g} s"
            )
        else:
            if state.unanswered_since is None:
                state.unanswered_since = now
            shown = ", ".join(_text(e) for e in targets[:4])
            note = f"punches to {shown} unanswered since {_clock(state.unanswered_since)}"
            if state.quiet_until is not None and state.quiet_until > now:
                note += (
                    f"; quiet until {_clock(state.quiet_until)} so that NAT entries expire "
                    "(a NAT that maps per destination on either side stays relayed)"
                )
        self.arbiter.explain(state.peer, note)

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
        body = encode_json({"to": key_text(peer.public_key)})
        for key in sorted(self.membership.learned.get(peer.public_key, set())):
            introducer = self.device.peers.get(key)
            if introducer is not None and self.device.send_control(
                introducer, kinds.CALL_ME_MAYBE, body, now
            ):
                self.control_sent += 1

    # ------------------------------------------------------------------ the birthday technique

    def _birthday_start(self, state: PathState, now: float) -> None:
        """Punching went quiet: open many mappings toward the member's endpoint and ask it to
        spray our public address (mesh/birthday.py), within the attempt bounds."""
        io = self.birthday
        if (
            io is None
            or state.kind == DIRECT
            or state.birthday_attempts >= bd.MAX_ATTEMPTS
            or (state.birthday_at is not None and now - state.birthday_at < bd.ATTEMPT_GAP)
        ):
            return
        toward = state.public_endpoint()
        if toward is None:
            return
        keypair = state.peer.keypairs.current
        if keypair is None or not keypair.can_send(now):
            # The BIRTHDAY message needs a session: make one, and start as soon as it is there
            # (``session_started``), not a whole punch cycle and quiet period later.
            self.device.renew_session(state.peer, now)
            state.birthday_pending = True
            return
        state.birthday_pending = False
        if state.birthday_toward is not None and state.birthday_toward != toward:
            io.release(state.birthday_toward)
        if not io.open(toward, bd.SOCKETS, bd.HOLD):
            return
        state.birthday_attempts += 1
        state.birthday_at = now
        state.birthday_toward = toward
        if self.device.send_control(state.peer, kinds.BIRTHDAY, b"", now):
            self.control_sent += 1

    def _birthday_received(self, peer: Peer, now: float) -> None:
        """A member opened many mappings toward us: spray its public address, within bounds."""
        state = self.states.get(peer.public_key)
        public = state.public_endpoint() if state is not None else None
        host = public[0] if public is not None else None
        if (
            state is None
            or host is None
            or state.kind in (LAN, DIRECT)
            # A spray that a lapsed session held up past SPRAY_GAP aims at sockets long closed:
            # a new attempt's message replaces it.
            or (state.spray is not None and now - state.spray.started < bd.SPRAY_GAP)
            or (state.spray_at is not None and now - state.spray_at < bd.SPRAY_GAP)
            or (state.moved_until is not None and now < state.moved_until)
        ):
            self.dropped += 1
            return
        state.spray_at = now
        ports = bd.random_ports(self.device.random)
        state.spray = bd.Spray(host, self.device.random(8), ports, now, next_at=now)
        self.agent.dirty = True
        # Neither side knows which NAT is the hard one: take the other role too (our own
        # sockets toward it, and it sprays us), within our own attempt bounds. Otherwise the
        # hard side's role waits until its own punching goes quiet, which needs the other
        # side's calls, which its quiet period holds back.
        self._birthday_start(state, now)

    def _spray(self, state: PathState, now: float) -> None:
        spray = state.spray
        assert spray is not None
        if spray.done:
            state.spray = None  # the last answers had their time: a miss
            return
        if not self._session_usable(state, now):
            # The session lapsed mid-spray (an idle relayed pair's lasts REJECT_AFTER_TIME):
            # pings would go nowhere yet use up the ports. Pause, renew it, then go on.
            again = self._yield_handshake(state, now)
            if again is None:
                self.device.renew_session(state.peer, now)
                again = now + SPRAY_PAUSE
            spray.next_at = again
            self.spray_pauses += 1
            return
        for port in spray.due(now):
            if self.device.send_control_to(
                state.peer, (spray.host, port), kinds.PATH_PING, spray.nonce, now
            ):
                self.birthday_probes_sent += 1
        if spray.done:
            spray.next_at = now + bd.LINGER

    def birthday_hit(self, toward: Endpoint, now: float) -> None:
        """The adapter: a datagram from ``toward`` arrived on one of our extra sockets, which
        now carries everything to it. Ping it at once (through that socket), not at a punch
        round: those wait for the member's CALL_ME_MAYBE, which its own quiet period may hold
        back for half a minute."""
        for state in self.states.values():
            if state.birthday_toward == toward:
                self.birthday_hits += 1
                state.quiet_until = None
                state.next_punch = now
                self.agent.dirty = True
                if state.kind in (NONE, RELAYED):
                    self._ping(state, toward, now)

    # ------------------------------------------------------------------ control messages

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        if kind == kinds.CALL_ME_MAYBE:
            self._call_me_maybe_received(peer, body, now)
            return
        if kind == kinds.BIRTHDAY:
            self._birthday_received(peer, now)
            return
        source = peer.arrived_from  # where this message came from (roaming or not)
        if len(body) != 8 or peer.arrived_via is not None or source is None:
            self.dropped += 1  # only what came straight over UDP tells of a UDP path
            return
        state = self.states.get(peer.public_key)
        if kind == kinds.PATH_PING:
            self.device.send_control_to(peer, source, kinds.PATH_PONG, body, now)
            self.control_sent += 1
            if state is not None:
                if source not in state.candidates():
                    state.reflexive = ([source, *state.reflexive])[:MAX_REFLEXIVE]
                    if state.kind in (NONE, RELAYED) and state.next_punch is None:
                        self._restart_punching(state, now)
                self._ping_back(state, source, now)
                self._keep_chosen(state, source, now)
            return
        if state is None:
            return
        sent = state.pending.pop(body, None)
        spray = state.spray
        if sent is None and spray is not None and body == spray.nonce:
            at = spray.sent_at.get(source[1]) if source[0] == spray.host else None
            if at is not None:
                sent = (source, at)
                state.spray = None  # a hit: the rest of the spray is not needed
                self.birthday_hits += 1
        if sent is None:
            self.dropped += 1
            self._keep_chosen(state, source, now)
            return
        rtt = now - sent[1]
        self.arbiter.proven(peer, arb.Path(_kind_of(source, state), source), rtt, now)
        if source == state.direct:
            state.rtt = rtt
            state.last_pong = now
            self._notify(lambda observer: observer.rtt_measured(peer.public_key, rtt))
            if state.next_check is None:
                state.next_check = now + CHECK_INTERVAL
                self.agent.dirty = True
            if state.kind == LAN or not state.lan:
                state.next_punch = None
        else:
            self._keep_chosen(state, source, now)

    def _ping_back(self, state: PathState, source: Endpoint, now: float) -> None:
        """A PATH_PING came straight from ``source``: while we have no direct path, ping it
        back now (see :data:`PING_BACK_GAP`), not at our next punch round, which a quiet
        period or a missing CALL_ME_MAYBE may hold back for half a minute."""
        if state.kind not in (NONE, RELAYED):
            return
        if state.ping_back_at is not None and now - state.ping_back_at < PING_BACK_GAP:
            return
        state.ping_back_at = now
        self._ping(state, source, now)

    def _keep_chosen(self, state: PathState, source: Endpoint, now: float) -> None:
        """Roaming follows every authenticated datagram: the arbiter keeps the path it chose
        if that is better than the one this message came over."""
        self.arbiter.heard_from(state.peer, source, now)

    def _moved(self, peer: Peer, old: arb.Path, new: arb.Path, reason: str) -> None:
        """The arbiter moved a member: keep punching's view of it (kind, direct) in step."""
        state = self.states.get(peer.public_key)
        if state is None:
            return
        if new.kind in arb.UDP_KINDS and new.endpoint is not None:
            state.direct = new.endpoint
            # A new set of attempts once this path is lost, the first without waiting out
            # ATTEMPT_GAP from the attempt that found it.
            state.birthday_attempts = 0
            state.birthday_at = None
            state.lost = state.moved_until = None
            host = new.endpoint[0]
            if _public_v4(new.endpoint) and host not in state.proven_hosts:
                state.proven_hosts = [*state.proven_hosts, host][-MAX_REFLEXIVE:]
            state.last_pong = max(state.last_pong, 0.0)
            self._set_kind(state, LAN if new.kind == arb.LAN else DIRECT, _text(new.endpoint))
        elif new.kind == arb.MEMBER and new.via is not None:
            state.direct = None
            self._set_kind(state, RELAYED, key_text(new.via.public_key))
        else:
            state.direct = None
            self._set_kind(state, NONE, None)

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
        if observed is not None:
            state.called_from = observed
        was_primed = state.peer_primed is not None and now - state.peer_primed <= PEER_PRIMED_FOR
        state.peer_primed = now
        if state.kind == LAN or (state.quiet_until is not None and now < state.quiet_until):
            return
        if self.primer is None:
            if state.next_punch is None or state.round > 2:
                self._restart_punching(state, now)
            return
        if state.next_punch is None or (
            state.round > 2
            and (state.call_restart is None or now - state.call_restart >= CALL_RESTART_GAP)
        ):
            state.call_restart = now
            self._restart_punching(state, now)
        elif not was_primed and state.next_punch > now:
            # The other side just primed: ping now, while its mapping is fresh.
            state.next_punch = now
            self.agent.dirty = True

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
                "from": key_text(peer.public_key),
                "observed": list(peer.endpoint) if peer.endpoint and peer.sends_over_udp else None,
            }
        )
        if self.device.send_control(target, kinds.CALL_ME_MAYBE, body, now):
            self.control_sent += 1

    # ------------------------------------------------------------------ timers

    def session_started(self, peer: Peer, now: float) -> None:
        state = self.states.get(peer.public_key)
        if state is not None and state.kind in (NONE, RELAYED):
            if state.birthday_pending:
                self._birthday_start(state, now)
            self._restart_punching(state, now)

    def next_deadline(self) -> float | None:
        best: float | None = None
        for state in self.states.values():
            spray = state.spray.next_at if state.spray is not None else None
            for deadline in (state.next_punch, state.next_check, spray):
                if deadline is not None and (best is None or deadline < best):
                    best = deadline
        return best

    def run_timers(self, now: float) -> None:
        for state in list(self.states.values()):
            if state.next_check is not None and state.next_check <= now:
                self._check(state, now)
            if state.spray is not None and state.spray.next_at <= now:
                self._spray(state, now)
            if state.next_punch is not None and state.next_punch <= now:
                if state.peer.keypairs.current is None:
                    # No session yet: make one through the relay (or the best guess), then punch.
                    self._ensure_route(state, now)
                    again = self._yield_handshake(state, now)
                    if again is None:
                        self.device.send_initiation(state.peer, now, retry=False)
                        again = now + 1.0
                    state.next_punch = again
                else:
                    self._session_usable(state, now)
                    self._punch(state, now)

    def _session_usable(self, state: PathState, now: float) -> bool:
        """Whether a session can carry our messages to the member (a usable one ends any
        yield of ours: the next time none is, a new one begins)."""
        keypair = state.peer.keypairs.current
        if keypair is None or not keypair.can_send(now):
            return False
        state.yield_from = None
        state.yield_done = False
        return True

    def _yield_handshake(self, state: PathState, now: float) -> float | None:
        """When to look again, or None to initiate now, for a member we have no session with:
        the member with the smaller key initiates at once, we wait :data:`HANDSHAKE_YIELD`
        first and then start one only if none came meanwhile (a handshake under way is the
        device's own timers' to retry)."""
        own = self.device.public_key
        if state.yield_done or own is None or own < state.peer.public_key:
            return None
        if state.yield_from is None:
            state.yield_from = now
        until = state.yield_from + HANDSHAKE_YIELD
        if now < until:
            return until
        state.yield_done = True
        if self.device.handshake_underway(state.peer, state.yield_from):
            self.yielded_handshakes += 1
            return now + 1.0
        return None

    def _ensure_route(self, state: PathState, now: float) -> None:
        peer = state.peer
        if peer.relay is None and state.direct is None:
            self.arbiter.offer_member(peer, self._relays_for(peer), now)
            if peer.relay is None and peer.endpoint is None and state.candidates():
                # Nobody forwards for us: the handshake itself has to punch.
                candidates = state.candidates()
                self.arbiter.try_endpoint(peer, candidates[state.round % len(candidates)], now)
                state.round += 1

    def _idle_gap(self, state: PathState, now: float) -> float | None:
        """The idle check interval for this pair now (None: not idle, or no policy)."""
        if self.idle_check_interval is None:
            return None
        gap = self.idle_check_interval(state.peer, now)
        return gap if gap is not None and gap > CHECK_INTERVAL else None

    def _check(self, state: PathState, now: float) -> None:
        if state.kind not in (LAN, DIRECT) or state.direct is None:
            state.next_check = None
            return
        # Idle pairs (issue 17): one ping per idle interval instead of every CHECK_INTERVAL.
        # An answered idle ping lets the path rest (looked at every CHECK_INTERVAL, sending
        # nothing, so data brings the usual pace back at once); an unanswered one is followed
        # by pings at the usual pace and judged dead as if the pong before it had come one
        # CHECK_INTERVAL earlier: the same DEAD_AFTER as on a busy path.
        gap = self._idle_gap(state, now)
        after_wait = False
        if state.idle_until is not None:
            if gap is not None and now < state.idle_until:
                state.next_check = min(state.idle_until, now + CHECK_INTERVAL)
                return
            state.idle_until = None
            after_wait = True
        reference = state.last_pong
        if state.idle_ping_at is not None:
            reference = max(reference, state.idle_ping_at - CHECK_INTERVAL)
        if (
            not after_wait
            and gap is not None
            and state.idle_ping_at is not None
            and state.last_pong >= state.idle_ping_at
        ):
            state.idle_until = state.idle_ping_at + gap
            state.next_check = min(state.idle_until, now + CHECK_INTERVAL)
            return
        if not after_wait and now - reference > DEAD_AFTER:
            # Dead: fall back to the relay at once and look for a direct path again.
            dead = state.direct
            state.next_check = None
            state.idle_ping_at = state.idle_until = None
            if self.birthday is not None and dead == state.birthday_toward:
                self.birthday.release(dead)
                state.birthday_toward = None
            if dead is not None and _public_v4(dead):
                state.lost = dead  # cleared if the arbiter moves it to another proven path
            self.arbiter.offer_member(state.peer, self._relays_for(state.peer), now)
            self.arbiter.failed(
                state.peer, dead, now, f"pings to {_text(dead)} unanswered for {DEAD_AFTER:g} s"
            )
            if state.kind in (LAN, DIRECT) and state.direct not in (None, dead):
                # The arbiter fell back to another endpoint proven moments ago (``_moved`` set
                # it): check it as any direct path, dead at the first check more than
                # FALLBACK_JUDGED_AFTER from now without a pong. Left unchecked, with no
                # punching toward a direct member, a dead one would carry the pair for good (a
                # router rebooted: every endpoint at its old address is dead, however lately
                # proven).
                state.last_pong = max(state.last_pong, now - DEAD_AFTER + FALLBACK_JUDGED_AFTER)
                self._ping(state, state.direct, now)
                state.next_check = now + CHECK_INTERVAL
                return
            state.direct = None
            self._restart_punching(state, now)
            return
        self._ping(state, state.direct, now)
        if after_wait or (gap is not None and state.idle_ping_at is None):
            state.idle_ping_at = now
        elif gap is None:
            state.idle_ping_at = None
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
            "punch_round": state.round,
            "peer_primed_at": state.peer_primed,
            "punch_quiet_until": state.quiet_until,
        }
        if state.birthday_attempts or state.spray_at is not None or state.birthday_pending:
            status["birthday"] = {
                "attempts": state.birthday_attempts,
                "toward": _text(state.birthday_toward) if state.birthday_toward else None,
                "spraying": state.spray is not None,
                "waiting_for_session": state.birthday_pending,
            }
        if state.kind == RELAYED and peer.relay is not None:
            status["path"] = f"relayed via {key_text(peer.relay.public_key)}"
            status["relay"] = key_text(peer.relay.public_key)
        return status

    def node_status(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for state in self.states.values():
            counts[state.kind] = counts.get(state.kind, 0) + 1
        status: dict[str, Any] = {
            "paths": counts,
            "endpoint_sources": [source.name for source in self.sources],
            "primers_sent": self.primers_sent,
        }
        if self.birthday_probes_sent or self.birthday_hits:
            status["birthday_probes_sent"] = self.birthday_probes_sent
            status["birthday_hits"] = self.birthday_hits
        if self.plugin_errors:
            status["plugin_errors"] = self.plugin_errors
        return status


_ULA = ipaddress.IPv6Network("fc00::/7")


def _kind_of(endpoint: Endpoint, state: PathState) -> str:
    """The arbiter's kind of a proven endpoint: LAN if a LAN source named it, else the kind a
    source named for it (``mapped``: the member's gateway maps it), else a member's own global
    IPv6 address is a direct path (``direct-v6``: no NAT on the way, only firewalls), its
    private addresses are LAN."""
    named = state.named.get(endpoint)
    if named is not None and named in arb.UDP_KINDS and endpoint not in state.lan:
        return named
    try:
        address = ipaddress.ip_address(endpoint[0].split("%", 1)[0])
    except ValueError:
        return arb.DIRECT
    if address.version == 6 and not (address.is_link_local or address in _ULA):
        return arb.DIRECT_V6
    return arb.udp_kind(endpoint, endpoint in state.lan)


_NOT_PUBLIC = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3")
)  # fmt: skip


def _public_v4(endpoint: Endpoint) -> bool:
    """An IPv4 endpoint outside private, carrier-grade NAT, loopback, link-local and multicast
    space: what a NAT's mapping looks like from outside."""
    try:
        address = ipaddress.ip_address(endpoint[0])
    except ValueError:
        return False
    return address.version == 4 and not any(address in n for n in _NOT_PUBLIC)


def _clock(when: float) -> str:
    """``HH:MM:SS UTC`` of a reactor timestamp (seconds since the epoch)."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%H:%M:%S UTC")


def _text(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"
