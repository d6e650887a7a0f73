"""No import cycles: a part never imports its caller (pipeline/ and scripts/).

The graph comes from the modules' own source (parsed with `ast`, nothing is imported), so it holds for any
layout: every `*.py` under the folder is a module, a package being its `__init__.py`. Every import counts,
wherever it is written:

- at the top of the module;
- inside a function (a lazy import still reaches into the module it names: a part reaching into its caller
  stays a cycle, only deferred);
- under `if TYPE_CHECKING:` (not a cycle when the program runs, but the two modules still each need the other
  to be read; the issue asks for no cycles, so the stricter reading).

`from package import name` is an edge to `package.name` when that is a module, else to the package's
`__init__`. Imports by string (`importlib.import_module`, the plugin registry's entry points) are not seen:
they name code chosen at run time (a user's plugin, the Daily stand-in), not the package's structure.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        where = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else Path(*self.path.parts[-2:])
        return f"{self.source} -> {self.target} ({where}:{self.line})"


def module_files(folder: Path, package: str | None) -> dict[str, Path]:
    """Module name -> file, for every .py under `folder`. `package`: the folder's import name ("pipeline");
    None when the folder's files are top-level modules (scripts/ runs with its own folder on sys.path)."""
    modules: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(([package] if package else []) + parts)
        if name:
            modules[name] = path
    return modules


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from ... import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` or the nearest enclosing module of the graph (an attribute path ends in its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(modules: dict[str, Path]) -> Iterator[Edge]:
    """Every import of a module of the graph by another, wherever it is written (see the module docstring)."""
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _known(base, modules))
            for target in targets:
                if target is not None and target != module:
                    yield Edge(module, target, path, node.lineno)


def find_cycles(modules: dict[str, Path]) -> list[list[Edge]]:
    """One cycle (its edges, in order) for each group of modules that import each other (strongly connected
    components, Tarjan), so every tangle is reported once, however many cycles run through it."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for edge in import_edges(modules):
        graph[edge.source].setdefault(edge.target, edge)  # the first import of a target names the line
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in graph:
        if v not in index:
            connect(v)
    return [_cycle_through(min(group), group, graph) for group in groups]


def _cycle_through(start: str, group: set[str], graph: dict[str, dict[str, Edge]]) -> list[Edge]:
    """The shortest way from `start` back to itself inside `group` (breadth first)."""
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w, edge in graph[v].items():
                if w not in group:
                    continue
                if w == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if w not in came_by:
                    came_by[w] = edge
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not strongly connected")  # cannot happen for a Tarjan group


def _report(cycles: list[list[Edge]]) -> str:
    return "\n".join("import cycle:\n  " + "\n  ".join(map(str, cycle)) for cycle in cycles)


# --------------------------------------------------------------------------------- the repository
def test_pipeline_has_no_import_cycle() -> None:
    modules = module_files(REPO / "pipeline", "pipeline")
    assert {"pipeline", "pipeline.app", "pipeline.wiring", "pipeline.serve", "pipeline.control.server",
            "pipeline.perception.stage"} <= set(modules)  # the graph is the package, not an empty glob
    edges = {(e.source, e.target) for e in import_edges(modules)}
    assert ("pipeline.serve", "pipeline.wiring") in edges and ("pipeline.app", "pipeline.serve") in edges
    cycles = find_cycles(modules)
    assert not cycles, _report(cycles)


def test_scripts_have_no_import_cycle() -> None:
    modules = module_files(REPO / "scripts", None)
    assert {"bench", "bench_relays", "bench_measure", "hard_audio"} <= set(modules)
    edges = {(e.source, e.target) for e in import_edges(modules)}
    assert {("bench", "bench_relays"), ("bench_relays", "bench_measure"), ("bench", "bench_measure")} <= edges
    cycles = find_cycles(modules)
    assert not cycles, _report(cycles)


# ------------------------------------------------------------------------------- the detector itself
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


@pytest.mark.parametrize("how", ["top", "function", "type_checking", "relative", "from_package", "plain_import"])
def test_every_kind_of_import_closes_a_cycle(tmp_path: Path, how: str) -> None:
    """b imports a at the top; a reaches back into b in each way an import can be written."""
    back = {
        "top": "from pkg.sub.b import thing\n",
        "function": "def later():\n    from pkg.sub.b import thing\n    return thing\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import thing\n",
        "relative": "from .sub.b import thing\n",
        "from_package": "from pkg.sub import b\n",
        "plain_import": "import pkg.sub.b as b\n",
    }[how]
    root = _tree(tmp_path / "pkg", {"__init__.py": "", "a.py": back, "sub/__init__.py": "",
                                    "sub/b.py": "from pkg.a import helper\nthing = 1\n"})
    cycles = find_cycles(module_files(root, "pkg"))
    assert len(cycles) == 1
    assert [(e.source, e.target) for e in cycles[0]] == [("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.a")]
    assert "import cycle:\n  pkg.a -> pkg.sub.b (pkg/a.py:" in _report(cycles)


def test_a_long_cycle_is_reported_once_with_every_hop(tmp_path: Path) -> None:
    root = _tree(tmp_path / "pkg", {"__init__.py": "", "a.py": "import pkg.b\n", "b.py": "import pkg.c\n",
                                    "c.py": "import pkg.d\nimport pkg.a\n", "d.py": "import pkg.b\n",
                                    "e.py": "import pkg.a\n"})
    cycles = find_cycles(module_files(root, "pkg"))
    assert len(cycles) == 1  # a -> b -> c -> a and b -> c -> d -> b are one tangle
    assert [(e.source, e.target) for e in cycles[0]] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")]


def test_a_package_importing_its_submodules_is_not_a_cycle(tmp_path: Path) -> None:
    """An `__init__` re-exporting its submodules, each importing a sibling by `from pkg import sibling`, is the
    usual layout (pipeline/perception/): the submodule needs the sibling, not the `__init__`."""
    root = _tree(tmp_path / "pkg", {"__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
                                    "a.py": "from pkg import b\nA = b.B\n", "b.py": "B = 1\n",
                                    "scripts/x.py": "import json\nimport y\n", "scripts/y.py": "import os\n"})
    assert find_cycles(module_files(root, "pkg")) == []
    assert find_cycles(module_files(root / "scripts", None)) == []


def test_a_submodule_using_its_packages_init_that_imports_it_is_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path / "pkg", {"__init__.py": "from pkg.a import A\nHELPER = 1\n",
                                    "a.py": "from pkg import HELPER\nA = HELPER\n"})
    cycles = find_cycles(module_files(root, "pkg"))
    assert [[(e.source, e.target) for e in c] for c in cycles] == [[("pkg", "pkg.a"), ("pkg.a", "pkg")]]


def test_top_level_scripts_importing_each_other_is_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path / "scripts", {"bench.py": "def main():\n    import bench_relays\n",
                                        "bench_relays.py": "import bench\n"})
    cycles = find_cycles(module_files(root, None))
    assert [[(e.source, e.target) for e in c] for c in cycles] == [[("bench", "bench_relays"),
                                                                    ("bench_relays", "bench")]]
