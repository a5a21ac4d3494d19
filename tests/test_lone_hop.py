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
    def check(self, argv: list[str], hops: dict[str, int]) -> None:
        """Two rounds of each mode (a small eviction, a short idle sleep): every hop is sampled,
        and its work counts reach each of its system calls (``hops``: how many) in order, and
        the next poll after them."""
        bench = _benchmark()
        args = bench.parse(["--evict-mib", "1", "--idle-ms", "1", *argv])
        answers = list(bench.run(args, iter([2])))
        self.assertEqual(len(answers), 2)
        work, samples = answers[0]["work"], answers[1]["samples"]
        self.assertEqual(sorted(h for h in work if not h.endswith(" calls")), sorted(hops))
        for hop, calls in hops.items():
            self.assertEqual(len(work[hop]), 3)
            *marks, end = work[hop][-1]
            self.assertEqual(len(marks), calls)
            for earlier, later in zip([(0, 0, 0), *marks], [*marks, end], strict=True):
                self.assertTrue(all(a < b for a, b in zip(earlier, later)), (hop, marks, end))
            for mode in bench.MODES:
                for what in ("cpu", "wall", "call"):
                    self.assertEqual(len(samples[f"{mode} {hop} {what}"]), 2)
        if "back" in hops:
            for mode in bench.MODES:
                self.assertEqual(len(samples[f"{mode} reply call"]), 2)

    def test_request_and_reply(self) -> None:
        """By default B's TUN end answers: B's hop writes the request and sends the reply,
        and A's receive of the reply is a third hop."""
        self.check([], {"send": 1, "receive": 2, "back": 1})

    def test_request_only(self) -> None:
        """``--no-reply``: the two hops of the request alone."""
        self.check(["--no-reply"], {"send": 1, "receive": 1})
