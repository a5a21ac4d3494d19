"""Tests for meshguard.core.replay: the cases of wireguard-go's replay_test.go and a reference."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.constants import REJECT_AFTER_MESSAGES
from meshguard.core.replay import RING_BITS, WINDOW, ReplayWindow

T_LIM = WINDOW + 1
REJECT = REJECT_AFTER_MESSAGES


class NaiveWindow:
    """The window's meaning, spelled out with a set: the reference for the ring."""

    def __init__(self, limit: int = REJECT) -> None:
        self.limit = limit
        self.seen: set[int] = set()
        self.last = 0

    def check(self, counter: int) -> bool:
        if counter >= self.limit:
            return False
        if counter > self.last:
            self.last = counter
        elif self.last - counter > WINDOW:
            return False
        if counter in self.seen:
            return False
        self.seen.add(counter)
        return True


class ReplayWindowTests(SynchronousTestCase):
    """The sequences wireguard-go (ported from the kernel's selftest) pins the window with."""

    def assertSequence(self, window: ReplayWindow, steps: list[tuple[int, bool]]) -> None:
        for number, (counter, expected) in enumerate(steps, 1):
            self.assertEqual(window.check(counter), expected, f"step {number}: counter {counter}")

    def test_window_size(self) -> None:
        """The window is 8128 counters, as in wireguard-go and the kernel on 64-bit."""
        self.assertEqual(WINDOW, 8128)
        self.assertEqual(RING_BITS, 8192)

    def test_sequence(self) -> None:
        """The 34 sequential cases of replay_test.go, with the project's reject limit."""
        self.assertSequence(
            ReplayWindow(),
            [
                (0, True),
                (1, True),
                (1, False),
                (9, True),
                (8, True),
                (7, True),
                (7, False),
                (T_LIM, True),
                (T_LIM - 1, True),
                (T_LIM - 1, False),
                (T_LIM - 2, True),
                (2, True),
                (2, False),
                (T_LIM + 16, True),
                (3, False),
                (T_LIM + 16, False),
                (T_LIM * 4, True),
                (T_LIM * 4 - (T_LIM - 1), True),
                (10, False),
                (T_LIM * 4 - T_LIM, False),
                (T_LIM * 4 - (T_LIM + 1), False),
                (T_LIM * 4 - (T_LIM - 2), True),
                (T_LIM * 4 + 1 - T_LIM, False),
                (0, False),
                (REJECT, False),
                (REJECT - 1, True),
                (REJECT, False),
                (REJECT - 1, False),
                (REJECT - 2, True),
                (REJECT + 1, False),
                (REJECT + 2, False),
                (REJECT - 2, False),
                (REJECT - 3, True),
                (0, False),
            ],
        )

    def test_sequenceWithGoLimit(self) -> None:
        """The tail of the sequence also holds for the limit replay_test.go itself uses."""
        limit = (1 << 64) - (1 << 4) - 1
        window = ReplayWindow(limit)
        self.assertSequence(
            window,
            [
                (0, True),
                (limit, False),
                (limit - 1, True),
                (limit, False),
                (limit - 1, False),
                (limit - 2, True),
                (limit + 1, False),
                (limit + 2, False),
                (limit - 2, False),
                (limit - 3, True),
                (0, False),
            ],
        )

    def test_bulkAscendingThenZero(self) -> None:
        """Bulk 1: 1..WINDOW then 0, exactly WINDOW behind, is still accepted once."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(1, WINDOW + 1)])
        self.assertSequence(window, [(0, True), (0, False)])

    def test_bulkAscendingPastWindow(self) -> None:
        """Bulk 2: 2..WINDOW+1 then 1 is accepted and 0, one past the window, is not."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(2, WINDOW + 2)])
        self.assertSequence(window, [(1, True), (0, False)])

    def test_bulkDescending(self) -> None:
        """Bulk 3: WINDOW+1 down to 1 are all accepted."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(WINDOW + 1, 0, -1)])

    def test_bulkDescendingPastWindow(self) -> None:
        """Bulk 4: WINDOW+2 down to 2 are accepted and 0 falls outside."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(WINDOW + 2, 1, -1)])
        self.assertSequence(window, [(0, False)])

    def test_bulkDescendingThenForward(self) -> None:
        """Bulk 5: WINDOW down to 1, then WINDOW+1 pushes 0 out of the window."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(WINDOW, 0, -1)])
        self.assertSequence(window, [(WINDOW + 1, True), (0, False)])

    def test_bulkDescendingZeroThenForward(self) -> None:
        """Bulk 6: WINDOW down to 1, then 0, then WINDOW+1 are all accepted."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(WINDOW, 0, -1)])
        self.assertSequence(window, [(0, True), (WINDOW + 1, True)])

    def test_reset(self) -> None:
        """After reset the window accepts the counters it had seen, as a new keypair would."""
        window = ReplayWindow()
        self.assertSequence(window, [(0, True), (5, True), (100_000, True)])
        window.reset()
        self.assertEqual(window.last, 0)
        self.assertSequence(window, [(0, True), (5, True), (5, False), (100_000, True)])

    def test_farJump(self) -> None:
        """A jump of more than the whole ring clears it: old slots do not alias new counters."""
        window = ReplayWindow()
        self.assertSequence(window, [(i, True) for i in range(0, 200)])
        far = 10 * RING_BITS
        self.assertSequence(window, [(far + i, True) for i in range(0, 200)])
        self.assertSequence(window, [(far + 5, False), (far - WINDOW + 200, True)])

    def test_wrapAlias(self) -> None:
        """A counter one ring ahead of a seen one lands on the same slot yet is accepted."""
        window = ReplayWindow()
        self.assertSequence(window, [(7, True), (7 + RING_BITS, True), (7 + 2 * RING_BITS, True)])
        self.assertSequence(window, [(7 + RING_BITS, False)])

    def test_reusedBlockCleared(self) -> None:
        """Moving into a block the ring last used a lap ago forgets that lap's counters."""
        window = ReplayWindow()
        self.assertSequence(window, [(5, True), (6, True), (127 * 64 + 1, True)])
        # One block forward: block 128 reuses the slots of block 0, where 5 and 6 were set.
        self.assertSequence(window, [(RING_BITS + 5, True), (RING_BITS + 6, True)])
        self.assertSequence(window, [(RING_BITS + 6, False), (6, False)])

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from((0, 1, 2, 63, 64, 65, 127 * 64, WINDOW, RING_BITS, RING_BITS + 1)),
                st.integers(min_value=0, max_value=WINDOW + 2),
            ),
            max_size=100,
        )
    )
    def test_matchesReferenceWalk(self, steps: list[tuple[int, int]]) -> None:
        """A walk forward by block-sized strides, checking counters behind it, matches too."""
        window, naive = ReplayWindow(), NaiveWindow()
        head = 0
        for stride, behind in steps:
            head += stride
            for counter in (head, max(0, head - behind), max(0, head - behind) + 1):
                self.assertEqual(window.check(counter), naive.check(counter), counter)

    def test_randomReorderedStream(self) -> None:
        """A long stream with reordering, duplicates and stale packets matches the reference."""
        rng = random.Random(6479)
        window, naive = ReplayWindow(), NaiveWindow()
        counter = 0
        for _ in range(50_000):
            counter += rng.choice((1, 1, 1, 2, 70, 3000))
            candidate = max(0, counter - rng.choice((0, 0, 0, 1, 63, 64, 65, WINDOW, WINDOW + 1)))
            self.assertEqual(window.check(candidate), naive.check(candidate), candidate)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.integers(min_value=0, max_value=3 * RING_BITS),
                st.integers(min_value=REJECT - 3 * RING_BITS, max_value=REJECT + 2),
            ),
            max_size=300,
        )
    )
    def test_matchesReference(self, counters: list[int]) -> None:
        """Any sequence of counters gets the same answers as the set-based reference."""
        window, naive = ReplayWindow(), NaiveWindow()
        for counter in counters:
            self.assertEqual(window.check(counter), naive.check(counter), counter)

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(min_value=0, max_value=1 << 40),
        st.lists(st.integers(min_value=-2 * RING_BITS, max_value=2 * RING_BITS), max_size=200),
    )
    def test_matchesReferenceNearBase(self, base: int, offsets: list[int]) -> None:
        """Counters clustered around any base, crossing many blocks, match the reference."""
        window, naive = ReplayWindow(), NaiveWindow()
        for offset in offsets:
            counter = max(0, base + offset)
            self.assertEqual(window.check(counter), naive.check(counter), counter)
