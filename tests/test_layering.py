"""Package layering: the module-level imports between dsa_train's packages form no cycle, and the
pure ops import none of the other packages (not even inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import dsa_train

PACKAGES = ("ops", "kernels", "parallel", "model", "train", "eval", "checkpoint", "convert", "data")
ROOT = Path(dsa_train.__file__).parent


def _imported_packages(tree: ast.AST, nodes) -> set[str]:
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dsa_train" and len(parts) > 1 and parts[1] in PACKAGES:
                out.add(parts[1])
    return out


def _package_graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            nodes = tree.body if module_level_only else ast.walk(tree)
            graph[package] |= _imported_packages(tree, nodes) - {package}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in PACKAGES:
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_between_packages():
    graph = _package_graph(module_level_only=True)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # The layers the design relies on (each is also a single edge a cycle would need).
    assert graph["kernels"] <= {"ops"}
    assert "model" not in graph["parallel"] and "kernels" not in graph["parallel"]


def test_ops_import_no_other_package():
    assert _package_graph(module_level_only=False)["ops"] == set()


def test_the_cycle_finder_finds_cycles():
    assert _cycle({**{p: set() for p in PACKAGES}, "ops": {"kernels"}, "kernels": {"ops"}}) == ["ops", "kernels", "ops"]
    assert _cycle({p: set() for p in PACKAGES}) is None
