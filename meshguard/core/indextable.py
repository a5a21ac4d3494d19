"""The local sender indices that incoming handshake and transport messages are addressed to.

An index is what a peer echoes back in ``receiver``, so it must name one live handshake or keypair
at a time; it is random so that it reveals nothing about how many sessions the node holds.
"""

from collections.abc import Callable
from typing import Final, Generic, TypeVar

from meshguard.core.interfaces import RandomBytes

T = TypeVar("T")

#: Draws before ``allocate`` gives up: only a broken random source collides this often.
MAX_DRAWS: Final = 1000


class IndexTable(Generic[T]):
    """Random, nonzero, collision-free 32-bit indices mapped to their handshakes or keypairs.

    Zero is never handed out, so it can stand for "no index" in the engine and in tests.
    """

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: dict[int, T] = {}

    def __len__(self) -> int:
        """The number of live indices."""
        return len(self._table)

    def __contains__(self, index: object) -> bool:
        return index in self._table

    def allocate(self, value: T, random: RandomBytes) -> int:
        """Bind ``value`` to a fresh index drawn from ``random`` and return the index."""
        table = self._table
        for _ in range(MAX_DRAWS):
            raw = random(4)
            if len(raw) != 4:
                raise ValueError(f"the random source gave {len(raw)} bytes for 4")
            index = int.from_bytes(raw, "little")
            if index and index not in table:
                table[index] = value
                return index
        raise RuntimeError(f"no free index in {MAX_DRAWS} draws; is the random source broken?")

    def get(self, index: int) -> T | None:
        """The value bound to ``index``, or None if the index is not live."""
        return self._table.get(index)

    def getter(self) -> Callable[[int], T | None]:
        """:meth:`get` as the table's own bound ``dict.get``, for the per-datagram look-up: one
        Python call fewer, which counts on a cold lone packet (docs/datapath.md, "Latency").
        Valid for the table's life: the dict is never replaced."""
        return self._table.get

    def replace(self, index: int, value: T) -> None:
        """Rebind a live index, as when a completed handshake becomes a keypair.

        The index must be live: rebinding a freed one would revive an index peers may reuse.
        """
        if index not in self._table:
            raise KeyError(index)
        self._table[index] = value

    def free(self, index: int) -> None:
        """Release ``index``; releasing one that is not live does nothing."""
        self._table.pop(index, None)
