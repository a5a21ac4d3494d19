"""The mesh agent: routes control messages to features and says hello to meshguard peers.

Every feature (keepalive policy, path MTU, membership, relaying) is a :class:`MeshFeature` that
owns some control message kinds, hears about new meshguard sessions, and keeps its own deadlines.
The agent aggregates them so the node keeps one reactor timer for the whole mesh layer.

HELLO tells a peer how we see it: its endpoint as observed from here (the only way a node behind
a NAT learns its public mapping), our local addresses and listen port (LAN candidates) and the
public endpoints our gateway maps to our port (``mapped``: PCP, NAT-PMP or UPnP, see
docs/portmapping.md), which an introducer passes on to the other members as candidates.

An idle tunnel says nothing it already said: with ``PersistentKeepalive = auto`` the whole point
is that an idle home sends only its keepalives. So a HELLO refresh (and the HELLO after a rekey)
goes out only when there is something to tell (the body differs from the last one the peer
acknowledged: a new observed endpoint, new local addresses), while the peer is not yet
acknowledged, or when data crossed the tunnel since the last exchange; otherwise the refresh is
skipped (counted) and looked at again a refresh later. A peer that restarted says hello itself
(its state is new), and our acknowledgement tells it everything.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshguard.core.device import Device
from meshguard.core.interfaces import Endpoint
from meshguard.core.peer import PATH_TLS, PERSISTENT_KEEPALIVE, Peer
from meshguard.mesh import kinds

#: Largest JSON control body accepted; anything larger is dropped unread.
MAX_JSON_BODY = 16384
#: How often a HELLO is repeated until acknowledged, and refreshed afterwards.
HELLO_RETRY = 2.0
HELLO_REFRESH = 60.0
#: Port-mapped endpoints accepted in one HELLO.
MAX_MAPPED = 4


class MeshFeature(Protocol):
    """One capability of the mesh layer."""

    kinds: tuple[int, ...]

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None: ...

    def session_started(self, peer: Peer, now: float) -> None: ...

    def next_deadline(self) -> float | None: ...

    def run_timers(self, now: float) -> None: ...

    def peer_status(self, peer: Peer) -> dict[str, Any]: ...


def decode_json(body: bytes) -> dict[str, Any] | None:
    """A JSON object from a control body, or None for anything else (hostile input)."""
    if len(body) > MAX_JSON_BODY:
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


#: A message that may wait for the peer's next keepalive goes this long before it: the device's
#: timers run before the mesh layer's, so at the same instant the keepalive would go first.
KEEPALIVE_SLOT_LEAD = 0.5


def keepalive_slot(peer: Peer) -> float | None:
    """When a control message to ``peer`` would go *instead of* its next persistent keepalive
    (any authenticated packet we send re-arms the keepalive timer), or None when no keepalive
    is armed. An idle NATed tunnel then sends one datagram where it would have sent two."""
    deadline = peer.timers.deadlines[PERSISTENT_KEEPALIVE]
    if deadline is None or not peer.persistent_keepalive:
        return None
    return deadline - KEEPALIVE_SLOT_LEAD


#: RFC 6666's discard-only prefix: never a place to send UDP to. meshguard's TLS relay once
#: stood for "through relay L to member K" with addresses in it that meant something only on
#: the node that made them; a peer running such a version may still name one as a candidate.
DISCARD_ONLY = ipaddress.IPv6Network("100::/64")


def same_host(a: Endpoint, b: Endpoint) -> bool:
    """Whether two endpoints have the same address (any port): a NAT may change the port."""
    try:
        return ipaddress.ip_address(a[0].split("%", 1)[0]) == ipaddress.ip_address(
            b[0].split("%", 1)[0]
        )
    except ValueError:
        return False


def parse_endpoint(value: object) -> Endpoint | None:
    """``["host", port]`` from a peer, checked: a numeric address and a port in range, and not
    in the discard-only prefix (an older node's stand-in for a relay path: never a candidate)."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    host, port = value
    if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address in DISCARD_ONLY:
        return None
    return (host, port)


@dataclass
class PeerMeshState:
    """What the agent knows of one meshguard peer."""

    hello_acked: bool = False
    #: A handshake completed and the features have not heard of this session yet.
    session_pending: bool = True
    next_hello: float | None = None
    #: Our endpoint as this peer sees it (its HELLO says).
    observed_self: Endpoint | None = None
    #: The peer's local addresses and port (LAN candidates), as it reported them.
    local_endpoints: list[Endpoint] = field(default_factory=list)
    #: Public endpoints the peer's gateway maps to it (port mapping), as it reported them.
    mapped_endpoints: list[Endpoint] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    #: The body of our latest HELLO, and of the latest one the peer acknowledged.
    sent_body: bytes | None = None
    told: bytes | None = None
    #: ``peer.data_packets`` at the latest exchange: unchanged means the tunnel is idle.
    data_mark: int = -1
    #: HELLOs not sent because the tunnel was idle and there was nothing new to tell.
    hellos_skipped: int = 0


class MeshAgent:
    """Dispatches control messages and keeps per-peer mesh state."""

    def __init__(
        self,
        device: Device,
        *,
        local_endpoints: Callable[[], list[Endpoint]] = list,
        mapped_endpoints: Callable[[], list[Endpoint]] = list,
    ) -> None:
        self.device = device
        self.local_endpoints = local_endpoints
        #: Our port-mapped public endpoints (:mod:`meshguard.portmap`), advertised in HELLO.
        self.mapped_endpoints = mapped_endpoints
        self.features: list[MeshFeature] = []
        self._by_kind: dict[int, MeshFeature] = {}
        self.peers: dict[bytes, PeerMeshState] = {}
        #: Observers told ``(peer, observed_endpoint)`` when a peer reports how it sees us.
        self.observed_listeners: list[Callable[[Peer, Endpoint, float], None]] = []
        #: Told ``(peer, now)`` when a feature sent a control message in the place of the
        #: peer's keepalive (:func:`keepalive_slot`): acknowledged keepalives watch for its
        #: answer and resend a keepalive if none comes (mesh/keepalive_acks.py).
        self.slot_listeners: list[Callable[[Peer, float], None]] = []
        self.dropped = 0
        #: Set when a deadline may have moved earlier (see ``TimerQueue.dirty``).
        self.dirty = False
        device.mesh = True
        device.set_control_handler(self.control_received)
        device.add_handshake_listener(self._handshake)

    def add_feature(self, feature: MeshFeature) -> None:
        for kind in feature.kinds:
            if kind in self._by_kind or kind in (kinds.HELLO, kinds.HELLO_ACK):
                raise ValueError(f"control kind {kind} is taken")
            self._by_kind[kind] = feature
        self.features.append(feature)

    def state(self, peer: Peer) -> PeerMeshState:
        state = self.peers.get(peer.public_key)
        if state is None:
            state = self.peers[peer.public_key] = PeerMeshState()
        return state

    # ------------------------------------------------------------------ hello

    def _handshake(self, peer: Peer) -> None:
        """A session completed; if the peer is a known meshguard node, say hello at once."""
        state = self.state(peer)
        state.session_pending = True
        if peer.is_meshguard:
            if not (state.hello_acked and state.told == self._hello_body(peer)):
                # Something to tell (or never told): say it until acknowledged. A rekey with
                # nothing new is not acknowledged again: ``run_timers`` decides, at once.
                state.hello_acked = False
            state.next_hello = peer.last_handshake_time
            self.dirty = True

    def _hello_body(self, peer: Peer) -> bytes:
        return encode_json(
            {
                "observed": list(peer.endpoint)
                if peer.endpoint is not None and peer.path_kind is not PATH_TLS
                else None,
                "local": [list(e) for e in self.local_endpoints()],
                "mapped": [list(e) for e in self.mapped_endpoints()[:MAX_MAPPED]],
                "features": sorted(self._feature_names()),
            }
        )

    def _feature_names(self) -> set[str]:
        """What HELLO tells peers we can do: every feature's class name, and the names a
        feature lists in its optional ``capabilities`` (protocol extensions it answers)."""
        names = {type(f).__name__ for f in self.features}
        for feature in self.features:
            names.update(getattr(feature, "capabilities", ()))
        return names

    def hold_hello(self, peer: Peer, until: float) -> None:
        """Move the next HELLO refresh with ``peer`` to ``until`` if it is due sooner: a feature
        that needs the tunnel idle for a while (the keepalive self-check) holds it back. Only
        an acknowledged exchange is held: a HELLO still being retried is left alone."""
        state = self.peers.get(peer.public_key)
        if (
            state is not None
            and state.hello_acked
            and state.next_hello is not None
            and state.next_hello < until
        ):
            state.next_hello = until

    def sent_in_slot(self, peer: Peer, now: float) -> None:
        """A feature's message to ``peer`` went instead of its keepalive (and is answered)."""
        for listener in self.slot_listeners:
            listener(peer, now)

    def advertise(self, now: float) -> None:
        """Our own endpoints changed (a port mapping came or went): say HELLO to every peer
        now instead of at the next refresh, so introducers pass it on within seconds."""
        for state in self.peers.values():
            if state.next_hello is not None:
                state.next_hello = now
        self.dirty = True

    def send_hello(self, peer: Peer, now: float, kind: int = kinds.HELLO) -> bool:
        body = self._hello_body(peer)
        sent = self.device.send_control(peer, kind, body, now)
        if sent and kind == kinds.HELLO:
            self.state(peer).sent_body = body
        return sent

    def _hello_wanted(self, peer: Peer, state: PeerMeshState) -> bool:
        """Whether a due HELLO says anything: not yet acknowledged, a new body, or traffic
        since the last exchange (a busy tunnel refreshes as before)."""
        return (
            not state.hello_acked
            or state.told != self._hello_body(peer)
            or peer.data_packets != state.data_mark
        )

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        try:
            if kind in (kinds.HELLO, kinds.HELLO_ACK):
                self._hello_received(peer, kind, body, now)
                return
            feature = self._by_kind.get(kind)
            if feature is None:
                self.dropped += 1
                return
            feature.control_received(peer, kind, body, now)
        except Exception:
            # A feature's bug must not let a peer's message crash the node.
            self.dropped += 1

    def _hello_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        message = decode_json(body)
        if message is None:
            self.dropped += 1
            return
        state = self.state(peer)
        if kind == kinds.HELLO:
            self.send_hello(peer, now, kinds.HELLO_ACK)
            if state.next_hello is None:
                state.next_hello = now + HELLO_REFRESH
        else:
            state.hello_acked = True
            state.next_hello = now + HELLO_REFRESH
            state.told = state.sent_body
        state.data_mark = peer.data_packets
        local = message.get("local")
        if isinstance(local, list):
            state.local_endpoints = [e for e in map(parse_endpoint, local[:16]) if e is not None]
        mapped = message.get("mapped", [])
        if isinstance(mapped, list):
            state.mapped_endpoints = [
                e for e in map(parse_endpoint, mapped[:MAX_MAPPED]) if e is not None
            ]
        features = message.get("features")
        if isinstance(features, list):
            state.features = [f for f in features[:32] if isinstance(f, str)]
        observed = parse_endpoint(message.get("observed"))
        if observed is not None and observed != state.observed_self:
            state.observed_self = observed
            for listener in self.observed_listeners:
                listener(peer, observed, now)
        if state.session_pending:
            state.session_pending = False
            for feature in self.features:
                feature.session_started(peer, now)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        deadlines = [s.next_hello for s in self.peers.values() if s.next_hello is not None]
        deadlines.extend(d for f in self.features if (d := f.next_deadline()) is not None)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        for key, state in list(self.peers.items()):
            peer = self.device.peers.get(key)
            if peer is None:
                del self.peers[key]
                continue
            if state.next_hello is not None and state.next_hello <= now:
                if self._hello_wanted(peer, state):
                    self.send_hello(peer, now)
                    state.next_hello = now + (HELLO_REFRESH if state.hello_acked else HELLO_RETRY)
                else:
                    # Idle, nothing new: stay quiet, look again a refresh later.
                    state.hellos_skipped += 1
                    state.next_hello = now + HELLO_REFRESH
                    if state.session_pending:
                        # A rekey: the features hear of the new session as after a HELLO.
                        state.session_pending = False
                        for feature in self.features:
                            feature.session_started(peer, now)
        for feature in self.features:
            if (deadline := feature.next_deadline()) is not None and deadline <= now:
                feature.run_timers(now)

    def node_status(self) -> dict[str, Any]:
        """Node-wide facts from the features that have any (``node_status()`` is optional)."""
        status: dict[str, Any] = {}
        for feature in self.features:
            node_status = getattr(feature, "node_status", None)
            if node_status is not None:
                status.update(node_status())
        return status

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        state = self.peers.get(peer.public_key)
        status: dict[str, Any] = {"meshguard": peer.is_meshguard}
        sent = peer.sent
        if sent.idle_since is not None:
            # What the tunnel costs while idle (docs/keepalive.md): datagrams by kind since
            # the first one after the latest data packet; ``sent`` counts them all along.
            status["sent_while_idle"] = dict(sent.idle)
            status["sent_while_idle_since_at"] = sent.idle_since
            status["sent"] = dict(sent.total)
        if state is not None:
            status["observed_self"] = list(state.observed_self) if state.observed_self else None
            status["local_endpoints"] = [list(e) for e in state.local_endpoints]
            if state.mapped_endpoints:
                status["mapped_endpoints"] = [list(e) for e in state.mapped_endpoints]
            if state.hellos_skipped:
                status["hellos_skipped_idle"] = state.hellos_skipped
        for feature in self.features:
            status.update(feature.peer_status(peer))
        return status
