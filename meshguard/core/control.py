"""Framing of mesh control messages, which ride inside WireGuard transport messages.

A control message is a transport plaintext whose first nibble is 15, so it can never be taken for
an IPv4 or IPv6 packet, and it is authenticated by the session like any data. Stock WireGuard
peers never receive one: a node sends control messages only to peers that showed they are
meshguard nodes, either by the mark in their handshake timestamp or by a control message of
their own.

The mark: WireGuard rounds the nanoseconds of the TAI64N timestamp in an initiation down to a
multiple of 2**24, so the low 24 bits are always zero on the wire. meshguard sets them to
``MESH_MARK``. The peer only compares timestamps for order, which the mark does not change, and
the timestamp is encrypted and authenticated inside the handshake.

Layout: ``0xF0 | version (1) | kind (1) | length (2, big-endian) | body``; the transport layer
pads the plaintext to 16 bytes, and ``length`` lets the receiver drop that padding.
"""

from __future__ import annotations

import struct
from typing import Final

CONTROL_MARKER: Final = 0xF0
CONTROL_VERSION: Final = 1
HEADER: Final = struct.Struct("!BBBH")
HEADER_SIZE: Final = HEADER.size
MAX_BODY: Final = 65535
MESH_MARK: Final = 0x6D6701
_LOW24: Final = (1 << 24) - 1


def mark_timestamp(timestamp: bytes) -> bytes:
    """Set meshguard's mark in the low 24 bits of a TAI64N timestamp's nanoseconds."""
    nanoseconds = int.from_bytes(timestamp[8:12], "big")
    nanoseconds = (nanoseconds & ~_LOW24) | MESH_MARK
    return timestamp[:8] + nanoseconds.to_bytes(4, "big")


def is_marked(timestamp: bytes) -> bool:
    """Whether a decrypted initiation timestamp carries meshguard's mark."""
    return len(timestamp) == 12 and int.from_bytes(timestamp[8:12], "big") & _LOW24 == MESH_MARK


def encode(kind: int, body: bytes) -> bytes:
    """A control plaintext of ``kind`` carrying ``body``."""
    if not 0 <= kind <= 255 or len(body) > MAX_BODY:
        raise ValueError("control message kind or body out of range")
    return HEADER.pack(CONTROL_MARKER, CONTROL_VERSION, kind, len(body)) + body


def decode(plaintext: bytes) -> tuple[int, bytes] | None:
    """``(kind, body)`` of a control plaintext, or None if it is not one this version reads."""
    if len(plaintext) < HEADER_SIZE:
        return None
    marker, version, kind, length = HEADER.unpack_from(plaintext)
    if marker != CONTROL_MARKER or version != CONTROL_VERSION:
        return None
    if HEADER_SIZE + length > len(plaintext):
        return None
    return kind, plaintext[HEADER_SIZE : HEADER_SIZE + length]
