"""Keepalive plugins' answers (mesh/interval_plugins.py), on their own: the first number wins,
clamped to auto's bounds; 0 is off; anything else, or a plugin that raises, is counted."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshguard.mesh import interval_plugins as I
from meshguard.mesh import keepalive as K

FACTS = I.KeepaliveFacts(
    natted=True,
    mapping="unknown",
    lifetime=110.0,
    lifetime_at_least=False,
    reason="0.7 of the measured NAT lifetime (110 s), keepalives acknowledged",
    carrier=False,
    current=77,
    expired=False,
    meshguard=True,
)
CHOSEN = I.Decision(77, FACTS.reason)


class Answer:
    def __init__(self, name: str, answer: object) -> None:
        self.name = name
        self.answer = answer
        self.asked = 0

    def interval(self, public_key: bytes, chosen: int, facts: I.KeepaliveFacts) -> int | None:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[return-value]


def consult(*plugins: Answer) -> tuple[I.IntervalPlugins, I.Decision]:
    table = I.IntervalPlugins(list(plugins), (K.INTERVAL_MIN, K.INTERVAL_MAX))  # type: ignore[arg-type]
    return table, table.consult(b"k" * 32, CHOSEN, lambda: FACTS)


class ConsultTests(SynchronousTestCase):
    def test_none_keeps_auto_and_facts_are_not_built_without_plugins(self) -> None:
        table = I.IntervalPlugins([], (K.INTERVAL_MIN, K.INTERVAL_MAX))
        built: list[int] = []
        decision = table.consult(b"k" * 32, CHOSEN, lambda: built.append(1) or FACTS)  # type: ignore[func-returns-value]
        self.assertIs(decision, CHOSEN)
        self.assertEqual(built, [])
        _, decision = consult(Answer("quiet", None))
        self.assertIs(decision, CHOSEN)

    def test_first_number_wins_clamped_and_zero_is_off(self) -> None:
        first, second = Answer("big", 100000), Answer("later", 30)
        _, decision = consult(first, second)
        self.assertEqual(decision.interval, K.INTERVAL_MAX)
        self.assertEqual(decision.plugin, "big")
        self.assertIs(decision.auto, CHOSEN)
        self.assertIn(f"100000 clamped to {K.INTERVAL_MAX}", decision.reason)
        self.assertEqual(second.asked, 0)
        _, decision = consult(Answer("off", 0))
        self.assertEqual(decision.interval, 0)

    def test_garbage_and_raising_plugins_are_counted_and_skipped(self) -> None:
        table, decision = consult(
            Answer("float", 20.0),
            Answer("bool", True),
            Answer("boom", ValueError("x")),
            Answer("ok", 40),
        )
        self.assertEqual(decision.interval, 40)
        self.assertEqual(table.errors, 3)
        self.assertTrue(table.error.startswith("boom raised ValueError"))
        self.assertEqual(table.names(), ["float", "bool", "boom", "ok"])
