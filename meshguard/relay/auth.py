"""Member authentication at the relay, from the WireGuard static keys alone.

The relay sends a fresh random challenge and its static public key. The client answers with its
static public key, a nonce and ``MAC(K, "client" || relay key || client key || challenge || nonce
|| binding)`` where ``K = KDF1(HASH(LABEL), DH(client static, relay static))``. Only the holder
of the client's private key (or the relay's) can compute ``K``, so the relay, which checks the
key belongs to one of its members, knows who it talks to. The challenge is new for every
connection and ``binding`` is the TLS exporter of this very TLS session, so a proof can be
neither replayed nor forwarded to another connection. The relay answers with ``MAC(K, "relay" ||
...)`` so the client knows the relay holds the key it announced.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from meshguard.core.crypto import CryptoError, blake2s, dh, kdf1, mac

VERSION: Final = 1
CHALLENGE_SIZE: Final = 32
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 16
KEY_SIZE: Final = 32
#: The TLS exporter label both sides use for the channel binding (RFC 5705 / 8446).
EXPORTER_LABEL: Final = b"EXPORTER-meshguard-relay-v1"
EXPORTER_SIZE: Final = 32

_LABEL: Final = blake2s(b"meshguard tls relay member proof v1")


@dataclass(frozen=True)
class Challenge:
    version: int
    relay_key: bytes
    challenge: bytes

    def encode(self) -> bytes:
        return bytes((self.version,)) + self.relay_key + self.challenge

    @classmethod
    def decode(cls, payload: bytes) -> Challenge | None:
        if len(payload) != 1 + KEY_SIZE + CHALLENGE_SIZE:
            return None
        return cls(payload[0], payload[1 : 1 + KEY_SIZE], payload[1 + KEY_SIZE :])


@dataclass(frozen=True)
class Answer:
    client_key: bytes
    nonce: bytes
    proof: bytes

    def encode(self) -> bytes:
        return self.client_key + self.nonce + self.proof

    @classmethod
    def decode(cls, payload: bytes) -> Answer | None:
        if len(payload) != KEY_SIZE + NONCE_SIZE + MAC_SIZE:
            return None
        return cls(
            payload[:KEY_SIZE],
            payload[KEY_SIZE : KEY_SIZE + NONCE_SIZE],
            payload[KEY_SIZE + NONCE_SIZE :],
        )


def _key(private: bytes, public: bytes) -> bytes | None:
    try:
        return kdf1(_LABEL, dh(private, public))
    except CryptoError:
        return None


def _transcript(challenge: Challenge, client_key: bytes, nonce: bytes, binding: bytes) -> bytes:
    return (
        bytes((challenge.version,))
        + challenge.relay_key
        + client_key
        + challenge.challenge
        + nonce
        + binding
    )


def answer(
    challenge: Challenge, client_private: bytes, client_key: bytes, nonce: bytes, binding: bytes
) -> tuple[Answer, bytes] | None:
    """The client's answer, and the relay's proof it should expect back (None: bad relay key)."""
    key = _key(client_private, challenge.relay_key)
    if key is None:
        return None
    transcript = _transcript(challenge, client_key, nonce, binding)
    return (
        Answer(client_key, nonce, mac(key, b"client" + transcript)),
        mac(key, b"relay" + transcript),
    )


def verify(
    challenge: Challenge, relay_private: bytes, received: Answer, binding: bytes
) -> bytes | None:
    """The relay's side: the relay's own proof when the answer is right, else None."""
    key = _key(relay_private, received.client_key)
    if key is None:
        return None
    transcript = _transcript(challenge, received.client_key, received.nonce, binding)
    if not hmac.compare_digest(mac(key, b"client" + transcript), received.proof):
        return None
    return mac(key, b"relay" + transcript)
