"""WireGuard's DoS layer: mac1 and mac2 on handshake messages, and cookie replies.

mac1 proves the sender knows our public key, so a responder can drop junk before any DH. Under
load a responder also wants mac2, keyed by a cookie bound to the sender's address, which it hands
out in an encrypted cookie reply. The initiator side (:class:`CookieGenerator`) lives per peer;
the responder side (:class:`CookieChecker`) lives once per device.
"""

import hmac
from typing import Final

from meshguard.core.constants import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    COOKIE_SECRET_LATENCY,
    MESSAGE_COOKIE_REPLY,
)
from meshguard.core.crypto import (
    KEY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_SIZE,
    XNONCE_SIZE,
    CryptoError,
    blake2s,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from meshguard.core.interfaces import RandomBytes
from meshguard.core.messages import (
    COOKIE_REPLY_ENCRYPTED_OFFSET,
    COOKIE_REPLY_NONCE_OFFSET,
    CookieReply,
    mac_offsets,
)

__all__ = ["COOKIE_LIFETIME", "CookieChecker", "CookieGenerator"]

#: How long an initiator uses a received cookie: the kernel's 120 s - 5 s, so that it stops
#: before the responder's secret rotates under it.
COOKIE_LIFETIME: Final = COOKIE_REFRESH_TIME - COOKIE_SECRET_LATENCY

_ZERO_MAC: Final = bytes(MAC_SIZE)
_COOKIE_REPLY_HEADER: Final = MESSAGE_COOKIE_REPLY.to_bytes(4, "little")


def _offsets(message: bytes) -> tuple[int, int]:
    offsets = mac_offsets(message)
    if offsets is None:
        raise ValueError("not a handshake initiation or response")
    return offsets


class CookieGenerator:
    """The initiator side for one peer: adds mac1/mac2 and accepts that peer's cookie replies."""

    def __init__(self, remote_static_public: bytes) -> None:
        self._mac1_key = blake2s(LABEL_MAC1, remote_static_public)
        self._cookie_key = blake2s(LABEL_COOKIE, remote_static_public)
        self._last_mac1: bytes | None = None
        self._cookie: bytes | None = None
        self._cookie_time = 0.0

    def add_macs(self, message: bytes, now: float) -> bytes:
        """Return ``message`` (type 1 or 2) with mac1 and mac2 filled in.

        mac2 is zeros unless we hold a cookie younger than :data:`COOKIE_LIFETIME`. The mac1 is
        remembered, since a cookie reply to this message is encrypted with it as AD.
        """
        mac1_offset, mac2_offset = _offsets(message)
        mac1 = mac(self._mac1_key, message[:mac1_offset])
        self._last_mac1 = mac1
        body = message[:mac1_offset] + mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_LIFETIME:
            return body + mac(self._cookie, body[:mac2_offset])
        return body + _ZERO_MAC

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Store the cookie from a 64-byte cookie reply; ``False`` (and no change) if it is bad.

        It must decrypt with the last mac1 we sent as AD; with none sent, nothing can match.
        The caller has already matched the reply's receiver index to this peer.
        """
        last_mac1 = self._last_mac1
        if last_mac1 is None:
            return False
        if len(reply) != COOKIE_REPLY_SIZE or reply[:4] != _COOKIE_REPLY_HEADER:
            return False
        nonce = reply[COOKIE_REPLY_NONCE_OFFSET:COOKIE_REPLY_ENCRYPTED_OFFSET]
        encrypted = reply[COOKIE_REPLY_ENCRYPTED_OFFSET:]
        try:
            cookie = xaead_decrypt(self._cookie_key, nonce, encrypted, last_mac1)
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_time = now
        # Like the kernel: one reply per mac1 sent, so a replayed reply is not accepted twice.
        self._last_mac1 = None
        return True


class CookieChecker:
    """The responder side for the device: checks mac1/mac2 and writes cookie replies.

    The cookie secret is random and replaced when older than ``COOKIE_REFRESH_TIME``, so a
    cookie stops working within two minutes and a leaked one is worth little.
    """

    def __init__(self, local_static_public: bytes, random: RandomBytes) -> None:
        self._mac1_key = blake2s(LABEL_MAC1, local_static_public)
        self._cookie_key = blake2s(LABEL_COOKIE, local_static_public)
        self._random = random
        self._secret: bytes | None = None
        self._secret_time = 0.0

    def check_mac1(self, message: bytes) -> bool:
        """Whether the message's mac1 was made with our public key; checked before any DH."""
        offsets = mac_offsets(message)
        if offsets is None:
            return False
        mac1_offset, mac2_offset = offsets
        expected = mac(self._mac1_key, message[:mac1_offset])
        return hmac.compare_digest(expected, message[mac1_offset:mac2_offset])

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        """Whether the message's mac2 was made with the cookie we would give ``source`` now."""
        offsets = mac_offsets(message)
        if offsets is None:
            return False
        _, mac2_offset = offsets
        expected = mac(self._cookie_for(source, now), message[:mac2_offset])
        return hmac.compare_digest(expected, message[mac2_offset:])

    def create_reply(self, message: bytes, receiver_index: int, source: bytes, now: float) -> bytes:
        """The 64-byte cookie reply to ``message`` (type 1 or 2) from ``source``.

        ``receiver_index`` is the sender index of ``message``. The cookie is encrypted under our
        public key with the message's mac1 as AD, so only its real sender can open it.
        """
        mac1_offset, mac2_offset = _offsets(message)
        cookie = self._cookie_for(source, now)
        nonce = self._random(XNONCE_SIZE)
        encrypted = xaead_encrypt(self._cookie_key, nonce, cookie, message[mac1_offset:mac2_offset])
        return CookieReply(receiver_index, nonce, encrypted).to_bytes()

    def _cookie_for(self, source: bytes, now: float) -> bytes:
        if self._secret is None or now - self._secret_time >= COOKIE_REFRESH_TIME:
            self._secret = self._random(KEY_SIZE)
            self._secret_time = now
        return mac(self._secret, source)
