"""The relay server: members authenticate, then exchange opaque WireGuard datagrams.

One :class:`RelayHub` per node holds the authenticated connections. A client frame ``SEND(to,
datagram)`` becomes ``RECV(from, datagram)`` on the target's connection at once or is dropped:
nothing is queued beyond the transport's own buffer (see :mod:`.connection`), except a bounded
slack for senders within their fair share of a paused receiver (:mod:`.fairness`). Each client has a
token bucket of bytes (every frame also costs :data:`FRAME_COST`, so tiny frames are no way
around it); over it, frames are dropped and counted. Frames that break the protocol close that
client's connection only. Datagrams addressed to the relay node itself go to its own device.

The hub is also this node's own "relay link" for the path logic: the members connected here are
reachable through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from meshguard.adapters.relay.connection import FramedConnection, channel_binding
from meshguard.core.keytext import short_key
from meshguard.relay import auth, frames
from meshguard.relay.fairness import FairShare

log = Logger()

#: A client has this long to authenticate.
AUTH_TIMEOUT = 10.0
#: Per-client rate: bytes per second and burst; each frame also costs FRAME_COST bytes.
RATE = 16 * 1024 * 1024
BURST = 2 * 1024 * 1024
FRAME_COST = 64
#: Most members announced in one PRESENT frame.
MAX_PRESENT = 2000


class RelayHub:
    """The authenticated members connected here, and forwarding between them."""

    name = "this node"

    def __init__(
        self,
        clock: Any,
        *,
        private_key: Callable[[], bytes | None],
        public_key: Callable[[], bytes | None],
        is_member: Callable[[bytes], bool],
        deliver_local: Callable[[bytes, bytes], None] = lambda source, datagram: None,
        random: Callable[[int], bytes] = os.urandom,
        rate: float = RATE,
        burst: float = BURST,
        max_payload: int = frames.MAX_PAYLOAD,
    ) -> None:
        self.clock = clock
        self.private_key = private_key
        self.public_key = public_key
        self.is_member = is_member
        self.deliver_local = deliver_local
        self.random = random
        self.rate = rate
        self.burst = burst
        self.max_payload = max_payload
        self.clients: dict[bytes, RelayServerProtocol] = {}
        self.forwarded = 0
        self.forwarded_bytes = 0
        self.rate_limited = 0
        self.unreachable = 0
        self.refused = 0
        self.backpressure_drops = 0
        #: Frames written to a paused receiver because their sender was within its fair share.
        self.fair_admitted = 0

    # ------------------------------------------------------------------ RelayLink

    def present(self) -> Collection[bytes]:
        return self.clients.keys()

    def send(self, destination: bytes, datagram: bytes) -> bool:
        """From this node's own device to a connected member."""
        own = self.public_key()
        target = self.clients.get(destination)
        if target is None or own is None:
            self.unreachable += 1
            return False
        return self._write(target, own, datagram, self.clock.seconds())

    def _write(
        self, target: RelayServerProtocol, source: bytes, datagram: bytes, now: float
    ) -> bool:
        """``RECV(source, datagram)`` to ``target``, or a drop: a paused receiver still takes
        frames from senders within their fair share of it, up to a bounded slack (fairness)."""
        fair = target.fair
        size = len(datagram) + frames.KEY_SIZE
        fair.offered(source, size, now)
        if target.paused:
            if target.closed or not fair.admit_paused(source, size):
                target.frames_dropped += 1
                self.backpressure_drops += 1
                return False
            self.fair_admitted += 1
            target.write_frame(frames.RECV, source + datagram, control=True)
            return True
        if not target.write_frame(frames.RECV, source + datagram):
            self.backpressure_drops += 1
            return False
        return True

    # ------------------------------------------------------------------ membership

    def register(self, client: RelayServerProtocol) -> None:
        key = client.member
        assert key is not None
        old = self.clients.get(key)
        if old is not None and old is not client:
            old.fail(frames.E_PROTOCOL, "replaced by a newer connection of the same member")
        self.clients[key] = client
        own = self.public_key()
        others = [k for k in self.clients if k != key]
        if own is not None:
            others.insert(0, own)
        client.write_frame(frames.PRESENT, b"".join(others[:MAX_PRESENT]), control=True)
        for other in self.clients.values():
            if other is not client:
                other.write_frame(frames.JOIN, key, control=True)
        log.info("relay: member {key} connected", key=short_key(key))

    def unregister(self, client: RelayServerProtocol) -> None:
        key = client.member
        if key is None or self.clients.get(key) is not client:
            return
        del self.clients[key]
        for other in self.clients.values():
            other.write_frame(frames.LEAVE, key, control=True)
        log.info("relay: member {key} left", key=short_key(key))

    def forward(
        self, source: RelayServerProtocol, destination: bytes, datagram: bytes, now: float
    ) -> None:
        assert source.member is not None
        if not self.is_member(source.member):
            # Removed from the mesh (a revocation) since it connected: nothing more is relayed.
            self.refused += 1
            source.fail(frames.E_NOT_MEMBER, "no longer a member of this relay")
            return
        if destination == self.public_key():
            self.deliver_local(source.member, datagram)
            return
        target = self.clients.get(destination)
        if target is None or target is source:
            self.unreachable += 1
            return
        if self._write(target, source.member, datagram, now):
            self.forwarded += 1
            self.forwarded_bytes += len(datagram)

    def status(self) -> dict[str, Any]:
        return {
            "members_connected": len(self.clients),
            "forwarded": self.forwarded,
            "forwarded_bytes": self.forwarded_bytes,
            "rate_limited": self.rate_limited,
            "unreachable": self.unreachable,
            "refused": self.refused,
            "backpressure_drops": self.backpressure_drops,
            "fair_admitted": self.fair_admitted,
        }


class RelayServerProtocol(FramedConnection):
    """One client connection: challenge, proof, then SEND frames."""

    def __init__(self, hub: RelayHub) -> None:
        self.hub = hub
        self.clock = hub.clock
        self.max_payload = hub.max_payload
        super().__init__()
        self.member: bytes | None = None
        self.challenge: auth.Challenge | None = None
        self._auth_timer: IDelayedCall | None = None
        self.tokens = hub.burst
        self.updated = 0.0
        #: Who sends to this member, and how much (see :mod:`.fairness`).
        self.fair = FairShare()

    def connectionMade(self) -> None:
        super().connectionMade()
        private = self.hub.private_key()
        public = self.hub.public_key()
        if private is None or public is None:
            self.fail(frames.E_PROTOCOL, "relay has no key yet")
            return
        self.challenge = auth.Challenge(auth.VERSION, public, self.hub.random(auth.CHALLENGE_SIZE))
        self.write_frame(frames.CHALLENGE, self.challenge.encode(), control=True)
        self.updated = self.clock.seconds()
        self._auth_timer = self.clock.callLater(AUTH_TIMEOUT, self._auth_timeout)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self.fair.resumed()

    def _auth_timeout(self) -> None:
        self._auth_timer = None
        if self.member is None:
            self.hub.refused += 1
            self.fail(frames.E_TIMEOUT, "no member proof in time")

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        self.hub.unregister(self)

    def frame_received(self, kind: int, payload: bytes) -> None:
        if self.member is None:
            if kind != frames.AUTH:
                self.hub.refused += 1
                self.fail(frames.E_PROTOCOL, "authenticate first")
                return
            self._authenticate(payload)
            return
        if kind != frames.SEND:
            self.fail(frames.E_PROTOCOL, f"unexpected frame {kind}")
            return
        if len(payload) <= frames.KEY_SIZE:
            self.fail(frames.E_PROTOCOL, "SEND without a datagram")
            return
        now = self.clock.seconds()
        self.tokens = min(self.hub.burst, self.tokens + (now - self.updated) * self.hub.rate)
        self.updated = now
        cost = len(payload) + FRAME_COST
        if self.tokens < cost:
            self.hub.rate_limited += 1
            return
        self.tokens -= cost
        self.hub.forward(self, payload[: frames.KEY_SIZE], payload[frames.KEY_SIZE :], now)

    def _authenticate(self, payload: bytes) -> None:
        answer = auth.Answer.decode(payload)
        private = self.hub.private_key()
        if answer is None or self.challenge is None or private is None:
            self.hub.refused += 1
            self.fail(frames.E_PROTOCOL, "malformed AUTH")
            return
        if not self.hub.is_member(answer.client_key):
            self.hub.refused += 1
            log.info("relay: refused {key}: not a member", key=short_key(answer.client_key))
            self.fail(frames.E_NOT_MEMBER, "not a member of this relay")
            return
        proof = auth.verify(self.challenge, private, answer, channel_binding(self.transport))
        if proof is None:
            self.hub.refused += 1
            log.info("relay: refused {key}: wrong proof", key=short_key(answer.client_key))
            self.fail(frames.E_BAD_PROOF, "proof does not match the key")
            return
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None
        self.member = answer.client_key
        self.write_frame(frames.AUTH_OK, proof, control=True)
        self.hub.register(self)


class RelayServerFactory(Factory):
    def __init__(self, hub: RelayHub) -> None:
        self.hub = hub

    def buildProtocol(self, addr: Any) -> RelayServerProtocol:
        return RelayServerProtocol(self.hub)
