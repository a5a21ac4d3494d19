"""The birthday technique: a direct path between a NAT that maps per destination ("hard",
Linux ``masquerade random``) and one that does not ("easy"), after plain hole punching failed.

A hard NAT gives every new flow (socket, destination) its own random public port, so the easy
side can never guess the port the hard side's packets to it leave from, and the easy side's
filter drops them. The way out (Tailscale's "birthday paradox" NAT traversal): the hard side
opens :data:`SOCKETS` extra sockets and sends from each a primer (hop limit 2: it leaves its
own NAT, creating a mapping, and dies before the easy side's NAT) toward the easy side's one
endpoint, so its NAT holds :data:`SOCKETS` mappings toward that endpoint; it then tells the
other side (a BIRTHDAY message through the tunnel, over the relay). The easy side sends
PATH_PINGs from its own socket to :data:`PROBES` distinct random ports of the hard side's
public address. A ping that lands on one of the mappings passes the hard NAT (it comes from
exactly the endpoint that mapping was made for); the hard side answers from that socket and
keeps sending to the easy side through it, and each ping opened the easy side's filter for
the port it went to, so the answer passes too. With 256 mappings among the 64,512 ports Linux
picks from, 2,048 probes hit with probability 1 - (1 - 256/64512)^2048 = 99.97 %; in the netns
runs the first hit came after 39 to 259 probes. (Tailscale's 1,024 give 98 %: in the NAT grid,
where each hard home runs the technique with six members at once, about one run in six then had
a pair whose first attempt missed, which costs ``ATTEMPT_GAP`` relayed; twice the pings at twice
the pace cost the same 10 s and ~20 kB/s.)

Bounded: at most :data:`PROBES` pings per attempt, :data:`PROBES_PER_TICK` every
:data:`TICK` seconds (200 a second, ~20 kB/s, ~220 kB per attempt), at most one spray per
member per :data:`SPRAY_GAP`; each side starts at most :data:`MAX_ATTEMPTS` attempts per member
(one each time punching goes quiet, at least :data:`ATTEMPT_GAP` apart) and then gives up
until a direct path is found again. The extra sockets live :data:`HOLD` seconds unless one is
hit. Both sides take both roles: neither knows which NAT is the hard one, and the side whose
NAT is easy loses only its primers and its answers to nobody. Two hard NATs stay relayed (the
spray then misses, as expected: each side's mappings point at the other's old port).

Sans-I/O: the sockets are the adapter's (:class:`BirthdayIO`,
``meshguard/adapters/birthday_sockets.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from meshguard.core.interfaces import Endpoint

#: Extra sockets the hard side opens, each with its own mapping toward the easy side.
SOCKETS = 256
#: Pings the easy side sends to distinct random ports of the hard side's address, at most.
PROBES = 2048
#: The spray's pace: this many pings every ``TICK`` seconds (200 a second).
PROBES_PER_TICK = 20
TICK = 0.1
#: How long answers to the last pings of a spray are still taken.
LINGER = 2.0
#: How long the extra sockets wait for a hit (the spray takes ~10 s after the BIRTHDAY message
#: crosses the relay).
HOLD = 20.0
#: A member's BIRTHDAY message starts a spray toward it at most this often.
SPRAY_GAP = 30.0
#: Attempts per member (we open sockets and ask it to spray), each when punching goes quiet.
MAX_ATTEMPTS = 3
ATTEMPT_GAP = 60.0
#: Ports the hard NAT picks from (Linux: 1024-65535 for a source port above 1023).
LOW_PORT = 1024
HIGH_PORT = 65535


class BirthdayIO(Protocol):
    """The extra sockets of the hard side's role (the node's adapter)."""

    def open(self, toward: Endpoint, count: int, hold: float) -> bool:
        """Open ``count`` sockets, each priming its NAT mapping toward ``toward`` with a
        datagram of hop limit 2; close them after ``hold`` seconds unless one is hit. A hit:
        the first datagram from ``toward`` on one of them makes that socket carry everything
        we send to ``toward`` from then on. False: nothing opened."""
        ...

    def release(self, toward: Endpoint) -> None:
        """Close the socket that carries ``toward`` (its path died or the member left)."""
        ...


@dataclass
class Spray:
    """The easy side's probes toward one member's public address."""

    host: str
    nonce: bytes
    ports: list[int]
    started: float
    sent: int = 0
    next_at: float = 0.0
    #: When each port's ping left (for the round-trip time of the one that is answered).
    sent_at: dict[int, float] = field(default_factory=dict)

    def due(self, now: float) -> list[int]:
        """The ports to ping now (the next tick's worth), advancing the schedule."""
        if self.next_at > now or self.sent >= len(self.ports):
            return []
        batch = self.ports[self.sent : self.sent + PROBES_PER_TICK]
        self.sent += len(batch)
        for port in batch:
            self.sent_at[port] = now
        self.next_at = now + TICK
        return batch

    @property
    def done(self) -> bool:
        return self.sent >= len(self.ports)


def random_ports(random: Callable[[int], bytes], count: int = PROBES) -> list[int]:
    """``count`` distinct ports from the hard NAT's range, in random order."""
    span = HIGH_PORT - LOW_PORT + 1
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < min(count, span):
        port = LOW_PORT + int.from_bytes(random(4), "little") % span
        if port not in seen:
            seen.add(port)
            chosen.append(port)
    return chosen
