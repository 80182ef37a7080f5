"""The import graph of engine, cogvlm2 and kernels points one way (engine -> cogvlm2 -> kernels) and has no cycle.

Every import counts, wherever it is written: at module level, inside a function, under `if TYPE_CHECKING:`. A
function-level import only postpones a cycle to the first call; a TYPE_CHECKING one still couples the modules.
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path
from typing import Iterator, Mapping

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "cogvlm2", "kernels")  # each package may import only the packages after it

Graph = dict[str, dict[str, str]]  # importing module -> {imported module: "file:line" of its first import}


# ---------------------------------------------------------------- building the graph

def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _absolute_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names, resolving relative levels against the importer's package."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None for third-party modules)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything imported anywhere in the tree. `from p import x` yields p.x, which the
    caller resolves to the submodule p.x when there is one, else to p."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_base(node, module, is_package)
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def targets(name: str, importer: str, modules: Mapping[str, Path]) -> list[str]:
    """The modules an import of `name` runs: the named module and the packages above it that the importer is not
    already inside (importing a.b.c first runs a/__init__.py and a/b/__init__.py)."""
    target = _known(name, modules)
    if target is None:
        return []
    inside = set(_ancestors(importer)) | {importer}
    return [m for m in _ancestors(target) + [target] if m in modules and m not in inside]


def build_graph(root: Path, packages: tuple[str, ...] = LAYERS) -> Graph:
    modules = find_modules(root, packages)
    graph: Graph = {module: {} for module in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            for target in targets(name, module, modules):
                graph[module].setdefault(target, f"{path.relative_to(root)}:{line}")
    return graph


def package_graph(graph: Graph) -> Graph:
    """Top-level package -> {package it imports: where one such import is}."""
    packages: Graph = {source.split(".")[0]: {} for source in graph}
    for source, target, where in _deepest_imports(graph):
        a, b = source.split(".")[0], target.split(".")[0]
        if a != b:
            packages[a].setdefault(b, f"{source} -> {target}, {where}")
    return packages


def _deepest_imports(graph: Graph) -> list[tuple[str, str, str]]:
    """(importer, module, where) once per import statement: the named module, not the packages it also runs."""
    deepest: dict[tuple[str, str], str] = {}
    for source, edges in sorted(graph.items()):
        for target, where in edges.items():
            key = (source, where)
            if key not in deepest or target.count(".") > deepest[key].count("."):
                deepest[key] = target
    return [(source, target, where) for (source, where), target in deepest.items()]


# ---------------------------------------------------------------- cycles

def strongly_connected(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """Tarjan's components with more than one node (or a self-import), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def shortest_cycle(graph: Mapping[str, Mapping[str, object]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first node, staying inside the component: [a, ..., a]."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start] + path[::-1][1:] + [start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise ValueError(f"{component} is not a cycle")


def describe_cycles(graph: Graph) -> str:
    """'' when the graph is acyclic, else each cycle with the import that makes each of its steps."""
    lines = []
    for component in strongly_connected(graph):
        cycle = shortest_cycle(graph, component)
        lines.append(f"import cycle: {' -> '.join(cycle)}")
        lines += [f"    {a} -> {b}    ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        if len(component) > len(cycle) - 1:
            lines.append(f"    (one cycle of the strongly connected group {', '.join(component)})")
    return "\n".join(lines)


def layer_violations(graph: Graph, layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Imports from a package to one at or before it in `layers` (other than itself)."""
    rank = {package: i for i, package in enumerate(layers)}
    found = []
    for source, target, where in sorted(_deepest_imports(graph)):
        a, b = source.split(".")[0], target.split(".")[0]
        if a != b and rank[b] < rank[a]:
            found.append(f"{source} imports {target} ({where}): {a} must not import {b}")
    return found


# ---------------------------------------------------------------- the checks on this tree

def test_no_cycle_between_modules():
    message = describe_cycles(build_graph(REPO))
    assert not message, "\n" + message


def test_no_cycle_between_packages():
    message = describe_cycles(package_graph(build_graph(REPO)))
    assert not message, "\n" + message


def test_kernels_import_nothing_from_the_model_or_the_engine():
    found = [v for v in layer_violations(build_graph(REPO)) if v.startswith("kernels")]
    assert not found, "\n" + "\n".join(found)


def test_the_model_imports_nothing_from_the_engine():
    found = [v for v in layer_violations(build_graph(REPO)) if v.startswith("cogvlm2")]
    assert not found, "\n" + "\n".join(found)


# ---------------------------------------------------------------- the checker itself

def test_cycles_found_in_a_synthetic_graph():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1", "d": "c.py:2"}, "d": {},
             "e": {"e": "e.py:1"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    message = describe_cycles(graph)
    assert "import cycle: a -> b -> c -> a" in message and "c -> a    (c.py:1)" in message
    assert "import cycle: e -> e" in message
    assert describe_cycles({"a": {"b": "a.py:1"}, "b": {}}) == ""


def test_shortest_cycle_inside_a_larger_group():
    graph = {"a": {"b": "", "c": ""}, "b": {"a": ""}, "c": {"b": ""}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "a"]
    assert "strongly connected group a, b, c" in describe_cycles(graph)


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_every_kind_of_import_is_an_edge(tmp_path):
    write_package(tmp_path, {
        "low/__init__.py": "",
        "low/leaf.py": "import numpy\n",
        "low/sub/__init__.py": "from . import deep\n",
        "low/sub/deep.py": "from ..leaf import x\n",
        "low/funcs.py": "def f():\n    from high import api\n",  # function level
        "low/hints.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from high.api import T\n",
        "low/submodule.py": "from low import leaf, funcs\n",  # `from package import submodule`
        "low/dotted.py": "import low.sub.deep\n",
        "high/__init__.py": "from high.api import T\n",
        "high/api.py": "from low.leaf import y\nT = int\n",
    })
    graph = build_graph(tmp_path, ("high", "low"))
    assert graph["low.sub"] == {"low.sub.deep": "low/sub/__init__.py:1"}
    assert set(graph["low.sub.deep"]) == {"low.leaf"}
    assert set(graph["low.funcs"]) == {"high", "high.api"}
    assert set(graph["low.hints"]) == {"high", "high.api"}
    assert set(graph["low.submodule"]) == {"low.leaf", "low.funcs"}
    assert set(graph["low.dotted"]) == {"low.sub", "low.sub.deep"}
    assert set(graph["high.api"]) == {"low", "low.leaf"} and graph["low.leaf"] == {}
    assert package_graph(graph) == {"high": {"low": "high.api -> low.leaf, high/api.py:1"},
                                    "low": {"high": "low.funcs -> high.api, low/funcs.py:2"}}
    assert "import cycle: high -> low -> high" in describe_cycles(package_graph(graph))
    assert describe_cycles(graph) == ""  # the packages form a cycle, their modules do not
    assert layer_violations(graph, ("high", "low")) == [
        "low.funcs imports high.api (low/funcs.py:2): low must not import high",
        "low.hints imports high.api (low/hints.py:3): low must not import high"]


def test_a_module_cycle_through_a_function_level_import(tmp_path):
    write_package(tmp_path, {"p/__init__.py": "", "p/a.py": "from p import b\n",
                             "p/b.py": "def f():\n    from p.a import g\n"})
    assert describe_cycles(build_graph(tmp_path, ("p",))) == (
        "import cycle: p.a -> p.b -> p.a\n    p.a -> p.b    (p/a.py:1)\n    p.b -> p.a    (p/b.py:2)")
