"""Whether a read batch follows an idle moment of the node: the lone-packet rule's clock.

A lone packet (an idle ping, an interactive keystroke) should leave at once, without the hold,
the read that finds the queue empty and the flush that a batch needs; under load a batch should
stay whole, one GSO send or coalesced write. The TUN device and the UDP sockets share one
``IdleGap``, because "idle" is the node's state, not one descriptor's: under a bulk transfer the
receiver's TUN reads (acknowledgements) come right after long UDP batches, and a per-descriptor
rule counted the UDP batch as the TUN device's idle time, sending every acknowledgement alone
(single-stream TCP fell to about half). So the gap runs from the end of the node's last read
batch, on any descriptor, to the start of this one: at most two clock reads per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["IdleGap"]


class IdleGap:
    """The end of the node's last read batch, and the rule that reads it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, gap: float = 0.0002) -> None:
        self._clock = clock
        #: Seconds without a read batch after which the next one is idle. Shorter than a round
        #: trip through the tunnel (so a reply arriving at the node that sent the request still
        #: counts as lone) and far longer than the pause between batches of a busy node (none:
        #: its poll returns at once).
        self.gap = gap
        #: Busy from creation: a test's ``task.Clock`` must advance before a batch is idle.
        self._last_end = clock()

    def batch_begins(self) -> bool:
        """True if no read batch ended in the last ``gap`` seconds."""
        return self._clock() - self._last_end >= self.gap

    def batch_ended(self) -> None:
        self._last_end = self._clock()
