"""The layers hold: sans-I/O cores, adapters below the composition, no import cycles.

The layout (docs/architecture.md) is only worth something while the imports keep to it, so these
tests read every module's imports (with ``ast``, nothing is run) and fail on the first one that
crosses a layer the wrong way.
"""

from __future__ import annotations

import ast
import pathlib

from twisted.trial.unittest import SynchronousTestCase

import meshguard

ROOT = pathlib.Path(meshguard.__file__).parent

#: The sans-I/O cores: the protocol, the mesh, and the sans-I/O halves of the TLS relay and of
#: port mapping. Their Twisted halves live in meshguard/adapters/.
CORES = ("meshguard.core", "meshguard.mesh", "meshguard.relay", "meshguard.portmap")
ADAPTERS = "meshguard.adapters"
CODECS = "meshguard.codecs"
COMPOSITION = "meshguard.app"
TESTING = "meshguard.testing"
PLUGINS = "meshguard.plugins"

FORBIDDEN_IO = {"twisted.internet", "socket", "select", "time", "os", "random", "asyncio"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(
    path: pathlib.Path, known: set[str] | frozenset[str] = frozenset()
) -> set[str]:
    """Every module ``path`` imports when it runs, at top level or inside a function (imports
    under ``if TYPE_CHECKING:`` never run and are left out). ``from P import N`` counts as
    ``P.N`` when that is a module in ``known``, else as ``P``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package[: len(package) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_of(name: str) -> str | None:
    for layer in (*CORES, ADAPTERS, CODECS, COMPOSITION, TESTING, PLUGINS):
        if within(name, layer):
            return layer
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


class CorePurityTests(SynchronousTestCase):
    def test_no_io_imports(self) -> None:
        """No module of the cores (protocol, mesh, the sans-I/O halves of the TLS relay and of
        port mapping) imports I/O: reactor, sockets, time, os, randomness."""
        modules = [
            (name, path)
            for name, path in all_modules().items()
            if any(within(name, core) for core in CORES)
        ]
        self.assertGreater(len(modules), 40)
        for name, path in modules:
            for imported in imported_modules(path):
                for forbidden in FORBIDDEN_IO:
                    self.assertFalse(within(imported, forbidden), f"{name} imports {imported}")


#: layer -> the meshguard layers it must not import.
RULES = {
    **dict.fromkeys(CORES, (ADAPTERS, CODECS, COMPOSITION, TESTING, PLUGINS)),
    CODECS: (ADAPTERS, COMPOSITION, TESTING, PLUGINS),
    ADAPTERS: (COMPOSITION, TESTING),
    PLUGINS: (ADAPTERS, COMPOSITION, TESTING),
    TESTING: (ADAPTERS, COMPOSITION),
}


def import_graph() -> dict[str, set[str]]:
    """Each meshguard module -> the meshguard modules it imports."""
    modules = all_modules()
    known = set(modules)
    return {
        name: {m for m in imported_modules(path, known) if within(m, "meshguard") and m != name}
        for name, path in modules.items()
    }


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, imports in sorted(graph.items()):
        layer = layer_of(name)
        for imported in sorted(imports):
            target = layer_of(imported)
            if layer is not None and target in RULES.get(layer, ()):
                found.append(f"{name} ({layer}) imports {imported} ({target})")
    return found


class LayerTests(SynchronousTestCase):
    """Who may import whom: cores < codecs < adapters < composition."""

    def test_every_module_has_a_layer(self) -> None:
        """No module sits loose in meshguard/: each belongs to one layer's folder."""
        loose = [name for name in all_modules() if name != "meshguard" and layer_of(name) is None]
        self.assertEqual(loose, [])

    def test_layers(self) -> None:
        """Cores import no adapter, codec, composition, fake or plugin; codecs import no adapter
        or composition; adapters import no composition module."""
        self.assertEqual(layer_violations(import_graph()), [])

    def test_a_violation_is_seen(self) -> None:
        """The check names an adapter that imports the composition, and a core that imports an
        adapter (so the empty list above means something)."""
        graph = {
            "meshguard.adapters.tun": {"meshguard.app.node", "meshguard.core.offload"},
            "meshguard.mesh.agent": {"meshguard.adapters.udp"},
            "meshguard.app.node": {"meshguard.adapters.tun"},
        }
        self.assertEqual(
            layer_violations(graph),
            [
                "meshguard.adapters.tun (meshguard.adapters) imports meshguard.app.node"
                " (meshguard.app)",
                "meshguard.mesh.agent (meshguard.mesh) imports meshguard.adapters.udp"
                " (meshguard.adapters)",
            ],
        )


class CycleTests(SynchronousTestCase):
    def test_no_import_cycles(self) -> None:
        """No two meshguard modules import each other, directly or through others (imports
        inside functions count: a lazy import hides a cycle, it does not remove it)."""
        graph = import_graph()
        self.assertEqual(find_cycles(graph), [])

    def test_cycles_are_found(self) -> None:
        """The cycle finder sees a cycle through three modules and none in a chain."""
        self.assertEqual(find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}), [])
