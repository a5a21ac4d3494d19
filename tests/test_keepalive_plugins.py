"""Keepalive plugins (``IKeepalivePolicy``) overriding ``PersistentKeepalive = auto``, against the
simulated NATs of tests/test_keepalive.py (in memory, deterministic clock)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meshguard.mesh import keepalive as K
from tests.test_keepalive import HOUR, Mesh


class Recording:
    """Answers ``answer(chosen)`` and records every question it was asked."""

    def __init__(self, name: str, answer: object = None) -> None:
        self.name = name
        self.answer = answer
        self.calls: list[tuple[bytes, int, K.KeepaliveFacts]] = []

    def interval(self, public_key: bytes, chosen: int, facts: K.KeepaliveFacts) -> int | None:
        self.calls.append((public_key, chosen, facts))
        answer = self.answer(chosen) if callable(self.answer) else self.answer
        return answer  # type: ignore[return-value]  # garbage on purpose in some tests


class Raising:
    name = "raising"

    def interval(self, public_key: bytes, chosen: int, facts: K.KeepaliveFacts) -> int | None:
        raise RuntimeError("plugin bug")


def settled(mesh: Mesh) -> Mesh:
    """Half an hour: sessions up, NAT detected and its lifetime measured."""
    mesh.net.advance(30 * 60)
    return mesh


class OverrideTests(SynchronousTestCase):
    def test_plugin_answer_is_used(self) -> None:
        """A plugin's number replaces auto's interval in force; the keepalives follow it and
        the home stays reachable."""
        fixed = Recording("fixed", 7)
        mesh = settled(Mesh(30.0, overrides=[fixed]))
        hub = mesh.hubs[0]
        peer = mesh.home.peer(hub)
        decision = mesh.policy.decisions[hub.public]
        self.assertEqual(peer.persistent_keepalive, 7)
        self.assertEqual(decision.interval, 7)
        self.assertEqual(decision.plugin, "fixed")
        assert decision.auto is not None and mesh.policy.nat.lifetime is not None
        self.assertEqual(
            decision.auto.interval, K.interval_for(mesh.policy.nat.lifetime, acked=True)
        )
        start = len(mesh.home.node.sent)
        mesh.net.advance(HOUR)
        # Idle: about one keepalive per 7 s (auto would have sent one per 19 s).
        self.assertGreater(mesh.keepalives_from_home(start), HOUR / 7 * 0.9)
        self.assertTrue(mesh.hub_reaches_home())

    def test_none_keeps_auto_choice(self) -> None:
        """A plugin answering None is asked about every auto peer (with auto's choice and what
        auto knows) and changes nothing; a peer that is not auto is never asked about."""
        silent = Recording("silent")
        mesh = settled(Mesh(30.0, overrides=[silent]))
        plain = settled(Mesh(30.0))
        hub = mesh.hubs[0]
        self.assertEqual(
            mesh.home.peer(hub).persistent_keepalive,
            plain.home.peer(plain.hubs[0]).persistent_keepalive,
        )
        decision = mesh.policy.decisions[hub.public]
        self.assertIsNone(decision.plugin)
        self.assertIn("of the measured NAT lifetime", decision.reason)
        self.assertTrue(silent.calls)
        key, chosen, facts = silent.calls[-1]
        self.assertEqual(key, hub.public)
        self.assertEqual(chosen, decision.interval)
        self.assertEqual(facts.reason, decision.reason)
        self.assertEqual(facts.natted, True)
        self.assertEqual(facts.lifetime, mesh.policy.nat.lifetime)
        self.assertEqual(facts.current, decision.interval)
        self.assertTrue(facts.meshguard)
        self.assertFalse(facts.expired)
        self.assertNotIn("keepalive_plugin", mesh.policy.peer_status(mesh.home.peer(hub)))

        mesh.policy.configure_auto(set(), mesh.net.now)
        asked = len(silent.calls)
        mesh.policy.update(mesh.net.now)
        self.assertEqual(len(silent.calls), asked)

    def test_first_number_wins_in_order(self) -> None:
        """Plugins are asked in order until one answers a number; later ones are not asked."""
        first = Recording("first")
        second = Recording("second", 9)
        third = Recording("third", 11)
        mesh = settled(Mesh(30.0, overrides=[first, second, third]))
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 9)
        self.assertTrue(first.calls)
        self.assertEqual(len(first.calls), len(second.calls))
        self.assertEqual(third.calls, [])

    def test_numbers_clamped_to_auto_bounds_and_zero_is_off(self) -> None:
        """1 becomes 2 s, 100000 becomes 300 s (the reason says so); 0 turns the keepalive
        off."""
        for answer, expected in ((1, K.INTERVAL_MIN), (100000, K.INTERVAL_MAX), (0, 0)):
            mesh = settled(Mesh(30.0, overrides=[Recording("p", answer)]))
            hub = mesh.hubs[0]
            self.assertEqual(mesh.home.peer(hub).persistent_keepalive, expected)
            reason = mesh.policy.decisions[hub.public].reason
            if answer != expected:
                self.assertIn(f"{answer} clamped to {expected}", reason)
            else:
                self.assertNotIn("clamped", reason)
        start = len(mesh.home.node.sent)
        mesh.net.advance(HOUR)
        self.assertEqual(mesh.keepalives_from_home(start), 0)

    def test_raising_or_garbage_counted_and_ignored(self) -> None:
        """Plugins that raise or answer garbage (text, a negative number, a bool, a float) are
        counted and skipped: the next plugin's answer, or auto's, applies."""
        broken = [
            Raising(),
            Recording("text", "15"),
            Recording("negative", -5),
            Recording("bool", True),
            Recording("float", 20.0),
        ]
        fallback = Recording("fallback", 17)
        mesh = settled(Mesh(30.0, overrides=[*broken, fallback]))
        policy = mesh.policy
        self.assertEqual(mesh.home.peer(mesh.hubs[0]).persistent_keepalive, 17)
        self.assertEqual(policy.plugin_errors, len(broken) * len(fallback.calls))
        status = policy.node_status()
        self.assertEqual(status["keepalive_plugin_errors"], policy.plugin_errors)
        self.assertEqual(status["keepalive_plugin_error"], "float answered 20.0")
        self.assertEqual(
            status["keepalive_plugins"],
            ["raising", "text", "negative", "bool", "float", "fallback"],
        )

        only_broken = settled(Mesh(30.0, overrides=broken))
        plain = settled(Mesh(30.0))
        self.assertEqual(
            only_broken.home.peer(only_broken.hubs[0]).persistent_keepalive,
            plain.home.peer(plain.hubs[0]).persistent_keepalive,
        )
        self.assertGreater(only_broken.policy.plugin_errors, 0)

    def test_reapplied_when_auto_decides_again(self) -> None:
        """A plugin answering auto's choice plus one is asked again whenever auto decides
        anew: with the default before the measurement, after it, on evidence of an expired
        mapping (halved) and after the new measurement; its answer is what applies each time."""
        plus_one = Recording("plus-one", lambda chosen: chosen + 1)
        mesh = Mesh(120.0, overrides=[plus_one])
        mesh.net.advance(1)
        hub = mesh.hubs[0]
        peer = mesh.home.peer(hub)
        self.assertEqual(peer.persistent_keepalive, K.DEFAULT_INTERVAL + 1)
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        assert policy.nat.lifetime is not None
        first = K.interval_for(policy.nat.lifetime, acked=True)
        self.assertEqual(peer.persistent_keepalive, first + 1)
        self.assertTrue(any(f.lifetime is None and c == 25 for _, c, f in plus_one.calls))

        assert mesh.nat is not None
        mesh.nat.lifetime = 20.0  # the router reboots with a shorter timeout
        mesh.net.advance(HOUR)
        expired = [(c, f) for _, c, f in plus_one.calls if f.expired]
        self.assertTrue(expired)
        chosen, facts = expired[0]
        self.assertIn("mapping expired", facts.reason)
        self.assertLessEqual(chosen, (first + 1) // 2)
        self.assertEqual(policy.nat.measurement, "measured")
        assert policy.nat.lifetime is not None
        self.assertLess(policy.nat.lifetime, 20.0)
        self.assertEqual(
            peer.persistent_keepalive, K.interval_for(policy.nat.lifetime, acked=True) + 1
        )
        self.assertTrue(mesh.hub_reaches_home())

    def test_switching_the_carrier_off_moves_the_carrier(self) -> None:
        """Endpoint-independent NAT, two hubs: a plugin turning one hub's keepalive off never
        leaves the node without one; the other hub carries the shared mapping."""
        mesh = Mesh(60.0, hubs=2)
        off, on = mesh.hubs
        # Whichever hub auto would pick as carrier, the plugin turns `off`'s keepalive off.
        mesh.policy.overrides.append(KeyFilter(off.public, Recording("quiet", 0)))
        settled(mesh)
        policy = mesh.policy
        self.assertEqual(policy.nat.mapping, "endpoint-independent")
        self.assertEqual(policy.carrier, on.public)
        self.assertEqual(mesh.home.peer(off).persistent_keepalive, 0)
        assert policy.nat.lifetime is not None
        self.assertEqual(
            mesh.home.peer(on).persistent_keepalive, K.interval_for(policy.nat.lifetime, acked=True)
        )
        self.assertIn("plugin quiet", policy.decisions[off.public].reason)
        mesh.net.advance(HOUR)
        self.assertTrue(mesh.hub_reaches_home(on))


class KeyFilter:
    """Asks ``inner`` only about one peer."""

    def __init__(self, key: bytes, inner: Recording) -> None:
        self.key = key
        self.inner = inner
        self.name = inner.name

    def interval(self, public_key: bytes, chosen: int, facts: K.KeepaliveFacts) -> int | None:
        if public_key != self.key:
            return None
        return self.inner.interval(public_key, chosen, facts)


class StatusTests(SynchronousTestCase):
    def test_status_names_the_plugin(self) -> None:
        """``meshguard status`` shows the plugin as the reason's source, with auto's own
        choice beside it, and lists the keepalive plugins in use."""
        mesh = settled(Mesh(30.0, overrides=[Recording("fixed", 7)]))
        policy = mesh.policy
        assert policy.nat.lifetime is not None
        auto = K.interval_for(policy.nat.lifetime, acked=True)
        status = policy.peer_status(mesh.home.peer(mesh.hubs[0]))
        fraction = f"{auto / policy.nat.lifetime:.2f}".rstrip("0")
        auto_reason = (
            f"{fraction} of the measured NAT lifetime ({policy.nat.lifetime:g} s),"
            " keepalives acknowledged"
        )
        self.assertEqual(status["keepalive_interval"], 7)
        self.assertEqual(status["keepalive_reason"], f"plugin fixed; auto: {auto}, {auto_reason}")
        self.assertEqual(status["keepalive"], f"7 (plugin fixed; auto: {auto}, {auto_reason})")
        self.assertEqual(status["keepalive_plugin"], "fixed")
        self.assertEqual(status["keepalive_auto_interval"], auto)
        self.assertEqual(status["keepalive_auto_reason"], auto_reason)
        self.assertTrue(status["keepalive_auto"])
        node = policy.node_status()
        self.assertEqual(node["keepalive_plugins"], ["fixed"])
        self.assertNotIn("keepalive_plugin_errors", node)

    def test_no_plugins_no_plugin_keys(self) -> None:
        """Without plugins the status is as before: no plugin keys at all."""
        mesh = settled(Mesh(30.0))
        self.assertFalse([k for k in mesh.policy.node_status() if k.startswith("keepalive_plugin")])


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class HostilePluginTests(SynchronousTestCase):
    def test_unprintable_answer_or_exception_still_counted(self) -> None:
        """An answer, or an exception, whose repr raises is counted like any other garbage and
        never escapes into the mesh layer; an int subclass is garbage too."""

        class Odd(int):
            pass

        class UnprintableError(Exception):
            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        class RaisesNasty:
            name = "nasty"

            def interval(self, public_key: bytes, chosen: int, facts: K.KeepaliveFacts) -> None:
                raise UnprintableError()

        mesh = settled(
            Mesh(
                30.0,
                overrides=[
                    RaisesNasty(),
                    Recording("unprintable", Unprintable()),
                    Recording("odd", Odd(9)),
                ],
            )
        )
        plain = settled(Mesh(30.0))
        self.assertEqual(
            mesh.home.peer(mesh.hubs[0]).persistent_keepalive,
            plain.home.peer(plain.hubs[0]).persistent_keepalive,
        )
        self.assertGreaterEqual(mesh.policy.plugin_errors, 3)
        self.assertEqual(mesh.policy.plugin_error, "odd answered 9")
