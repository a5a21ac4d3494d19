"""Fair sharing of one receiver's connection among the members sending to it.

The relay never queues beyond a connection's transport buffer: while a receiver's transport is
paused, datagrams to it are dropped. Dropping whatever arrives while paused hits every sender
in proportion to the time the receiver is paused, so one member flooding a receiver (within its
own rate limit) takes most of that receiver's bandwidth and a light sender's TCP inside the
tunnel sees heavy loss. This module tells the heavy from the light: each receiver counts the
bytes each sender offered it over the last one to two :data:`WINDOW` s, and while the receiver
is paused a sender at or below the average share still gets its frames written, up to
:data:`SLACK` bytes beyond the transport's high-water mark until the transport resumes. Heavy
senders are dropped as before. Buffering stays bounded: at most SLACK extra bytes per receiver.

Sans-I/O: time comes in as an argument.
"""

from __future__ import annotations

#: Length of one accounting window (seconds); shares cover the current and the previous one.
WINDOW = 0.5
#: Bytes a paused receiver still takes from light senders before it resumes.
SLACK = 64 * 1024
#: Senders tracked per window; beyond it new senders share one bucket (bounded memory).
MAX_SENDERS = 4096
_OTHERS = b""


class FairShare:
    """Per-receiver accounting of offered bytes by sender, and the paused-receiver decision."""

    __slots__ = ("current", "current_total", "previous", "previous_total", "slack", "started")

    def __init__(self) -> None:
        self.current: dict[bytes, int] = {}
        self.previous: dict[bytes, int] = {}
        self.current_total = 0
        self.previous_total = 0
        self.started = 0.0
        #: Bytes written beyond the high-water mark since the transport paused.
        self.slack = 0

    def offered(self, sender: bytes, size: int, now: float) -> None:
        """Count ``size`` bytes that ``sender`` offered this receiver (written or not)."""
        if now - self.started >= WINDOW:
            if now - self.started >= 2 * WINDOW:
                self.previous, self.previous_total = {}, 0
            else:
                self.previous, self.previous_total = self.current, self.current_total
            self.current, self.current_total = {}, 0
            self.started = now
        current = self.current
        if sender not in current and len(current) >= MAX_SENDERS:
            sender = _OTHERS
        current[sender] = current.get(sender, 0) + size
        self.current_total += size

    def light(self, sender: bytes) -> bool:
        """Whether ``sender`` offered no more than the average sender did (over both windows)."""
        share = self.current.get(sender, 0) + self.previous.get(sender, 0)
        senders = max(len(self.current), len(self.previous), 1)
        return share * senders <= self.current_total + self.previous_total

    def admit_paused(self, sender: bytes, size: int) -> bool:
        """The receiver is paused: may this frame still be written? (Counts it against SLACK.)"""
        if self.slack + size > SLACK or not self.light(sender):
            return False
        self.slack += size
        return True

    def resumed(self) -> None:
        self.slack = 0
