"""The cryptographic primitives of WireGuard, exactly as the protocol names them.

Everything above this module (the Noise handshake, cookies, the data path) is written in terms of
these few functions, so that a known-answer test here pins down the bytes on the wire everywhere.
BLAKE2s comes from ``hashlib`` (libsodium has none), X25519 and XChaCha20-Poly1305 from PyNaCl,
and ChaCha20-Poly1305 from ``cryptography`` because its key object can be reused per packet.

Python cannot reliably wipe ``bytes``; we drop references instead of zeroing memory.
"""

import hashlib
import hmac
import math
import struct
from collections.abc import Callable
from typing import Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshguard.core.interfaces import RandomBytes

__all__ = [
    "C0",
    "CONSTRUCTION",
    "H0",
    "IDENTIFIER",
    "KEY_SIZE",
    "LABEL_COOKIE",
    "LABEL_MAC1",
    "MAC_SIZE",
    "TAG_SIZE",
    "TIMESTAMP_SIZE",
    "TRANSPORT_NONCE",
    "XNONCE_SIZE",
    "CryptoError",
    "InvalidTag",
    "TransportCipher",
    "aead_decrypt",
    "aead_encrypt",
    "blake2s",
    "clamp",
    "dh",
    "generate_private_key",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]


class CryptoError(Exception):
    """A cryptographic operation failed: bad tag, bad key length or an all-zero DH result.

    Callers handling data from a peer catch it and drop the message; it carries no key material.
    """


CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
MAC_SIZE: Final = 16
XNONCE_SIZE: Final = 24
TIMESTAMP_SIZE: Final = 12

_ZERO_KEY: Final = bytes(KEY_SIZE)
_TAI64_BASE: Final = 0x400000000000000A
_TAI64N_WHITENER: Final = ~((1 << 24) - 1)
_TAI64N: Final = struct.Struct(">QI")
#: The 12-byte AEAD nonce: four zero bytes, then the counter as a little-endian u64.
_NONCE: Final = struct.Struct("<4xQ")
#: Builds a transport nonce from a counter; its last eight bytes are the message's counter field.
TRANSPORT_NONCE: Final = _NONCE.pack


def blake2s(*parts: bytes) -> bytes:
    """HASH: the 32-byte unkeyed BLAKE2s of the concatenation of ``parts``.

    Taking several parts saves the caller a concatenation for every ``HASH(H ‖ x)`` mix.
    """
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: BLAKE2s keyed natively (not HMAC), 16-byte digest; mac1, mac2 and cookies use it."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC (RFC 2104) over BLAKE2s-256, the building block of the KDF."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the first HKDF output keyed by ``key`` over ``data``."""
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: the first two HKDF outputs, as the ``(C, κ)`` steps of the handshake need."""
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: the first three HKDF outputs, used only for the PSK step ``(C, τ, κ)``."""
    prk = hmac_blake2s(key, data)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    t3 = hmac_blake2s(prk, t2 + b"\x03")
    return t1, t2, t3


def _require_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise CryptoError(f"{what} must be {KEY_SIZE} bytes, not {len(key)}")


def clamp(private: bytes) -> bytes:
    """Clamp an X25519 private key the way ``wg`` does when it loads one."""
    _require_key(private, "private key")
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def generate_private_key(random: RandomBytes) -> bytes:
    """DH_GENERATE: a clamped private key from the injected random source."""
    return clamp(random(KEY_SIZE))


def public_key(private: bytes) -> bytes:
    """The X25519 public key for ``private``."""
    _require_key(private, "private key")
    try:
        return nacl.bindings.crypto_scalarmult_base(private)
    except nacl.exceptions.CryptoError as e:
        raise CryptoError("cannot derive public key") from e


def dh(private: bytes, public: bytes) -> bytes:
    """DH: X25519; an all-zero result (a low-order peer point) raises so the message is dropped."""
    _require_key(private, "private key")
    _require_key(public, "public key")
    try:
        # libsodium refuses an all-zero result itself; the check below is belt and braces.
        shared = nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError as e:
        raise CryptoError("X25519 produced the all-zero point") from e
    if shared == _ZERO_KEY:
        raise CryptoError("X25519 produced the all-zero point")
    return shared


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD: ChaCha20-Poly1305 with WireGuard's nonce; returns ciphertext ‖ 16-byte tag."""
    _require_key(key, "AEAD key")
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Open an :func:`aead_encrypt` box; raises :class:`CryptoError` if it does not authenticate."""
    _require_key(key, "AEAD key")
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, ad)
    except InvalidTag as e:
        raise CryptoError("AEAD authentication failed") from e


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 with a 24-byte random nonce, used only for cookie replies."""
    _require_key(key, "XAEAD key")
    if len(nonce) != XNONCE_SIZE:
        raise CryptoError(f"XAEAD nonce must be {XNONCE_SIZE} bytes")
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Open an :func:`xaead_encrypt` box; raises :class:`CryptoError` on any failure."""
    _require_key(key, "XAEAD key")
    if len(nonce) != XNONCE_SIZE:
        raise CryptoError(f"XAEAD nonce must be {XNONCE_SIZE} bytes")
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except nacl.exceptions.CryptoError as e:
        raise CryptoError("XAEAD authentication failed") from e


class TransportCipher:
    """One direction of a session's data path: a ChaCha20-Poly1305 key bound once and reused.

    Building the cipher object costs more than sealing a small packet, so a keypair holds one
    per direction; each call creates nothing but the 12-byte nonce. Transport data has no AD.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        _require_key(key, "transport key")
        self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(key)

    def seal(self, counter: int, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` under nonce ``counter``; returns ciphertext ‖ tag.

        Sealing after :meth:`zero` is local misuse and raises :class:`CryptoError`.
        """
        aead = self._aead
        if aead is None:
            raise CryptoError("transport key has been zeroed")
        return aead.encrypt(_NONCE.pack(counter), plaintext, None)

    def encryptor(self) -> Callable[[bytes, bytes | memoryview, None], bytes]:
        """The bound AEAD encrypt call, taken once by ``Keypair`` (its ``encrypt``, which the
        device seals with): it takes the 12-byte nonce (:data:`TRANSPORT_NONCE`), the
        plaintext and ``None`` (no AD). One Python call fewer per packet than :meth:`seal`
        (about 0.2 us of 2); raises like :meth:`seal` once zeroed."""
        aead = self._aead
        if aead is None:
            raise CryptoError("transport key has been zeroed")
        return aead.encrypt

    def decryptor(self) -> Callable[[bytes, bytes | memoryview, None], bytes] | None:
        """The bound AEAD decrypt call, taken once by ``Keypair`` (its ``decrypt``, which the
        device opens with; ``None`` once zeroed): it raises
        :class:`cryptography.exceptions.InvalidTag`, re-exported here as
        :data:`InvalidTag`, where :meth:`open` returns ``None``."""
        aead = self._aead
        return None if aead is None else aead.decrypt

    def open(self, counter: int, ciphertext: bytes) -> bytes | None:
        """Decrypt a peer's packet; ``None`` if it does not authenticate (or the key is gone).

        Never raises on peer data: a forged packet is a drop, not an error.
        """
        aead = self._aead
        if aead is None:
            return None
        try:
            return aead.decrypt(_NONCE.pack(counter), ciphertext, None)
        except InvalidTag:
            return None

    def zero(self) -> None:
        """Drop the key object so that nothing can be sealed or opened with it any more."""
        self._aead = None

    @property
    def zeroed(self) -> bool:
        """Whether :meth:`zero` has been called."""
        return self._aead is None


def tai64n(unix_time: float) -> bytes:
    """TAI64N of a wall-clock time, nanoseconds rounded down to a multiple of 2**24 like wg-go.

    The rounding keeps precise clock readings off the wire; the peer only compares the values.
    """
    seconds = math.floor(unix_time)
    nanoseconds = int((unix_time - seconds) * 1e9) & _TAI64N_WHITENER
    return _TAI64N.pack(_TAI64_BASE + seconds, nanoseconds)


C0: Final = blake2s(CONSTRUCTION)
H0: Final = blake2s(C0, IDENTIFIER)
