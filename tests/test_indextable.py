"""Tests for meshguard.core.indextable: random, unique, nonzero sender indices."""

import random
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meshguard.core.indextable import MAX_DRAWS, IndexTable


def scripted(*indices: int) -> "ScriptedRandom":
    return ScriptedRandom(indices)


class ScriptedRandom:
    """A random source that yields the given indices (little-endian), to force collisions."""

    def __init__(self, indices: tuple[int, ...]) -> None:
        self._indices: Iterator[int] = iter(indices)
        self.calls = 0

    def __call__(self, size: int) -> bytes:
        self.calls += 1
        return next(self._indices).to_bytes(size, "little")


class IndexTableTests(SynchronousTestCase):
    """Allocation, lookup, rebinding and release."""

    def setUp(self) -> None:
        self.table: IndexTable[str] = IndexTable()

    def test_getterFollowsTheTable(self) -> None:
        """The getter taken before any allocation sees what ``get`` sees, through
        allocation, rebinding and release."""
        table: IndexTable[str] = IndexTable()
        get = table.getter()
        index = table.allocate("handshake", scripted(7))
        self.assertEqual((get(index), get(8)), ("handshake", None))
        table.replace(index, "keypair")
        self.assertEqual(get(index), table.get(index))
        self.assertEqual(get(index), "keypair")
        table.free(index)
        self.assertIsNone(get(index))

    def test_allocateUsesRandomSource(self) -> None:
        """The index is the little-endian u32 the random source gave."""
        index = self.table.allocate("handshake", scripted(0xDEADBEEF))
        self.assertEqual(index, 0xDEADBEEF)
        self.assertEqual(self.table.get(index), "handshake")
        self.assertEqual(len(self.table), 1)
        self.assertIn(index, self.table)

    def test_deterministicWithSeed(self) -> None:
        """The same seeded source gives the same indices, so engine tests are reproducible."""
        first: IndexTable[int] = IndexTable()
        second: IndexTable[int] = IndexTable()
        rng1, rng2 = random.Random(7), random.Random(7)
        a = [first.allocate(i, rng1.randbytes) for i in range(100)]
        b = [second.allocate(i, rng2.randbytes) for i in range(100)]
        self.assertEqual(a, b)

    def test_skipsZero(self) -> None:
        """Zero is never handed out; the next draw is used."""
        source = scripted(0, 5)
        self.assertEqual(self.table.allocate("a", source), 5)
        self.assertEqual(source.calls, 2)

    def test_skipsLiveIndex(self) -> None:
        """A draw that hits a live index is discarded rather than overwriting it."""
        self.table.allocate("a", scripted(9))
        source = scripted(9, 9, 10)
        self.assertEqual(self.table.allocate("b", source), 10)
        self.assertEqual(source.calls, 3)
        self.assertEqual(self.table.get(9), "a")
        self.assertEqual(self.table.get(10), "b")

    def test_freedIndexReusable(self) -> None:
        """Once freed, an index may be drawn again."""
        self.table.allocate("a", scripted(9))
        self.table.free(9)
        self.assertIsNone(self.table.get(9))
        self.assertEqual(self.table.allocate("b", scripted(9)), 9)
        self.assertEqual(self.table.get(9), "b")

    def test_brokenSourceRaises(self) -> None:
        """A source that keeps colliding fails loudly instead of spinning forever."""
        source = scripted(*([0] * MAX_DRAWS))
        self.assertRaises(RuntimeError, self.table.allocate, "a", source)
        self.assertEqual(len(self.table), 0)

    def test_shortRandomRaises(self) -> None:
        """A source that returns the wrong number of bytes is a local bug and raises."""
        self.assertRaises(ValueError, self.table.allocate, "a", lambda n: b"\x01\x02")
        self.assertRaises(ValueError, self.table.allocate, "a", lambda n: bytes(8))

    def test_getUnknown(self) -> None:
        """An index nobody holds, such as one from a forged message, maps to None."""
        self.assertIsNone(self.table.get(12345))
        self.assertIsNone(self.table.get(0))

    def test_replace(self) -> None:
        """replace() rebinds a live index, keeping the count."""
        index = self.table.allocate("handshake", scripted(3))
        self.table.replace(index, "keypair")
        self.assertEqual(self.table.get(index), "keypair")
        self.assertEqual(len(self.table), 1)

    def test_replaceFreedRaises(self) -> None:
        """replace() of an index that is not live is a caller's bug and raises KeyError."""
        self.assertRaises(KeyError, self.table.replace, 3, "keypair")
        index = self.table.allocate("handshake", scripted(3))
        self.table.free(index)
        self.assertRaises(KeyError, self.table.replace, index, "keypair")
        self.assertEqual(len(self.table), 0)

    def test_freeTwice(self) -> None:
        """free() of an index that is not live does nothing."""
        index = self.table.allocate("a", scripted(3))
        self.table.free(index)
        self.table.free(index)
        self.table.free(77)
        self.assertEqual(len(self.table), 0)

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(min_value=0, max_value=2**32),
        st.lists(st.tuples(st.sampled_from(("allocate", "free", "replace")), st.integers(0, 50))),
    )
    def test_matchesDict(self, seed: int, ops: list[tuple[str, int]]) -> None:
        """Any mix of operations keeps live indices unique, nonzero, u32 and as a dict says."""
        rng = random.Random(seed)
        # A tiny index space (1..64) forces collisions; the table must still never reuse.
        source = lambda n: rng.randrange(0, 65).to_bytes(n, "little")  # noqa: E731
        table: IndexTable[int] = IndexTable()
        model: dict[int, int] = {}
        allocated: list[int] = []
        for name, argument in ops:
            if name == "allocate" and len(model) < 60:
                index = table.allocate(argument, source)
                self.assertNotIn(index, model)
                self.assertTrue(0 < index < 2**32)
                model[index] = argument
                allocated.append(index)
            elif name == "free" and allocated:
                index = allocated[argument % len(allocated)]
                table.free(index)
                model.pop(index, None)
            elif name == "replace" and model:
                index = sorted(model)[argument % len(model)]
                table.replace(index, -argument)
                model[index] = -argument
            self.assertEqual(len(table), len(model))
        for index in range(0, 70):
            self.assertEqual(table.get(index), model.get(index))
