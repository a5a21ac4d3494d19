"""The "via TLS relay" path: one more way to reach a peer, used only while no UDP path works.

A peer reached through a TLS relay gets a *relay endpoint*: an address in the discard-only
prefix ``100::/64`` (RFC 6666) that stands for "link L, member K". The device sends to it like
any endpoint and the node hands such datagrams to the relay link instead of the UDP socket;
datagrams the relay delivers from K come in "from" that endpoint, so WireGuard's own roaming
keeps the session on whichever path last carried an authenticated datagram. The session never
changes when the path does.

Rules, per peer present at a connected relay (the relay tells who is):

- Fall back: a handshake initiation stayed unanswered for :data:`FALLBACK_AFTER` seconds with
  nothing received from the peer meanwhile (so about 6 s after the first attempt, or about 20 s
  after traffic stops being answered, when WireGuard starts a new handshake) -> the relay
  endpoint, and a new initiation through it at once.
- An established session on UDP: data sent and nothing received for :data:`STALL_PROBE_AFTER`
  seconds sends one TLS_UDP_PROBE over UDP (a working peer answers at once); still nothing
  received :data:`FALLBACK_AFTER` seconds after the stall began -> the relay endpoint, without
  waiting for WireGuard's own ~20 s of timers. The session stays; the peer follows when our
  datagrams reach it through the relay.
- While on the relay, every :data:`PROBE_INTERVAL` seconds send a TLS_UDP_PROBE straight over UDP
  to the last UDP endpoint the peer had. The other side answers over UDP (TLS_UDP_ACK) and keeps
  its own choice; the prober, which now knows UDP works both ways, moves to UDP and says so
  (TLS_UDP_SWITCH), and the other side follows. Authenticated UDP traffic from a peer we still
  send to through the relay moves us too (a lost SWITCH).
- A peer that leaves the relay (or a relay link that goes down) goes back to its UDP endpoint.
- A peer another member forwards for (the mesh's ``peer.relay``) while a relay reaches it moves
  to the relay at once: no second layer of encryption, no forwarding member's rate limit. The
  mesh asks :meth:`TlsPaths.reaches` before choosing a forwarding member at all.

This module is sans-I/O: links are objects with ``present()`` and ``send()``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent
from meshguard.mesh.arbiter import PathArbiter

#: Relay endpoints live in the discard-only prefix 100::/64: never a real peer address.
PREFIX = "100::"
_BASE = 0x0100 << 112
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
    reused, so relay endpoints made for it can never name another link."""

    name = "(removed)"

    def present(self) -> Collection[bytes]:
        return ()

    def send(self, destination: bytes, datagram: bytes) -> bool:
        return False


@dataclass
class _PeerPath:
    #: The relay endpoint we send to while the peer is on a relay, else None.
    tls: Endpoint | None = None
    #: The last UDP endpoint the peer had: where probes go and where we return to.
    udp: Endpoint | None = None
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
    """The path rules above, as a mesh feature, and the relay endpoints' registry."""

    kinds: tuple[int, ...] = (kinds.TLS_UDP_PROBE, kinds.TLS_UDP_ACK, kinds.TLS_UDP_SWITCH)

    def __init__(
        self,
        agent: MeshAgent,
        *,
        on_change: Callable[[Peer, str], None] | None = None,
        arbiter: PathArbiter | None = None,
    ) -> None:
        self.agent = agent
        #: Writes, logs and reports every move onto or off a relay (mesh/arbiter.py).
        self.arbiter = arbiter if arbiter is not None else PathArbiter()
        self.device = agent.device
        self.links: list[RelayLink] = []
        self.states: dict[bytes, _PeerPath] = {}
        self._endpoints: dict[tuple[int, bytes], Endpoint] = {}
        self._by_endpoint: dict[Endpoint, tuple[int, bytes]] = {}
        self._next_tick: float | None = None
        #: Told ``(peer, description)`` when a peer moves onto or off a relay (for logs).
        self.on_change = on_change
        self.sent = 0
        self.delivered_count = 0
        self.dropped = 0
        self.fallbacks = 0
        self.returns = 0

    # ------------------------------------------------------------------ links and endpoints

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

    def endpoint_for(self, link_id: int, key: bytes) -> Endpoint:
        endpoint = self._endpoints.get((link_id, key))
        if endpoint is None:
            slot = len(self._endpoints) + 1
            address = str(ipaddress.IPv6Address(_BASE | (link_id << 32) | slot))
            endpoint = (address, 1)
            self._endpoints[(link_id, key)] = endpoint
            self._by_endpoint[endpoint] = (link_id, key)
        return endpoint

    def reaches(self, peer: Peer) -> bool:
        """Whether a relay link reaches ``peer`` now (then no member need forward for it)."""
        return any(peer.public_key in link.present() for link in self.links)

    def holds(self, peer: Peer) -> bool:
        """Whether we have ``peer`` on a relay now (the mesh's direct paths defer to us)."""
        state = self.states.get(peer.public_key)
        return state is not None and state.tls is not None

    def direct_confirmed(self, peer: Peer, endpoint: Endpoint, now: float) -> None:
        """The mesh's path check got an answer over UDP at ``endpoint``: UDP works both ways.

        Leave the relay now and tell the peer (TLS_UDP_SWITCH) so it follows; otherwise the
        next datagram it still sends through the relay would roam us back onto it.
        """
        state = self.states.get(peer.public_key)
        if state is None or state.tls is None or endpoint in self._by_endpoint:
            return
        self.device.send_control_to(
            peer, endpoint, kinds.TLS_UDP_SWITCH, self.device.random(8), now
        )
        self._move_to_udp(peer, state, endpoint, now, "the mesh path check was answered")

    def shown_endpoint(self, peer: Peer) -> Endpoint | None:
        """The endpoint ``wg show`` (UAPI get) reports: while the peer is on a relay, its last
        UDP endpoint (or none), never the stand-in, which means nothing outside this node and
        would be written into a saved configuration by ``wg showconf``."""
        endpoint = peer.endpoint
        if endpoint is None or endpoint not in self._by_endpoint:
            return endpoint
        state = self.states.get(peer.public_key)
        return state.udp if state is not None else None

    def is_relay_endpoint(self, endpoint: Endpoint | None) -> bool:
        return endpoint is not None and endpoint in self._by_endpoint

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        """The node's outgoing hook for relay endpoints."""
        target = self._by_endpoint.get(endpoint)
        if target is None:
            self.dropped += 1
            return
        link_id, key = target
        if self.links[link_id].send(key, data):
            self.sent += 1
        else:
            self.dropped += 1

    def wrap(
        self, udp_send: Callable[[bytes, Endpoint], None]
    ) -> Callable[[bytes, Endpoint], None]:
        """The device's ``send_datagram``: relay endpoints to the relay, the rest to UDP."""
        by_endpoint = self._by_endpoint
        send_relayed = self.send_datagram

        def send(data: bytes, endpoint: Endpoint) -> None:
            if endpoint in by_endpoint:
                send_relayed(data, endpoint)
            else:
                udp_send(data, endpoint)

        return send

    def wrap_probe(
        self, send_probe: Callable[[bytes, Endpoint], bool]
    ) -> Callable[[bytes, Endpoint], bool]:
        """Path MTU probes toward a relay endpoint go through the relay (TCP carries any size)."""

        def probe(data: bytes, endpoint: Endpoint) -> bool:
            if endpoint in self._by_endpoint:
                self.send_datagram(data, endpoint)
                return True
            return send_probe(data, endpoint)

        return probe

    def delivered(self, link_id: int, source: bytes, datagram: bytes, now: float) -> None:
        """A datagram the relay says ``source`` sent us: into the device, from its endpoint."""
        peer = self.device.peers.get(source)
        if peer is None:
            self.dropped += 1
            return
        endpoint = self.endpoint_for(link_id, source)
        before = peer.rx_bytes
        self.device.datagram_received(datagram, endpoint, now)
        if peer.rx_bytes == before:
            return  # did not authenticate as this peer: dropped and counted by the device
        self.delivered_count += 1
        state = self._state(source)
        state.tls_rx += peer.rx_bytes - before
        if peer.endpoint != endpoint:
            return
        if state.tls is None:
            if state.udp is not None and now - state.switched < UDP_HOLD:
                self.arbiter.tls_keep(peer, state.udp)  # just moved to UDP; still in flight
                return
            self._move_to_relay(peer, state, endpoint, now, "the peer reached us through it")
        else:
            state.tls = endpoint

    # ------------------------------------------------------------------ MeshFeature

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        source = peer.endpoint
        if (
            len(body) != 8
            or self.device.relayed_by is not None
            or source is None
            or source in self._by_endpoint
        ):
            self.dropped += 1  # only what came straight over UDP says anything about UDP
            return
        state = self._state(peer.public_key)
        state.udp = source
        if kind == kinds.TLS_UDP_PROBE:
            self.device.send_control_to(peer, source, kinds.TLS_UDP_ACK, body, now)
            if state.tls is not None:
                # The prober decides, once it knows both ways work.
                self.arbiter.tls_keep(peer, state.tls)
        elif kind == kinds.TLS_UDP_ACK:
            if state.pending.pop(body, None) is None:
                if state.tls is not None:
                    self.arbiter.tls_keep(peer, state.tls)
                return
            if state.tls is None:
                return  # a stall probe answered: UDP still works, nothing to switch
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
        endpoint = peer.endpoint
        on_relay = endpoint is not None and endpoint in self._by_endpoint
        if endpoint is not None and not on_relay:
            state.udp = endpoint
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
        if udp_rx > 0 and not on_relay:
            state.udp_seen = now
            if state.tls is not None and endpoint is not None:
                self._move_to_udp(peer, state, endpoint, now, "UDP traffic from the peer")
                return
        if state.tls is None:
            if link_id is not None and peer.relay is not None and not on_relay:
                # A member forwards for it inside our session with that member (a second layer
                # of encryption, and that member's rate limit): the TLS relay reaches it itself.
                self._move_to_relay(
                    peer,
                    state,
                    self.endpoint_for(link_id, peer.public_key),
                    now,
                    "reached without a forwarding member",
                )
                if peer.keypairs.current is None:
                    peer.last_sent_handshake = None
                    self.device.send_initiation(peer, now, retry=True)
                return
            if (
                link_id is not None
                and not on_relay
                and state.waiting_since is not None
                and now - state.waiting_since >= FALLBACK_AFTER
            ):
                state.waiting_since = None
                self.fallbacks += 1
                self._move_to_relay(
                    peer, state, self.endpoint_for(link_id, peer.public_key), now, "UDP failed"
                )
                # Handshake through the relay now rather than at the next retransmission.
                peer.last_sent_handshake = None
                self.device.send_initiation(peer, now, retry=True)
                return
            stalled = state.stalled_since
            if link_id is None or peer.relay is not None or stalled is None:
                return
            if now - stalled >= FALLBACK_AFTER:
                # An established session's UDP path went dead: the peer answered neither our
                # data nor a probe that asks for an answer. Move now rather than wait for
                # WireGuard's own timers (about 20 s); the session stays.
                state.stalled_since, state.stall_probed = None, False
                self.fallbacks += 1
                self._move_to_relay(
                    peer,
                    state,
                    self.endpoint_for(link_id, peer.public_key),
                    now,
                    "UDP stopped answering",
                )
                self.device.send_keepalive(peer, now)
            elif now - stalled >= STALL_PROBE_AFTER and not state.stall_probed:
                state.stall_probed = True
                self._probe(peer, state, now)
            return
        current = self._by_endpoint.get(state.tls)
        if link_id is None:
            # Gone from every relay: back to UDP, where the usual rules (and we) try again.
            state.tls = None
            self.arbiter.tls_move(
                peer, state.udp if on_relay else peer.endpoint, None, "no relay reaches it"
            )
            self._changed(peer, "back to UDP (no relay reaches it)")
            return
        if current is not None and current[0] != link_id:
            state.tls = self.endpoint_for(link_id, peer.public_key)
            if on_relay:
                self.arbiter.tls_move(
                    peer, state.tls, self.link_name(state.tls), "its relay changed"
                )
        if now >= state.next_probe:
            state.next_probe = now + PROBE_INTERVAL
            self._probe(peer, state, now)

    def _probe(self, peer: Peer, state: _PeerPath, now: float) -> None:
        if state.udp is None:
            return
        nonce = self.device.random(8)
        if len(state.pending) >= MAX_PENDING:
            del state.pending[min(state.pending, key=lambda n: state.pending[n])]
        if self.device.send_control_to(peer, state.udp, kinds.TLS_UDP_PROBE, nonce, now):
            state.pending[nonce] = now

    def _move_to_relay(
        self, peer: Peer, state: _PeerPath, endpoint: Endpoint, now: float, why: str
    ) -> None:
        state.tls = endpoint
        state.next_probe = now + PROBE_INTERVAL
        self.arbiter.tls_move(peer, endpoint, self.link_name(endpoint), why)
        self._changed(peer, f"tls-relay via {self.link_name(endpoint)} ({why})")

    def _move_to_udp(
        self, peer: Peer, state: _PeerPath, source: Endpoint, now: float, why: str
    ) -> None:
        state.udp_seen = now
        if state.tls is not None:
            self.arbiter.tls_move(peer, source, None, why)
        else:
            self.arbiter.tls_keep(peer, source)
        if state.tls is not None:
            state.tls = None
            state.switched = now
            state.pending.clear()
            self.returns += 1
            self._changed(peer, f"UDP {source[0]}:{source[1]} ({why})")

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

    def link_name(self, endpoint: Endpoint) -> str:
        target = self._by_endpoint.get(endpoint)
        return self.links[target[0]].name if target is not None else "?"

    # ------------------------------------------------------------------ status

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        if peer.endpoint is None or peer.endpoint not in self._by_endpoint:
            return {}
        name = self.link_name(peer.endpoint)
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
