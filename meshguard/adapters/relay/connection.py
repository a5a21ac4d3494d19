"""What both ends of a relay connection share: framing, backpressure, liveness, TCP keepalive.

Writes respect the transport's backpressure: the connection registers as a streaming producer,
and while the transport says "pause" (its buffer is over its high-water mark) datagram frames
are dropped, not queued, as UDP would drop them. So a slow or dead peer costs at most one
transport buffer. An application PING every :data:`PING_INTERVAL` seconds of silence and a
deadline of :data:`DEAD_AFTER` seconds without any byte received find dead connections; TCP
keepalive and ``TCP_USER_TIMEOUT`` do the same at the kernel level.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meshguard.relay import frames

log = Logger()

PING_INTERVAL = 10.0
DEAD_AFTER = 30.0
#: TCP keepalive: first probe after this idle time, then every interval, this many times.
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3
#: Unacknowledged data older than this kills the connection (milliseconds).
USER_TIMEOUT_MS = 30000


def tune_tcp(transport: Any) -> None:
    """TCP keepalive and a user timeout on the socket under ``transport`` (TLS or plain)."""
    seen = 0
    while transport is not None and seen < 4:
        seen += 1
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            return
        transport = getattr(transport, "transport", None)


def channel_binding(transport: Any) -> bytes:
    """The TLS exporter value of this connection, or b"" when it is not TLS (tests)."""
    from meshguard.relay.auth import EXPORTER_LABEL, EXPORTER_SIZE

    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    export = getattr(connection, "export_keying_material", None)
    if export is None:
        return b""
    try:
        return bytes(export(EXPORTER_LABEL, EXPORTER_SIZE))
    except Exception:
        return b""


@implementer(IPushProducer)
class FramedConnection(Protocol):
    """Frames in and out, with backpressure and liveness; subclasses handle the frames."""

    clock: Any
    max_payload: int = frames.MAX_PAYLOAD

    def __init__(self) -> None:
        self.decoder = frames.FrameDecoder(self.max_payload)
        self.paused = False
        self.closed = False
        self.last_received = 0.0
        self._liveness: IDelayedCall | None = None
        self.frames_dropped = 0

    # ------------------------------------------------------------------ lifecycle

    def connectionMade(self) -> None:
        tune_tcp(self.transport)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self, True)
        self.last_received = self.clock.seconds()
        self._liveness = self.clock.callLater(PING_INTERVAL, self._check_liveness)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.closed = True
        if self._liveness is not None and self._liveness.active():
            self._liveness.cancel()
        self._liveness = None

    def _check_liveness(self) -> None:
        self._liveness = None
        if self.closed:
            return
        now = self.clock.seconds()
        silent = now - self.last_received
        if silent >= DEAD_AFTER:
            log.info("relay connection silent for {s:.0f} s: closing", s=silent)
            self.abort()
            return
        if silent >= PING_INTERVAL:
            self.write_frame(frames.PING, b"\0" * 8, control=True)
        wait = min(PING_INTERVAL, max(0.5, DEAD_AFTER - silent))
        self._liveness = self.clock.callLater(wait, self._check_liveness)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        transport: Any = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                transport.loseConnection()

    def fail(self, code: int, text: str) -> None:
        """Tell the other side why, then close."""
        if self.closed:
            return
        self.write_frame(
            frames.ERROR, bytes((code,)) + text.encode("ascii", "replace")[:200], control=True
        )
        self.closed = True
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    # ------------------------------------------------------------------ IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    # ------------------------------------------------------------------ frames

    def write_frame(self, kind: int, payload: bytes, *, control: bool = False) -> bool:
        """Write a frame; datagram frames are dropped while the transport is paused."""
        if self.closed and not control:
            return False
        if self.paused and not control:
            self.frames_dropped += 1
            return False
        assert self.transport is not None
        self.transport.write(frames.encode(kind, payload))
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.clock.seconds()
        try:
            received = self.decoder.feed(data)
        except frames.FrameError as e:
            self.fail(frames.E_PROTOCOL, str(e))
            return
        for kind, payload in received:
            if self.closed:
                return
            try:
                if kind == frames.PING:
                    self.write_frame(frames.PONG, payload[:8], control=True)
                elif kind != frames.PONG:
                    self.frame_received(kind, payload)
            except Exception:
                # Nothing from the network raises out of the protocol.
                log.failure("relay frame handling failed")
                self.abort()
                return

    def frame_received(self, kind: int, payload: bytes) -> None:
        raise NotImplementedError
