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
