"""Framing over the relay's TLS stream: datagram boundaries kept, sizes bounded.

A frame is a 4-byte header, one type byte and a 24-bit big-endian payload length, then the
payload. The decoder refuses a frame longer than its ``max_payload`` as soon as the header says
so, before buffering it, so a peer cannot make us hold more than one frame's worth of bytes.
"""

from __future__ import annotations

from typing import Final

HEADER_SIZE: Final = 4
KEY_SIZE: Final = 32

#: Relay -> client: protocol version, the relay's static public key, a fresh challenge.
CHALLENGE: Final = 1
#: Client -> relay: its static public key, a nonce and the proof (see :mod:`.auth`).
AUTH: Final = 2
#: Relay -> client: the relay's own proof; the client is now a member here.
AUTH_OK: Final = 3
#: Either way: a one-byte reason code and a short ASCII text, then the connection closes.
ERROR: Final = 4
#: Client -> relay: destination public key + datagram.
SEND: Final = 5
#: Relay -> client: source public key + datagram.
RECV: Final = 6
#: Either way: an application-level ping and its answer (same 8-byte token).
PING: Final = 7
PONG: Final = 8
#: Relay -> client: the members present now (keys), one joining, one leaving.
PRESENT: Final = 9
JOIN: Final = 10
LEAVE: Final = 11

KNOWN: Final = frozenset(range(CHALLENGE, LEAVE + 1))

#: Largest payload by default: a destination key plus the largest UDP datagram.
MAX_PAYLOAD: Final = KEY_SIZE + 65535
#: The 24-bit length field's own limit.
LIMIT: Final = (1 << 24) - 1

# ERROR reason codes.
E_PROTOCOL: Final = 1
E_NOT_MEMBER: Final = 2
E_BAD_PROOF: Final = 3
E_TIMEOUT: Final = 4
E_LIMIT: Final = 5


class FrameError(Exception):
    """The stream is not valid framing: the connection must be closed."""


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame. Local misuse (a payload too long for the header) raises ValueError."""
    length = len(payload)
    if not 0 < kind < 256 or length > LIMIT:
        raise ValueError("frame type or length out of range")
    return bytes((kind, length >> 16, (length >> 8) & 0xFF, length & 0xFF)) + payload


class FrameDecoder:
    """Bytes from the stream in, whole frames out."""

    __slots__ = ("_buffer", "max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = min(max_payload, LIMIT)
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``; raises :class:`FrameError` on a bad header."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            kind = buffer[offset]
            length = (buffer[offset + 1] << 16) | (buffer[offset + 2] << 8) | buffer[offset + 3]
            if kind not in KNOWN:
                raise FrameError(f"unknown frame type {kind}")
            if length > self.max_payload:
                raise FrameError(f"frame of {length} bytes is over the limit")
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            frames.append((kind, bytes(buffer[start : start + length])))
            offset = start + length
        if offset:
            del buffer[:offset]
        return frames
