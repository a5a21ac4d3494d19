"""The protocol core stays sans-I/O: it never imports the reactor, sockets, clocks or ``os``."""

from __future__ import annotations

import ast
import pathlib

from twisted.trial.unittest import SynchronousTestCase

import meshguard.core
import meshguard.mesh
import meshguard.portmap.natpmp
import meshguard.portmap.pcp

FORBIDDEN = {"twisted.internet", "socket", "select", "time", "os", "random", "asyncio"}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


class CorePurityTests(SynchronousTestCase):
    def test_no_io_imports(self) -> None:
        """No module of meshguard.core or meshguard.mesh, nor the port-mapping codecs (NAT-PMP,
        PCP), imports I/O: reactor, sockets, time, os."""
        modules = []
        for package in (meshguard.core, meshguard.mesh):
            modules.extend(sorted(pathlib.Path(package.__file__).parent.rglob("*.py")))
        for codec in (meshguard.portmap.natpmp, meshguard.portmap.pcp):
            modules.append(pathlib.Path(codec.__file__))
        self.assertTrue(modules)
        for path in modules:
            for name in imported_modules(path):
                for forbidden in FORBIDDEN:
                    self.assertFalse(
                        name == forbidden or name.startswith(forbidden + "."),
                        f"{path.name} imports {name}",
                    )
