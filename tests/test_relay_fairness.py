"""Per-receiver fair sharing at the relay: who is light, windows, bounded slack and memory."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshguard.relay.fairness import MAX_SENDERS, SLACK, WINDOW, FairShare

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


class FairShareTests(SynchronousTestCase):
    def test_light_and_heavy(self) -> None:
        fair = FairShare()
        for _ in range(10):
            fair.offered(A, 1000, 0.0)
        fair.offered(B, 1000, 0.0)
        self.assertFalse(fair.light(A))
        self.assertTrue(fair.light(B))
        self.assertTrue(fair.light(C))  # never sent: certainly within its share

    def test_slack_is_bounded_and_reset_on_resume(self) -> None:
        fair = FairShare()
        fair.offered(A, 10, 0.0)
        admitted = 0
        while fair.admit_paused(A, 1000):
            admitted += 1
        self.assertEqual(admitted, SLACK // 1000)
        self.assertFalse(fair.admit_paused(A, 1000))
        self.assertLessEqual(fair.slack, SLACK)
        fair.resumed()
        self.assertTrue(fair.admit_paused(A, 1000))

    def test_heavy_sender_is_forgiven_after_two_windows(self) -> None:
        fair = FairShare()
        for _ in range(10):
            fair.offered(A, 1000, 0.0)
        fair.offered(B, 1000, 0.0)
        fair.offered(B, 1000, WINDOW)  # A's burst is in the previous window: still heavy
        self.assertFalse(fair.light(A))
        fair.offered(B, 1000, 2 * WINDOW + 0.1)  # both windows rolled past A's burst
        fair.offered(A, 1000, 2 * WINDOW + 0.1)
        self.assertTrue(fair.light(A))
        fair.offered(B, 1000, 10.0)  # a long silence clears both windows
        self.assertEqual(fair.previous_total, 0)

    def test_senders_tracked_are_bounded(self) -> None:
        fair = FairShare()
        for i in range(MAX_SENDERS + 100):
            fair.offered(i.to_bytes(32, "big"), 1, 0.0)
        self.assertLessEqual(len(fair.current), MAX_SENDERS + 1)
        self.assertEqual(fair.current_total, MAX_SENDERS + 100)
