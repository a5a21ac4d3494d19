"""Membership: introducers tell members about each other; members add what they learn as peers.

An introducer is a node whose config lists every member as a ``[Peer]``; a member marks the
introducer's ``[Peer]`` with ``Introducer = yes``. A member subscribes to each of its introducers
over the tunnel (MEMBERS ``{"op": "subscribe"}``); the introducer answers with its list of members
(key, AllowedIPs, the endpoint it observes for them, their LAN endpoints), in pages, again whenever
the list changes, and whenever the member re-subscribes (every :data:`RESUBSCRIBE` seconds) with
another generation than the introducer's current one (a list got lost; or the subscriber is new
to it).

The re-subscription is a heartbeat (the introducer forgets a subscriber after
:data:`SUBSCRIBER_TIMEOUT`): on an idle tunnel it waits for the moment the member's next keepalive
to the introducer is due and goes instead of it, when that comes soon enough (issue 17: an idle
home sends its keepalives and nothing else).

An introducer that says so in HELLO (:data:`HEARTBEAT_CAPABILITY`) takes any authenticated
datagram from a subscriber as a heartbeat, and forgets a subscriber only after three of the
heartbeat periods it said it keeps (``"every"`` in its subscription, at most
:data:`EVERY_MAX`), and answers a heartbeat that carries ``"every"`` with an empty keepalive (so
a heartbeat in a keepalive's place is answered as a keepalive request would be). A member with a
keepalive to such an introducer then re-subscribes only every :data:`HEARTBEAT_LONG` seconds (to
find a lost list) or when its keepalive interval grew past what it told, in a keepalive's place
(or, when every slot carries a handshake, right after one): its keepalives are the heartbeat.
Toward an introducer without it, nothing changes.

A member trusts lists only from its introducers, merges several introducers' lists, never touches a
peer the user configured (nor AllowedIPs that overlap a configured peer's), and removes a learned
peer when no introducer lists it any more.

In a mesh with an authority (:mod:`meshguard.mesh.authority`) a member accepts a learned member
only with a record the authority signed: the member's key, addresses (its AllowedIPs) and name
come from the record, never from the introducer, and revocations (signed too) remove a member
everywhere. An introducer then also serves the members its store enrolled (:meth:`enroll`).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import (
    MAX_MAPPED,
    MeshAgent,
    decode_json,
    encode_json,
    keepalive_slot,
    parse_endpoint,
)
from meshguard.mesh.authority import MAX_TEXT, Member
from meshguard.mesh.roster import Roster

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Entries per MEMBERS page: keeps each page well under the agent's JSON limit.
PAGE_SIZE = 16
#: Entries per page when entries carry signed records (larger), and revocations per message.
SIGNED_PAGE_SIZE = 8
REVOKED_PER_MESSAGE = 32
#: Most members, AllowedIPs per member and LAN endpoints per member accepted from an introducer.
MAX_MEMBERS = 4096
MAX_ALLOWED = 64
MAX_LOCAL = 8
#: How often a member re-subscribes: quickly until it has a list, then as a heartbeat.
SUBSCRIBE_RETRY = 3.0
RESUBSCRIBE = 60.0
#: A subscriber that has not re-subscribed for this long is forgotten.
SUBSCRIBER_TIMEOUT = 3 * RESUBSCRIBE
#: A heartbeat waits for the keepalive's slot only if it then comes at most this long after the
#: previous one (a lost one still leaves the next before the introducer forgets us).
RESUBSCRIBE_LATEST = SUBSCRIBER_TIMEOUT - RESUBSCRIBE
#: Introducers listing this in HELLO keep subscribers alive by their traffic and honour
#: ``"every"``; the longest heartbeat period they accept, and how often a member with a
#: keepalive re-subscribes to one anyway (a list lost on the way shows in the generation).
HEARTBEAT_CAPABILITY = "MembersByTraffic"
EVERY_MAX = 600
HEARTBEAT_LONG = 1800.0
#: How often an introducer compares its members' endpoints with what it last announced, and how
#: long it lets changes gather before sending a new list.
CHANGE_CHECK = 1.0
DEBOUNCE = 1.0
#: A list no session could carry is tried again this much later (after a handshake for it).
LIST_RETRY = 6.0


@dataclass(frozen=True)
class MemberInfo:
    """One member as an introducer describes it."""

    key: bytes
    allowed: tuple[Network, ...] = ()
    observed: Endpoint | None = None
    local: tuple[Endpoint, ...] = ()
    #: Public endpoints the member's gateway maps to it (port mapping, docs/portmapping.md).
    mapped: tuple[Endpoint, ...] = ()
    #: The authority-signed record of this member, passed on unchanged (None: unsigned).
    record: str | None = None
    #: The member's name (from its verified record only).
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "key": base64.b64encode(self.key).decode(),
            "allowed": [str(n) for n in self.allowed],
            "observed": list(self.observed) if self.observed is not None else None,
            "local": [list(e) for e in self.local],
        }
        if self.mapped:
            value["mapped"] = [list(e) for e in self.mapped]
        if self.record is not None:
            value["record"] = self.record
        return value


def parse_key(value: object) -> bytes | None:
    if not isinstance(value, str) or len(value) != 44:
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return key if len(key) == 32 else None


def parse_member(value: object) -> MemberInfo | None:
    """A member entry from an introducer's list, or None if any part is malformed."""
    if not isinstance(value, dict):
        return None
    key = parse_key(value.get("key"))
    allowed_raw = value.get("allowed")
    local_raw = value.get("local", [])
    mapped_raw = value.get("mapped", [])
    if key is None or not isinstance(allowed_raw, list) or not isinstance(local_raw, list):
        return None
    if not isinstance(mapped_raw, list):
        return None
    allowed: list[Network] = []
    for text in allowed_raw[:MAX_ALLOWED]:
        if not isinstance(text, str):
            return None
        try:
            allowed.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            return None
    observed_raw = value.get("observed")
    observed = parse_endpoint(observed_raw) if observed_raw is not None else None
    if observed_raw is not None and observed is None:
        return None
    local = tuple(e for e in map(parse_endpoint, local_raw[:MAX_LOCAL]) if e is not None)
    mapped = tuple(e for e in map(parse_endpoint, mapped_raw[:MAX_MAPPED]) if e is not None)
    record = value.get("record")
    if record is not None and (not isinstance(record, str) or len(record) > MAX_TEXT):
        return None
    return MemberInfo(key, tuple(allowed), observed, local, mapped, record)


def parse_page(message: dict[str, Any]) -> tuple[int, int, int, bool, list[MemberInfo]] | None:
    """``(generation, page, pages, relays, members)`` of a list page, or None."""
    gen, page, pages = message.get("gen"), message.get("page"), message.get("pages")
    members = message.get("members")
    relays = message.get("relay", False)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (gen, page, pages)):
        return None
    assert isinstance(gen, int) and isinstance(page, int) and isinstance(pages, int)
    if not 0 <= page < pages <= MAX_MEMBERS // SIGNED_PAGE_SIZE + 1 or gen < 0:
        return None
    if not isinstance(members, list) or len(members) > PAGE_SIZE or not isinstance(relays, bool):
        return None
    parsed = [parse_member(m) for m in members]
    if any(m is None for m in parsed):
        return None
    return gen, page, pages, relays, [m for m in parsed if m is not None]


@dataclass
class _Assembly:
    """Pages of one introducer's list, gathered until complete."""

    gen: int
    pages: int
    relays: bool
    received: dict[int, list[MemberInfo]] = field(default_factory=dict)


@dataclass
class _Subscriber:
    last_subscribed: float
    #: The generation this subscriber last received in full, or -1.
    sent_gen: int = -1
    #: The heartbeat period it said it keeps (0: the default), and what we last saw of its
    #: traffic (``peer.rx_bytes``, the time of its latest initiation): anything authenticated
    #: from it counts as a heartbeat, a keepalive's handshake initiation too.
    every: int = 0
    rx_mark: tuple[int, float | None] = (-1, None)

    def timeout(self) -> float:
        return max(SUBSCRIBER_TIMEOUT, 3.0 * self.every)


class Membership:
    """The MEMBERS control message, both the introducer's side and the member's side."""

    kinds: tuple[int, ...] = (kinds.MEMBERS,)
    #: Told to peers in HELLO (see the module's docstring).
    capabilities: tuple[str, ...] = (HEARTBEAT_CAPABILITY,)

    def __init__(self, agent: MeshAgent, *, forwarding: bool = True) -> None:
        self.agent = agent
        self.device = agent.device
        #: Keys of our introducers (``Introducer = yes``).
        self.introducers: set[bytes] = set()
        #: Whether we forward members' datagrams (``Forwarding``), announced with our lists.
        self.forwarding = forwarding
        #: Member key -> the introducers that list it (learned peers only).
        self.learned: dict[bytes, set[bytes]] = {}
        #: Introducer key -> its last complete list, and whether it offers to relay.
        self.views: dict[bytes, dict[bytes, MemberInfo]] = {}
        self.relaying_introducers: set[bytes] = set()
        self._assembly: dict[bytes, _Assembly] = {}
        self._next_subscribe: dict[bytes, float] = {}
        #: Per introducer: when we last subscribed, and the generation of its latest list.
        self._subscribed_at: dict[bytes, float] = {}
        self._view_gen: dict[bytes, int] = {}
        #: Per introducer: the heartbeat period we last told it (``"every"``).
        self._told_every: dict[bytes, int] = {}
        # Introducer side.
        self.subscribers: dict[bytes, _Subscriber] = {}
        self.generation = 0
        self._announced: dict[bytes, MemberInfo] = {}
        self._next_check: float | None = None
        self._send_at: float | None = None
        #: Told ``(peer, info, introducers, now)`` when a learned member is added or changes,
        #: and ``(peer, None, set(), now)`` when it goes away.
        self.listeners: list[Callable[[Peer, MemberInfo | None, set[bytes], float], None]] = []
        self.dropped = 0
        self.lists_sent = 0
        self.lists_received = 0
        #: A mesh with an authority: the verified members (None: trust introducers' lists).
        self.roster: Roster | None = None
        #: Our own signed record, sent with each subscription so introducers learn our name.
        self.own_record: str | None = None
        self.own_name: str | None = None
        #: Introducer side: members enrolled from the store, by key (see :meth:`enroll`).
        self.enrolled: dict[bytes, Member] = {}
        #: Learned entries refused for a missing, forged, expired or revoked record.
        self.refused = 0

    # ------------------------------------------------------------------ configuration

    def configure(self, introducers: set[bytes], forwarding: bool, now: float) -> None:
        """The config changed: introducers no longer listed stop counting."""
        self.forwarding = forwarding
        for key in list(self.views):
            if key not in introducers:
                self._introducer_gone(key, now)
        self.introducers = set(introducers)
        for key in self.introducers:
            self._next_subscribe.setdefault(key, now)
        self.agent.dirty = True

    def set_authority(self, roster: Roster | None, own_record: str | None, now: float) -> None:
        """Trust learned members only through ``roster`` (None: today's unsigned behaviour)."""
        self.roster = roster
        self.own_record = own_record
        own = roster.accept(own_record, now) if roster is not None and own_record else None
        self.own_name = own.name if own is not None else None
        self._merge(now)

    def enroll(self, members: list[Member], now: float) -> None:
        """Introducer side: make our enrolled peers match ``members`` (verified records from the
        store). A peer the user configured by hand is left as it is."""
        revoked = self.roster.revoked if self.roster is not None else {}
        wanted = {
            m.key: m for m in members if m.key != self.device.public_key and m.key not in revoked
        }
        for key in list(self.enrolled):
            if key not in wanted:
                del self.enrolled[key]
                peer = self.device.peers.get(key)
                if peer is not None:
                    self.device.remove_peer(key)
                    for listener in self.listeners:
                        listener(peer, None, set(), now)
        for key, member in wanted.items():
            if key in self.device.peers and key not in self.enrolled and key not in self.learned:
                continue  # configured by the user
            self.learned.pop(key, None)
            peer = self.device.add_peer(key)
            if peer is None:
                continue
            if self.enrolled.get(key) != member:
                self.enrolled[key] = member
                if set(member.addresses) != set(self.device.allowed_ips.networks(peer)):
                    self.device.replace_allowed_ips(peer, member.addresses)
        self.agent.dirty = True

    def announce(self, now: float) -> None:
        """Introducer side: something subscribers must hear changed (a revocation, say), even
        if our member list looks the same: send everything again shortly."""
        self.generation += 1
        if self._send_at is None:
            self._send_at = now
        self.agent.dirty = True

    def name_of(self, key: bytes) -> str | None:
        """The member's name from its verified record, if we have one."""
        return self.roster.name_of(key) if self.roster is not None else None

    def is_learned(self, peer: Peer) -> bool:
        return peer.public_key in self.learned

    def user_configured(self, key: bytes) -> None:
        """The user configured ``key`` by hand (config or ``wg set``): it is no longer ours."""
        self.learned.pop(key, None)
        self.enrolled.pop(key, None)

    # ------------------------------------------------------------------ MeshFeature

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        message = decode_json(body)
        if message is None:
            self.dropped += 1
            return
        op = message.get("op")
        if op == "subscribe":
            self._subscribe(peer, message, now)
        elif op == "list":
            self._list_received(peer, message, now)
        elif op == "revoked" and self.roster is not None and peer.public_key in self.introducers:
            self._revoked_received(message, now)
        else:
            self.dropped += 1

    def session_started(self, peer: Peer, now: float) -> None:
        if peer.public_key in self.introducers:
            self._next_subscribe[peer.public_key] = now
            self.agent.dirty = True

    def next_deadline(self) -> float | None:
        deadlines = list(self._next_subscribe.values())
        if self.subscribers and self._next_check is not None:
            deadlines.append(self._next_check)
        if self._send_at is not None:
            deadlines.append(self._send_at)
        if self.roster is not None and (expiry := self.roster.next_expiry()) is not None:
            deadlines.append(float(expiry))
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for key, when in list(self._next_subscribe.items()):
            if when > now:
                continue
            peer = self.device.peers.get(key)
            if peer is None or key not in self.introducers:
                del self._next_subscribe[key]
                continue
            have = key in self.views
            slot = keepalive_slot(peer)
            last = self._subscribed_at.get(key)
            keypair = peer.keypairs.current
            by_traffic = have and self._by_traffic(peer)
            if by_traffic and last is not None and not self._heartbeat_due(peer, last, now):
                # Our keepalives keep the subscription: look again later, send nothing.
                self._next_subscribe[key] = now + RESUBSCRIBE
                continue
            if (
                have
                and slot is not None
                and last is not None
                and now < slot
                and (by_traffic or slot <= last + RESUBSCRIBE_LATEST)
                and keypair is not None
                and keypair.can_send(slot)
            ):
                # A heartbeat only: it goes in the place of our next keepalive to the
                # introducer (it re-arms the keepalive timer) rather than beside it.
                self._next_subscribe[key] = slot
                continue
            body: dict[str, Any] = {"op": "subscribe"}
            if self.own_record is not None:
                body["record"] = self.own_record
            if have and key in self._view_gen:
                body["gen"] = self._view_gen[key]
            if by_traffic:
                body["every"] = self._every(peer)
            if self.device.send_control(peer, kinds.MEMBERS, encode_json(body), now):
                self._subscribed_at[key] = now
                if by_traffic:
                    self._told_every[key] = body["every"]
                    if slot is not None and now >= slot:
                        # In the keepalive's place, and answered: watched like a keepalive.
                        self.agent.sent_in_slot(peer, now)
            self._next_subscribe[key] = now + (RESUBSCRIBE if have else SUBSCRIBE_RETRY)
        if self.subscribers and self._next_check is not None and self._next_check <= now:
            self._next_check = now + CHANGE_CHECK
            self._check_changes(now)
        if self._send_at is not None and self._send_at <= now:
            self._send_at = None
            self._send_lists(now)
        if self.roster is not None and (expiry := self.roster.next_expiry()) is not None:
            if expiry <= now:
                self.forget_members(self.roster.expire(now), now)

    def _by_traffic(self, peer: Peer) -> bool:
        """The introducer counts our keepalives as heartbeats, and we send keepalives to it."""
        state = self.agent.peers.get(peer.public_key)
        return (
            peer.persistent_keepalive > 0
            and state is not None
            and HEARTBEAT_CAPABILITY in state.features
        )

    @staticmethod
    def _every(peer: Peer) -> int:
        """The heartbeat period we tell the introducer: our keepalive interval (at least
        RESUBSCRIBE, at most EVERY_MAX)."""
        return max(int(RESUBSCRIBE), min(EVERY_MAX, peer.persistent_keepalive))

    def _heartbeat_due(self, peer: Peer, last: float, now: float) -> bool:
        """Whether a subscription must go now although keepalives keep us alive: the long
        period passed, or our interval grew past what the introducer was told."""
        told = self._told_every.get(peer.public_key, 0)
        return now - last >= HEARTBEAT_LONG or self._every(peer) > told

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        name = self.name_of(peer.public_key)
        named: dict[str, Any] = {"name": name} if name is not None else {}
        introducers = self.learned.get(peer.public_key)
        if introducers is not None:
            return {
                **named,
                "member": "learned",
                "learned_from": sorted(base64.b64encode(k).decode() for k in introducers),
            }
        status: dict[str, Any] = {
            **named,
            "member": "enrolled" if peer.public_key in self.enrolled else "configured",
        }
        if peer.public_key in self.introducers:
            status["introducer"] = True
        if peer.public_key in self.subscribers:
            status["subscriber"] = True
        return status

    def node_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "members_learned": len(self.learned),
            "subscribers": len(self.subscribers),
            "forwarding": self.forwarding,
        }
        if self.roster is not None:
            status["mesh"] = self.roster.mesh
            status["members_enrolled"] = len(self.enrolled)
            status["members_refused"] = self.refused
            status["members_revoked"] = len(self.roster.revoked)
            if self.own_name is not None:
                status["name"] = self.own_name
        return status

    # ------------------------------------------------------------------ introducer side

    def _subscribe(self, peer: Peer, message: dict[str, Any], now: float) -> None:
        if peer.public_key in self.learned:
            # Only peers our user configured may subscribe (they are our members).
            self.dropped += 1
            return
        record = message.get("record")
        if self.roster is not None and record is not None:
            # Learn the subscriber's name; a record for another key is only ever that key's.
            self.roster.accept(record, now)
        subscriber = self.subscribers.get(peer.public_key)
        if subscriber is None:
            subscriber = self.subscribers[peer.public_key] = _Subscriber(now)
        subscriber.last_subscribed = now
        every = message.get("every")
        if type(every) is int and every > 0:
            subscriber.every = min(every, EVERY_MAX)
        gen = message.get("gen")
        if gen == self.generation == subscriber.sent_gen and type(gen) is int:
            # A heartbeat from a member that has our current list: nothing to send, but a
            # member that said "every" sent it in a keepalive's place: answer as a keepalive
            # request is answered (an empty keepalive, never answered itself).
            keypair = peer.keypairs.current
            if subscriber.every and keypair is not None and keypair.can_send(now):
                self.device.send_keepalive(peer, now)
            return
        subscriber.sent_gen = -1
        if self._next_check is None:
            self._next_check = now
            self._announced = self._current_members()
        if self._send_at is None:
            self._send_at = now
        self.agent.dirty = True

    def _current_members(self) -> dict[bytes, MemberInfo]:
        """Our configured meshguard peers, as we see them now."""
        members: dict[bytes, MemberInfo] = {}
        for key, peer in self.device.peers.items():
            if key in self.learned or not peer.is_meshguard:
                continue
            state = self.agent.peers.get(key)
            known = self.roster.members.get(key) if self.roster is not None else None
            members[key] = MemberInfo(
                key,
                tuple(self.device.allowed_ips.networks(peer)),
                peer.endpoint if peer.sends_over_udp else None,
                tuple(state.local_endpoints[:MAX_LOCAL]) if state is not None else (),
                tuple(state.mapped_endpoints[:MAX_MAPPED]) if state is not None else (),
                known.text if known is not None else None,
            )
        return members

    def _check_changes(self, now: float) -> None:
        for key, subscriber in list(self.subscribers.items()):
            peer = self.device.peers.get(key)
            mark = (peer.rx_bytes, peer.last_initiation_consumed) if peer is not None else None
            if mark is not None and mark != subscriber.rx_mark:
                # Anything authenticated from it: it is alive (its keepalives are heartbeats).
                subscriber.rx_mark = mark
                subscriber.last_subscribed = now
            if peer is None or now - subscriber.last_subscribed > subscriber.timeout():
                del self.subscribers[key]
        current = self._current_members()
        if current != self._announced:
            self._announced = current
            self.generation += 1
            if self._send_at is None:
                self._send_at = now + DEBOUNCE

    def _send_lists(self, now: float) -> None:
        members = sorted(self._announced.values(), key=lambda m: m.key)
        size = PAGE_SIZE if self.roster is None else SIGNED_PAGE_SIZE
        revoked = self.roster.revocation_texts() if self.roster is not None else []
        for key, subscriber in self.subscribers.items():
            if subscriber.sent_gen == self.generation:
                continue
            peer = self.device.peers.get(key)
            if peer is None:
                continue
            sent = True
            # Revocations first, so a member never re-learns a revoked key in between.
            for start in range(0, len(revoked), REVOKED_PER_MESSAGE):
                chunk = revoked[start : start + REVOKED_PER_MESSAGE]
                body = encode_json({"op": "revoked", "revoked": chunk})
                sent = self.device.send_control(peer, kinds.MEMBERS, body, now) and sent
            entries = [m.to_json() for m in members if m.key != key]
            pages = max(1, -(-len(entries) // size))
            for page in range(pages):
                message: dict[str, Any] = {
                    "op": "list",
                    "gen": self.generation,
                    "page": page,
                    "pages": pages,
                    "relay": self.forwarding,
                    "members": entries[page * size : (page + 1) * size],
                }
                if page == 0 and self.own_record is not None:
                    message["self"] = self.own_record
                body = encode_json(message)
                sent = self.device.send_control(peer, kinds.MEMBERS, body, now) and sent
            if sent:
                subscriber.sent_gen = self.generation
                self.lists_sent += 1
                continue
            keypair = peer.keypairs.current
            if (
                keypair is None or not keypair.can_send(now)
            ) and now - subscriber.last_subscribed < SUBSCRIBER_TIMEOUT:
                # No session can carry it (an idle member's keepalive handshake leaves ours
                # unconfirmed, and its keepalives may be minutes apart): start one, try again.
                self.device.send_keepalive(peer, now)
                self._send_at = now + LIST_RETRY
                self.agent.dirty = True

    # ------------------------------------------------------------------ member side

    def _list_received(self, peer: Peer, message: dict[str, Any], now: float) -> None:
        key = peer.public_key
        if key not in self.introducers:
            # Membership is trusted only from our introducers.
            self.dropped += 1
            return
        parsed = parse_page(message)
        if parsed is None:
            self.dropped += 1
            return
        gen, page, pages, relays, members = parsed
        own = message.get("self")
        if self.roster is not None and own is not None:
            self.roster.accept(own, now)  # the introducer's own record: its name
        if self.roster is not None:
            members = [m for m in map(lambda m: self._verified(m, now), members) if m is not None]
        assembly = self._assembly.get(key)
        if assembly is None or assembly.gen != gen or assembly.pages != pages:
            assembly = self._assembly[key] = _Assembly(gen, pages, relays)
        assembly.received[page] = members
        if len(assembly.received) < pages:
            return
        del self._assembly[key]
        view: dict[bytes, MemberInfo] = {}
        for page_members in assembly.received.values():
            for info in page_members:
                view[info.key] = info
        self.lists_received += 1
        self.views[key] = view
        self._view_gen[key] = gen
        if assembly.relays:
            self.relaying_introducers.add(key)
        else:
            self.relaying_introducers.discard(key)
        if self._next_subscribe.get(key, 0.0) < now + RESUBSCRIBE:
            self._next_subscribe[key] = now + RESUBSCRIBE
        self._merge(now)

    def _verified(self, info: MemberInfo, now: float) -> MemberInfo | None:
        """``info`` with the addresses and name its signed record gives, or None (refused)."""
        assert self.roster is not None
        member = self.roster.accept(info.record, now)
        if member is None or member.key != info.key:
            self.refused += 1
            return None
        return replace(info, allowed=member.addresses, name=member.name)

    def _revoked_received(self, message: dict[str, Any], now: float) -> None:
        assert self.roster is not None
        texts = message.get("revoked")
        if not isinstance(texts, list):
            self.dropped += 1
            return
        gone: list[bytes] = []
        for text in texts[:REVOKED_PER_MESSAGE]:
            if isinstance(text, str) and (revocation := self.roster.revoke(text)) is not None:
                gone.append(revocation.key)
        self.forget_members(gone, now)

    def forget_members(self, keys: list[bytes], now: float) -> None:
        """These members' records expired or were revoked: they are no longer members here."""
        if not keys:
            return
        for view in self.views.values():
            for key in keys:
                view.pop(key, None)
        still = [m for k, m in self.enrolled.items() if k not in keys]
        if len(still) != len(self.enrolled):
            self.enroll(still, now)
        self._merge(now)

    def _introducer_gone(self, key: bytes, now: float) -> None:
        self.views.pop(key, None)
        self._view_gen.pop(key, None)
        self._subscribed_at.pop(key, None)
        self._told_every.pop(key, None)
        self._assembly.pop(key, None)
        self._next_subscribe.pop(key, None)
        self.relaying_introducers.discard(key)
        self._merge(now)

    def _configured_networks(self) -> list[Network]:
        networks: list[Network] = []
        for key, peer in self.device.peers.items():
            if key not in self.learned:
                networks.extend(self.device.allowed_ips.networks(peer))
        return networks

    def _merge(self, now: float) -> None:
        """Make the device's learned peers match the union of our introducers' views."""
        wanted: dict[bytes, tuple[MemberInfo, set[bytes]]] = {}
        for introducer, view in self.views.items():
            for key, info in view.items():
                if key == self.device.public_key or key in self.introducers:
                    continue
                if self.roster is not None and key in self.roster.revoked:
                    continue
                if key in self.device.peers and key not in self.learned:
                    continue  # configured by the user: never overridden
                if key in wanted:
                    merged, sources = wanted[key]
                    wanted[key] = (_merge_info(merged, info), sources | {introducer})
                else:
                    wanted[key] = (info, {introducer})
        for key in list(self.learned):
            if key not in wanted:
                del self.learned[key]
                peer = self.device.peers.get(key)
                if peer is not None:
                    self.device.remove_peer(key)
                    for listener in self.listeners:
                        listener(peer, None, set(), now)
        configured = self._configured_networks()
        for key, (info, sources) in wanted.items():
            added = self.device.add_peer(key)
            if added is None:
                continue
            self.learned[key] = sources
            allowed = [
                n
                for n in info.allowed
                if not any(n.version == c.version and n.overlaps(c) for c in configured)  # type: ignore[arg-type]
            ]
            if set(allowed) != set(self.device.allowed_ips.networks(added)):
                self.device.replace_allowed_ips(added, allowed)
            for listener in self.listeners:
                listener(added, info, sources, now)
        self.agent.dirty = True


def _merge_info(a: MemberInfo, b: MemberInfo) -> MemberInfo:
    """Two introducers' views of one member: the union of what they say."""
    allowed = a.allowed + tuple(n for n in b.allowed if n not in a.allowed)
    local = a.local + tuple(e for e in b.local if e not in a.local)
    mapped = a.mapped + tuple(e for e in b.mapped if e not in a.mapped)
    return MemberInfo(
        a.key,
        allowed[:MAX_ALLOWED],
        a.observed or b.observed,
        local[:MAX_LOCAL],
        mapped[:MAX_MAPPED],
        a.record or b.record,
        a.name or b.name,
    )
