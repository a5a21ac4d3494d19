"""The "via TLS relay" path: one more way to reach a peer, used only while no UDP path works.

This logic detects when UDP fails (or works again) and asks the path arbiter
(:mod:`meshguard.mesh.arbiter`) to put a peer on a relay link or to let it go; the arbiter
decides by its ranking and writes ``peer.path_kind``. The device then sends such a peer's
datagrams through :meth:`TlsPaths.send`, the transport registered for ``PATH_TLS``, which puts
them on the link that carries the peer. Datagrams the relay delivers go into the device as
relayed (``Device.relayed_datagram_received``): roaming records "through relay NAME" on the
peer and never touches its UDP endpoint, which stays what ``wg show`` reports. The session
never changes when the path does.

Rules, per peer present at a connected relay (the relay tells who is):

- Fall back: a handshake initiation stayed unanswered for :data:`FALLBACK_AFTER` seconds with
  nothing received from the peer meanwhile (so about 6 s after the first attempt, or about 20 s
  after traffic stops being answered, when WireGuard starts a new handshake) -> the relay
  (asked of the arbiter), and a new initiation through it at once.
- An established session on UDP: data sent and nothing received for :data:`STALL_PROBE_AFTER`
  seconds sends one TLS_UDP_PROBE over UDP (a working peer answers at once); still nothing
  received :data:`FALLBACK_AFTER` seconds after the stall began -> the relay, without
  waiting for WireGuard's own ~20 s of timers. The session stays; the peer follows when our
  datagrams reach it through the relay.
- While on the relay, every :data:`PROBE_INTERVAL` seconds send a TLS_UDP_PROBE straight over UDP
  to the last UDP endpoint the peer had. The other side answers over UDP (TLS_UDP_ACK) and keeps
  its own choice; the prober, which now knows UDP works both ways, moves to UDP and says so
  (TLS_UDP_SWITCH), and the other side follows. Authenticated UDP traffic from a peer we still
  send to through the relay moves us too (a lost SWITCH).
- A peer that leaves the relay (or a relay link that goes down) goes back to its UDP endpoint.
- A peer another member forwards for (``PATH_MEMBER``) while a relay reaches it moves to the
  relay at once: no second layer of encryption, no forwarding member's rate limit (the arbiter's
  ``TLS_REPLACES_MEMBER``). The arbiter asks :meth:`TlsPaths.reaches` before choosing a
  forwarding member at all.

This module is sans-I/O: links are objects with ``present()`` and ``send()``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import Carrier, Endpoint
from meshguard.core.peer import PATH_MEMBER, PATH_TLS, Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.arbiter import PathArbiter

#: How often the path rules run while any relay link exists.
TICK = 1.0
#: While on a relay, UDP is probed this often.
PROBE_INTERVAL = 5.0
#: After we moved from the relay to UDP, a datagram that came through the relay does not move us
#: back for this long (in-flight relay traffic right after a switch). Short: when UDP dies again
#: right after the switch, the peer falls back first and we must follow it onto the relay.
UDP_HOLD = 3.0
#: A handshake unanswered for this long (and nothing received meanwhile) means UDP fails.
FALLBACK_AFTER = 5.0
#: On UDP, data sent and nothing received for this long: probe UDP at once (an answer is due).
STALL_PROBE_AFTER = 1.0
#: Outstanding probe nonces kept per peer.
MAX_PENDING = 8


class RelayLink(Protocol):
    """A connection to a TLS relay (or this node's own relay server), as the path logic sees it."""

    #: Shown in status: ``tls-relay via NAME``.
    name: str

    def present(self) -> Collection[bytes]:
        """The members reachable through this link now (empty while it is down)."""
        ...

    def send(self, destination: bytes, datagram: bytes) -> bool:
        """Queue ``datagram`` for ``destination``; False when it had to be dropped."""
        ...


class _Removed:
    """What is left of a link removed on reload: reaches nobody, shown nowhere; its id is not
    reused, so a peer's link id can never name another link."""

    name = "(removed)"

    def present(self) -> Collection[bytes]:
        return ()

    def send(self, destination: bytes, datagram: bytes) -> bool:
        return False


@dataclass
class _PeerPath:
    #: The link carrying the peer while the arbiter has it on a relay, else None. The peer's
    #: UDP endpoint (``peer.endpoint``) stays its last one: where probes go, where we return.
    link: int | None = None
    udp_seen: float = float("-inf")
    #: When we last moved from the relay to UDP.
    switched: float = float("-inf")
    #: Bytes of authenticated datagrams that came through a relay (to tell UDP traffic apart).
    tls_rx: int = 0
    rx_mark: int = 0
    tls_rx_mark: int = 0
    tx_mark: int = 0
    #: Since when we sent over UDP and received nothing (an established session going dead).
    stalled_since: float | None = None
    stall_probed: bool = False
    next_probe: float = 0.0
    #: Since when an initiation has been outstanding with nothing received.
    waiting_since: float | None = None
    pending: dict[bytes, float] = field(default_factory=dict)


class TlsPaths:
    """The path rules above, as a mesh feature, and the device's transport for ``PATH_TLS``."""

    kinds: tuple[int, ...] = (kinds.TLS_UDP_PROBE, kinds.TLS_UDP_ACK, kinds.TLS_UDP_SWITCH)

    def __init__(
        self,
        agent: MeshAgent,
        *,
        on_change: Callable[[Peer, str], None] | None = None,
        arbiter: PathArbiter | None = None,
    ) -> None:
        self.agent = agent
        #: Decides, writes, logs and reports every move onto or off a relay (mesh/arbiter.py).
        self.arbiter = arbiter if arbiter is not None else PathArbiter()
        self.device = agent.device
        self.links: list[RelayLink] = []
        self.states: dict[bytes, _PeerPath] = {}
        self._next_tick: float | None = None
        #: Told ``(peer, description)`` when a peer moves onto or off a relay (for logs).
        self.on_change = on_change
        self.sent = 0
        self.delivered_count = 0
        self.dropped = 0
        self.fallbacks = 0
        self.returns = 0
        self.device.set_transport(PATH_TLS, self)
        self.device.add_relayed_listener(self.relayed_arrival)
        self.arbiter.set_tls(self)
        self.arbiter.add_udp_proven_listener(self.direct_confirmed)

    # ------------------------------------------------------------------ links

    def add_link(self, link: RelayLink, now: float) -> int:
        self.links.append(link)
        if self._next_tick is None:
            self._next_tick = now
            self.agent.dirty = True
        return len(self.links) - 1

    def remove_link(self, link_id: int, now: float) -> None:
        """A relay taken out of the configuration: its peers go back to UDP at once."""
        link = self.links[link_id]
        if isinstance(link, _Removed):
            return
        self.links[link_id] = _Removed()
        self.run_timers_now(now)

    def run_timers_now(self, now: float) -> None:
        """Apply the path rules now (links changed), not at the next tick."""
        self._next_tick = now
        self.run_timers(now)

    def reaches(self, peer: Peer) -> bool:
        """Whether a relay link reaches ``peer`` now (then no member need forward for it)."""
        return any(peer.public_key in link.present() for link in self.links)

    def holds(self, peer: Peer) -> bool:
        """Whether we have ``peer`` on a relay now (the mesh's direct paths defer to us)."""
        state = self.states.get(peer.public_key)
        return state is not None and state.link is not None

    def direct_confirmed(self, peer: Peer, endpoint: Endpoint, now: float) -> None:
        """The mesh's path check got an answer over UDP at ``endpoint``: UDP works both ways.

        Leave the relay now and tell the peer (TLS_UDP_SWITCH) so it follows; otherwise the
        next datagram it still sends through the relay would take us back onto it.
        """
        state = self.states.get(peer.public_key)
        if state is None or state.link is None:
            return
        self.device.send_control_to(
            peer, endpoint, kinds.TLS_UDP_SWITCH, self.device.random(8), now
        )
        self._move_to_udp(peer, state, endpoint, now, "the mesh path check was answered")

    # ------------------------------------------------------------------ PathTransport

    def send(self, peer: Peer, datagram: bytes, now: float) -> bool:
        """The device's transport for peers on ``PATH_TLS``: onto the link that carries it."""
        state = self.states.get(peer.public_key)
        link_id = state.link if state is not None else None
        if link_id is None or not self.links[link_id].send(peer.public_key, datagram):
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def delivered(self, link_id: int, source: bytes, datagram: bytes, now: float) -> None:
        """A datagram the relay says ``source`` sent us: into the device, as relayed."""
        peer = self.device.peers.get(source)
        if peer is None:
            self.dropped += 1
            return
        before = peer.rx_bytes
        # An authenticated one reaches ``relayed_arrival`` before any reply goes out.
        self.device.relayed_datagram_received(datagram, self.links[link_id], now)
        if peer.rx_bytes == before:
            return  # did not authenticate as this peer: dropped and counted by the device
        self.delivered_count += 1
        self._state(source).tls_rx += peer.rx_bytes - before

    def relayed_arrival(self, peer: Peer, via: Peer | Carrier, now: float) -> None:
        """The device's relayed listener: a datagram from ``peer`` authenticated after coming
        through ``via``. One of our links: the peer reached us only through it, so we answer
        (and send) there too, unless we moved to UDP just now (still in flight)."""
        if isinstance(via, Peer):
            return
        link_id = next((i for i, link in enumerate(self.links) if link is via), None)
        if link_id is None:
            return
        state = self._state(peer.public_key)
        if state.link == link_id:
            return
        if state.link is None and peer.endpoint is not None and now - state.switched < UDP_HOLD:
            return  # just moved to UDP: still in flight through the relay
        why = "the peer reached us through it" if state.link is None else "its relay changed"
        self._move_to_relay(peer, state, link_id, now, why)

    # ------------------------------------------------------------------ MeshFeature

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        source = peer.arrived_from
        if len(body) != 8 or peer.arrived_via is not None or source is None:
            self.dropped += 1  # only what came straight over UDP says anything about UDP
            return
        state = self._state(peer.public_key)
        if kind == kinds.TLS_UDP_PROBE:
            # Answer; the prober decides, once it knows both ways work.
            self.device.send_control_to(peer, source, kinds.TLS_UDP_ACK, body, now)
        elif kind == kinds.TLS_UDP_ACK:
            if state.pending.pop(body, None) is None or state.link is None:
                return  # unknown, or a stall probe answered: UDP still works, nothing to move
            self.device.send_control_to(peer, source, kinds.TLS_UDP_SWITCH, body, now)
            self._move_to_udp(peer, state, source, now, "our probe was answered")
        else:
            self._move_to_udp(peer, state, source, now, "the peer switched")

    def session_started(self, peer: Peer, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return self._next_tick

    def run_timers(self, now: float) -> None:
        if self._next_tick is None or now < self._next_tick:
            return
        self._next_tick = now + TICK
        present: list[Collection[bytes]] = [link.present() for link in self.links]
        for key, peer in self.device.peers.items():
            link_id = next((i for i, keys in enumerate(present) if key in keys), None)
            state = self.states.get(key)
            if state is None:
                if link_id is None:
                    continue
                state = self._state(key)
            self._tick_peer(peer, state, link_id, now)
        for key in [k for k in self.states if k not in self.device.peers]:
            del self.states[key]

    def _tick_peer(self, peer: Peer, state: _PeerPath, link_id: int | None, now: float) -> None:
        if state.link is not None and not self.arbiter.holds_tls(peer):
            state.link = None  # the arbiter moved it to a better path
        on_relay = state.link is not None
        rx = peer.rx_bytes - state.rx_mark
        udp_rx = rx - (state.tls_rx - state.tls_rx_mark)
        tx = peer.tx_bytes - state.tx_mark
        state.rx_mark, state.tls_rx_mark, state.tx_mark = peer.rx_bytes, state.tls_rx, peer.tx_bytes
        if rx > 0 or on_relay or peer.keypairs.current is None:
            state.stalled_since, state.stall_probed = None, False
        elif tx > 0 and state.stalled_since is None:
            state.stalled_since = now
        if peer.handshake is None or rx > 0:
            state.waiting_since = None
        elif state.waiting_since is None:
            state.waiting_since = now
        if udp_rx > 0 and peer.arrived_via is None:
            state.udp_seen = now
            if on_relay and peer.endpoint is not None:
                self._move_to_udp(peer, state, peer.endpoint, now, "UDP traffic from the peer")
                return
        if not on_relay:
            if link_id is not None and peer.path_kind is PATH_MEMBER:
                # A member forwards for it inside our session with that member (a second layer
                # of encryption, and that member's rate limit): the TLS relay reaches it itself.
                if self._move_to_relay(
                    peer, state, link_id, now, "reached without a forwarding member"
                ) and (peer.keypairs.current is None):
                    peer.last_sent_handshake = None
                    self.device.send_initiation(peer, now, retry=True)
                return
            if (
                link_id is not None
                and state.waiting_since is not None
                and now - state.waiting_since >= FALLBACK_AFTER
            ):
                state.waiting_since = None
                if self._move_to_relay(peer, state, link_id, now, "UDP failed"):
                    self.fallbacks += 1
                    # Handshake through the relay now rather than at the next retransmission.
                    peer.last_sent_handshake = None
                    self.device.send_initiation(peer, now, retry=True)
                return
            stalled = state.stalled_since
            if link_id is None or peer.path_kind is PATH_MEMBER or stalled is None:
                return
            if now - stalled >= FALLBACK_AFTER:
                # An established session's UDP path went dead: the peer answered neither our
                # data nor a probe that asks for an answer. Move now rather than wait for
                # WireGuard's own timers (about 20 s); the session stays.
                state.stalled_since, state.stall_probed = None, False
                if self._move_to_relay(peer, state, link_id, now, "UDP stopped answering"):
                    self.fallbacks += 1
                    self.device.send_keepalive(peer, now)
            elif now - stalled >= STALL_PROBE_AFTER and not state.stall_probed:
                state.stall_probed = True
                self._probe(peer, state, now)
            return
        if link_id is None:
            # Gone from every relay: back to UDP, where the usual rules (and we) try again.
            self._release(peer, state, peer.endpoint, now, "no relay reaches it")
            self._changed(peer, "back to UDP (no relay reaches it)")
            return
        if state.link != link_id:
            self._move_to_relay(peer, state, link_id, now, "its relay changed")
        if now >= state.next_probe:
            state.next_probe = now + PROBE_INTERVAL
            self._probe(peer, state, now)

    def _probe(self, peer: Peer, state: _PeerPath, now: float) -> None:
        if peer.endpoint is None:
            return
        nonce = self.device.random(8)
        if len(state.pending) >= MAX_PENDING:
            del state.pending[min(state.pending, key=lambda n: state.pending[n])]
        if self.device.send_control_to(peer, peer.endpoint, kinds.TLS_UDP_PROBE, nonce, now):
            state.pending[nonce] = now

    def _move_to_relay(
        self, peer: Peer, state: _PeerPath, link_id: int, now: float, why: str
    ) -> bool:
        """Ask the arbiter to carry ``peer`` over ``link_id``; False when it refused (a better
        path is proven)."""
        name = self.links[link_id].name
        if not self.arbiter.tls_take(peer, name, now, why):
            return False
        state.link = link_id
        state.next_probe = now + PROBE_INTERVAL
        self._changed(peer, f"tls-relay via {name} ({why})")
        return True

    def _move_to_udp(
        self, peer: Peer, state: _PeerPath, source: Endpoint, now: float, why: str
    ) -> None:
        state.udp_seen = now
        if state.link is None:
            return
        self._release(peer, state, source, now, why, answered=True)
        state.switched = now
        state.pending.clear()
        self.returns += 1
        self._changed(peer, f"UDP {source[0]}:{source[1]} ({why})")

    def _release(
        self,
        peer: Peer,
        state: _PeerPath,
        endpoint: Endpoint | None,
        now: float,
        why: str,
        *,
        answered: bool = False,
    ) -> None:
        state.link = None
        self.arbiter.tls_release(peer, endpoint, why, now, answered=answered)

    def _changed(self, peer: Peer, description: str) -> None:
        self.agent.dirty = True
        if self.on_change is not None:
            try:
                self.on_change(peer, description)
            except Exception:
                self.dropped += 0  # an observer's bug never breaks the path logic

    def _state(self, key: bytes) -> _PeerPath:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _PeerPath()
        return state

    def link_name(self, link_id: int) -> str:
        return self.links[link_id].name

    # ------------------------------------------------------------------ status

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        state = self.states.get(peer.public_key)
        if state is None or state.link is None:
            return {}
        name = self.link_name(state.link)
        return {"path": f"tls-relay via {name}", "endpoint": None, "tls_relay": name}

    def node_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {}
        live = [link for link in self.links if not isinstance(link, _Removed)]
        for link in live:
            link_status = getattr(link, "status", None)
            if link_status is not None:
                status["relay_server"] = link_status()
        return status | {
            "tls_relays": {link.name: len(link.present()) for link in live},
            "tls_relay_sent": self.sent,
            "tls_relay_delivered": self.delivered_count,
            "tls_relay_dropped": self.dropped,
        }
