"""The NAT matrix over real nftables NATs: every pair of NAT kinds in one mesh, each cell's path
asserted against the expected grid, "direct" proven by the introducer forwarding nothing for
the pair during a transfer, and the grid written out (docs/nat-grid.md holds a copy).

One internet holds one home per kind (two for ``hard``, so that hard meets hard), each with
one member, and a public introducer; all pairs punch at once, so one setup covers every cell.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.miniupnpd import MINIUPNPD, start_miniupnpd
from tests.natmesh import grid_markdown, start_mesh
from tests.netns import (
    CONNTRACK,
    DEFAULT_BINARIES,
    Testbed,
    nat_homes,
    reboot_router,
    require_root_netns,
)

#: (label, NAT kind, WAN input filter) per home, in order.
HOMES: list[tuple[str, str, bool]] = [
    ("one-to-one", "one-to-one", False),
    ("easy+filter", "easy", True),
    ("easy", "easy", False),
    ("easy-addr", "easy-addr", False),
    ("cgnat+filter", "cgnat", True),
    ("cgnat", "cgnat", False),
    ("hard", "hard", False),
    ("hard2", "hard", False),
    ("hard+map", "hard", False),
]
#: Homes whose router runs miniupnpd (NAT-PMP, PCP, UPnP-IGD): the member maps its port.
MAPPING = {"hard+map"}

DIRECT = "direct"
MEMBER = "member"
#: A path to the member's mapped port (its gateway forwards it: meshguard/portmap/); in the
#: grid a cell is direct when neither side is relayed, and says ``mapped`` when one side
#: uses such a port.
MAPPED = "mapped"


def expected(x: str, y: str) -> str:
    """The matrix we promise. Direct: one side one-to-one, or both map endpoint-independently
    (``cgnat`` too, with or without its carrier's WAN filter: its primers' hop limit is traced
    to pass the carrier, meshguard/adapters/primer.py), or a hard NAT facing address-only filtering
    (its random port is let in), or a hard NAT facing port-dependent filtering (the birthday
    technique, docs/nat-matrix.md), or any NAT whose gateway maps our port. Relayed through a
    member: hard against hard without port mapping."""
    kinds = {label.rstrip("2") for label in (x, y)}
    if "one-to-one" in kinds or kinds & MAPPING:
        return DIRECT
    if kinds == {"hard"}:
        return MEMBER
    return DIRECT


#: Bytes each pair moves over TCP while the introducer's counter is watched.
TRANSFER = 1024 * 1024
#: How long every pair gets to settle after the last node started: room for a second birthday
#: attempt (``ATTEMPT_GAP`` after a first that missed) under load; a grid that settles sooner
#: ends the wait sooner.
SETTLE = 150.0
#: Homes whose routers reboot (change public address) after the grid, all at once (a
#: ``cgnat`` home's carrier): every kind. :func:`tests.netns.reboot_router` empties the
#: router's whole conntrack table (``conntrack -F``), as a real reboot does, so the DNAT/SNAT
#: entries of ``one-to-one`` and ``easy-addr`` go too; ``hard+map``'s miniupnpd keeps running
#: and its rules match the WAN interface, not the address.
REBOOTED = tuple(label for label, _, _ in HOMES)


#: How long they get to be back: dead-path detection (10-14 s), the quiet period toward a
#: member that moved (39 s, meshguard/mesh/paths.py MOVED_QUIET_FOR), punching, and for a hard
#: NAT the birthday technique: 4 rounds, then attempts (a spray of ~10 s each) ATTEMPT_GAP
#: (60 s) apart, three at most. With every router rebooting at once each hard home runs the
#: technique with six members at the same moment, and in 2 of 4 runs one pair's first two
#: attempts both missed (150 s was not enough), so the bound leaves room for the third.
REBOOT_BOUND = 210.0


class NatGridTests(TestCase):
    timeout = 600

    def test_grid(self) -> None:
        require_root_netns(self, [*DEFAULT_BINARIES, MINIUPNPD, CONNTRACK])
        tb = Testbed(self)
        self.addCleanup(tb.cleanup)
        net = nat_homes(tb, [(1, kind, wan) for _, kind, wan in HOMES])
        labels = [label for label, _, _ in HOMES]
        for i, label in enumerate(labels):
            if label in MAPPING:
                start_miniupnpd(tb, net.homes[i].router, f"192.168.{i + 1}.0/24")
        mesh = start_mesh(tb, net)
        started = time.monotonic()
        pairs = list(itertools.combinations(range(len(HOMES)), 2))
        first_direct: dict[tuple[int, int], float] = {}

        def kinds_of(x: int, y: int) -> set[str]:
            return {str(mesh.peer(x, y).get("path_kind")), str(mesh.peer(y, x).get("path_kind"))}

        def outcome(x: int, y: int) -> str:
            kinds = kinds_of(x, y)
            if kinds <= {DIRECT, "lan", MAPPED}:
                return DIRECT
            return MEMBER if MEMBER in kinds else "/".join(sorted(kinds))

        def settled() -> bool:
            done = True
            for x, y in pairs:
                got = outcome(x, y)
                if got == DIRECT and (x, y) not in first_direct:
                    first_direct[(x, y)] = time.monotonic() - started
                if got != expected(labels[x], labels[y]):
                    done = False
            return done

        try:
            tb.wait_for(settled, timeout=SETTLE, interval=1.0, what="the expected grid")
        except AssertionError:
            pass  # the grid below says which cells differ
        grid = {(x, y): outcome(x, y) for x, y in pairs}
        mapped = {(x, y) for x, y in pairs if MAPPED in kinds_of(x, y)}
        reasons = {
            (x, y): mesh.peer(x, y).get("not_direct_reason")
            for x, y in pairs
            if grid[(x, y)] != DIRECT
        }
        # Direct means direct: a transfer between the pair leaves the introducer's forwarded
        # bytes for the pair unchanged.
        flat: dict[tuple[int, int], bool] = {}
        for x, y in pairs:
            before = mesh.forwarded(x, y)
            ok = tb.tcp_transfer(
                mesh.namespaces[y], mesh.namespaces[x], mesh.addresses[y], TRANSFER
            )
            self.assertTrue(ok, f"{labels[x]} cannot send {TRANSFER} bytes to {labels[y]}")
            flat[(x, y)] = mesh.forwarded(x, y) == before
        text = _render(labels, grid, first_direct, reasons, flat, mapped)
        out = os.environ.get("MESHGUARD_NAT_GRID")
        Path(out if out else Path(tb.log_dir) / "nat-grid.md").write_text(text)
        wrong = [
            f"{labels[x]} vs {labels[y]}: {grid[(x, y)]}, expected {expected(labels[x], labels[y])}"
            for x, y in pairs
            if grid[(x, y)] != expected(labels[x], labels[y])
        ]
        not_flat = [
            f"{labels[x]} vs {labels[y]}"
            for x, y in pairs
            if grid[(x, y)] == DIRECT and not flat[(x, y)]
        ]
        self.assertEqual((wrong, not_flat), ([], []), text)

        # Router reboots: every router (a cgnat home's carrier) comes back at once with a new
        # public address and an empty conntrack table (every mapping new); each home's time
        # until all its pairs are as in the grid again, direct ones at its new address.

        rebooted = [i for i, label in enumerate(labels) if label in REBOOTED]
        new_public = {i: f"203.0.{i + 1}.3" for i in rebooted}
        for i in rebooted:
            reboot_router(tb, net.homes[i], new_public[i])
        rebooted_at = time.monotonic()
        recovered: dict[int, float] = {}

        def why(r: int, y: int) -> str:
            """What both sides' status says about a pair that is not back (for the report)."""
            sides = []
            for a, b in ((r, y), (y, r)):
                peer = mesh.peer(a, b)
                sides.append(
                    f"{labels[a]}: {peer.get('not_direct_reason')}, birthday {peer.get('birthday')}"
                )
            return " (" + "; ".join(sides) + ")"

        def home_back(r: int) -> bool:
            return not home_missing(r)

        def home_missing(r: int) -> str:
            """The first pair of home ``r`` that is not back yet, with what it shows."""
            for y in range(len(labels)):
                if y == r:
                    continue
                x, z = min(r, y), max(r, y)
                got = outcome(x, z)
                if got != expected(labels[x], labels[z]):
                    return f"vs {labels[y]}: {got}{why(r, y)}"
                if got == DIRECT:
                    seen = mesh.peer(y, r).get("endpoint") or [""]
                    if seen[0] != new_public[r]:
                        return f"vs {labels[y]}: direct at {seen[0]}"
            return ""

        def all_back() -> bool:
            for r in rebooted:
                if r not in recovered and home_back(r):
                    recovered[r] = time.monotonic() - rebooted_at
            return len(recovered) == len(rebooted)

        try:
            tb.wait_for(all_back, timeout=REBOOT_BOUND, interval=1.0, what="homes back")
        except AssertionError:
            pass
        lines = ["", "Time until every pair of a home is as above again after its router reboot:"]
        lines.append("")
        for r in rebooted:
            took = recovered.get(r)
            lines.append(
                f"- {labels[r]}: {took:.0f} s"
                if took is not None
                else f"- {labels[r]}: not back ({home_missing(r)})"
            )
        with Path(out if out else Path(tb.log_dir) / "nat-grid.md").open("a") as f:
            f.write("\n".join(lines) + "\n")
        self.assertEqual(sorted(recovered), rebooted, "\n".join(lines))


def _render(
    labels: list[str],
    grid: dict[tuple[int, int], str],
    first_direct: dict[tuple[int, int], float],
    reasons: dict[tuple[int, int], object],
    flat: dict[tuple[int, int], bool],
    mapped: set[tuple[int, int]],
) -> str:
    def cell(x: int, y: int) -> str:
        key = (min(x, y), max(x, y))
        if x == y:
            return "-"
        got = grid[key]
        if got == DIRECT:
            seconds = first_direct.get(key)
            mark = (" (mapped)" if key in mapped else "") + ("" if flat[key] else " (relay used!)")
            return f"direct {seconds:.0f} s{mark}" if seconds is not None else f"direct{mark}"
        return "via member" if got == MEMBER else got

    return grid_markdown(labels, cell, reasons)
