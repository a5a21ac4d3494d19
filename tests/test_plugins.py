"""Plugins: endpoint sources and path observers are found with ``getPlugins``, built-in and
third-party alike, and called by the mesh layer (docs/plugins.md)."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import meshguard.plugins
from meshguard.app.node import Node
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.members import MemberInfo, Network
from meshguard.mesh.sources import DEFAULT_SOURCES, Candidate, gather, gather_kinds
from meshguard.plugins import IEndpointSource, IKeepalivePolicy, IPathObserver, load
from meshguard.plugins.standard import PathLog
from tests.meshsim import MeshSim
from tests.test_keepalive import Mesh

DOCS = pathlib.Path(__file__).parent.parent / "docs" / "plugins.md"

#: A second third-party module: records what the node tells it.
RECORDER = """
from twisted.plugin import IPlugin
from zope.interface import implementer

from meshguard.plugins import IPathObserver

events = []


@implementer(IPlugin, IPathObserver)
class Recorder:
    def member_changed(self, public_key, allowed_ips):
        events.append(("member", public_key, None if allowed_ips is None else list(allowed_ips)))

    def path_changed(self, public_key, old, new, detail):
        events.append(("path", public_key, old, new))

    def rtt_measured(self, public_key, rtt):
        events.append(("rtt", public_key, rtt))


recorder = Recorder()
"""


def doc_example(index: int = 0) -> str:
    """A complete plugin file docs/plugins.md shows: 0, endpoints and path changes; 1, keepalive
    policies."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 2, "docs/plugins.md shows two complete plugin modules"
    return str(blocks[index])


def private(n: int) -> bytes:
    return generate_private_key(lambda size: bytes([n]) * size)


def key(n: int) -> bytes:
    return public_key(private(n))


class Recording:
    """A path observer (the structural shape) that records events."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def member_changed(self, public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:
        self.events.append(("member", public_key, allowed_ips))

    def path_changed(self, public_key: bytes, old: str, new: str, detail: str | None) -> None:
        self.events.append(("path", public_key, old, new))

    def rtt_measured(self, public_key: bytes, rtt: float) -> None:
        self.events.append(("rtt", public_key, rtt))


class Broken:
    name = "broken"

    def candidates(self, key: bytes, reports: Mapping[bytes, MemberInfo]) -> Iterable[Candidate]:
        raise RuntimeError("plugin bug")

    def member_changed(self, public_key: bytes, allowed_ips: Sequence[Network] | None) -> None:
        raise RuntimeError("plugin bug")

    def path_changed(self, public_key: bytes, old: str, new: str, detail: str | None) -> None:
        raise RuntimeError("plugin bug")

    def rtt_measured(self, public_key: bytes, rtt: float) -> None:
        raise RuntimeError("plugin bug")


class BuiltinPluginTests(SynchronousTestCase):
    def test_builtin_sources_and_observer_are_plugins(self) -> None:
        """The built-in endpoint sources and the path logger are found by getPlugins, built-ins
        first with LAN before introducer-observed, and a node uses them."""
        sources = load(IEndpointSource)
        self.assertEqual([s.name for s in sources][:2], ["lan", "introducer"])
        self.assertTrue(any(isinstance(o, PathLog) for o in load(IPathObserver)))
        node = Node("mgplug0", Clock())
        self.assertEqual([s.name for s in node.mesh_stack.paths.sources][:2], ["lan", "introducer"])
        self.assertTrue(any(isinstance(o, PathLog) for o in node.mesh_stack.paths.observers))
        self.assertIn("lan", node.status_document()["node"]["endpoint_sources"])

    def test_default_sources_match_the_old_candidate_rules(self) -> None:
        """Without plugins, candidates are each introducer's LAN endpoints (ranked LAN) and its
        observed endpoint; an endpoint both LAN and observed counts as LAN."""
        k = key(1)
        reports = {
            b"\x02" * 32: MemberInfo(k, (), ("203.0.113.5", 4000), (("192.168.1.5", 51820),)),
            b"\x01" * 32: MemberInfo(k, (), ("192.168.1.5", 51820), (("10.0.0.5", 51820),)),
        }
        lan, direct, failures = gather(DEFAULT_SOURCES, k, reports)
        self.assertEqual(lan, [("10.0.0.5", 51820), ("192.168.1.5", 51820)])
        self.assertEqual(direct, [("203.0.113.5", 4000)])
        self.assertEqual(failures, 0)

    def test_sources_name_kinds(self) -> None:
        """``gather_kinds`` keeps the kind a source names for an endpoint (``mapped`` from the
        port-mapping source), also for an endpoint another source observes first; endpoints
        nobody names have no kind."""
        k = key(1)
        reports = {
            b"\x01" * 32: MemberInfo(
                k, (), ("203.0.113.5", 51820), (), (("203.0.113.5", 51820), ("203.0.113.5", 7))
            ),
            b"\x02" * 32: MemberInfo(k, (), ("203.0.113.5", 4000)),
        }
        lan, direct, kinds, failures = gather_kinds(DEFAULT_SOURCES, k, reports)
        self.assertEqual(lan, [])
        self.assertEqual(
            direct, [("203.0.113.5", 51820), ("203.0.113.5", 4000), ("203.0.113.5", 7)]
        )
        self.assertEqual(kinds, {("203.0.113.5", 51820): "mapped", ("203.0.113.5", 7): "mapped"})
        self.assertEqual(failures, 0)

    def test_a_broken_or_lying_source_is_skipped_and_counted(self) -> None:
        """A source that raises or names a DNS name or garbage is skipped and counted; the other
        sources still count."""

        class Lying:
            name = "lying"

            def candidates(self, key: bytes, reports: Mapping[bytes, MemberInfo]) -> Any:
                return [Candidate(("example.com", 1)), "junk", Candidate(("192.0.2.1", 7))]

        k = key(1)
        reports = {b"\x01" * 32: MemberInfo(k, (), ("203.0.113.5", 4000))}
        _lan, direct, failures = gather([Broken(), Lying(), *DEFAULT_SOURCES], k, reports)
        self.assertEqual(direct, [("192.0.2.1", 7), ("203.0.113.5", 4000)])
        self.assertEqual(failures, 3)


class PathEventTests(SynchronousTestCase):
    def test_observers_hear_members_paths_and_rtts(self) -> None:
        """An observer hears a learned member arrive with its AllowedIPs, its path go relayed
        then direct, and round-trip times; a broken observer beside it changes nothing."""
        sim = MeshSim(seed=2)
        a = sim.add_member(None, "198.51.100.20")
        b = sim.add_member(None, "198.51.100.21")
        recording = Recording()
        a.stack.paths.observers.extend([Broken(), recording])
        sim.start()
        sim.run(20)
        self.assertEqual(sim.path(a, b), "direct")
        events = [e for e in recording.events if e[1] == b.public_key]
        self.assertEqual(events[0], ("member", b.public_key, [ipaddress.ip_network(b.address)]))
        paths = [e[2:] for e in events if e[0] == "path"]
        self.assertEqual(paths, [("none", "relayed"), ("relayed", "direct")])
        rtts = [e[2] for e in events if e[0] == "rtt"]
        self.assertTrue(rtts and all(r >= 0 for r in rtts))
        self.assertGreater(a.stack.paths.plugin_errors, 0)
        sim.introducer.node.device.remove_peer(b.public_key)
        sim.run(5)
        self.assertIn(("member", b.public_key, None), recording.events)


class ThirdPartyPluginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = pathlib.Path(self.mktemp())
        plugins = self.directory / "meshguard" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "mgtest_endpoints_file.py").write_text(doc_example())
        (plugins / "mgtest_recorder.py").write_text(RECORDER)
        (plugins / "mgtest_keepalive_policy.py").write_text(doc_example(1))
        self.endpoints = self.directory / "endpoints.json"
        self.metered = self.directory / "metered"
        self.patch(sys, "path", [str(self.directory), *sys.path])
        self.patch(meshguard.plugins, "__path__", list(meshguard.plugins.__path__))
        environ = {
            **os.environ,
            "MESHGUARD_ENDPOINTS_FILE": str(self.endpoints),
            "MESHGUARD_METERED_FLAG": str(self.metered),
        }
        self.patch(os, "environ", environ)
        self.addCleanup(self._forget_modules)

    def _forget_modules(self) -> None:
        for name in (
            "meshguard.plugins.mgtest_endpoints_file",
            "meshguard.plugins.mgtest_recorder",
            "meshguard.plugins.mgtest_keepalive_policy",
        ):
            sys.modules.pop(name, None)

    def test_node_loads_and_calls_a_plugin_from_a_temporary_package(self) -> None:
        """The plugin file of docs/plugins.md, put in a ``meshguard/plugins`` directory on
        sys.path, is loaded by a node: the endpoints it reads become the member's punch candidates,
        and a second plugin module's observer hears the learned member."""
        member = key(3)
        self.endpoints.write_text(
            json.dumps({base64.b64encode(member).decode(): ["192.0.2.77:51820"]})
        )
        clock = Clock()
        clock.advance(1000)
        node = Node("mgplug1", clock)
        names = [s.name for s in node.mesh_stack.paths.sources]
        self.assertEqual(names, ["lan", "introducer", "mapped", "endpoints-file"])
        recorder = sys.modules["meshguard.plugins.mgtest_recorder"]

        # An introducer tells the node about the member; the plugins take part.
        node.device.set_private_key(private(9), clock.seconds())
        introducer = node.device.add_peer(key(2))
        assert introducer is not None
        node.mesh_stack.configure({key(2)}, True, clock.seconds())
        info = MemberInfo(member, (ipaddress.ip_network("10.99.0.3/32"),), ("203.0.113.9", 4000))
        body = encode_json(
            {"op": "list", "gen": 1, "page": 0, "pages": 1, "members": [info.to_json()]}
        )
        node.mesh_stack.membership.control_received(
            introducer, kinds.MEMBERS, body, clock.seconds()
        )
        state = node.mesh_stack.paths.states[member]
        self.assertEqual(state.candidates(), [("203.0.113.9", 4000), ("192.0.2.77", 51820)])
        self.assertIn(("member", member, [ipaddress.ip_network("10.99.0.3/32")]), recorder.events)
        self.assertEqual(node.status_document()["node"]["endpoint_sources"], names)

    def test_keepalive_policy_from_a_temporary_package(self) -> None:
        """The keepalive policies of docs/plugins.md, put in a ``meshguard/plugins`` directory on
        sys.path, are found by getPlugins in the module's order and consulted by auto: the
        metered floor while the flag file exists (20 s where auto chose 13 s behind a 30 s NAT),
        the fixed interval for its peer over the floor, and auto's own choice without either."""
        policies = load(IKeepalivePolicy)
        self.assertEqual([p.name for p in policies], ["fixed", "metered-floor"])
        module = sys.modules["meshguard.plugins.mgtest_keepalive_policy"]
        self.metered.write_text("")
        mesh = Mesh(30.0, overrides=policies)
        mesh.net.advance(30 * 60)
        policy = mesh.policy
        hub = mesh.hubs[0]
        peer = mesh.home.peer(hub)
        lifetime = policy.nat.lifetime
        assert lifetime is not None
        self.assertEqual(peer.persistent_keepalive, 20)
        self.assertEqual(
            policy.peer_status(peer)["keepalive"],
            f"20 (plugin metered-floor; auto: 13, half the measured NAT lifetime ({lifetime:g} s))",
        )

        self.patch(module, "FIXED", {base64.b64encode(hub.public).decode(): 15})
        policy.update(mesh.net.now)
        self.assertEqual(peer.persistent_keepalive, 15)
        self.assertEqual(policy.peer_status(peer)["keepalive_plugin"], "fixed")

        self.patch(module, "FIXED", {})
        self.metered.unlink()
        policy.update(mesh.net.now)
        self.assertEqual(peer.persistent_keepalive, 13)
        self.assertNotIn("keepalive_plugin", policy.peer_status(peer))
        self.assertEqual(policy.plugin_errors, 0)

    def test_node_consults_keepalive_plugins(self) -> None:
        """A node hands the keepalive plugins it finds to its ``auto`` policy, in load order,
        and its status lists them."""
        node = Node("mgplug2", Clock())
        names = [getattr(p, "name", None) for p in node.keepalive.overrides]
        self.assertEqual(names, ["fixed", "metered-floor"])
        self.assertEqual(
            node.status_document()["node"]["keepalive_plugins"], ["fixed", "metered-floor"]
        )
        self.assertEqual(Node("mgplug3", Clock(), plugins=False).keepalive.overrides, [])
