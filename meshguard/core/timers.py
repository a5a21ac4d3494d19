"""A lazy deadline queue for the per-peer protocol timers.

WireGuard re-arms some timers on every packet (the persistent keepalive, for one). A heap push per
packet would cost more than the packet's crypto, so a timer here is just a deadline stored in a
slot; the heap only learns about a deadline when it is earlier than the one already queued for
that slot. When a queued entry comes due, the slot's current deadline decides: fire, re-queue
later, or drop a cancelled entry. The adapter keeps one reactor call for ``next_deadline()``.
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class TimerSlots:
    """The deadlines of one owner's timers, indexed by small integers."""

    __slots__ = ("deadlines", "queued")

    def __init__(self, count: int) -> None:
        self.deadlines: list[float | None] = [None] * count
        self.queued: list[float | None] = [None] * count


class TimerQueue(Generic[T]):
    """Deadlines of many owners' timer slots, ordered by time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, T, TimerSlots]] = []
        self._sequence = 0
        #: Set when a deadline earlier than every queued one was added; whoever keeps the
        #: reactor timer checks it (cheaply, per batch) and clears it when rescheduling.
        self.dirty = False

    def arm(self, owner: T, slots: TimerSlots, kind: int, deadline: float) -> None:
        """Set ``kind`` to fire at ``deadline``, replacing any earlier setting."""
        slots.deadlines[kind] = deadline
        queued = slots.queued[kind]
        if queued is None or deadline < queued:
            self._push(owner, slots, kind, deadline)

    @staticmethod
    def cancel(slots: TimerSlots, kind: int) -> None:
        """Cancel ``kind``; its queued entry is dropped when it comes due."""
        slots.deadlines[kind] = None

    @staticmethod
    def pending(slots: TimerSlots, kind: int) -> bool:
        return slots.deadlines[kind] is not None

    def _push(self, owner: T, slots: TimerSlots, kind: int, deadline: float) -> None:
        if not self._heap or deadline < self._heap[0][0]:
            self.dirty = True
        slots.queued[kind] = deadline
        self._sequence += 1
        heapq.heappush(self._heap, (deadline, self._sequence, kind, owner, slots))

    def next_deadline(self) -> float | None:
        """The earliest queued deadline (possibly of a moved or cancelled timer: waking early is
        harmless, ``expired`` sorts it out)."""
        heap = self._heap
        while heap:
            deadline, _, kind, _, slots = heap[0]
            if slots.queued[kind] != deadline or slots.deadlines[kind] is None:
                heapq.heappop(heap)
                if slots.queued[kind] == deadline:
                    slots.queued[kind] = None
                continue
            return deadline
        return None

    def expired(self, now: float) -> list[tuple[T, int]]:
        """Pop every timer due at ``now``; each returned timer is disarmed before it is handed out,
        so its handler may re-arm it."""
        heap = self._heap
        due: list[tuple[T, int]] = []
        while heap and heap[0][0] <= now:
            deadline, _, kind, owner, slots = heapq.heappop(heap)
            if slots.queued[kind] != deadline:
                continue
            slots.queued[kind] = None
            current = slots.deadlines[kind]
            if current is None:
                continue
            if current > now:
                self._push(owner, slots, kind, current)
                continue
            slots.deadlines[kind] = None
            due.append((owner, kind))
        return due

    def forget(self, slots: TimerSlots) -> None:
        """Cancel all of an owner's timers (a removed peer)."""
        for kind in range(len(slots.deadlines)):
            slots.deadlines[kind] = None
