"""The seams between the sans-I/O core and the adapters and features around it.

The core calls these to send and write, and to report what it saw; adapters and the mesh
features implement them. Keeping them as ``typing.Protocol`` lets tests wire the core to
recording stubs or in-memory networks, and lets mypy check every registration.

Events the device reports come in two shapes (see ``Device``'s registration methods):

- *listeners*: any number may register, each is told (authenticated sources, handshakes);
- *owners*: exactly one party decides what happens (a control message's dispatch, a datagram
  that is no WireGuard message, an oversize packet, an echo reply that may be consumed, a path
  kind's transport). Registering a second owner raises :class:`AlreadyRegisteredError` instead of
  silently replacing the first, which is how single-slot callbacks used to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshguard.core.peer import Peer

#: A UDP endpoint as ``(host, port)``; ``host`` is a numeric IPv4 or IPv6 address.
Endpoint = tuple[str, int]

#: A source of random bytes, like ``os.urandom``; tests pass a seeded one.
RandomBytes = Callable[[int], bytes]


class AlreadyRegisteredError(RuntimeError):
    """A second owner tried to take an event that has one (a wiring bug: fail loudly)."""


class DeviceIO(Protocol):
    """Where the device engine puts what it produces."""

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        """Send one UDP datagram to ``endpoint``."""

    def write_packet(self, packet: bytes) -> None:
        """Write one decrypted IP packet to the TUN device.

        An adapter may also offer ``write_packets(packets: list[bytes])``, the same for a
        batch's packets in order in one call (the device looks for it; it must not keep the
        list, which the device empties and reuses).
        """


class ControlHandler(Protocol):
    """The owner of authenticated mesh control messages (the mesh agent dispatches by kind)."""

    def __call__(self, peer: Peer, kind: int, body: bytes, now: float) -> None: ...


class DatagramHandler(Protocol):
    """The owner of datagrams that are no WireGuard message (mesh probes); it counts what it
    does not recognise. Such a datagram never authenticated: it must not change peer state."""

    def __call__(self, data: bytes, source: Endpoint, now: float) -> None: ...


class SourceListener(Protocol):
    """Told the source of every datagram from ``peer`` that authenticated and came straight
    over UDP (WireGuard's roaming moment), before any reply to it is sent: the UDP layer
    learns which local address to answer from only then, so spoofed datagrams cannot change
    it. Called on the hot path: keep it cheap."""

    def __call__(self, peer: Peer, source: Endpoint, now: float) -> None: ...


class Carrier(Protocol):
    """A relay that is no peer (a TLS relay link), as the device records where a datagram
    came through (``Peer.arrived_via``)."""

    #: Shown in status and logs: the relay's ``host:port``.
    name: str


class RoamingHandler(Protocol):
    """The owner of a peer's endpoint when an authenticated datagram came straight over UDP
    from ``source`` other than ``peer.endpoint`` (WireGuard's roaming): the path arbiter moves
    the endpoint, or keeps the path it decided. Without an owner the device roams itself."""

    def __call__(self, peer: Peer, source: Endpoint, now: float) -> None: ...


class RelayedListener(Protocol):
    """Told of every datagram from ``peer`` that authenticated and came through a relay
    (``via``: the forwarding member or the carrier), before any reply to it is sent: the path
    logic may put the peer on that relay first, so the reply takes the same way."""

    def __call__(self, peer: Peer, via: Peer | Carrier, now: float) -> None: ...


class PeerRemovedListener(Protocol):
    """Told of every peer the device removed (UAPI ``remove``, a config reload without it, a
    replace, a learned member that left, our own key set to the peer's), after it is gone:
    per-peer state kept elsewhere (the path arbiter's) is dropped with it."""

    def __call__(self, peer: Peer) -> None: ...


class TooBigHandler(Protocol):
    """The owner of TUN packets larger than the peer's ``inner_mtu`` (path MTU enforcement):
    the device does not send them."""

    def __call__(self, peer: Peer, packet: bytes, now: float) -> None: ...


class EchoReplyHandler(Protocol):
    """The owner of ICMP echo replies carrying its marker (path MTU probes toward stock
    peers): True consumes the reply, False lets it through to the TUN device."""

    def __call__(self, peer: Peer, packet: bytes, now: float) -> bool: ...


class PathTransport(Protocol):
    """Carries a peer's datagrams on a path that is not plain UDP to ``peer.endpoint`` (a
    forwarding member, a TLS relay). The device looks it up by the peer's decided path kind
    (``Peer.path_kind``) and hands it each datagram; it returns False when it dropped one."""

    def send(self, peer: Peer, datagram: bytes, now: float) -> bool: ...
