"""The flood guard: when it sheds, how hard, and what it lets through."""

from __future__ import annotations

import random
from dataclasses import fields

from twisted.trial.unittest import SynchronousTestCase

from meshguard.adapters import flood_guard
from meshguard.adapters.flood_guard import FloodGuard
from meshguard.adapters.socket_filter import Shedding
from meshguard.core.device import Device, DropCounters
from meshguard.testing.memory import MemoryNetwork


class RecordingShedder:
    def __init__(self) -> None:
        self.calls: list[Shedding | None] = []

    def set_shedding(self, shedding: Shedding | None) -> None:
        self.calls.append(shedding)


class FloodGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.device: Device = (
            MemoryNetwork().add(("192.0.2.1", 51820), random.Random(1).randbytes).device
        )
        self.device.set_private_key(bytes(range(32)), 0.0)
        peer = self.device.add_peer(bytes([9]) * 32)
        assert peer is not None
        peer.endpoint = ("10.0.0.1", 51820)
        other = self.device.add_peer(bytes([8]) * 32)
        assert other is not None
        other.endpoint = ("::ffff:10.0.0.2", 51820)
        peer.handshake_index = 77
        self.shedder = RecordingShedder()
        self.guard = FloodGuard(self.device, self.shedder)
        self.now = 100.0
        self.guard.tick(self.now)

    def flood(self, per_second: float, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.now += flood_guard.TICK
            self.device.counters.bad_mac1 += int(per_second * flood_guard.TICK)
            self.guard.tick(self.now)

    def test_counters_exist(self) -> None:
        """Every counter the guard sums is one of the device's."""
        names = {f.name for f in fields(DropCounters)}
        self.assertLessEqual(set(flood_guard.HOSTILE_COUNTERS), names)

    def test_quiet_port_stays_plain(self) -> None:
        self.flood(flood_guard.ON_RATE / 2, ticks=20)
        self.assertEqual(self.shedder.calls, [])
        self.assertFalse(self.guard.status()["shedding"])

    def test_flood_turns_shedding_on_with_known_sources_and_live_indices(self) -> None:
        self.flood(flood_guard.ON_RATE * 2)
        shedding = self.shedder.calls[-1]
        assert shedding is not None
        self.assertEqual(shedding.sample_mask, flood_guard.FIRST_MASK)
        self.assertEqual(set(shedding.known_sources), {bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])})
        self.assertEqual(shedding.receiver_indices, (77,))
        self.assertEqual(self.guard.status()["sample"], "1/64")

    def test_sample_shrinks_while_too_much_gets_through_then_grows_and_ends(self) -> None:
        self.flood(flood_guard.ON_RATE * 2)
        self.flood(flood_guard.TARGET_RATE * 2, ticks=3)
        self.assertEqual(self.guard.mask, (flood_guard.FIRST_MASK + 1) * 8 - 1)
        # Quiet: the sample doubles every QUIET_TICKS (one mask bit less), then shedding ends.
        periods = self.guard.mask.bit_length() + 1
        steps = 0
        while self.guard.shedding is not None and steps < 1000:
            self.flood(0)
            steps += 1
        self.assertIsNone(self.guard.shedding)
        self.assertIsNone(self.shedder.calls[-1])
        self.assertEqual(steps, flood_guard.QUIET_TICKS * periods)

    def test_big_flood_starts_with_a_smaller_sample(self) -> None:
        """100,000/s: the first sample already brings it near the target (1/256 -> ~390/s)."""
        self.flood(100_000)
        self.assertEqual(self.guard.mask, 255)

    def test_sample_never_exceeds_the_largest_mask(self) -> None:
        self.flood(flood_guard.ON_RATE * 2)
        self.flood(flood_guard.ON_RATE * 100, ticks=40)
        self.assertEqual(self.guard.mask, flood_guard.MAX_MASK)

    def test_filter_follows_new_indices(self) -> None:
        """A handshake during the flood: its new index is in the next tick's filter."""
        self.flood(flood_guard.ON_RATE * 2)
        peer = self.device.peers[bytes([9]) * 32]
        peer.handshake_index = 1234
        self.flood(flood_guard.TARGET_RATE)
        shedding = self.shedder.calls[-1]
        assert shedding is not None
        self.assertEqual(shedding.receiver_indices, (1234,))

    def test_too_many_indices_skip_the_index_check(self) -> None:
        for n in range(flood_guard.MAX_INDICES + 1):
            peer = self.device.add_peer(n.to_bytes(4, "big") + bytes(28))
            assert peer is not None
            peer.handshake_index = n + 1000
        self.flood(flood_guard.ON_RATE * 2)
        shedding = self.shedder.calls[-1]
        assert shedding is not None
        self.assertIsNone(shedding.receiver_indices)
