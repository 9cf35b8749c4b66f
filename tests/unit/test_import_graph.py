"""The apex_grpc import graph has no cycle (function-level imports included).

Every module under apex_grpc/ is parsed with ast; each import (at any depth: module level, in a
function, under a condition) becomes an edge to the project module it names. A cycle means two
modules each need the other, so neither owns the concern they share.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "apex_grpc"


def module_names(package_root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under package_root (packages by their
    __init__.py)."""
    modules = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = path.relative_to(package_root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules that `module`'s source imports, wherever the import statement is."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import name` imports the submodule pkg.name when there is one, else
                # takes an attribute of pkg itself.
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif base in known:
                    found.add(base)
    found.discard(module)
    return found


def import_graph(package_root: Path) -> dict[str, set[str]]:
    modules = module_names(package_root)
    known = set(modules)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name,
                                   path.name == "__init__.py", known)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        on_path = {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert "apex_grpc.engine.builder" in graph and "apex_grpc.perf.profiler" in graph
    assert "apex_grpc.platform" in graph["apex_grpc.perf.profiler"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_an_injected_cycle_and_accepts_a_dag():
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert find_cycle(dag) is None
    cyclic = {**dag, "c": {"d"}}
    cycle = find_cycle(cyclic)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"a", "c", "d"} <= set(cycle)
    for here, there in zip(cycle, cycle[1:]):
        assert there in cyclic[here]


def test_a_function_level_import_closes_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "top.py").write_text("from pkg.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text("from .helper import value\n")
    (package / "sub" / "helper.py").write_text("import os\nvalue = 1\n")
    graph = import_graph(package)
    assert graph["pkg.top"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.sub.helper"}
    assert find_cycle(graph) is None
    (package / "sub" / "helper.py").write_text(
        "def lazy():\n    from ..top import leaf\n    return leaf\n")
    assert find_cycle(import_graph(package)) == ["pkg.sub.helper", "pkg.top", "pkg.sub.leaf",
                                                 "pkg.sub.helper"]
