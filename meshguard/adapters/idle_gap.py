"""Whether a read batch follows an idle moment of the node: the lone-packet rule's clock.

A lone packet (an idle ping, an interactive keystroke) should leave at once, without the hold,
the read that finds the queue empty and the flush that a batch needs; under load a batch should
stay whole, one GSO send or coalesced write. The TUN device and the UDP sockets share one
``IdleGap``, because "idle" is the node's state, not one descriptor's: under a bulk transfer the
receiver's TUN reads (acknowledgements) come right after long UDP batches, and a per-descriptor
rule counted the UDP batch as the TUN device's idle time, sending every acknowledgement alone
(single-stream TCP fell to about half). So the gap runs from the end of the node's last read
batch, on any descriptor, to the start of this one: two clock reads per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["IdleGap"]


class IdleGap:
    """The end of the node's last read batch, whether that batch was lone, and the rule."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        gap: float = 0.002,
        reply_gap: float = 0.0002,
    ) -> None:
        self._clock = clock
        #: Seconds without a read batch after which the next one is lone. Longer than the
        #: pauses of paced senders (iperf3 sends a burst every millisecond), whose bursts must
        #: stay whole batches: handing each burst's first packet on alone cost the UDP packet
        #: rate 10-15 per cent.
        self.gap = gap
        #: After a lone batch, a batch this long after it is lone too: the reply to what the
        #: lone batch sent (an echo reply reaching the node that sent the request, a fraction
        #: of a millisecond later) goes at once; what a busy node reads right after (no pause
        #: at all) does not.
        self.reply_gap = reply_gap
        #: Busy from creation: a test's ``task.Clock`` must advance before a batch is lone.
        self._last_end = clock()
        self._last_lone = False

    def batch_begins(self) -> bool:
        """True if this batch's first packet goes alone: no read batch ended in the last
        ``gap`` seconds, or the last batch was lone and ended ``reply_gap`` or more ago."""
        pause = self._clock() - self._last_end
        lone = pause >= self.gap or (self._last_lone and pause >= self.reply_gap)
        self._last_lone = lone
        return lone

    def batch_ended(self) -> None:
        self._last_end = self._clock()
