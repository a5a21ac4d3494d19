"""The flood guard: turns the UDP port's kernel filter to shedding while hostile datagrams pour in.

Every datagram that reaches the device and does not authenticate is counted in its drop
counters (bad mac1, unknown receiver, cookie replies sent under load, ...). Checked every
:data:`TICK` seconds, a high rate of those means a flood: then the socket filter
(:mod:`meshguard.adapters.socket_filter`) passes transport data only for live receiver indices and
handshakes only from known peers' addresses plus a random sample of the rest, and the sample
shrinks until what still reaches Python stays near :data:`TARGET_RATE`. When the rate stays low,
the sample grows back and shedding ends. The kernel drops the rest before it is queued, so the
flood can no longer crowd the tunnel's datagrams out of the receive buffer or take Python's time.

Known peers (those with an endpoint) re-handshake through shedding at once; a new peer or one
that moved gets in with the sampling's probability per initiation, as with any bounded queue.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from meshguard.adapters.socket_filter import Shedding
from meshguard.core.device import Device

__all__ = ["HOSTILE_COUNTERS", "TICK", "FloodGuard"]

#: Seconds between looks at the counters.
TICK = 0.25
#: Hostile datagrams per second reaching Python that turn shedding on.
ON_RATE = 2000.0
#: While shedding, the sample shrinks while more than this many a second still get through...
TARGET_RATE = 500.0
#: ...and grows back while fewer than this do; at no sampling and still below, shedding ends.
QUIET_RATE = 100.0
#: Ticks in a row below QUIET_RATE before the sample grows (or shedding ends).
QUIET_TICKS = 8
#: The first sample when shedding starts (one in 64, or less if the flood is big enough to
#: need it: the rate seen divided by TARGET_RATE) and the smallest (one in 65536).
FIRST_MASK = 63
MAX_MASK = 0xFFFF
#: More live indices than this and the filter stops checking receivers (program size limit).
MAX_INDICES = 3000
#: Known peer addresses checked in the filter, at most.
MAX_SOURCES = 512

#: The device's drop counters that only unauthenticated datagrams move.
HOSTILE_COUNTERS = (
    "malformed",
    "bad_mac1",
    "cookie_sent",
    "rate_limited",
    "handshake_failed",
    "initiation_replayed",
    "initiation_flood",
    "unknown_index",
    "decrypt_failed",
    "cookie_rejected",
    "handshake_backlog_full",
)


class Shedder(Protocol):
    """The UDP adapter's side: install the filter for ``shedding`` (None: the plain one)."""

    def set_shedding(self, shedding: Shedding | None) -> None: ...


class FloodGuard:
    """Reads ``device``'s counters at each :meth:`tick` and sets the port's filter."""

    def __init__(self, device: Device, shedder: Shedder) -> None:
        self.device = device
        self.shedder = shedder
        self.shedding: Shedding | None = None
        self.mask = 0
        self._last_total: int | None = None
        self._last_time = 0.0
        self._quiet = 0
        #: Times shedding started, and the last rate seen (for status).
        self.episodes = 0
        self.rate = 0.0

    def _hostile_total(self) -> int:
        counters = self.device.counters
        return sum(getattr(counters, name) for name in HOSTILE_COUNTERS)

    def tick(self, now: float) -> None:
        total = self._hostile_total()
        if self._last_total is None or now <= self._last_time:
            self._last_total, self._last_time = total, now
            return
        rate = (total - self._last_total) / (now - self._last_time)
        self._last_total, self._last_time = total, now
        self.rate = rate
        if self.shedding is None:
            if rate < ON_RATE:
                return
            # Start with a sample that brings what reaches Python near the target at once.
            self.mask = FIRST_MASK
            while self.mask < MAX_MASK and rate / (self.mask + 1) > TARGET_RATE:
                self.mask = self.mask * 2 + 1
            self.episodes += 1
            self._quiet = 0
        elif rate > TARGET_RATE:
            self.mask = min(MAX_MASK, self.mask * 2 + 1)
            self._quiet = 0
        elif rate < QUIET_RATE:
            self._quiet += 1
            if self._quiet >= QUIET_TICKS:
                self._quiet = 0
                if self.mask == 0:
                    self.shedding = None
                    self.shedder.set_shedding(None)
                    return
                self.mask >>= 1
        else:
            self._quiet = 0
        self._apply()

    def _apply(self) -> None:
        wanted = Shedding(self._known_sources(), self._live_indices(), self.mask)
        if wanted != self.shedding:
            self.shedding = wanted
            self.shedder.set_shedding(wanted)

    def _known_sources(self) -> tuple[bytes, ...]:
        found: set[bytes] = set()
        for peer in self.device.peers.values():
            endpoint = peer.endpoint
            if endpoint is None or endpoint[1] == 0:
                continue
            try:
                address = ipaddress.ip_address(endpoint[0].split("%", 1)[0])
            except ValueError:
                continue
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add(address.packed)
            if len(found) >= MAX_SOURCES:
                break
        return tuple(sorted(found))

    def _live_indices(self) -> tuple[int, ...] | None:
        found: set[int] = set()
        for peer in self.device.peers.values():
            if peer.handshake_index is not None:
                found.add(peer.handshake_index)
            keypairs = peer.keypairs
            for keypair in (keypairs.previous, keypairs.current, keypairs.next):
                if keypair is not None:
                    found.add(keypair.local_index)
        if len(found) > MAX_INDICES:
            return None
        return tuple(sorted(found))

    def status(self) -> dict[str, Any]:
        """For ``meshguard status``: whether the port is shedding, and how hard."""
        return {
            "shedding": self.shedding is not None,
            "sample": f"1/{self.mask + 1}" if self.shedding is not None else "all",
            "hostile_per_second": round(self.rate),
            "episodes": self.episodes,
        }
