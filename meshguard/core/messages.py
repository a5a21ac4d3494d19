"""The four WireGuard wire messages: layouts, encoders and one total parser.

A datagram from the network is untrusted, so :func:`parse_message` accepts exactly the sizes and
headers that wireguard-go and the kernel accept and returns ``None`` for anything else, never
raising. Constructing a message with wrong field lengths is local misuse and raises ``ValueError``.
"""

import struct
from dataclasses import dataclass
from typing import Final

from meshguard.core.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)

__all__ = [
    "COOKIE_REPLY_ENCRYPTED_OFFSET",
    "COOKIE_REPLY_NONCE_OFFSET",
    "INITIATION_EPHEMERAL_OFFSET",
    "INITIATION_MAC1_OFFSET",
    "INITIATION_MAC2_OFFSET",
    "INITIATION_STATIC_OFFSET",
    "INITIATION_TIMESTAMP_OFFSET",
    "MAC_FIELD_SIZE",
    "RESPONSE_EMPTY_OFFSET",
    "RESPONSE_EPHEMERAL_OFFSET",
    "RESPONSE_MAC1_OFFSET",
    "RESPONSE_MAC2_OFFSET",
    "TRANSPORT_HEADER",
    "CookieReply",
    "Initiation",
    "Message",
    "Response",
    "Transport",
    "mac_offsets",
    "parse_message",
]

MAC_FIELD_SIZE: Final = 16

INITIATION_EPHEMERAL_OFFSET: Final = 8
INITIATION_STATIC_OFFSET: Final = 40
INITIATION_TIMESTAMP_OFFSET: Final = 88
INITIATION_MAC1_OFFSET: Final = 116
INITIATION_MAC2_OFFSET: Final = 132

RESPONSE_EPHEMERAL_OFFSET: Final = 12
RESPONSE_EMPTY_OFFSET: Final = 44
RESPONSE_MAC1_OFFSET: Final = 60
RESPONSE_MAC2_OFFSET: Final = 76

COOKIE_REPLY_NONCE_OFFSET: Final = 8
COOKIE_REPLY_ENCRYPTED_OFFSET: Final = 32

_EPHEMERAL_SIZE: Final = 32
_ENCRYPTED_STATIC_SIZE: Final = 48
_ENCRYPTED_TIMESTAMP_SIZE: Final = 28
_ENCRYPTED_NOTHING_SIZE: Final = 16
_COOKIE_NONCE_SIZE: Final = 24
_ENCRYPTED_COOKIE_SIZE: Final = 32
_TAG_SIZE: Final = 16
_U64_MAX: Final = (1 << 64) - 1
_U32_MAX: Final = (1 << 32) - 1

_INITIATION: Final = struct.Struct("<II32s48s28s16s16s")
_RESPONSE: Final = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY: Final = struct.Struct("<II24s32s")
#: Type, receiver index and counter of a transport message; the data path may use it directly
#: (``unpack_from``) to avoid building a :class:`Transport` per packet.
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")
_TYPE: Final = struct.Struct("<I")

assert _INITIATION.size == INITIATION_SIZE
assert _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE
assert TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE


def _check_index(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must be a u32, not {value}")


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")


@dataclass(frozen=True, slots=True)
class Initiation:
    """Handshake initiation (type 1, 148 bytes): the initiator's ``e, es, s, ss, {t}``."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def __post_init__(self) -> None:
        _check_index("sender", self.sender)
        _check_size("ephemeral", self.ephemeral, _EPHEMERAL_SIZE)
        _check_size("encrypted_static", self.encrypted_static, _ENCRYPTED_STATIC_SIZE)
        _check_size("encrypted_timestamp", self.encrypted_timestamp, _ENCRYPTED_TIMESTAMP_SIZE)
        _check_size("mac1", self.mac1, MAC_FIELD_SIZE)
        _check_size("mac2", self.mac2, MAC_FIELD_SIZE)

    def to_bytes(self) -> bytes:
        """The message as sent on the wire."""
        return _INITIATION.pack(
            MESSAGE_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    """Handshake response (type 2, 92 bytes): the responder's ``e, ee, se, psk, {}``."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def __post_init__(self) -> None:
        _check_index("sender", self.sender)
        _check_index("receiver", self.receiver)
        _check_size("ephemeral", self.ephemeral, _EPHEMERAL_SIZE)
        _check_size("encrypted_nothing", self.encrypted_nothing, _ENCRYPTED_NOTHING_SIZE)
        _check_size("mac1", self.mac1, MAC_FIELD_SIZE)
        _check_size("mac2", self.mac2, MAC_FIELD_SIZE)

    def to_bytes(self) -> bytes:
        """The message as sent on the wire."""
        return _RESPONSE.pack(
            MESSAGE_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Cookie reply (type 3, 64 bytes): an under-load responder's answer instead of a response."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def __post_init__(self) -> None:
        _check_index("receiver", self.receiver)
        _check_size("nonce", self.nonce, _COOKIE_NONCE_SIZE)
        _check_size("encrypted_cookie", self.encrypted_cookie, _ENCRYPTED_COOKIE_SIZE)

    def to_bytes(self) -> bytes:
        """The message as sent on the wire."""
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )


@dataclass(frozen=True, slots=True)
class Transport:
    """Transport data (type 4): header plus the sealed packet; ``encrypted`` includes the tag."""

    receiver: int
    counter: int
    encrypted: bytes

    def __post_init__(self) -> None:
        _check_index("receiver", self.receiver)
        if not 0 <= self.counter <= _U64_MAX:
            raise ValueError(f"counter must be a u64, not {self.counter}")
        if len(self.encrypted) < _TAG_SIZE:
            raise ValueError("encrypted must hold at least the 16-byte tag")

    def to_bytes(self) -> bytes:
        """The message as sent on the wire."""
        return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.receiver, self.counter) + bytes(
            self.encrypted
        )


Message = Initiation | Response | CookieReply | Transport


def parse_message(data: bytes) -> Message | None:
    """Decode one datagram, or ``None`` if wireguard-go and the kernel would drop it.

    The first four bytes are read as a little-endian u32 type, so non-zero reserved bytes make an
    unknown type. Types 1-3 must have exactly their size; type 4 needs at least header and tag.
    """
    size = len(data)
    if size < _TYPE.size:
        return None
    (kind,) = _TYPE.unpack_from(data)
    if kind == MESSAGE_TRANSPORT:
        if size < TRANSPORT_MIN_SIZE:
            return None
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        return Transport(receiver, counter, bytes(data[TRANSPORT_HEADER_SIZE:]))
    if kind == MESSAGE_INITIATION:
        if size != INITIATION_SIZE:
            return None
        _, sender, ephemeral, static, timestamp, mac1, mac2 = _INITIATION.unpack(data)
        return Initiation(sender, ephemeral, static, timestamp, mac1, mac2)
    if kind == MESSAGE_RESPONSE:
        if size != RESPONSE_SIZE:
            return None
        _, sender, receiver, ephemeral, empty, mac1, mac2 = _RESPONSE.unpack(data)
        return Response(sender, receiver, ephemeral, empty, mac1, mac2)
    if kind == MESSAGE_COOKIE_REPLY:
        if size != COOKIE_REPLY_SIZE:
            return None
        _, receiver, nonce, encrypted = _COOKIE_REPLY.unpack(data)
        return CookieReply(receiver, nonce, encrypted)
    return None


def mac_offsets(message: bytes) -> tuple[int, int] | None:
    """Where mac1 and mac2 sit in a handshake message, or ``None`` if it is not type 1 or 2.

    The cookie layer uses this to stay agnostic of which handshake message it protects.
    """
    size = len(message)
    if size == INITIATION_SIZE and message[:4] == b"\x01\x00\x00\x00":
        return INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET
    if size == RESPONSE_SIZE and message[:4] == b"\x02\x00\x00\x00":
        return RESPONSE_MAC1_OFFSET, RESPONSE_MAC2_OFFSET
    return None
