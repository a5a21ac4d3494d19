"""Per-source token buckets that cap handshake processing while the device is under load.

Handshakes cost a Diffie-Hellman each, so when a flood arrives each source (an IPv4 address or an
IPv6 /64, which one attacker usually owns whole) gets a small steady allowance; well-behaved peers
that retry once every few seconds never notice.
"""

from typing import Final

#: Seconds an entry may sit unused before ``collect`` drops it; also how often to call ``collect``.
COLLECT_INTERVAL: Final = 1.0
#: Sources tracked at most; beyond this new sources are denied until ``collect`` frees room.
DEFAULT_MAX_ENTRIES: Final = 8192

_V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"
# Seconds early a packet may be and still count as on schedule: Unix times near 1.7e9 round to
# 0.24 us, so a packet exactly 1/rate after the last may otherwise find 0.99999 tokens.
_TIME_SLACK: Final = 1e-6


class RateLimiter:
    """A token bucket per source: ``rate`` packets a second on average, ``burst`` at once."""

    __slots__ = (
        "_burst",
        "_entries",
        "_idle",
        "_last_collect",
        "_max_entries",
        "_one_token",
        "_rate",
    )

    def __init__(
        self, rate: float = 20.0, burst: int = 5, *, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate, burst and max_entries must be positive")
        self._rate = rate
        self._burst = float(burst)
        self._max_entries = max_entries
        self._one_token = 1.0 - rate * _TIME_SLACK
        # An entry is dropped only once its bucket is full again, so forgetting it grants nothing.
        self._idle = max(COLLECT_INTERVAL, burst / rate)
        # Per source: [tokens left, time of last packet].
        self._entries: dict[bytes, list[float]] = {}
        self._last_collect = float("-inf")

    def __len__(self) -> int:
        """The number of sources currently tracked."""
        return len(self._entries)

    def allow(self, source_ip: bytes, now: float) -> bool:
        """Spend a token of ``source_ip``'s bucket (4 or 16 raw bytes) if it has one."""
        entries = self._entries
        key = _source_key(source_ip)
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self._max_entries:
                # Full: reclaim idle entries at most once per interval, so a flood of new
                # sources cannot make every packet pay for a sweep of the whole table.
                if now - self._last_collect < COLLECT_INTERVAL:
                    return False
                self.collect(now)
                if len(entries) >= self._max_entries:
                    return False
            entries[key] = [self._burst - 1.0, now]
            return True
        tokens, last = entry
        if now > last:
            tokens += (now - last) * self._rate
            if tokens > self._burst:
                tokens = self._burst
            # A clock that steps back must not refill the bucket twice, so time only advances.
            entry[1] = now
        if tokens >= self._one_token:
            entry[0] = tokens - 1.0
            return True
        entry[0] = tokens
        return False

    def collect(self, now: float) -> None:
        """Forget sources idle long enough for their bucket to be full; bounds memory."""
        self._last_collect = now
        cutoff = now - self._idle
        stale = [key for key, (_, last) in self._entries.items() if last < cutoff]
        for key in stale:
            del self._entries[key]


def _source_key(source_ip: bytes) -> bytes:
    """The bucket a source address belongs to: IPv4 whole, IPv6 by /64, v4-mapped as IPv4."""
    size = len(source_ip)
    if size == 4:
        return source_ip
    if size == 16:
        if source_ip[:12] == _V4_MAPPED_PREFIX:
            return source_ip[12:]
        return source_ip[:8]
    raise ValueError(f"a source address is 4 or 16 bytes, not {size}")
