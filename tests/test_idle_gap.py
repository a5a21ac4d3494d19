"""The node's idle rule (meshguard.adapters.idle_gap) on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.idle_gap import IdleGap


class IdleGapTests(SynchronousTestCase):
    def test_gap_runs_from_the_last_batch_end(self) -> None:
        """A batch is idle when no batch ended in the last ``gap`` seconds, however long ago
        the last one began; the rule starts busy, so a new node batches until it is idle."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.001)
        self.assertFalse(idle.batch_begins())
        clock.advance(0.001)
        self.assertTrue(idle.batch_begins())
        clock.advance(0.005)  # a long batch
        idle.batch_ended()
        self.assertFalse(idle.batch_begins())
        clock.advance(0.0009)
        self.assertFalse(idle.batch_begins())
        clock.advance(0.0001)
        self.assertTrue(idle.batch_begins())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reply_to_a_lone_batch_is_lone(self) -> None:
        """After a lone batch (an idle ping's request sent), a batch ``reply_gap`` or more
        later is lone too (its reply arrives), while one right after it (the rest of a burst)
        or after a busy batch within ``gap`` (a paced sender's next burst) is busy."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002, reply_gap=0.0002)
        clock.advance(0.02)
        self.assertTrue(idle.batch_begins())  # the request, after 20 ms
        idle.batch_ended()
        clock.advance(0.0005)
        self.assertTrue(idle.batch_begins())  # its reply, 0.5 ms later
        idle.batch_ended()
        self.assertFalse(idle.batch_begins())  # what was queued behind it: no pause
        idle.batch_ended()
        clock.advance(0.001)
        self.assertFalse(idle.batch_begins())  # a burst 1 ms after a busy batch
        idle.batch_ended()
        clock.advance(0.0019)
        self.assertFalse(idle.batch_begins())
        idle.batch_ended()
        clock.advance(0.0021)
        self.assertTrue(idle.batch_begins())
