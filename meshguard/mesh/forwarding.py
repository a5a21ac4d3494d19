"""Relaying: a member forwards other members' WireGuard datagrams, which it cannot read.

Sender side: the device hands a datagram for a peer whose ``relay`` is set to
:meth:`Relaying.send`, which wraps it in RELAY_FORWARD ``{to (32 bytes), datagram}`` inside our
session with the relay. Relay side: RELAY_FORWARD from one peer becomes RELAY_DELIVER ``{from (32
bytes), datagram}`` inside the session with the target, at once or not at all: nothing is queued,
and each sending peer has a token bucket of bytes (:data:`RATE` per second, :data:`BURST` at
most; ``ForwardingRate`` in the config sets the rate), so no member can make the relay buffer
or spend without bound. ``Forwarding = no``
refuses. Receiver side: RELAY_DELIVER from a peer we configured goes to the device as a datagram
received "via" that peer; it authenticates end to end, or is dropped, like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshguard.core.keytext import key_text
from meshguard.core.peer import PATH_MEMBER, Peer
from meshguard.mesh import kinds
from meshguard.mesh.agent import MeshAgent

KEY_SIZE = 32
#: Bytes per second a relay forwards for one sending peer unless ``ForwardingRate`` says
#: otherwise: about what one busy home link carries, so a relayed pair is not throttled far below
#: its direct speed, while one member still cannot take a relay's whole CPU for itself.
RATE = 64 * 1024 * 1024
#: The bucket holds this many seconds of the rate, at least :data:`MIN_BURST` bytes.
BURST_SECONDS = 0.125
MIN_BURST = 512 * 1024
BURST = max(MIN_BURST, int(RATE * BURST_SECONDS))
#: Largest datagram carried: a WireGuard transport message of a 65535-byte MTU never appears in
#: practice; this bounds the control body well inside the 16-bit control length.
MAX_DATAGRAM = 65535 - KEY_SIZE - 16


@dataclass
class _Bucket:
    tokens: float
    updated: float


def parse_relay_body(body: bytes) -> tuple[bytes, bytes] | None:
    """``(key, datagram)`` of a RELAY_FORWARD or RELAY_DELIVER body, or None."""
    if len(body) <= KEY_SIZE or len(body) - KEY_SIZE > MAX_DATAGRAM:
        return None
    return body[:KEY_SIZE], body[KEY_SIZE:]


class Relaying:
    """RELAY_FORWARD and RELAY_DELIVER, on all three sides."""

    kinds: tuple[int, ...] = (kinds.RELAY_FORWARD, kinds.RELAY_DELIVER)

    def __init__(
        self,
        agent: MeshAgent,
        *,
        forwarding: bool = True,
        trusted: Callable[[Peer], bool] = lambda peer: True,
        rate: float = RATE,
        burst: float = BURST,
    ) -> None:
        self.agent = agent
        self.device = agent.device
        self.forwarding = forwarding
        #: Whether we accept datagrams delivered by this peer (our configured peers).
        self.trusted = trusted
        self.rate = rate
        self.burst = burst
        self._buckets: dict[bytes, _Bucket] = {}
        self.forwarded_bytes = 0
        self.forwarded_packets = 0
        self.refused = 0
        self.rate_limited = 0
        self.dropped = 0
        self.sent_via_relay = 0
        self.received_via_relay = 0
        #: Sessions with a relay (or, relaying, with a target) renewed because one lapsed.
        self.renewed = 0
        #: Bytes forwarded per (from, to) pair, for status and tests.
        self.pairs: dict[tuple[bytes, bytes], int] = {}
        self.device.set_transport(PATH_MEMBER, self)

    # ------------------------------------------------------------------ sender side

    def set_rate(self, rate: float | None) -> None:
        """Apply ``ForwardingRate`` (bytes per second per sender; None: unlimited)."""
        if rate is None:
            self.rate = self.burst = float("inf")
        else:
            self.rate = rate
            self.burst = max(MIN_BURST, rate * BURST_SECONDS)
        self._buckets.clear()

    def send(self, peer: Peer, datagram: bytes, now: float) -> bool:
        """The device's transport for peers on a member path: wrap ``datagram`` in a
        RELAY_FORWARD to the member ``peer.relay``."""
        relay = peer.relay
        if relay is None or relay.removed:
            self.dropped += 1
            return False
        if self.device.send_control(relay, kinds.RELAY_FORWARD, peer.public_key + datagram, now):
            self.sent_via_relay += 1
            return True
        self.dropped += 1
        self._renew(relay, now)
        return False

    def _renew(self, peer: Peer, now: float) -> None:
        """A session we forward through lapsed (control messages do not rekey: an idle
        tunnel's lasts REJECT_AFTER_TIME): start a new one at once rather than drop what
        follows until the peer's next persistent keepalive, up to 25 s later. A handshake
        already under way is left to the device's retransmit timer."""
        keypair = peer.keypairs.current
        if not peer.is_meshguard or (keypair is not None and keypair.can_send(now)):
            return
        if self.device.renew_session(peer, now):
            self.renewed += 1

    # ------------------------------------------------------------------ MeshFeature

    def control_received(self, peer: Peer, kind: int, body: bytes, now: float) -> None:
        parsed = parse_relay_body(body)
        if parsed is None:
            self.dropped += 1
            return
        key, datagram = parsed
        if kind == kinds.RELAY_FORWARD:
            self._forward(peer, key, datagram, now)
        elif not self.trusted(peer) or key == peer.public_key:
            self.dropped += 1
        else:
            self.received_via_relay += 1
            self.device.relayed_datagram_received(datagram, peer, now)

    def _forward(self, source: Peer, key: bytes, datagram: bytes, now: float) -> None:
        if not self.forwarding:
            self.refused += 1
            return
        target = self.device.peers.get(key)
        if target is None or target is source or not target.is_meshguard:
            self.dropped += 1
            return
        bucket = self._buckets.get(source.public_key)
        if bucket is None:
            bucket = self._buckets[source.public_key] = _Bucket(self.burst, now)
        elapsed = now - bucket.updated
        if elapsed > 0:
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
        bucket.updated = now
        if bucket.tokens < len(datagram):
            self.rate_limited += 1
            return
        bucket.tokens -= len(datagram)
        if self.device.send_control(target, kinds.RELAY_DELIVER, source.public_key + datagram, now):
            self.forwarded_packets += 1
            self.forwarded_bytes += len(datagram)
            pair = (source.public_key, key)
            self.pairs[pair] = self.pairs.get(pair, 0) + len(datagram)
        else:
            self.dropped += 1
            self._renew(target, now)

    def session_started(self, peer: Peer, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def run_timers(self, now: float) -> None:
        pass

    def peer_status(self, peer: Peer) -> dict[str, Any]:
        return {}

    def node_status(self) -> dict[str, Any]:
        return {
            "relay_forwarded_bytes": self.forwarded_bytes,
            "relay_forwarded_packets": self.forwarded_packets,
            "relay_refused": self.refused,
            "relay_rate_limited": self.rate_limited,
            "relay_forwarding_rate": None if self.rate == float("inf") else self.rate,
            "relay_forwarded_by_pair": {
                f"{key_text(source)}>{key_text(target)}": count
                for (source, target), count in sorted(self.pairs.items())
            },
        }
