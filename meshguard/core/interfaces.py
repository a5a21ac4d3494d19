"""The seams between the sans-I/O core and the adapters that do I/O.

The core calls these to send and write; adapters implement them. Keeping them as
``typing.Protocol`` lets tests wire the core to recording stubs or in-memory networks.
"""

from collections.abc import Callable
from typing import Protocol

#: A UDP endpoint as ``(host, port)``; ``host`` is a numeric IPv4 or IPv6 address.
Endpoint = tuple[str, int]

#: A source of random bytes, like ``os.urandom``; tests pass a seeded one.
RandomBytes = Callable[[int], bytes]


class DeviceIO(Protocol):
    """Where the device engine puts what it produces."""

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        """Send one UDP datagram to ``endpoint``."""

    def write_packet(self, packet: bytes) -> None:
        """Write one decrypted IP packet to the TUN device."""
