"""The birthday technique over real nftables NATs: homes behind an endpoint-independent NAT
(``masquerade``, with and without the WAN input filter) and a home behind a NAT that maps per
destination (``masquerade random``) go direct, proven by the introducer forwarding nothing for
the pairs during a transfer; the hard home reaches them through one of its extra sockets."""

from __future__ import annotations

import time

from twisted.trial.unittest import TestCase

from meshguard.app.status_client import read_status
from meshguard.mesh import birthday as bd
from tests.natmesh import start_mesh
from tests.netns import (
    CONNTRACK,
    DEFAULT_BINARIES,
    Testbed,
    nat_homes,
    reboot_router,
    require_root_netns,
)

#: Within this long after the last node started: punching goes quiet after about 10 s of
#: unanswered rounds, then the spray takes at most ~11 s.
BOUND = 90.0
#: After a router reboot: 10 s until the dead path is noticed, punching until it goes quiet,
#: the spray, and up to one more attempt (ATTEMPT_GAP), with margin.
REBOOT_BOUND = 150.0


class BirthdayTests(TestCase):
    timeout = 300

    def test_easy_and_hard_go_direct(self) -> None:
        """``easy`` (no WAN filter) and ``easy+filter`` each go direct with ``hard``: both
        sides say ``direct``; the easy side reaches the hard router's address; the hard side
        counts a hit on its extra sockets and every side's spray counter stays within the
        bounds; a 1 MiB transfer each way leaves the introducer's forwarded bytes for the
        pairs unchanged."""
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, "easy", False), (1, "easy", True), (1, "hard", False)])
        mesh = start_mesh(tb, net)
        easy, easy_f, hard = 0, 1, 2
        started = time.monotonic()

        def direct(x: int, y: int) -> bool:
            return mesh.peer(x, y).get("path_kind") == "direct" and (
                mesh.peer(y, x).get("path_kind") == "direct"
            )

        try:
            tb.wait_for(
                lambda: direct(easy, hard) and direct(easy_f, hard) and direct(easy, easy_f),
                BOUND,
                interval=1.0,
                what="the easy homes direct with the hard one",
            )
        except AssertionError:
            summary = {
                (x, y): (mesh.peer(x, y).get("path_kind"), mesh.peer(x, y).get("birthday"),
                         mesh.peer(x, y).get("not_direct_reason"))
                for x in range(3) for y in range(3) if x != y
            }  # fmt: skip
            self.fail(f"not direct: {summary}")
        took = time.monotonic() - started
        hard_public = net.homes[hard].public
        for x in (easy, easy_f):
            endpoint = mesh.peer(x, hard)["endpoint"]
            self.assertEqual(endpoint[0], hard_public)
        hard_node = read_status(mesh.ifnames[hard])["node"]
        self.assertGreaterEqual(hard_node.get("birthday_hits", 0), 1, hard_node)
        for x in range(3):
            node = read_status(mesh.ifnames[x])["node"]
            # Each side sprays at most PROBES per attempt, MAX_ATTEMPTS attempts per peer.
            most = 2 * bd.MAX_ATTEMPTS * bd.PROBES
            self.assertLessEqual(node.get("birthday_probes_sent", 0), most, node)
        for x in (easy, easy_f):
            for a, b in ((x, hard), (hard, x)):
                before = mesh.forwarded(a, b)
                self.assertTrue(
                    tb.tcp_transfer(mesh.namespaces[b], mesh.namespaces[a], mesh.addresses[b],
                                    1 << 20)
                )  # fmt: skip
                self.assertEqual(mesh.forwarded(a, b), before, (a, b))
        print(f"direct after {took:.0f} s")

    def test_hard_router_reboot_goes_direct_again(self) -> None:
        """A ``cgnat`` home (carrier without a WAN filter) and a ``hard`` home go direct; the
        hard home's router reboots with a new public address (its mappings and the winning
        socket's gone); within REBOOT_BOUND the pair is direct again, the cgnat side at the new
        address."""
        require_root_netns(self, [*DEFAULT_BINARIES, CONNTRACK])
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, "cgnat", False), (1, "hard", False)])
        mesh = start_mesh(tb, net)
        cgnat, hard = 0, 1

        def direct_at(address: str) -> bool:
            peer = mesh.peer(cgnat, hard)
            return (
                peer.get("path_kind") == "direct"
                and mesh.peer(hard, cgnat).get("path_kind") == "direct"
                and (peer.get("endpoint") or [""])[0] == address
            )

        tb.wait_for(lambda: direct_at(net.homes[hard].public), BOUND, interval=1.0, what="direct")
        reboot_router(tb, net.homes[hard], "203.0.2.3")
        rebooted = time.monotonic()
        try:
            tb.wait_for(lambda: direct_at("203.0.2.3"), REBOOT_BOUND, interval=1.0, what="back")
        except AssertionError:
            self.fail(f"not back: {mesh.peer(cgnat, hard)} / {mesh.peer(hard, cgnat)}")
        print(f"back after {time.monotonic() - rebooted:.0f} s")

    def test_cgnat_without_carrier_filter_goes_direct_with_easy_and_hard(self) -> None:
        """A ``cgnat`` home whose carrier does not drop unsolicited input, beside ``easy``
        homes (with and without the WAN filter) and a ``hard`` one: the cgnat member traces
        its NAT depth (primers with hop limit 3 pass its carrier too, the others' 2), so no
        peer's ping reaches the carrier before the home's own packets and clashes there;
        every pair is direct (the hard one by the birthday technique) and a 1 MiB transfer
        each way between the cgnat and the hard home leaves the introducer's counter flat.
        Before the trace these pairs were racy in the NAT grid (docs/nat-grid.md)."""
        require_root_netns(self)
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(
            tb, [(1, "cgnat", False), (1, "easy", False), (1, "easy", True), (1, "hard", False)]
        )
        mesh = start_mesh(tb, net)
        cgnat, hard = 0, 3
        pairs = [(x, y) for x in range(4) for y in range(x + 1, 4)]

        def direct(x: int, y: int) -> bool:
            return mesh.peer(x, y).get("path_kind") == "direct" and (
                mesh.peer(y, x).get("path_kind") == "direct"
            )

        started = time.monotonic()
        try:
            tb.wait_for(
                lambda: all(direct(x, y) for x, y in pairs),
                BOUND,
                interval=1.0,
                what="every pair direct",
            )
        except AssertionError:
            summary = {
                (x, y): (mesh.peer(x, y).get("path_kind"), mesh.peer(x, y).get("birthday"),
                         mesh.peer(x, y).get("not_direct_reason"))
                for x in range(4) for y in range(4) if x != y
            }  # fmt: skip
            self.fail(f"not direct: {summary}")
        took = time.monotonic() - started
        ttls = [read_status(name)["node"]["primer_ttl"] for name in mesh.ifnames]
        self.assertEqual(ttls, [3, 2, 2, 2])
        for a, b in ((cgnat, hard), (hard, cgnat)):
            before = mesh.forwarded(a, b)
            self.assertTrue(
                tb.tcp_transfer(mesh.namespaces[b], mesh.namespaces[a], mesh.addresses[b], 1 << 20)
            )
            self.assertEqual(mesh.forwarded(a, b), before, (a, b))
        print(f"direct after {took:.0f} s")
