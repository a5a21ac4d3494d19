"""A WireGuard peer's state: identity, endpoint, handshake, keypairs, timers and counters.

The rules that act on this state live in :mod:`meshguard.core.device`; a peer is plain data so
that the device can keep its hot loop free of indirection.
"""

from __future__ import annotations

from collections import deque

from meshguard.core.constants import MAX_STAGED_PACKETS
from meshguard.core.cookie import CookieGenerator
from meshguard.core.interfaces import Endpoint
from meshguard.core.keypair import Keypairs
from meshguard.core.keytext import short_key
from meshguard.core.noise import InitiatorHandshake
from meshguard.core.sent import SentCounts
from meshguard.core.timers import TimerSlots

# Timer kinds, indices into ``Peer.timers``.
RETRANSMIT_HANDSHAKE = 0
SEND_KEEPALIVE = 1
NEW_HANDSHAKE = 2
ZERO_KEY_MATERIAL = 3
PERSISTENT_KEEPALIVE = 4
TIMER_NAMES = (
    "retransmit_handshake",
    "send_keepalive",
    "new_handshake",
    "zero_key_material",
    "persistent_keepalive",
)

ZERO_KEY = bytes(32)


class Peer:
    """Everything the device knows about one remote static key."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.preshared_key = ZERO_KEY
        #: DH(our static private, their static public); recomputed when our key changes.
        self.static_shared: bytes | None = None
        self.endpoint: Endpoint | None = None
        self.persistent_keepalive = 0
        self.cookies = CookieGenerator(public_key)
        self.keypairs = Keypairs()
        self.handshake: InitiatorHandshake | None = None
        self.handshake_index: int | None = None
        self.handshake_attempts = 0
        self.last_sent_handshake: float | None = None
        self.latest_timestamp = bytes(12)
        self.last_initiation_consumed: float | None = None
        self.last_handshake_time = 0.0
        self.sent_lastminute_handshake = False
        self.need_another_keepalive = False
        #: The handshake in flight was started by the persistent keepalive on an idle tunnel:
        #: its completion sends no key-confirmation keepalive (``Device._persistent_keepalive``).
        self.quiet_handshake = False
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)
        self.timers = TimerSlots(len(TIMER_NAMES))
        self.rx_bytes = 0
        self.tx_bytes = 0
        #: Inner packets carried either way (not keepalives, control or probes): tells mesh
        #: features whether the tunnel is in use or idle.
        self.data_packets = 0
        #: Keepalives, control, handshake and probe datagrams sent, in all and while idle.
        self.sent = SentCounts()
        self.removed = False
        #: Whether the peer showed it is a meshguard node (handshake mark or control message).
        self.is_meshguard = False
        #: Largest inner packet the path to this peer carries (path MTU discovery lowers it).
        self.inner_mtu = 65535
        #: Inner MTU that TCP SYNs to and from this peer have their MSS clamped to (0: off);
        #: path MTU discovery sets it to the smaller of both directions' inner MTUs.
        self.mss_mtu = 0
        #: The member that forwards our datagrams to this peer, or None to send them straight
        #: to ``endpoint``. Only the mesh layer sets it (see :meth:`Device.send_via_relay`).
        self.relay: Peer | None = None

    def __repr__(self) -> str:
        # The public key is public, but a short form keeps log lines readable.
        return f"<Peer {self.short_name}>"

    @property
    def short_name(self) -> str:
        return short_key(self.public_key)
