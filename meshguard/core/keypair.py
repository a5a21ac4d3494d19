"""Transport keypairs and the previous/current/next slots a peer keeps them in."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshguard.core.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from meshguard.core.crypto import CryptoError, TransportCipher
from meshguard.core.replay import ReplayWindow

if TYPE_CHECKING:
    from meshguard.core.peer import Peer


def _zeroed(nonce: bytes, plaintext: bytes | memoryview, aad: None) -> bytes:
    """A zeroed keypair's ``encrypt``: raises as ``TransportCipher.seal`` does once zeroed."""
    raise CryptoError("transport key has been zeroed")


class Keypair:
    """One session's keys, counters and replay window, as derived by one handshake.

    ``header`` is the first eight bytes of every transport message sent with it (type and the
    peer's receiver index), built once so the data path only appends the counter.
    """

    __slots__ = (
        "created",
        "decrypt",
        "encrypt",
        "header",
        "is_initiator",
        "local_index",
        "peer",
        "receiver",
        "remote_index",
        "replay",
        "send_counter",
        "sender",
    )

    def __init__(
        self,
        peer: Peer,
        send_key: bytes,
        receive_key: bytes,
        *,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        created: float,
    ) -> None:
        self.peer = peer
        self.sender = TransportCipher(send_key)
        self.receiver = TransportCipher(receive_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.is_initiator = is_initiator
        self.created = created
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.header = struct.pack("<II", 4, remote_index)
        #: The bound AEAD calls (``TransportCipher.encryptor``/``decryptor``), taken once and
        #: the only way the device reaches the AEAD (lone and batch paths alike): the lone
        #: packet's path reads an attribute instead of making a call, which costs several
        #: microseconds of cold interpreter after an idle moment (docs/datapath.md,
        #: "Latency"). ``zero`` replaces them, so a zeroed keypair seals and opens nothing.
        self.encrypt: Callable[[bytes, bytes | memoryview, None], bytes] = self.sender.encryptor()
        self.decrypt: Callable[[bytes, bytes | memoryview, None], bytes] | None = (
            self.receiver.decryptor()
        )

    def can_send(self, now: float) -> bool:
        """Whether this keypair may still seal a message (REJECT limits by time and count)."""
        return now - self.created < REJECT_AFTER_TIME and self.send_counter < REJECT_AFTER_MESSAGES

    def expire_for_sending(self) -> None:
        """Make the keypair unusable for sending, forcing a new handshake (a changed key)."""
        self.send_counter = REJECT_AFTER_MESSAGES

    def zero(self) -> None:
        """Drop the cipher objects so no key material stays reachable from this keypair.

        Also expired for sending, so every send path's own limit check refuses it (stages
        and handshakes, or returns False) before ``encrypt`` could raise: the device zeroes
        only keypairs already out of every slot, but a send reached from a receive path must
        not raise even if that changed."""
        self.sender.zero()
        self.receiver.zero()
        self.expire_for_sending()
        self.encrypt = _zeroed
        self.decrypt = None


class Keypairs:
    """A peer's previous, current and next keypairs with WireGuard's rotation rules.

    The responder may not send with a new keypair until the initiator has used it (key
    confirmation), so the responder's fresh keypair waits in ``next``.
    """

    __slots__ = ("current", "next", "previous")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Put a new keypair in its slot; returns the keypairs that are thereby dropped."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.next
                self.next = None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.previous = None
            self.next = keypair
        return dropped

    def promote_next(self, keypair: Keypair) -> list[Keypair]:
        """The initiator used ``next``: it becomes current. Returns the keypair dropped."""
        dropped: list[Keypair] = []
        if self.next is not keypair:
            return dropped
        if self.previous is not None:
            dropped.append(self.previous)
        self.previous = self.current
        self.current = keypair
        self.next = None
        return dropped

    def clear(self) -> list[Keypair]:
        """Empty every slot; returns what was there."""
        dropped = [k for k in (self.previous, self.current, self.next) if k is not None]
        self.previous = self.current = self.next = None
        return dropped
