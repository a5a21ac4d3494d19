"""The WireGuard device engine: peers, handshakes, transport and timers, with no I/O.

Inputs are IP packets from the TUN side (:meth:`Device.packet_from_tun`), UDP datagrams from the
network side (:meth:`Device.datagram_received`) and the passage of time (:meth:`Device.run_timers`
at :meth:`Device.next_deadline`). Outputs go through the injected :class:`DeviceIO`. Everything
that arrives from the network is hostile: it is dropped and counted unless it authenticates, and
nothing in here raises because of a peer's bytes.

The data path (``packet_from_tun`` and the transport branch of ``datagram_received``) is the hot
loop of the whole node: it keeps to local variables, attribute slots and one AEAD call per packet.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from meshguard.core import constants as C
from meshguard.core import control
from meshguard.core.allowedips import AllowedIPs
from meshguard.core.cookie import CookieChecker
from meshguard.core.crypto import (
    TRANSPORT_NONCE,
    CryptoError,
    InvalidTag,
    clamp,
    dh,
    generate_private_key,
    public_key,
    tai64n,
)
from meshguard.core.indextable import IndexTable
from meshguard.core.interfaces import (
    AlreadyRegisteredError,
    Carrier,
    ControlHandler,
    DatagramHandler,
    DeviceIO,
    EchoReplyHandler,
    Endpoint,
    PathTransport,
    PeerRemovedListener,
    RandomBytes,
    RelayedListener,
    RoamingHandler,
    SourceListener,
    TooBigHandler,
)
from meshguard.core.keypair import Keypair
from meshguard.core.mss import clamp_if_syn
from meshguard.core.noise import (
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from meshguard.core.peer import (
    NEW_HANDSHAKE,
    PATH_MEMBER,
    PATH_UDP,
    PERSISTENT_KEEPALIVE,
    RETRANSMIT_HANDSHAKE,
    SEND_KEEPALIVE,
    ZERO_KEY,
    ZERO_KEY_MATERIAL,
    Peer,
)
from meshguard.core.ratelimiter import RateLimiter
from meshguard.core.sent import CONTROL, HANDSHAKE, KEEPALIVE
from meshguard.core.timers import TimerQueue

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_TRANSPORT_TYPE = b"\x04\x00\x00\x00"
_INITIATION_TYPE = b"\x01\x00\x00\x00"
_RESPONSE_TYPE = b"\x02\x00\x00\x00"
_COOKIE_TYPE = b"\x03\x00\x00\x00"
_ZEROS = bytes(16)
#: A transport nonce is four zero bytes and the little-endian counter, which is the message's
#: counter field as it came (``TRANSPORT_NONCE``).
_NONCE_PREFIX = bytes(4)
#: A padding limit no packet reaches: probes are padded to 16 whatever the MTU (their size is
#: the point), as stock WireGuard pads.
_NO_LIMIT = 1 << 20
#: Bytes of ``random`` drawn at a time for timer jitter (two per timer armed): jitter needs
#: no fresh cryptographic randomness per arm (wireguard-go draws it from a fast PRNG), and in
#: production ``random`` is ``os.urandom``, a system call on a lone packet's send path.
_JITTER_POOL = 64
#: A transport message's receiver index and counter (after the 4-byte type).
_TRANSPORT_HEADER = struct.Struct("<4xIQ")
#: The same with the message type: one call tells a batch's transport message and its session.
_TRANSPORT_FIELDS = struct.Struct("<IIQ")
#: An inner IPv4 packet without options (first byte 0x45), at least 34 bytes: total length,
#: protocol, source address and (for TCP) the flags byte, read at once by the batch path.
_INNER_V4 = struct.Struct("!2xH5xB2x4s4x13xB")
#: The receive-side rekey age: REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT.
_REKEY_ON_RECEIVE_AGE = C.REJECT_AFTER_TIME - C.KEEPALIVE_TIMEOUT - C.REKEY_TIMEOUT


@dataclass
class DropCounters:
    """Why datagrams and packets were dropped: the only trace hostile input leaves."""

    malformed: int = 0
    bad_mac1: int = 0
    cookie_sent: int = 0
    rate_limited: int = 0
    handshake_failed: int = 0
    initiation_replayed: int = 0
    initiation_flood: int = 0
    unknown_index: int = 0
    decrypt_failed: int = 0
    replayed: int = 0
    expired_keypair: int = 0
    bad_inner_packet: int = 0
    source_not_allowed: int = 0
    no_route: int = 0
    no_endpoint: int = 0
    no_identity: int = 0
    cookie_rejected: int = 0
    handshake_backlog_full: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Handshake messages waiting behind transport data at most (see ``Device.handshake_backlog``).
HANDSHAKE_BACKLOG = 1024

#: The source of a datagram that came through a relay (a member or a TLS relay), and the
#: endpoint argument while sealing for a peer on a relayed path: never sent to.
_RELAYED: Endpoint = ("0.0.0.0", 0)


def _reject(counter: int) -> bool:
    """The replay check before any session is known in a batch (never called)."""
    return False


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """A stable byte form of an endpoint, for cookies (any stable encoding interoperates)."""
    host, port = endpoint
    return ipaddress.ip_address(host.split("%", 1)[0]).packed + port.to_bytes(2, "big")


def _endpoint_ip(endpoint: Endpoint) -> bytes:
    return ipaddress.ip_address(endpoint[0].split("%", 1)[0]).packed


class Device:
    """One WireGuard interface's protocol state.

    ``now`` is the reactor's clock in seconds since the Unix epoch; it also stamps initiations
    (TAI64N) and the last-handshake times ``wg show`` reports.
    """

    def __init__(
        self,
        io: DeviceIO,
        random: RandomBytes,
        *,
        mtu: int = C.DEFAULT_MTU,
        under_load_threshold: int = 128,
        on_handshake: Callable[[Peer], None] | None = None,
        mesh: bool = False,
    ) -> None:
        self.io = io
        self.random = random
        self.mtu = mtu
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        #: The table's lookup cache (cleared in place, never replaced), tried before a lookup.
        self._routes = self.allowed_ips.cache
        self.indices: IndexTable[Peer | Keypair] = IndexTable()
        #: ``indices.get`` without its Python frame, for each transport message.
        self._index_get = self.indices.getter()
        self.timers: TimerQueue[Peer] = TimerQueue()
        self.counters = DropCounters()
        self.rate_limiter = RateLimiter()
        self.cookie_checker: CookieChecker | None = None
        self.under_load_threshold = under_load_threshold
        self.is_up = False
        #: Called with the peer whenever a handshake completes (``on_handshake`` first); the mesh
        #: features each add one.
        self.handshake_listeners: list[Callable[[Peer], None]] = (
            [on_handshake] if on_handshake is not None else []
        )
        #: Whether this device speaks the mesh control channel (marks its initiations).
        self.mesh = mesh
        # The events below are wired through the registration methods ("Events" section):
        # owners are taken once (a second one raises), listeners add up.
        self._control_handler: ControlHandler | None = None
        self._unknown_datagram_handler: DatagramHandler | None = None
        self._source_listeners: list[SourceListener] = []
        self._relayed_listeners: list[RelayedListener] = []
        self._removed_listeners: list[PeerRemovedListener] = []
        self._roaming_handler: RoamingHandler | None = None
        self._too_big_handler: TooBigHandler | None = None
        #: The ICMP echo identifier (2 bytes) of path MTU probes toward stock peers: received
        #: echo replies carrying it go to the echo handler. None: no check in the receive path.
        self.echo_marker: bytes | None = None
        self._echo_handler: EchoReplyHandler | None = None
        #: The transports of paths that are not plain UDP, by path kind (``PATH_*``).
        self._transports: dict[str, PathTransport] = {}
        #: When not None, initiations and responses that arrive directly while the device is
        #: under load wait here and are handled by :meth:`run_handshake_backlog`, at most
        #: ``handshake_budget`` per call. The adapter calls it after each read batch, so
        #: transport data for live sessions in a batch is served first and a handshake flood
        #: gets at most the budget per batch. Bounded by HANDSHAKE_BACKLOG; beyond it new ones
        #: are dropped and counted. (Not under load, handshakes are handled at once, so the
        #: UDP layer still learns the local address a peer reached from them.)
        self.handshake_backlog: deque[tuple[bytes, Endpoint]] | None = None
        self.handshake_budget = 32
        #: The keypair the last transport message opened under (for transport_batch_received).
        self._last_opened: Keypair | None = None
        self._load_window_start = 0.0
        self._load_window_count = 0
        self._under_load_until = -1.0
        #: Random bytes for timer jitter and how many of them are used (``_jitter``).
        self._jitter_pool = b""
        self._jitter_used = 0

    # ------------------------------------------------------------------ events

    def _claim(self, slot: str, owner: object, event: str) -> None:
        if getattr(self, slot) is not None:
            raise AlreadyRegisteredError(f"the device's {event} already has an owner")
        setattr(self, slot, owner)

    def attach_io(self, io: DeviceIO) -> None:
        """Where sealed datagrams and opened packets go from now on (the node's adapters once
        they run, a discarding sink before and after)."""
        self.io = io

    def set_control_handler(self, handler: ControlHandler) -> None:
        """The owner of authenticated control messages (the mesh agent)."""
        self._claim("_control_handler", handler, "control messages")

    def set_unknown_datagram_handler(self, handler: DatagramHandler) -> None:
        """The owner of datagrams that are no WireGuard message; without one they are
        counted as malformed."""
        self._claim("_unknown_datagram_handler", handler, "non-WireGuard datagrams")

    def add_source_listener(self, listener: SourceListener) -> None:
        """Told the source of every authenticated datagram that came straight over UDP."""
        self._source_listeners.append(listener)

    def remove_source_listener(self, listener: SourceListener) -> None:
        """Undo :meth:`add_source_listener` (one registration of ``listener``)."""
        self._source_listeners.remove(listener)

    def set_roaming_handler(self, handler: RoamingHandler) -> None:
        """The owner of roaming (the path arbiter); without one the device roams itself, as
        WireGuard does."""
        self._claim("_roaming_handler", handler, "roaming")

    def _roam(self, peer: Peer, source: Endpoint, now: float) -> None:
        handler = self._roaming_handler
        if handler is None:
            peer.endpoint = source
        else:
            handler(peer, source, now)

    def add_relayed_listener(self, listener: RelayedListener) -> None:
        """Told of every authenticated datagram that came through a relay."""
        self._relayed_listeners.append(listener)

    def add_peer_removed_listener(self, listener: PeerRemovedListener) -> None:
        """Told of every peer removed, once it is gone (:meth:`remove_peer`)."""
        self._removed_listeners.append(listener)

    def add_handshake_listener(self, listener: Callable[[Peer], None]) -> None:
        """Told each peer whose handshake completed."""
        self.handshake_listeners.append(listener)

    def set_too_big_handler(self, handler: TooBigHandler) -> None:
        """The owner of TUN packets larger than the peer's ``inner_mtu``."""
        self._claim("_too_big_handler", handler, "oversize packets")

    def set_echo_handler(self, marker: bytes, handler: EchoReplyHandler) -> None:
        """The owner of echo replies whose identifier is ``marker`` (2 bytes)."""
        if len(marker) != 2:
            raise ValueError("an echo marker is 2 bytes")
        self._claim("_echo_handler", handler, "marked echo replies")
        self.echo_marker = marker

    def set_transport(self, kind: str, transport: PathTransport) -> None:
        """The transport that carries datagrams of peers on a path of ``kind``."""
        if kind in self._transports:
            raise AlreadyRegisteredError(f"the device's {kind} path already has a transport")
        self._transports[kind] = transport

    # ------------------------------------------------------------------ configuration

    def set_private_key(self, private_key: bytes | None, now: float) -> None:
        """Change the identity: as wireguard-go, drop a peer that has our new public key,
        recompute every static-static DH and force fresh handshakes."""
        if private_key is not None and private_key == ZERO_KEY:
            private_key = None
        if private_key is not None:
            private_key = clamp(private_key)
        if private_key == self.private_key:
            return
        self.private_key = private_key
        if private_key is None:
            self.public_key = None
            self.cookie_checker = None
        else:
            self.public_key = public_key(private_key)
            self.cookie_checker = CookieChecker(self.public_key, self.random)
            clash = self.peers.get(self.public_key)
            if clash is not None:
                self.remove_peer(clash.public_key)
        for peer in self.peers.values():
            self._compute_static_shared(peer)
            peer.handshake = None
            self._free_handshake_index(peer)
            current = peer.keypairs.current
            if current is not None:
                current.expire_for_sending()

    def _compute_static_shared(self, peer: Peer) -> None:
        peer.static_shared = None
        if self.private_key is None:
            return
        try:
            peer.static_shared = dh(self.private_key, peer.public_key)
        except CryptoError:
            peer.static_shared = None

    def add_peer(self, public_key: bytes) -> Peer | None:
        """Add a peer (or return the existing one). Our own key gives ``None``: wireguard-go
        silently ignores such a block."""
        if self.public_key is not None and public_key == self.public_key:
            return None
        peer = self.peers.get(public_key)
        if peer is None:
            peer = Peer(public_key)
            self.peers[public_key] = peer
            self._compute_static_shared(peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        peer.removed = True
        self.allowed_ips.remove_value(peer)
        self._free_handshake_index(peer)
        peer.handshake = None
        for keypair in peer.keypairs.clear():
            self._drop_keypair(keypair)
        peer.staged.clear()
        self.timers.forget(peer.timers)
        for listener in self._removed_listeners:
            listener(peer)

    def remove_all_peers(self) -> None:
        for key in list(self.peers):
            self.remove_peer(key)

    def set_preshared_key(self, peer: Peer, psk: bytes | None) -> None:
        peer.preshared_key = psk if psk is not None else ZERO_KEY

    def set_endpoint(self, peer: Peer, endpoint: Endpoint | None) -> None:
        peer.endpoint = endpoint

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float) -> None:
        """Set the interval (0 = off); turning it on while up sends a keepalive at once."""
        if not 0 <= interval <= 65535:
            raise ValueError("persistent keepalive must be 0..65535 seconds")
        was = peer.persistent_keepalive
        peer.persistent_keepalive = interval
        if interval == 0:
            self.timers.cancel(peer.timers, PERSISTENT_KEEPALIVE)
        elif was == 0 and self.is_up:
            self._persistent_keepalive(peer, now)

    def up(self, now: float) -> None:
        """The interface came up: peers with a persistent keepalive announce themselves."""
        self.is_up = True
        for peer in list(self.peers.values()):
            if peer.persistent_keepalive:
                self.send_keepalive(peer, now)

    def down(self) -> None:
        self.is_up = False
        for peer in self.peers.values():
            for keypair in peer.keypairs.clear():
                self._drop_keypair(keypair)
            self._free_handshake_index(peer)
            peer.handshake = None
            peer.staged.clear()
            self.timers.forget(peer.timers)

    # ------------------------------------------------------------------ outgoing data

    def packet_from_tun(self, packet: bytes, now: float) -> None:
        """Route one IP packet from the TUN device to its peer and send it sealed."""
        length = len(packet)
        if length < 20:
            self.counters.bad_inner_packet += 1
            return
        version = packet[0] >> 4
        if version == 4:
            address = packet[16:20]
        elif version == 6 and length >= 40:
            address = packet[24:40]
        else:
            self.counters.bad_inner_packet += 1
            return
        # The lookup cache first: one dict operation instead of a call on a lone packet's way.
        routes = self._routes
        peer = routes[address] if address in routes else self.allowed_ips.lookup(address)
        if peer is None:
            self.counters.no_route += 1
            return
        if length > peer.inner_mtu and self._too_big_handler is not None:
            self._too_big_handler(peer, packet, now)
            return
        mss_mtu = peer.mss_mtu
        # Only TCP can be a SYN to clamp; the protocol byte spares the rest a call.
        if mss_mtu and packet[9 if version == 4 else 6] == 6:
            packet = clamp_if_syn(packet, mss_mtu)
        keypair = peer.keypairs.current
        endpoint = peer.endpoint
        if (
            keypair is None
            or endpoint is None
            or peer.path_kind is not PATH_UDP
            or keypair.send_counter >= C.REKEY_AFTER_MESSAGES
            or now - keypair.created
            >= (C.REKEY_AFTER_TIME if keypair.is_initiator else C.REJECT_AFTER_TIME)
        ):
            self.send_data(peer, packet, now)
            return
        # The common case inline: ``send_data``, ``_seal``, ``_transmit`` and ``_data_sent``
        # for one packet of a direct session that needs no rekey, in one frame. After an idle
        # moment every Python call costs several microseconds of cold interpreter
        # (docs/datapath.md, "Latency"); the result is the same bytes and timers
        # (tests/test_device.py checks both paths side by side).
        size = len(packet)
        limit = self.mtu
        if size & 15 and size < limit:
            packet += _ZEROS[: min(-size & 15, limit - size)]
        counter = keypair.send_counter
        nonce = TRANSPORT_NONCE(counter)
        message = keypair.header + nonce[4:] + keypair.encrypt(nonce, packet, None)
        keypair.send_counter = counter + 1
        self.io.send_datagram(message, endpoint)
        peer.tx_bytes += len(message)
        timers = peer.timers
        deadlines = timers.deadlines
        deadlines[SEND_KEEPALIVE] = None
        if peer.persistent_keepalive:
            self.timers.arm(peer, timers, PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive)
        peer.data_packets += 1
        if deadlines[NEW_HANDSHAKE] is None:
            self.timers.arm(
                peer,
                timers,
                NEW_HANDSHAKE,
                now + C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT + self._jitter(),
            )

    def packets_from_tun(self, packets: Sequence[bytes | memoryview], now: float) -> None:
        """The segments of one TUN super-packet: route, check and arm timers once, then seal
        them in one loop (the per-packet path costs about a microsecond more a segment).

        All segments of a super-packet share their addresses, so the first one routes them
        all. Anything unusual (a smaller path MTU to enforce, a SYN to clamp, no session, the
        counter limit in reach) takes the per-packet path, which handles it. Segments may be
        views of the TUN device's cut arena (``offload.CutArena``), valid only during the
        call: they are only sealed here; the per-packet path, which may keep or hash a packet,
        gets ``bytes``.
        """
        if not packets:
            return
        first = bytes(packets[0])
        length = max(map(len, packets))
        if len(first) < 20:
            peer = None
        elif first[0] >> 4 == 4:
            peer = self.allowed_ips.lookup(first[16:20])
        elif len(first) >= 40:
            peer = self.allowed_ips.lookup(first[24:40])
        else:
            peer = None
        keypair = peer.keypairs.current if peer is not None else None
        endpoint = peer.endpoint if peer is not None else None
        if (
            peer is None
            or keypair is None
            or endpoint is None
            or peer.path_kind is not PATH_UDP
            or length > peer.inner_mtu
            or now - keypair.created >= C.REJECT_AFTER_TIME
            or keypair.send_counter + len(packets) >= C.REKEY_AFTER_MESSAGES
        ):
            for packet in packets:
                self.packet_from_tun(bytes(packet), now)
            return
        mss_mtu = peer.mss_mtu
        if mss_mtu and clamp_if_syn(first, mss_mtu) is not first:
            # A SYN to clamp (never in a real TSO frame): the per-packet path clamps it. Path
            # MTU discovery sets ``mss_mtu`` for every meshguard peer, so only a SYN may
            # send a batch down the slow path. The segments of one super-packet share their
            # flags but FIN and PSH (as they share their addresses, which the first routes):
            # the first one tells.
            for packet in packets:
                self.packet_from_tun(bytes(packet), now)
            return
        self._transmit(peer, self._seal(keypair, packets, self.mtu), endpoint, now)
        self._data_sent(peer, keypair, len(packets), now)

    def send_data(self, peer: Peer, packet: bytes, now: float) -> None:
        """Seal and send ``packet`` to ``peer``, staging it while no session can carry it."""
        keypair = peer.keypairs.current
        endpoint = peer.endpoint if peer.path_kind is PATH_UDP else _RELAYED
        if (
            keypair is None
            or now - keypair.created >= C.REJECT_AFTER_TIME
            or keypair.send_counter >= C.REJECT_AFTER_MESSAGES
            or endpoint is None
        ):
            if endpoint is None:
                self.counters.no_endpoint += 1
                return
            peer.staged.append(packet)
            self.send_initiation(peer, now, retry=False)
            return
        self._transmit(peer, self._seal(keypair, (packet,), self.mtu), endpoint, now)
        self._data_sent(peer, keypair, 1, now)

    def _seal(
        self, keypair: Keypair, packets: Iterable[bytes | memoryview], limit: int
    ) -> list[bytes]:
        """The one place transport messages are built: each packet padded to a multiple of 16
        (but not beyond ``limit``, the MTU, unless already there), sealed under the next
        counter, behind the message header. Checks (session age, counter limits) are the
        caller's; this only builds."""
        # Per packet: one nonce (whose last eight bytes are the counter field), one AEAD call,
        # one concatenation; the cipher's wrapper and the counter's own encoding are skipped
        # (about 0.5 us a packet, docs/datapath.md). A zeroed keypair's ``encrypt`` raises
        # before the counter moves; no caller gets here with one (only keypairs already out
        # of every slot are zeroed, callers seal with ``keypairs.current``, and ``zero``
        # expires a keypair, which every caller's limit check refuses).
        encrypt = keypair.encrypt
        nonce_of = TRANSPORT_NONCE
        header = keypair.header
        counter = keypair.send_counter
        zeros = _ZEROS
        messages: list[bytes] = []
        append = messages.append
        for packet in packets:
            size = len(packet)
            if size & 15 and size < limit:
                packet = bytes(packet) + zeros[: min(-size & 15, limit - size)]
            nonce = nonce_of(counter)
            append(header + nonce[4:] + encrypt(nonce, packet, None))
            counter += 1
        keypair.send_counter = counter
        return messages

    def _transmit(self, peer: Peer, messages: list[bytes], endpoint: Endpoint, now: float) -> None:
        """Send sealed messages to ``peer`` (directly, in bulk where the adapter can, or through
        its relay) and do what any authenticated send does: count the bytes, drop the passive
        keepalive, re-arm the persistent one."""
        if peer.path_kind is not PATH_UDP:
            for message in messages:
                self._send_by_path(peer, message, now)
        elif len(messages) == 1:
            self.io.send_datagram(messages[0], endpoint)
        else:
            send_datagrams = getattr(self.io, "send_datagrams", None)
            if send_datagrams is not None:
                send_datagrams(messages, endpoint)
            else:
                send = self.io.send_datagram
                for message in messages:
                    send(message, endpoint)
        peer.tx_bytes += sum(map(len, messages))
        # Any authenticated packet sent: no passive keepalive needed; persistent one re-armed.
        peer.timers.deadlines[SEND_KEEPALIVE] = None
        if peer.persistent_keepalive:
            self.timers.arm(
                peer, peer.timers, PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive
            )

    def _data_sent(self, peer: Peer, keypair: Keypair, count: int, now: float) -> None:
        """After ``count`` data packets went out: expect an answer (or start a new handshake
        after KEEPALIVE + REKEY timeouts), and rekey on the counter or the session's age."""
        peer.data_packets += count
        if peer.timers.deadlines[NEW_HANDSHAKE] is None:
            self.timers.arm(
                peer,
                peer.timers,
                NEW_HANDSHAKE,
                now + C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT + self._jitter(),
            )
        if keypair.send_counter > C.REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now - keypair.created > C.REKEY_AFTER_TIME
        ):
            self.send_initiation(peer, now, retry=False)

    def send_keepalive(self, peer: Peer, now: float) -> None:
        """Send an encrypted empty packet (or the staged ones), handshaking first if needed."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: Peer, now: float) -> None:
        keypair = peer.keypairs.current
        endpoint = peer.endpoint if peer.path_kind is PATH_UDP else _RELAYED
        if endpoint is None:
            if peer.staged:
                self.counters.no_endpoint += 1
            peer.staged.clear()
            return
        if keypair is None or not keypair.can_send(now):
            self.send_initiation(peer, now, retry=False)
            return
        staged = list(peer.staged)
        peer.staged.clear()
        if not staged:
            return
        self._transmit(peer, self._seal(keypair, staged, self.mtu), endpoint, now)
        data = 0
        for packet in staged:
            if packet:
                data += 1
            else:
                peer.sent.add(KEEPALIVE, peer.data_packets + data, now)
        if data:
            self._data_sent(peer, keypair, data, now)

    # ------------------------------------------------------------------ handshakes out

    def _jitter(self) -> float:
        """REKEY_TIMEOUT's jitter, 0 to 0.333 s: two bytes of a pool of ``_JITTER_POOL``
        refilled from ``random`` when used up (one draw per 32 timers armed, not one each)."""
        used = self._jitter_used
        pool = self._jitter_pool
        if used >= len(pool):
            pool = self._jitter_pool = self.random(_JITTER_POOL)
            used = 0
        self._jitter_used = used + 2
        return int.from_bytes(pool[used : used + 2], "little") % 334 / 1000.0

    def send_initiation(self, peer: Peer, now: float, *, retry: bool) -> None:
        """Start (or retry) a handshake with ``peer``, at most once per REKEY_TIMEOUT."""
        if not retry:
            peer.handshake_attempts = 0
            peer.quiet_handshake = False
        if (
            peer.last_sent_handshake is not None
            and now - peer.last_sent_handshake < C.REKEY_TIMEOUT
        ):
            if not self.timers.pending(peer.timers, RETRANSMIT_HANDSHAKE):
                # We answered the peer's initiation moments ago and it has not confirmed the
                # session yet (it may never: see ``_persistent_keepalive``): try ours once the
                # gap has passed, rather than leave what we have to send waiting for the
                # peer's next packet. Confirmation cancels it (``_handshake_complete``).
                self.timers.arm(
                    peer,
                    peer.timers,
                    RETRANSMIT_HANDSHAKE,
                    peer.last_sent_handshake + C.REKEY_TIMEOUT + self._jitter(),
                )
            return
        if self.private_key is None or self.public_key is None or peer.static_shared is None:
            self.counters.no_identity += 1
            return
        peer.last_sent_handshake = now
        self._free_handshake_index(peer)
        index = self.indices.allocate(peer, self.random)
        peer.handshake_index = index
        message, handshake = create_initiation(
            local_static_public=self.public_key,
            local_static_private=self.private_key,
            remote_static=peer.public_key,
            precomputed_ss=peer.static_shared,
            ephemeral_private=generate_private_key(self.random),
            sender_index=index,
            timestamp=control.mark_timestamp(tai64n(now)) if self.mesh else tai64n(now),
        )
        peer.handshake = handshake
        message = peer.cookies.add_macs(message, now)
        self._send_handshake_message(peer, message, now)
        self.timers.arm(
            peer, peer.timers, RETRANSMIT_HANDSHAKE, now + C.REKEY_TIMEOUT + self._jitter()
        )

    def handshake_underway(self, peer: Peer, since: float) -> bool:
        """Whether a handshake with ``peer`` is under way or happened at or after ``since``:
        ours in flight (its retransmit timer runs, so the device retries it), an initiation
        from the peer consumed, or a handshake completed. The mesh layer's yielding side of a
        pair that learned of each other at once (mesh/paths.py, ``HANDSHAKE_YIELD``) asks before
        it initiates: an initiation of its own then would cross the peer's, each side's answer
        would meet a replaced handshake state, and no session would form for REKEY_TIMEOUT."""
        consumed = peer.last_initiation_consumed
        return (
            self.timers.pending(peer.timers, RETRANSMIT_HANDSHAKE)
            or (consumed is not None and consumed >= since)
            or peer.last_handshake_time >= since
        )

    def renew_session(self, peer: Peer, now: float) -> bool:
        """Start a handshake with ``peer`` unless one is under way (see
        :meth:`handshake_underway`): what the mesh layer does when a session it relies on
        lapsed, leaving a handshake in flight to the device's retransmit timer instead of
        restarting it (and its attempt count). True when an initiation was sent."""
        if self.handshake_underway(peer, now):
            return False
        self.send_initiation(peer, now, retry=False)
        return True

    def _send_handshake_message(self, peer: Peer, message: bytes, now: float) -> None:
        if peer.path_kind is not PATH_UDP:
            self._send_by_path(peer, message, now)
            peer.tx_bytes += len(message)
            peer.sent.add(HANDSHAKE, peer.data_packets, now)
        elif peer.endpoint is not None:
            self.io.send_datagram(message, peer.endpoint)
            peer.tx_bytes += len(message)
            peer.sent.add(HANDSHAKE, peer.data_packets, now)
        else:
            self.counters.no_endpoint += 1
        peer.timers.deadlines[SEND_KEEPALIVE] = None
        if peer.persistent_keepalive:
            self.timers.arm(
                peer, peer.timers, PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive
            )

    def _free_handshake_index(self, peer: Peer) -> None:
        if peer.handshake_index is not None:
            if self.indices.get(peer.handshake_index) is peer:
                self.indices.free(peer.handshake_index)
            peer.handshake_index = None

    def _drop_keypair(self, keypair: Keypair) -> None:
        if self.indices.get(keypair.local_index) is keypair:
            self.indices.free(keypair.local_index)
        keypair.zero()

    # ------------------------------------------------------------------ incoming datagrams

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> None:
        """Handle one UDP datagram; anything that does not authenticate is counted, not raised."""
        head = data[:4]
        if head == _TRANSPORT_TYPE:
            if len(data) < C.TRANSPORT_MIN_SIZE:
                self.counters.malformed += 1
                return
            self._receive_transport(data, source, now)
        elif head == _INITIATION_TYPE or head == _RESPONSE_TYPE:
            initiation = head == _INITIATION_TYPE
            if len(data) != (C.INITIATION_SIZE if initiation else C.RESPONSE_SIZE):
                self.counters.malformed += 1
                return
            backlog = self.handshake_backlog
            if backlog is not None and now < self._under_load_until:
                # Under load: after the transport data of this read batch.
                if len(backlog) >= HANDSHAKE_BACKLOG:
                    self.counters.handshake_backlog_full += 1
                else:
                    backlog.append((data, source))
                return
            self._receive_handshake(data, source, now)
        elif head == _COOKIE_TYPE:
            if len(data) != C.COOKIE_REPLY_SIZE:
                self.counters.malformed += 1
                return
            self._receive_cookie_reply(data, now)
        elif self._unknown_datagram_handler is not None:
            self._unknown_datagram_handler(data, source, now)
        else:
            self.counters.malformed += 1

    def run_handshake_backlog(self, now: float) -> bool:
        """Handle up to ``handshake_budget`` waiting handshake messages, oldest first; True
        when more are still waiting (the adapter comes back for them after other I/O)."""
        backlog = self.handshake_backlog
        if not backlog:
            return False
        for _ in range(min(self.handshake_budget, len(backlog))):
            data, source = backlog.popleft()
            self._receive_handshake(data, source, now)
        return bool(backlog)

    def _receive_handshake(
        self, data: bytes, source: Endpoint, now: float, via: Peer | Carrier | None = None
    ) -> None:
        """An initiation or a response of the right size, now or from the backlog: admitted
        (mac1, and under load the cookie and the rate limit) before any public-key work."""
        if not self._admit_handshake(data, int.from_bytes(data[4:8], "little"), source, now):
            return
        if data[:4] == _INITIATION_TYPE:
            self._receive_initiation(data, source, now, via)
        else:
            self._receive_response(data, source, now, via)

    def _receive_transport(
        self, data: bytes, source: Endpoint, now: float, via: Peer | Carrier | None = None
    ) -> None:
        keypair = self._index_get(int.from_bytes(data[4:8], "little"))
        # ``type() is`` narrows for mypy without a run-time ``assert isinstance``.
        if type(keypair) is not Keypair:
            self.counters.unknown_index += 1
            return
        if now - keypair.created >= C.REJECT_AFTER_TIME:
            self.counters.expired_keypair += 1
            return
        counter = int.from_bytes(data[8:16], "little")
        # The bound AEAD call and the header's own counter bytes as the nonce: one Python
        # call fewer than ``TransportCipher.open`` (several microseconds cold, after an idle
        # moment; docs/datapath.md, "Latency").
        decrypt = keypair.decrypt
        if decrypt is None:
            self.counters.decrypt_failed += 1
            return
        try:
            plaintext = decrypt(_NONCE_PREFIX + data[8:16], data[16:], None)
        except InvalidTag:
            self.counters.decrypt_failed += 1
            return
        if not keypair.replay.check(counter):
            self.counters.replayed += 1
            return
        peer = keypair.peer
        # Authenticated: roaming, counters, key confirmation, timers.
        if via is None:
            # ``_arrived``'s direct case, inline for the same reason.
            peer.arrived_from = source
            if source != peer.endpoint:
                self._roam(peer, source, now)
            for listener in self._source_listeners:
                listener(peer, source, now)
            peer.arrived_via = None
            # transport_batch_received may open the rest of its batch under this keypair.
            self._last_opened = keypair
        else:
            self._arrived(peer, source, via, now)
        peer.rx_bytes += len(data)
        if keypair is peer.keypairs.next:
            for dropped in peer.keypairs.promote_next(keypair):
                self._drop_keypair(dropped)
            self._handshake_complete(peer, now)
            self._send_staged(peer, now)
        deadlines = peer.timers.deadlines
        deadlines[NEW_HANDSHAKE] = None
        if peer.persistent_keepalive:
            self.timers.arm(
                peer, peer.timers, PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive
            )
        if not plaintext:
            return
        if plaintext[0] >> 4 == 15:
            self._receive_control(peer, plaintext, now)
            return
        # Data received: answer within KEEPALIVE_TIMEOUT unless we send something anyway.
        if deadlines[SEND_KEEPALIVE] is None:
            self.timers.arm(peer, peer.timers, SEND_KEEPALIVE, now + C.KEEPALIVE_TIMEOUT)
        else:
            peer.need_another_keepalive = True
        if (
            keypair.is_initiator
            and not peer.sent_lastminute_handshake
            and keypair is peer.keypairs.current
            and now - keypair.created > _REKEY_ON_RECEIVE_AGE
        ):
            peer.sent_lastminute_handshake = True
            self.send_initiation(peer, now, retry=False)
        self._deliver(peer, plaintext, now)

    def transport_batch_received(
        self, datagrams: Sequence[bytes | memoryview], source: Endpoint, now: float
    ) -> None:
        """The datagrams of one UDP GRO read (one source, one time): as
        :meth:`datagram_received` for each, with the per-session work done once.

        Datagrams may be views of the adapter's receive buffer, valid only during the call:
        the AEAD opens the ciphertext where it lies (a view, no slice copied), and every
        datagram that leaves the fast path (which may keep it: a handshake's backlog, a relay)
        is handed on as ``bytes``.

        The first datagram of a session in the batch takes the full path (index lookup, age,
        roaming, key confirmation, timers); the following ones under the same receiver index
        only decrypt, pass the replay window and are delivered, since everything else would
        repeat with the same source and the same ``now``. Any other message resets that.
        """
        known = -1
        keypair: Keypair | None = None
        peer: Peer | None = None
        decrypt: Callable[[bytes, bytes | memoryview, None], bytes] | None = None
        check: Callable[[int], bool] = _reject
        counters = self.counters
        unpack = _TRANSPORT_FIELDS.unpack_from
        inner_v4 = _INNER_V4.unpack_from
        deadlines: list[float | None] = []
        nonce_of = TRANSPORT_NONCE
        lookup = self.allowed_ips.lookup
        # Opened packets wait here and go to the adapter together (one call, not one a packet),
        # before anything that may write or send on its own and at the end.
        pending: list[bytes] = []
        hold = pending.append
        min_size = C.TRANSPORT_MIN_SIZE
        # The last inner source address checked against the peer's allowed IPs, and whether
        # it passed: a bulk flow's segments all carry the same one.
        checked: bytes | None = None
        allowed = False
        # Per fast packet, kept here and added to the peer before anything else runs (a
        # handler, the full path) and at the end: bytes received, packets delivered.
        rx_bytes = delivered = 0
        # The passive keepalive's state for this run: 0 look at the deadline, 1 armed by
        # this batch (the next packet asks for another), 2 another asked for already.
        keepalive = 0
        # SYN clamping and the echo prober: whether the fast path must look for them.
        mss = False
        echo = self.echo_marker is not None
        for data in datagrams:
            if decrypt is not None and len(data) >= min_size:
                kind, index, counter = unpack(data)
                if kind == 4 and index == known:
                    assert peer is not None and keypair is not None
                    try:
                        plaintext = decrypt(nonce_of(counter), data[16:], None)
                    except InvalidTag:
                        counters.decrypt_failed += 1
                        continue
                    if not check(counter):
                        counters.replayed += 1
                        continue
                    rx_bytes += len(data)
                    if not plaintext:
                        continue
                    first = plaintext[0]
                    if first >> 4 == 15:
                        fast = False  # a control message: to its handler below
                    else:
                        if keepalive != 2:
                            if deadlines[SEND_KEEPALIVE] is None:
                                self.timers.arm(
                                    peer, peer.timers, SEND_KEEPALIVE, now + C.KEEPALIVE_TIMEOUT
                                )
                                keepalive = 1
                            else:
                                peer.need_another_keepalive = True
                                keepalive = 2
                        # _deliver's checks, inline for the common packet: the whole of an IP
                        # packet, a source address just checked, neither an echo reply for the
                        # prober nor a SYN to clamp (those, and anything odd, go to _deliver).
                        length = len(plaintext)
                        if first == 0x45 and length >= 34:
                            # IPv4 without options: length, protocol, source and, for TCP,
                            # the flags in one call.
                            total, proto, source_address, tcp_flags = inner_v4(plaintext)
                            fast = total == length and not (
                                (proto == 6 and tcp_flags & 2 and mss) or (proto == 1 and echo)
                            )
                        else:
                            if first >> 4 == 4:
                                fast = length >= 20 and (plaintext[2] << 8) | plaintext[3] == length
                                source_address = plaintext[12:16]
                                proto = plaintext[9]
                                flags_at = ((first & 15) << 2) + 13
                            else:
                                fast = (
                                    first >> 4 == 6
                                    and length >= 40
                                    and (plaintext[4] << 8) | plaintext[5] == length - 40
                                )
                                source_address = plaintext[8:24]
                                proto = plaintext[6]
                                flags_at = 53
                            if fast and (
                                (
                                    proto == 6
                                    and mss
                                    and length > flags_at
                                    and plaintext[flags_at] & 2
                                )
                                or ((proto == 1 or proto == 58) and echo)
                            ):
                                fast = False
                    if not fast:
                        # A handler runs: what is held and counted goes first.
                        if pending:
                            self._write_pending(pending)
                        peer.rx_bytes += rx_bytes
                        peer.data_packets += delivered
                        rx_bytes = delivered = keepalive = 0
                        if first >> 4 == 15:
                            self._receive_control(peer, plaintext, now)
                        else:
                            self._deliver(peer, plaintext, now)
                        # The handler may have changed anything (keys, routes): look again.
                        decrypt = keypair.decrypt
                        mss = bool(peer.mss_mtu)
                        echo = self.echo_marker is not None
                        checked = None
                        continue
                    if source_address != checked:
                        checked = source_address
                        allowed = lookup(source_address) is peer
                    if not allowed:
                        counters.source_not_allowed += 1
                        continue
                    delivered += 1
                    hold(plaintext)
                    continue
            if pending:
                self._write_pending(pending)
            if peer is not None:
                peer.rx_bytes += rx_bytes
                peer.data_packets += delivered
            rx_bytes = delivered = keepalive = 0
            self._last_opened = None
            self.datagram_received(bytes(data), source, now)
            keypair = self._last_opened
            checked = None
            if keypair is not None:
                known = keypair.local_index
                peer = keypair.peer
                decrypt = keypair.decrypt
                check = keypair.replay.check
                deadlines = peer.timers.deadlines
                mss = bool(peer.mss_mtu)
                echo = self.echo_marker is not None
            else:
                decrypt = None
        if pending:
            self._write_pending(pending)
        if peer is not None:
            peer.rx_bytes += rx_bytes
            peer.data_packets += delivered
        self._last_opened = None

    def _write_pending(self, pending: list[bytes]) -> None:
        """Hand a batch's opened packets to the adapter in one call where it takes them
        (``write_packets``, which must not keep the list: it is emptied and reused here)."""
        write_packets = getattr(self.io, "write_packets", None)
        if write_packets is not None:
            write_packets(pending)
        else:
            write = self.io.write_packet
            for packet in pending:
                write(packet)
        pending.clear()

    def _deliver(self, peer: Peer, plaintext: bytes, now: float) -> None:
        """Check an opened data packet against the peer's allowed IPs and write it out."""
        length = len(plaintext)
        version = plaintext[0] >> 4
        if version == 4:
            if length < 20:
                self.counters.bad_inner_packet += 1
                return
            total = (plaintext[2] << 8) | plaintext[3]
            if total < 20 or total > length:
                self.counters.bad_inner_packet += 1
                return
            source_address = plaintext[12:16]
        elif version == 6:
            if length < 40:
                self.counters.bad_inner_packet += 1
                return
            total = 40 + ((plaintext[4] << 8) | plaintext[5])
            if total > length:
                self.counters.bad_inner_packet += 1
                return
            source_address = plaintext[8:24]
        else:
            self.counters.bad_inner_packet += 1
            return
        routes = self._routes
        if (
            routes[source_address]
            if source_address in routes
            else self.allowed_ips.lookup(source_address)
        ) is not peer:
            self.counters.source_not_allowed += 1
            return
        if total != length:
            plaintext = plaintext[:total]
        marker = self.echo_marker
        if marker is not None and (
            (version == 4 and plaintext[9] == 1 and plaintext[24:26] == marker)
            or (version == 6 and plaintext[6] == 58 and plaintext[44:46] == marker)
        ):
            on_echo_reply = self._echo_handler
            if on_echo_reply is not None and on_echo_reply(peer, plaintext, now):
                return
        mss_mtu = peer.mss_mtu
        if mss_mtu and plaintext[9 if version == 4 else 6] == 6:
            plaintext = clamp_if_syn(plaintext, mss_mtu)
        peer.data_packets += 1
        self.io.write_packet(plaintext)

    def _receive_control(self, peer: Peer, plaintext: bytes, now: float) -> None:
        decoded = control.decode(plaintext)
        handler = self._control_handler
        if decoded is None or not self.mesh or handler is None:
            self.counters.bad_inner_packet += 1
            return
        peer.is_meshguard = True
        kind, body = decoded
        handler(peer, kind, body, now)

    def send_control(self, peer: Peer, kind: int, body: bytes, now: float) -> bool:
        """Send a control message to a meshguard peer over its current session.

        Returns False (nothing sent) when the peer is not known to be a meshguard node or no
        session can carry the message yet; control traffic is retried by its sender, never
        staged behind data.
        """
        if not self.mesh or not peer.is_meshguard:
            return False
        keypair = peer.keypairs.current
        endpoint = peer.endpoint if peer.path_kind is PATH_UDP else _RELAYED
        if keypair is None or endpoint is None or not keypair.can_send(now):
            return False
        self._transmit(
            peer, self._seal(keypair, (control.encode(kind, body),), self.mtu), endpoint, now
        )
        peer.sent.add(CONTROL, peer.data_packets, now)
        return True

    def send_probe(self, peer: Peer, kind: int, body: bytes, now: float) -> bool | None:
        """Send a control message as a path MTU probe: with Don't-Fragment, no padding added.

        The adapter's ``send_probe(datagram, endpoint) -> bool`` sends it with DF and says
        whether the local stack accepted it (False: EMSGSIZE, bigger than the local route
        allows); an adapter without one sends it as any datagram. Returns None when nothing
        was sent (not a meshguard peer, no session, no direct endpoint).
        """
        if not self.mesh or not peer.is_meshguard:
            return None
        return self.send_packet_probe(peer, control.encode(kind, body), now)

    def send_packet_probe(self, peer: Peer, packet: bytes, now: float) -> bool | None:
        """Seal ``packet`` (an inner packet, any peer) and send it as a path MTU probe, with
        Don't-Fragment; see :meth:`send_probe` for the result. Toward a stock WireGuard peer the
        probe is an ordinary data packet (an ICMP echo request its host answers)."""
        relayed = peer.path_kind is not PATH_UDP
        if peer.path_kind is PATH_MEMBER:
            return None
        keypair = peer.keypairs.current
        endpoint = peer.endpoint if not relayed else _RELAYED
        if keypair is None or endpoint is None or not keypair.can_send(now):
            return None
        (message,) = self._seal(keypair, (packet,), _NO_LIMIT)
        peer.tx_bytes += len(message)
        peer.sent.add(CONTROL, peer.data_packets, now)
        if relayed:
            # A relay's stream carries any size: the probe goes, and says nothing of UDP.
            self._send_by_path(peer, message, now)
            return True
        send_probe = getattr(self.io, "send_probe", None)
        if send_probe is None:
            self.io.send_datagram(message, endpoint)
            return True
        return bool(send_probe(message, endpoint))

    def send_control_to(
        self, peer: Peer, endpoint: Endpoint, kind: int, body: bytes, now: float
    ) -> bool:
        """Send a control message to a meshguard peer at ``endpoint``, whatever its current path.

        Hole punching uses it to try a candidate endpoint (and to answer on the endpoint a ping
        came from) over the session the pair already has, usually one set up through a relay.
        """
        if not self.mesh or not peer.is_meshguard:
            return False
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now):
            return False
        (message,) = self._seal(keypair, (control.encode(kind, body),), _NO_LIMIT)
        self.io.send_datagram(message, endpoint)
        peer.tx_bytes += len(message)
        peer.sent.add(CONTROL, peer.data_packets, now)
        return True

    def _send_by_path(self, peer: Peer, message: bytes, now: float) -> None:
        """Hand ``message`` to the transport of the peer's decided path (not plain UDP)."""
        transport = self._transports.get(peer.path_kind)
        if transport is None or not transport.send(peer, message, now):
            self.counters.no_endpoint += 1

    def relayed_datagram_received(self, data: bytes, via: Peer | Carrier, now: float) -> None:
        """A datagram a relay carried to us: from another member (``via`` that member,
        RELAY_DELIVER) or through a TLS relay (``via`` its link). Handled as if received,
        except that roaming records ``via`` (``peer.arrived_via``) instead of a source
        endpoint: the path stays the arbiter's to decide. Handshakes through a relay never wait
        in the backlog and never get a cookie reply (the carrier authenticated and rate-limits
        its sender already; an answer to ``_RELAYED`` would go nowhere), and only WireGuard
        messages come this way."""
        if isinstance(via, Peer) and via.removed:
            return
        head = data[:4]
        if head == _TRANSPORT_TYPE and len(data) >= C.TRANSPORT_MIN_SIZE:
            self._receive_transport(data, _RELAYED, now, via)
        elif (head == _INITIATION_TYPE and len(data) == C.INITIATION_SIZE) or (
            head == _RESPONSE_TYPE and len(data) == C.RESPONSE_SIZE
        ):
            self._receive_handshake(data, _RELAYED, now, via)
        elif head == _COOKIE_TYPE and len(data) == C.COOKIE_REPLY_SIZE:
            self._receive_cookie_reply(data, now)
        else:
            self.counters.malformed += 1

    def _arrived(
        self, peer: Peer, source: Endpoint, via: Peer | Carrier | None, now: float
    ) -> None:
        """An authenticated message from ``peer`` came straight from ``source`` (``via``
        None: roaming is asked about a new source, the source listeners hear of it) or
        through a relay (``via``). The one place every authenticated kind records this."""
        if via is None:
            peer.arrived_from = source
            if source != peer.endpoint:
                self._roam(peer, source, now)
            for listener in self._source_listeners:
                listener(peer, source, now)
        else:
            self._relayed_from(peer, via, now)
        peer.arrived_via = via

    def _relayed_from(self, peer: Peer, via: Peer | Carrier, now: float) -> None:
        """An authenticated datagram came through ``via``: the listeners hear of it (before any
        reply). Without a roaming owner (a bare device) a peer we have no way to reach yet
        answers through the same member, as the path arbiter would decide."""
        for listener in self._relayed_listeners:
            listener(peer, via, now)
        if (
            self._roaming_handler is None
            and isinstance(via, Peer)
            and peer.path_kind is PATH_UDP
            and peer.endpoint is None
            and via is not peer
        ):
            peer.relay = via
            peer.path_kind = PATH_MEMBER

    def _under_load(self, now: float) -> bool:
        """Count handshake messages per second; past the threshold, demand cookies for 1 s."""
        if now - self._load_window_start >= 1.0:
            self._load_window_start = now
            self._load_window_count = 0
        self._load_window_count += 1
        if self._load_window_count > self.under_load_threshold:
            self._under_load_until = now + C.UNDER_LOAD_AFTER
        return now < self._under_load_until

    def _admit_handshake(
        self, data: bytes, sender_index: int, source: Endpoint, now: float
    ) -> bool:
        """mac1, and under load mac2 (else a cookie reply) and the per-source rate limit."""
        checker = self.cookie_checker
        if checker is None:
            self.counters.no_identity += 1
            return False
        if not checker.check_mac1(data):
            self.counters.bad_mac1 += 1
            return False
        if source is not _RELAYED and self._under_load(now):
            try:
                source_bytes = endpoint_bytes(source)
            except ValueError:
                self.counters.malformed += 1
                return False
            if not checker.check_mac2(data, source_bytes, now):
                reply = checker.create_reply(data, sender_index, source_bytes, now)
                self.io.send_datagram(reply, source)
                self.counters.cookie_sent += 1
                return False
            if not self.rate_limiter.allow(source_bytes[:-2], now):
                self.counters.rate_limited += 1
                return False
        return True

    def _receive_initiation(
        self, data: bytes, source: Endpoint, now: float, via: Peer | Carrier | None = None
    ) -> None:
        assert self.private_key is not None and self.public_key is not None

        def static_shared_for(remote_static: bytes) -> bytes | None:
            candidate = self.peers.get(remote_static)
            return None if candidate is None else candidate.static_shared

        consumed = consume_initiation(
            data,
            local_static_private=self.private_key,
            local_static_public=self.public_key,
            precomputed_ss_for=static_shared_for,
        )
        if consumed is None:
            self.counters.handshake_failed += 1
            return
        peer = self.peers[consumed.remote_static]
        if consumed.timestamp <= peer.latest_timestamp:
            self.counters.initiation_replayed += 1
            return
        if (
            peer.last_initiation_consumed is not None
            and now - peer.last_initiation_consumed < C.MIN_INITIATION_GAP
        ):
            self.counters.initiation_flood += 1
            return
        peer.latest_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now
        if control.is_marked(consumed.timestamp):
            peer.is_meshguard = True
        self._arrived(peer, source, via, now)
        # A consumed initiation replaces any handshake we had in flight with this peer.
        self._free_handshake_index(peer)
        peer.handshake = None
        self._authenticated_received(peer, now)
        index = self.indices.allocate(peer, self.random)
        message, keys = create_response(
            consumed,
            psk=peer.preshared_key,
            ephemeral_private=generate_private_key(self.random),
            sender_index=index,
        )
        keypair = Keypair(
            peer,
            keys.send_key,
            keys.receive_key,
            local_index=index,
            remote_index=consumed.remote_index,
            is_initiator=False,
            created=now,
        )
        self.indices.replace(index, keypair)
        for dropped in peer.keypairs.install(keypair):
            self._drop_keypair(dropped)
        message = peer.cookies.add_macs(message, now)
        peer.last_sent_handshake = now
        self._send_handshake_message(peer, message, now)
        self.timers.arm(peer, peer.timers, ZERO_KEY_MATERIAL, now + C.ZERO_KEY_MATERIAL_AFTER)

    def _receive_response(
        self, data: bytes, source: Endpoint, now: float, via: Peer | Carrier | None = None
    ) -> None:
        assert self.private_key is not None
        receiver_index = int.from_bytes(data[8:12], "little")
        peer = self.indices.get(receiver_index)
        if peer.__class__ is not Peer:
            self.counters.unknown_index += 1
            return
        assert isinstance(peer, Peer)
        handshake = peer.handshake
        if handshake is None or peer.handshake_index != receiver_index:
            self.counters.unknown_index += 1
            return
        result = consume_response(
            data, handshake, local_static_private=self.private_key, psk=peer.preshared_key
        )
        if result is None:
            self.counters.handshake_failed += 1
            return
        remote_index, keys = result
        peer.handshake = None
        peer.handshake_index = None
        keypair = Keypair(
            peer,
            keys.send_key,
            keys.receive_key,
            local_index=receiver_index,
            remote_index=remote_index,
            is_initiator=True,
            created=now,
        )
        self.indices.replace(receiver_index, keypair)
        for dropped in peer.keypairs.install(keypair):
            self._drop_keypair(dropped)
        self._arrived(peer, source, via, now)
        self._authenticated_received(peer, now)
        self._handshake_complete(peer, now)
        self.timers.arm(peer, peer.timers, ZERO_KEY_MATERIAL, now + C.ZERO_KEY_MATERIAL_AFTER)
        # Key confirmation: the responder needs a packet on the new keypair. Not for a
        # handshake a persistent keepalive started on an idle tunnel (``_persistent_keepalive``).
        if not peer.staged and not peer.quiet_handshake:
            peer.staged.append(b"")
        peer.quiet_handshake = False
        self._send_staged(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        owner = self.indices.get(int.from_bytes(data[4:8], "little"))
        if owner is None:
            self.counters.unknown_index += 1
            return
        peer = owner.peer if isinstance(owner, Keypair) else owner
        if not peer.cookies.consume_reply(data, now):
            self.counters.cookie_rejected += 1

    def _authenticated_received(self, peer: Peer, now: float) -> None:
        self.timers.cancel(peer.timers, NEW_HANDSHAKE)
        if peer.persistent_keepalive:
            self.timers.arm(
                peer, peer.timers, PERSISTENT_KEEPALIVE, now + peer.persistent_keepalive
            )

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        self.timers.cancel(peer.timers, RETRANSMIT_HANDSHAKE)
        peer.handshake_attempts = 0
        peer.sent_lastminute_handshake = False
        peer.last_handshake_time = now
        for listener in self.handshake_listeners:
            listener(peer)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """When :meth:`run_timers` should next be called (``None``: nothing pending)."""
        return self.timers.next_deadline()

    def run_timers(self, now: float) -> None:
        """Fire every protocol timer that is due."""
        for peer, kind in self.timers.expired(now):
            if peer.removed:
                continue
            if kind == RETRANSMIT_HANDSHAKE:
                self._retransmit_handshake(peer, now)
            elif kind == SEND_KEEPALIVE:
                self.send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    self.timers.arm(peer, peer.timers, SEND_KEEPALIVE, now + C.KEEPALIVE_TIMEOUT)
            elif kind == NEW_HANDSHAKE:
                self.send_initiation(peer, now, retry=False)
            elif kind == ZERO_KEY_MATERIAL:
                self._zero_key_material(peer)
            elif kind == PERSISTENT_KEEPALIVE:
                if peer.persistent_keepalive:
                    self._persistent_keepalive(peer, now)

    def _persistent_keepalive(self, peer: Peer, now: float) -> None:
        """Keep the NAT mapping toward ``peer`` open. On an idle tunnel whose session expired,
        the handshake initiation refreshes the mapping as well as a keepalive would, so toward
        a meshguard peer no keepalive follows the handshake as key confirmation: the next
        keepalive confirms the keypair, and a peer that must send before that starts its own
        handshake, at most REKEY_TIMEOUT after its response (see ``send_initiation``). One
        datagram per keepalive period instead of two. A stock WireGuard peer gets its
        confirmation at once, as from WireGuard (it would hold its packets for us until our
        next keepalive)."""
        keypair = peer.keypairs.current
        if peer.is_meshguard and not peer.staged and (keypair is None or not keypair.can_send(now)):
            self.send_initiation(peer, now, retry=False)
            # Quiet only if this initiation went out (not one already in flight for data).
            peer.quiet_handshake = peer.last_sent_handshake == now
            return
        self.send_keepalive(peer, now)

    def _retransmit_handshake(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts > C.MAX_TIMER_HANDSHAKES:
            # Give up after REKEY_ATTEMPT_TIME; key material goes later.
            self.timers.cancel(peer.timers, SEND_KEEPALIVE)
            peer.staged.clear()
            if not self.timers.pending(peer.timers, ZERO_KEY_MATERIAL):
                self.timers.arm(
                    peer, peer.timers, ZERO_KEY_MATERIAL, now + C.ZERO_KEY_MATERIAL_AFTER
                )
            return
        peer.handshake_attempts += 1
        self.send_initiation(peer, now, retry=True)

    def _zero_key_material(self, peer: Peer) -> None:
        self._free_handshake_index(peer)
        peer.handshake = None
        for keypair in peer.keypairs.clear():
            self._drop_keypair(keypair)

    # ------------------------------------------------------------------ helpers for adapters

    def replace_allowed_ips(self, peer: Peer, networks: Iterable[Network]) -> None:
        self.allowed_ips.remove_value(peer)
        for network in networks:
            self.allowed_ips.insert(network, peer)
