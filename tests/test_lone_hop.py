"""``benchmarks/lone_hop.py`` runs: two real nodes on fresh reactors, each mode's rounds.

A smoke test of the harness only (it measures nothing here): the lead compares trees with it,
so a change of the adapters that breaks the harness should show in the suite, not at the next
measurement.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

BENCHMARK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "lone_hop.py")


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lone_hop", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoneHopBenchmarkTests(SynchronousTestCase):
    def test_rounds_of_every_mode(self) -> None:
        """A few rounds of each mode (a small eviction, a short idle sleep): every hop is
        sampled, and the work counts reach the hop's system call before the next poll."""
        bench = _benchmark()
        args = bench.parse(["--evict-mib", "1", "--idle-ms", "1"])
        answers = list(bench.run(args, iter([2])))
        self.assertEqual(len(answers), 2)
        work, samples = answers[0]["work"], answers[1]["samples"]
        for hop in ("send", "receive"):
            self.assertEqual(len(work[hop]), 3)
            call, end = work[hop][-1]
            self.assertTrue(0 < call[0] <= end[0] and 0 < call[2] < end[2], (hop, call, end))
            for mode in bench.MODES:
                for what in ("cpu", "wall", "call"):
                    self.assertEqual(len(samples[f"{mode} {hop} {what}"]), 2)
