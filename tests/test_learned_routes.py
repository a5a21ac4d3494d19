"""``Table = auto`` routes learned members' AllowedIPs too, and removes them when they go."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import meshguard.app.service
from meshguard.adapters.link import CommandResult, Link
from meshguard.app.node import Node
from meshguard.app.service import NodeService
from meshguard.codecs.config import parse_config
from meshguard.core.crypto import generate_private_key, public_key
from meshguard.mesh import kinds
from meshguard.mesh.agent import encode_json
from meshguard.mesh.members import MemberInfo


def private(n: int) -> bytes:
    return generate_private_key(lambda size: bytes([n]) * size)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


INTRODUCER = public_key(private(2))
NEAR = public_key(private(3))  # inside the interface's subnet: no route of its own
FAR = public_key(private(4))  # elsewhere: routed


def member_list(gen: int, *members: MemberInfo) -> bytes:
    return encode_json(
        {"op": "list", "gen": gen, "page": 0, "pages": 1, "members": [m.to_json() for m in members]}
    )


class LearnedRouteTests(SynchronousTestCase):
    def start(self, table: str) -> NodeService:
        self.clock = Clock()
        self.commands: list[list[str]] = []

        def runner(argv: Sequence[str]) -> CommandResult:
            self.commands.append(list(argv))
            return CommandResult(0, "", "")

        def make_node(interface: str, reactor: Any, **kwargs: Any) -> Node:
            node = Node(interface, reactor, link=Link(interface, runner), plugins=False, **kwargs)
            node.open = lambda: None  # type: ignore[method-assign]
            return node

        self.patch(meshguard.app.service, "Node", make_node)
        self.patch(meshguard.app.service, "host_addresses", lambda exclude: [])
        self.patch(meshguard.app.service, "listen_uapi", lambda *a: None)
        self.patch(meshguard.app.service, "listen_status", lambda *a: None)
        config = parse_config(
            f"[Interface]\nPrivateKey = {b64(private(1))}\nAddress = 10.99.0.2/24\n"
            f"Table = {table}\n\n"
            f"[Peer]\nPublicKey = {b64(INTRODUCER)}\nIntroducer = yes\n"
            "AllowedIPs = 10.99.0.1/32, 10.200.0.0/16\nEndpoint = 192.0.2.1:51820\n",
            "mg0.conf",
        )
        service = NodeService("mgr0", config, reactor=self.clock)
        service._set_up()
        return service

    def routes(self) -> list[tuple[str, str]]:
        return [(c[2], c[3]) for c in self.commands if c[1] == "route"]

    def hear(self, service: NodeService, gen: int, *members: MemberInfo) -> None:
        assert service.node is not None
        introducer = service.node.device.peers[INTRODUCER]
        service.node.mesh_stack.membership.control_received(
            introducer, kinds.MEMBERS, member_list(gen, *members), self.clock.seconds()
        )

    def test_learned_members_get_routes_and_lose_them(self) -> None:
        """A learned member outside the interface's subnet gets a route (once per list, after
        the list is handled), one inside it gets none, and a member no introducer lists any more
        loses its route."""
        service = self.start("auto")
        self.assertEqual(self.routes(), [("add", "10.200.0.0/16")])
        self.commands.clear()
        near = MemberInfo(NEAR, (ipaddress.ip_network("10.99.0.3/32"),))
        far = MemberInfo(FAR, (ipaddress.ip_network("10.50.0.0/24"),))
        self.hear(service, 1, near, far)
        self.assertEqual(self.routes(), [])  # coalesced: synced once the burst is handled
        self.clock.advance(0)
        self.assertEqual(self.routes(), [("add", "10.50.0.0/24")])
        self.hear(service, 2, near, far)  # the same list again (a re-subscription)
        self.clock.advance(0)
        self.assertEqual(self.routes(), [("add", "10.50.0.0/24")])
        self.hear(service, 3, near)
        self.clock.advance(0)
        self.assertEqual(self.routes(), [("add", "10.50.0.0/24"), ("del", "10.50.0.0/24")])
        self.assertEqual(service.routes, [ipaddress.ip_network("10.200.0.0/16")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_table_off_routes_nothing(self) -> None:
        """With ``Table = off`` learned members get no routes either."""
        service = self.start("off")
        far = MemberInfo(FAR, (ipaddress.ip_network("10.50.0.0/24"),))
        self.hear(service, 1, far)
        self.clock.advance(0)
        self.assertEqual(self.routes(), [])
        self.assertIn(FAR, service.node.device.peers if service.node else {})

    def test_a_route_that_fails_is_logged_and_retried(self) -> None:
        """A route the kernel refuses is logged, not raised into the mesh layer, and tried
        again at the next change."""
        service = self.start("auto")
        fail = [True]

        def runner(argv: Sequence[str]) -> CommandResult:
            self.commands.append(list(argv))
            return CommandResult(2 if fail[0] else 0, "", "RTNETLINK answers: File exists")

        assert service.node is not None
        service.node.link = Link("mgr0", runner)
        self.commands.clear()
        far = MemberInfo(FAR, (ipaddress.ip_network("10.50.0.0/24"),))
        self.hear(service, 1, far)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        fail[0] = False
        self.hear(service, 2, far)
        self.clock.advance(0)
        self.assertEqual(self.routes(), [("add", "10.50.0.0/24"), ("add", "10.50.0.0/24")])
        self.assertIn(ipaddress.ip_network("10.50.0.0/24"), service.routes)
