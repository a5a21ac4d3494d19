"""Curve25519 keys in the encodings WireGuard tools use: 44-character base64 and 64-digit hex.

The decoders are strict in the same way as wireguard-tools' `encoding.c`, so a key that `wg`
rejects is rejected here too, and their error messages never contain the input: the input may be
a private key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from typing import Final

from nacl.bindings import crypto_scalarmult_base

KEY_LEN: Final = 32
KEY_LEN_BASE64: Final = 44
KEY_LEN_HEX: Final = 64

# 42 free characters, then one whose low two bits are zero (it carries the last 4 bits of the
# key), then the single pad character. This is exactly the canonical encoding of 32 bytes.
_BASE64_KEY: Final = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
_HEX_KEY: Final = re.compile(r"[0-9A-Fa-f]{64}")

BASE64_KEY_HINT: Final = "44 characters ending in '='"


def key_from_base64(text: str) -> bytes:
    """Decode a base64 key; raise ValueError (without the input in the message) if it is not one."""
    if not isinstance(text, str) or _BASE64_KEY.fullmatch(text) is None:
        raise ValueError(f"not a base64 WireGuard key ({BASE64_KEY_HINT})")
    return base64.b64decode(text, validate=True)


def key_to_base64(key: bytes) -> str:
    """Encode a 32-byte key the way `wg genkey` prints it (without the newline)."""
    _check_length(key)
    return base64.b64encode(key).decode("ascii")


def key_from_hex(text: str) -> bytes:
    """Decode a 64-digit hex key (either case), as the UAPI carries keys."""
    if not isinstance(text, str) or _HEX_KEY.fullmatch(text) is None:
        raise ValueError("not a hex WireGuard key (64 hex digits)")
    return binascii.unhexlify(text)


def key_to_hex(key: bytes) -> str:
    """Encode a 32-byte key as lowercase hex, the UAPI's form."""
    _check_length(key)
    return key.hex()


def clamp(key: bytes) -> bytes:
    """Clamp a Curve25519 private key as RFC 7748 and `wg genkey` do."""
    _check_length(key)
    clamped = bytearray(key)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return bytes(clamped)


def genkey(urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return a new clamped private key; the random source is injectable for tests."""
    return clamp(urandom(KEY_LEN))


def genpsk(urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return a new preshared key: 32 random bytes, unclamped, as `wg genpsk` makes."""
    psk = urandom(KEY_LEN)
    _check_length(psk)
    return psk


def pubkey(private_key: bytes) -> bytes:
    """Return the public key for a private key (libsodium clamps the scalar itself)."""
    _check_length(private_key)
    return bytes(crypto_scalarmult_base(private_key))


def _check_length(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_LEN:
        raise ValueError(f"a WireGuard key is {KEY_LEN} bytes")
