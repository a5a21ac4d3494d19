"""The node's idle rule (meshguard.adapters.idle_gap) on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters.idle_gap import IdleGap

#: Two descriptors of one node (the TUN device and a UDP socket); only identity matters.
TUN = object()
UDP = object()


class IdleGapTests(SynchronousTestCase):
    def test_gap_runs_from_the_last_batch_end(self) -> None:
        """A batch is idle when no batch ended in the last ``gap`` seconds, however long ago
        the last one began; the rule starts busy, so a new node batches until it is idle."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.001)
        self.assertFalse(idle.batch_begins(TUN))
        clock.advance(0.001)
        self.assertTrue(idle.batch_begins(TUN))
        clock.advance(0.005)  # a long batch
        idle.batch_ended()
        self.assertFalse(idle.batch_begins(TUN))
        clock.advance(0.0009)
        self.assertFalse(idle.batch_begins(TUN))
        clock.advance(0.0001)
        self.assertTrue(idle.batch_begins(TUN))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_gap_is_the_nodes_not_a_descriptors(self) -> None:
        """A busy batch on one descriptor keeps the next batch on another busy (a bulk
        receiver's acknowledgements read from TUN right after its UDP batches)."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002)
        clock.advance(0.0019)
        self.assertFalse(idle.batch_begins(UDP))
        clock.advance(0.001)
        idle.batch_ended()
        clock.advance(0.0019)
        self.assertFalse(idle.batch_begins(TUN))

    def test_reply_to_a_lone_batch_is_lone(self) -> None:
        """After a lone batch (an idle ping's request sent), a batch ``reply_gap`` or more
        later is lone too (its reply arrives), while one right after it (the rest of a burst)
        or after a busy batch within ``gap`` (a paced sender's next burst) is busy."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002, reply_gap=0.0002)
        clock.advance(0.02)
        self.assertTrue(idle.batch_begins(TUN))  # the request, after 20 ms
        idle.batch_ended()
        clock.advance(0.0005)
        self.assertTrue(idle.batch_begins(UDP))  # its reply, 0.5 ms later
        idle.batch_ended()
        self.assertFalse(idle.batch_begins(UDP))  # what was queued behind it: no pause
        idle.batch_ended()
        clock.advance(0.001)
        self.assertFalse(idle.batch_begins(TUN))  # a burst 1 ms after a busy batch
        idle.batch_ended()
        clock.advance(0.0019)
        self.assertFalse(idle.batch_begins(TUN))
        idle.batch_ended()
        clock.advance(0.0021)
        self.assertTrue(idle.batch_begins(TUN))

    def test_reply_on_another_descriptor_counts_from_the_lone_batch_start(self) -> None:
        """A reply arriving on another descriptor than the lone batch's is lone once
        ``reply_gap`` has passed since that batch began, however long the batch took (cold
        code after an idle moment): an echo reply read from UDP shortly after the slow lone
        batch that sent its request ended. Not before: what arrives while the lone batch is
        barely under way is no reply to it."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002, reply_gap=0.0002)
        clock.advance(0.02)
        self.assertTrue(idle.batch_begins(TUN))
        clock.advance(0.00015)  # a slow lone batch
        idle.batch_ended()
        clock.advance(0.00006)
        self.assertTrue(idle.batch_begins(UDP))  # 0.21 ms after the request's batch began
        idle.batch_ended()

        clock.advance(0.02)
        self.assertTrue(idle.batch_begins(TUN))
        clock.advance(0.0001)
        idle.batch_ended()
        clock.advance(0.00005)
        self.assertFalse(idle.batch_begins(UDP))  # 0.15 ms after it began
        idle.batch_ended()

    def test_same_descriptor_counts_from_the_lone_batch_end(self) -> None:
        """On the lone batch's own descriptor the pause counts from its end: what was queued
        behind the lone packet (read at once, or a little later after a slow lone batch) is
        a busy batch, whatever time passed since the lone batch began."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002, reply_gap=0.0002)
        clock.advance(0.02)
        self.assertTrue(idle.batch_begins(TUN))
        clock.advance(0.0003)  # a slow lone batch
        idle.batch_ended()
        clock.advance(0.00005)
        self.assertFalse(idle.batch_begins(TUN))  # the rest of the burst
        idle.batch_ended()

    def test_a_busy_batch_ends_the_chain_of_replies(self) -> None:
        """Only the batch right after a lone one can be its reply: after a busy batch, even
        one on the first descriptor, the next batch within ``gap`` is busy on either."""
        clock = Clock()
        idle = IdleGap(clock.seconds, gap=0.002, reply_gap=0.0002)
        clock.advance(0.02)
        self.assertTrue(idle.batch_begins(TUN))
        idle.batch_ended()
        self.assertFalse(idle.batch_begins(TUN))  # the rest of a burst
        idle.batch_ended()
        clock.advance(0.0005)
        self.assertFalse(idle.batch_begins(UDP))
        idle.batch_ended()

    def test_now_is_the_batch_start(self) -> None:
        """``now`` is the clock read at the latest batch's start (the time the read paths
        hand on with each packet), unchanged by the clock moving during the batch or by its
        end."""
        clock = Clock()
        clock.advance(5)
        idle = IdleGap(clock.seconds)
        self.assertEqual(idle.now, 5)
        clock.advance(1)
        idle.batch_begins(TUN)
        clock.advance(0.25)
        idle.batch_ended()
        self.assertEqual(idle.now, 6)
        idle.batch_begins(UDP)
        self.assertEqual(idle.now, 6.25)
