"""What a node sent to one peer besides its data, by kind, and how much of it while idle.

The point of ``PersistentKeepalive = auto`` is to keep an idle tunnel's NAT mapping open with as
few datagrams as possible; these counts let a user see what their NAT costs (``meshguard
status``: keepalives, mesh control messages, handshake messages and NAT measurement probes).
Data packets are not counted here (``Peer.data_packets`` does, on the hot path): a count is
taken only when something other than data is sent, which is rare.

An *idle stretch* begins with the first such datagram after the latest data packet (either way;
``Peer.data_packets`` moved) and lasts until the next data packet: what it holds is what the
idle tunnel cost, starting with the passive keepalive or rekey that follows traffic.
"""

from __future__ import annotations

from typing import Final

KEEPALIVE: Final = "keepalive"
CONTROL: Final = "control"
HANDSHAKE: Final = "handshake"
PROBE: Final = "probe"
KINDS: Final = (KEEPALIVE, CONTROL, HANDSHAKE, PROBE)


class SentCounts:
    """Datagrams sent to one peer by kind: in all, and in the current idle stretch."""

    __slots__ = ("_data_mark", "idle", "idle_since", "latest", "total")

    def __init__(self) -> None:
        self.total = dict.fromkeys(KINDS, 0)
        self.idle = dict.fromkeys(KINDS, 0)
        #: When the current idle stretch began (None: nothing sent yet), and the latest count.
        self.idle_since: float | None = None
        self.latest: float | None = None
        self._data_mark = -1

    def add(self, kind: str, data_packets: int, now: float) -> None:
        """One datagram of ``kind`` went out at ``now``; ``data_packets`` is the peer's count
        of data packets either way (a change since the last call ends the idle stretch)."""
        self.total[kind] += 1
        if data_packets != self._data_mark:
            self._data_mark = data_packets
            self.idle = dict.fromkeys(KINDS, 0)
            self.idle_since = now
        self.idle[kind] += 1
        self.latest = now

    def relabel(self, was: str, kind: str) -> None:
        """The datagram just counted as ``was`` is better called ``kind`` (a keepalive sent as a
        control message asking for an answer is still the keepalive)."""
        if self.total[was] and self.idle[was]:
            self.total[was] -= 1
            self.idle[was] -= 1
            self.total[kind] += 1
            self.idle[kind] += 1
