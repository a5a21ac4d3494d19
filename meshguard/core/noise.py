"""The Noise_IKpsk2 handshake of WireGuard as four pure functions.

Each function takes the previous state and returns the message bytes and the next state, so the
handshake can be tested byte for byte without a device, and the device alone decides what to keep
per peer (replay and flood checks, index tables, timers). Messages leave here with mac1 and mac2
zeroed; :mod:`meshguard.core.cookie` fills them.

Functions that read a peer's message return ``None`` for anything that does not authenticate and
never raise; functions that build messages from local state raise :class:`CryptoError` on misuse.
"""

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from meshguard.core.constants import (
    INITIATION_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_SIZE,
)
from meshguard.core.crypto import (
    C0,
    H0,
    KEY_SIZE,
    TIMESTAMP_SIZE,
    CryptoError,
    aead_decrypt,
    aead_encrypt,
    blake2s,
    dh,
    kdf1,
    kdf2,
    kdf3,
    public_key,
)

__all__ = [
    "ConsumedInitiation",
    "InitiatorHandshake",
    "SessionKeys",
    "consume_initiation",
    "consume_response",
    "create_initiation",
    "create_response",
]

_ZERO_MACS: Final = bytes(32)
_ZERO_KEY: Final = bytes(KEY_SIZE)
_U32_MAX: Final = (1 << 32) - 1
_INITIATION_BODY: Final = struct.Struct("<II32s48s28s")
_RESPONSE_BODY: Final = struct.Struct("<III32s16s")


@dataclass(slots=True)
class InitiatorHandshake:
    """What the initiator keeps between sending an initiation and consuming the response."""

    chaining_key: bytes
    hash: bytes
    ephemeral_private: bytes
    local_index: int


@dataclass(slots=True)
class ConsumedInitiation:
    """An authenticated initiation, before the device's per-peer replay and flood checks.

    ``timestamp`` is the decrypted 12-byte TAI64N the device compares with the peer's last one.
    """

    remote_static: bytes
    timestamp: bytes
    chaining_key: bytes
    hash: bytes
    remote_ephemeral: bytes
    remote_index: int


@dataclass(slots=True)
class SessionKeys:
    """The two transport keys of a session, from one side's point of view."""

    send_key: bytes
    receive_key: bytes


def _initial_hash(responder_static: bytes) -> bytes:
    # H0 ‖ Sr_pub is the same for every handshake toward one responder; cheap enough to redo.
    return blake2s(H0, responder_static)


def create_initiation(
    *,
    local_static_public: bytes,
    local_static_private: bytes,
    remote_static: bytes,
    precomputed_ss: bytes,
    ephemeral_private: bytes,
    sender_index: int,
    timestamp: bytes,
) -> tuple[bytes, InitiatorHandshake]:
    """Build the 148-byte initiation (macs zeroed) and the state to consume its response.

    ``precomputed_ss`` is ``DH(local_static_private, remote_static)``, computed once per peer;
    ``local_static_private`` is accepted for symmetry with the responder side but not needed.
    Raises :class:`CryptoError` if ``remote_static`` is a low-order point or inputs are malformed.
    """
    del local_static_private  # the static-static DH arrives precomputed
    if len(timestamp) != TIMESTAMP_SIZE:
        raise CryptoError(f"timestamp must be {TIMESTAMP_SIZE} bytes")
    if len(precomputed_ss) != KEY_SIZE or precomputed_ss == _ZERO_KEY:
        raise CryptoError("no usable static-static DH for this peer")
    if not 0 <= sender_index <= _U32_MAX:
        raise CryptoError("sender index must be a u32")
    ephemeral_public = public_key(ephemeral_private)

    h = _initial_hash(remote_static)
    c = kdf1(C0, ephemeral_public)
    h = blake2s(h, ephemeral_public)
    c, key = kdf2(c, dh(ephemeral_private, remote_static))
    encrypted_static = aead_encrypt(key, 0, local_static_public, h)
    h = blake2s(h, encrypted_static)
    c, key = kdf2(c, precomputed_ss)
    encrypted_timestamp = aead_encrypt(key, 0, timestamp, h)
    h = blake2s(h, encrypted_timestamp)

    message = (
        _INITIATION_BODY.pack(
            MESSAGE_INITIATION,
            sender_index,
            ephemeral_public,
            encrypted_static,
            encrypted_timestamp,
        )
        + _ZERO_MACS
    )
    return message, InitiatorHandshake(c, h, ephemeral_private, sender_index)


def consume_initiation(
    message: bytes,
    *,
    local_static_private: bytes,
    local_static_public: bytes,
    precomputed_ss_for: Callable[[bytes], bytes | None],
) -> ConsumedInitiation | None:
    """Authenticate an initiation addressed to us, or ``None`` to drop it.

    ``precomputed_ss_for(remote_static)`` returns ``DH(local_static_private, remote_static)`` for
    a known peer and ``None`` for an unknown one. mac1 is not checked here (the cookie layer does
    it first), nor are the timestamp replay and flood checks, which need per-peer state.
    """
    if len(message) != INITIATION_SIZE:
        return None
    kind, sender, ephemeral, encrypted_static, encrypted_timestamp = _INITIATION_BODY.unpack_from(
        message
    )
    if kind != MESSAGE_INITIATION:
        return None
    try:
        h = _initial_hash(local_static_public)
        c = kdf1(C0, ephemeral)
        h = blake2s(h, ephemeral)
        c, key = kdf2(c, dh(local_static_private, ephemeral))
        remote_static = aead_decrypt(key, 0, encrypted_static, h)
        h = blake2s(h, encrypted_static)
        ss = precomputed_ss_for(remote_static)
        if ss is None or len(ss) != KEY_SIZE or ss == _ZERO_KEY:
            return None
        c, key = kdf2(c, ss)
        timestamp = aead_decrypt(key, 0, encrypted_timestamp, h)
        h = blake2s(h, encrypted_timestamp)
    except CryptoError:
        return None
    return ConsumedInitiation(
        remote_static=remote_static,
        timestamp=timestamp,
        chaining_key=c,
        hash=h,
        remote_ephemeral=ephemeral,
        remote_index=sender,
    )


def _mix_response(
    c: bytes, h: bytes, ephemeral: bytes, ee: bytes, se: bytes, psk: bytes
) -> tuple[bytes, bytes, bytes]:
    """The steps both sides share for the response: returns ``(C, H, κ)`` before ``{}``."""
    c = kdf1(c, ephemeral)
    h = blake2s(h, ephemeral)
    c = kdf1(c, ee)
    c = kdf1(c, se)
    c, tau, key = kdf3(c, psk)
    h = blake2s(h, tau)
    return c, h, key


def create_response(
    consumed: ConsumedInitiation,
    *,
    psk: bytes,
    ephemeral_private: bytes,
    sender_index: int,
) -> tuple[bytes, SessionKeys]:
    """Build the 92-byte response (macs zeroed) and the responder's transport keys.

    ``psk`` is the peer's preshared key, 32 zero bytes when none is set. Raises
    :class:`CryptoError` only on local misuse: a ``consumed`` from :func:`consume_initiation`
    cannot give an all-zero DH, since its ephemeral and static already passed one.
    """
    if len(psk) != KEY_SIZE:
        raise CryptoError(f"preshared key must be {KEY_SIZE} bytes")
    if not 0 <= sender_index <= _U32_MAX:
        raise CryptoError("sender index must be a u32")
    ephemeral_public = public_key(ephemeral_private)
    c, h, key = _mix_response(
        consumed.chaining_key,
        consumed.hash,
        ephemeral_public,
        dh(ephemeral_private, consumed.remote_ephemeral),
        dh(ephemeral_private, consumed.remote_static),
        psk,
    )
    encrypted_nothing = aead_encrypt(key, 0, b"", h)
    initiator_to_responder, responder_to_initiator = kdf2(c, b"")
    message = (
        _RESPONSE_BODY.pack(
            MESSAGE_RESPONSE,
            sender_index,
            consumed.remote_index,
            ephemeral_public,
            encrypted_nothing,
        )
        + _ZERO_MACS
    )
    return message, SessionKeys(send_key=responder_to_initiator, receive_key=initiator_to_responder)


def consume_response(
    message: bytes,
    handshake: InitiatorHandshake,
    *,
    local_static_private: bytes,
    psk: bytes,
) -> tuple[int, SessionKeys] | None:
    """Authenticate the response to ``handshake``: ``(remote_index, keys)`` or ``None`` to drop.

    The receiver index must be the handshake's local index; mac1 is the cookie layer's job.
    """
    if len(message) != RESPONSE_SIZE:
        return None
    kind, sender, receiver, ephemeral, encrypted_nothing = _RESPONSE_BODY.unpack_from(message)
    if kind != MESSAGE_RESPONSE or receiver != handshake.local_index:
        return None
    try:
        c, h, key = _mix_response(
            handshake.chaining_key,
            handshake.hash,
            ephemeral,
            dh(handshake.ephemeral_private, ephemeral),
            dh(local_static_private, ephemeral),
            psk,
        )
        aead_decrypt(key, 0, encrypted_nothing, h)
    except CryptoError:
        return None
    initiator_to_responder, responder_to_initiator = kdf2(c, b"")
    return sender, SessionKeys(send_key=initiator_to_responder, receive_key=responder_to_initiator)
