"""The code's layout: no package imports another that imports it back, and docs/architecture.md
names every module and no module that is gone."""

from __future__ import annotations

import ast
import itertools
import re
from collections import deque
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "orchestrator")
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# (importing unit, imported unit) -> where: "path:line" of each import making that edge
Edges = dict[tuple[str, str], list[str]]

# Cycles known today, each to be broken (then its entry goes: the test fails while a listed
# cycle is gone, so the list cannot go stale). Nothing may be added here.
KNOWN_CYCLES: set[frozenset[str]] = set()  # a cycle accepted for now, with its reason


def modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    found = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def unit(module: str) -> str:
    """What cycles are checked between: the first two dotted components (`orchestrator.raft`,
    `mesh.lb`; a top-level module such as `orchestrator.node` is a unit of its own)."""
    return ".".join(module.split(".")[:2])


def imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: Collection[str]
) -> list[str]:
    """The modules an import statement in `module` names: `from a.b import c` names `a.b.c`
    when that is a module, else `a.b`; a relative import is resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
    ]


def import_graph() -> Edges:
    """Imports between units, wherever they are: module level, inside functions, under
    TYPE_CHECKING (a type-only import still ties the two packages together)."""
    known = modules()
    edges: Edges = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported(node, module, path.name == "__init__.py", known):
                if name.split(".")[0] not in PACKAGES:
                    continue
                a, b = unit(module), unit(name)
                if a != b:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    seen = edges.setdefault((a, b), [])
                    if where not in seen:
                        seen.append(where)
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """One shortest cycle through each strongly connected set of units (Tarjan's algorithm,
    then a breadth-first search inside the set); [] when the graph is acyclic."""
    succ: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(succ):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for w in succ[v]:
                if w in component and w not in came_from:
                    came_from[w] = v
                    queue.append(w)
        path = [start]
        while (prev := came_from[path[-1]]) != start:
            path.append(prev)
        found.append([start, *reversed(path[1:]), start])
    return found


def describe(cycle: list[str], edges: Edges) -> str:
    steps = [f"  {a} -> {b} ({', '.join(edges[a, b])})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_no_package_imports_another_that_imports_it_back() -> None:
    edges = import_graph()
    found = cycles(edges)
    new = [c for c in found if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles between packages:\n" + "\n".join(describe(c, edges) for c in new)
    broken = KNOWN_CYCLES - {frozenset(c) for c in found}
    assert not broken, f"no longer cycles (remove them from KNOWN_CYCLES): {broken}"


def test_the_import_graph_sees_imports_wherever_they_are() -> None:
    edges = import_graph()
    # module level, and the layering the rest of the code relies on
    assert ("orchestrator.store", "orchestrator.raft") in edges
    assert ("orchestrator.manager", "orchestrator.store") in edges
    # the data plane stands alone: nothing of the control plane in it
    assert not [(a, b) for a, b in edges if a.startswith("mesh") and b.startswith("orchestrator")]
    # a cycle, and where it comes from, is named
    sample = {
        ("a.x", "a.y"): ["a/x.py:3"],
        ("a.y", "a.z"): ["a/y.py:4"],
        ("a.z", "a.x"): ["a/z.py:5"],
    }
    assert cycles(sample) == [["a.x", "a.y", "a.z", "a.x"]]
    assert "a/z.py:5" in describe(cycles(sample)[0], sample)
    assert cycles({("a.x", "a.y"): [], ("a.y", "a.z"): []}) == []


def test_imports_inside_functions_count() -> None:
    known = modules()
    tree = ast.parse("def f():\n    from orchestrator.raft import core, Raft\n")
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported(node, "orchestrator.store.log", False, known) == [
        "orchestrator.raft.core",
        "orchestrator.raft",
    ]
    relative = ast.parse("from ..raft.core import Raft\n").body[0]
    assert isinstance(relative, ast.ImportFrom)
    assert imported(relative, "orchestrator.store.log", False, known) == ["orchestrator.raft.core"]


def test_the_architecture_document_names_every_module() -> None:
    doc = ARCHITECTURE.read_text()
    missing = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if path.name != "__init__.py" and f"{path.name}`" not in doc and f"`{path.stem}`" not in doc
    ]
    assert not missing, f"modules docs/architecture.md does not name: {missing}"


def test_the_architecture_document_names_no_module_that_is_gone() -> None:
    doc = ARCHITECTURE.read_text()
    # its paths are from the repository's root or from the package a table is about
    # (`lb/model.py`, `exec/runner.py`): each must be the end of a file's path
    files = [
        "/" + str(p.relative_to(ROOT))
        for top in (*PACKAGES, "tests", "bench")
        for p in (ROOT / top).rglob("*.py")
    ]
    named = set(re.findall(r"`([\w./-]+\.py)`", doc))
    gone = sorted(p for p in named if not any(f.endswith("/" + p) for f in files))
    assert named and not gone, f"docs/architecture.md names what is not there: {gone}"
