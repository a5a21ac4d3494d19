"""Whether a read batch follows an idle moment of the node: the lone-packet rule's clock.

A lone packet (an idle ping, an interactive keystroke) should leave at once, without the hold,
the read that finds the queue empty and the flush that a batch needs; under load a batch should
stay whole, one GSO send or coalesced write. The TUN device and the UDP sockets share one
``IdleGap``, because "idle" is the node's state, not one descriptor's: under a bulk transfer the
receiver's TUN reads (acknowledgements) come right after long UDP batches, and a per-descriptor
rule counted the UDP batch as the TUN device's idle time, sending every acknowledgement alone
(single-stream TCP fell to about half). So the gap runs from the end of the node's last read
batch, on any descriptor, to the start of this one: two clock reads per batch.

The reply to a lone batch is lone too. On the descriptor the lone batch came from, what is
read with no pause after it is what was queued behind it, so the pause counts from the lone
batch's end. On another descriptor (an echo request read from the TUN device, its reply on
the UDP socket) the reply can only come a network round trip after the request went out, so
the time counts from the lone batch's start: a lone batch that took long (cold code after an
idle moment) does not make its own reply wait for a batch.

The clock read at a batch's start is also the batch's time (``now``): the read paths hand it
on with each packet, so the node needs no clock read (and no call of its own) between a read
and the engine.
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
        #: at all) does not. Counted from the lone batch's end on its own descriptor, from its
        #: start on another.
        self.reply_gap = reply_gap
        #: Busy from creation: a test's ``task.Clock`` must advance before a batch is lone.
        self._last_end = clock()
        self._last_start = self._last_end
        self._last_lone = False
        self._last_source: object = None
        #: The clock read of the latest batch's start: the time the read paths hand on with
        #: every packet of the batch (one clock read per batch, not one per packet or layer).
        self.now = self._last_end

    def batch_begins(self, source: object) -> bool:
        """True if this batch (read from ``source``, a descriptor) hands its first packet on
        alone: no read batch ended in the last ``gap`` seconds, or the last batch was lone and
        ``reply_gap`` or more has passed since it ended (same descriptor) or began (another)."""
        self.now = now = self._clock()
        pause = now - self._last_end
        if pause >= self.gap:
            lone = True
        elif not self._last_lone:
            lone = False
        elif source is self._last_source:
            lone = pause >= self.reply_gap
        else:
            lone = now - self._last_start >= self.reply_gap
        self._last_lone = lone
        self._last_start = now
        self._last_source = source
        return lone

    def batch_ended(self) -> None:
        self._last_end = self._clock()
