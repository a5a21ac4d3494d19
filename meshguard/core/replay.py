"""The anti-replay window for transport counters (RFC 6479, sized like wireguard-go).

The receiver accepts each counter at most once and tolerates reordering up to ``WINDOW`` messages
behind the highest counter seen. Check a counter only after the AEAD has authenticated the
message, or forged packets could slide the window.
"""

from typing import Final

from meshguard.core.constants import REJECT_AFTER_MESSAGES

#: Counters per block; a block is the unit the ring clears as the window moves forward.
BLOCK_BITS: Final = 64
#: Blocks in the ring: 128 x 64 = 8192 counters, as in wireguard-go and the kernel.
RING_BLOCKS: Final = 128
RING_BITS: Final = RING_BLOCKS * BLOCK_BITS
#: How far behind the highest accepted counter a counter may be: one block is kept spare so the
#: block being cleared never holds a counter that is still inside the window.
WINDOW: Final = RING_BITS - BLOCK_BITS

_BLOCK_SHIFT: Final = 6
_RING_MASK: Final = RING_BITS - 1
_BLOCK_MASK: Final = RING_BLOCKS - 1
_ZERO_BLOCK: Final = bytes(BLOCK_BITS)
_ZERO_RING: Final = bytes(RING_BITS)


class ReplayWindow:
    """Test-and-set of received counters, one window per receiving keypair.

    The ring holds one byte per counter rather than one bit: CPython indexes a ``bytearray``
    faster than it shifts and masks ``int`` words (docs/datapath.md has the figures), and
    ``check`` runs once per received packet. It is still RFC 6479: a ring of blocks, cleared
    block by block as the highest counter moves, with no shifting.
    """

    __slots__ = ("_last", "_limit", "_ring")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        """``limit`` is the first counter always rejected; tests may lower it."""
        self._limit = limit
        self._ring = bytearray(RING_BITS)
        self._last = 0

    @property
    def last(self) -> int:
        """The highest counter accepted so far (0 before any)."""
        return self._last

    def reset(self) -> None:
        """Forget every counter, as for a fresh keypair."""
        self._ring[:] = _ZERO_RING
        self._last = 0

    def check(self, counter: int) -> bool:
        """Accept and record ``counter``, or reject it as replayed, too old or past the limit."""
        last = self._last
        if counter > last:
            # Only a forward move can reach the limit: ``last`` is always below it.
            if counter >= self._limit:
                return False
            blocks = (counter >> _BLOCK_SHIFT) - (last >> _BLOCK_SHIFT)
            if blocks:
                ring = self._ring
                if blocks >= RING_BLOCKS:
                    ring[:] = _ZERO_RING
                else:
                    for block in range((last >> _BLOCK_SHIFT) + 1, (counter >> _BLOCK_SHIFT) + 1):
                        start = (block & _BLOCK_MASK) << _BLOCK_SHIFT
                        ring[start : start + BLOCK_BITS] = _ZERO_BLOCK
                # The counter's block was just cleared, so the counter is new.
                ring[counter & _RING_MASK] = 1
                self._last = counter
                return True
            self._last = counter
        elif last - counter > WINDOW:
            return False
        ring = self._ring
        slot = counter & _RING_MASK
        if ring[slot]:
            return False
        ring[slot] = 1
        return True
