"""The lazy deadline queue behind the per-peer timers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.timers import TimerQueue, TimerSlots


class TimerQueueTests(SynchronousTestCase):
    def test_fires_at_deadline(self) -> None:
        queue: TimerQueue[str] = TimerQueue()
        slots = TimerSlots(2)
        queue.arm("p", slots, 0, 5.0)
        self.assertEqual(queue.next_deadline(), 5.0)
        self.assertEqual(queue.expired(4.9), [])
        self.assertEqual(queue.expired(5.0), [("p", 0)])
        self.assertIsNone(queue.next_deadline())

    def test_moved_later_fires_later(self) -> None:
        """Re-arming later needs no heap push; the early entry re-queues itself."""
        queue: TimerQueue[str] = TimerQueue()
        slots = TimerSlots(1)
        queue.arm("p", slots, 0, 5.0)
        queue.arm("p", slots, 0, 9.0)
        self.assertEqual(queue.expired(5.0), [])
        self.assertEqual(queue.next_deadline(), 9.0)
        self.assertEqual(queue.expired(9.0), [("p", 0)])

    def test_moved_earlier_fires_earlier_once(self) -> None:
        queue: TimerQueue[str] = TimerQueue()
        slots = TimerSlots(1)
        queue.arm("p", slots, 0, 9.0)
        queue.arm("p", slots, 0, 3.0)
        self.assertEqual(queue.expired(3.0), [("p", 0)])
        self.assertEqual(queue.expired(10.0), [])

    def test_cancel(self) -> None:
        queue: TimerQueue[str] = TimerQueue()
        slots = TimerSlots(1)
        queue.arm("p", slots, 0, 1.0)
        queue.cancel(slots, 0)
        self.assertIsNone(queue.next_deadline())
        self.assertEqual(queue.expired(2.0), [])

    @given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 100), st.booleans()), max_size=60))
    def test_matches_reference(self, ops: list[tuple[int, float, bool]]) -> None:
        """Against a dict of deadlines: every armed, uncancelled timer fires exactly once, at its
        latest deadline."""
        queue: TimerQueue[str] = TimerQueue()
        slots = TimerSlots(3)
        reference: dict[int, float] = {}
        for kind, deadline, cancel in ops:
            if cancel:
                queue.cancel(slots, kind)
                reference.pop(kind, None)
            else:
                queue.arm("p", slots, kind, deadline)
                reference[kind] = deadline
        fired: list[tuple[float, int]] = []
        times = sorted({0.0, 100.0, *reference.values()})
        for now in times:
            fired.extend((now, kind) for _, kind in queue.expired(now))
        self.assertEqual(sorted(fired), sorted((d, k) for k, d in reference.items()))
