"""One-way layers: no import cycle between the subpackages of safe/.

Every module under safe/ is parsed (nothing is imported) and each import of a `safe.` module counts, at the top of
a file or inside a function alike: a late import avoids a cycle at import time, not in the design. Modules are
grouped by subpackage (safe/core, safe/data, ...); the top-level modules (safe/cli.py, safe/inference.py, ...) form
the group "safe". The layers, lowest first: core (errors, atomic files, caches, settings), data (the runtime
datasets), staging (offline data tools), toy (the toy world), eval (metrics only), models, retention, training,
and the top-level entry points, which nothing under safe/ imports.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SAFE = Path(__file__).resolve().parents[1] / "safe"
ROOT = "safe"


def _subpackages() -> set[str]:
    return {p.parent.name for p in SAFE.glob("*/__init__.py")}


def _group(module: str, subpackages: set[str]) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in subpackages else ROOT


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SAFE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, package: str) -> list[str]:
    """The `safe.` modules (or `safe.` names) an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing module's package
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from safe import data` imports a subpackage: each imported name may be a module.
        names = [module] + [f"{module}.{alias.name}" for alias in node.names]
    else:
        return []
    return [name for name in names if name.startswith(f"{ROOT}.")]


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(importing group, imported group) -> the imports that make that edge, as 'file:line module'."""
    subpackages = _subpackages()
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(SAFE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        source = path.relative_to(SAFE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(node, package):
                edge = (_group(module, subpackages), _group(target, subpackages))
                line = f"{source}:{node.lineno}"
                if edge[0] != edge[1] and not any(w.split()[0] == line for w in edges[edge]):
                    edges[edge].append(f"{line} {target}")
    return dict(edges)


def cycles(edges) -> list[set[str]]:
    """The strongly connected components of more than one group (Tarjan): each holds at least one cycle."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _explain(edges, components) -> str:
    lines = []
    for component in components:
        lines.append("cycle among " + ", ".join(sorted(component)) + ":")
        for (a, b), where in sorted(edges.items()):
            if a in component and b in component:
                lines.append(f"  {a} -> {b}: " + "; ".join(where[:4]) + (" ..." if len(where) > 4 else ""))
    return "\n".join(lines)


def test_the_graph_sees_the_imports():
    edges = import_graph()
    assert {"data", "eval", "models", "retention", "training"} <= _subpackages()
    # Top-level imports (training -> models) and a function-local one (tiny_base.py imports the VQA metric).
    assert ("training", "models") in edges and ("models", "eval") in edges
    assert any("safe/models/tiny_base.py" in where for where in edges[("models", "eval")])
    assert cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [{"a", "b", "c"}]


def test_no_import_cycle_between_subpackages():
    edges = {edge: where for edge, where in import_graph().items() if ROOT not in edge}
    found = cycles(edges)
    assert not found, _explain(edges, found)


def test_no_import_cycle_through_the_top_level_modules():
    edges = import_graph()
    found = cycles(edges)
    assert not found, _explain(edges, found)


LAYERS = ("core", "data", "staging", "toy", "eval", "models", "retention", "training", ROOT)


def test_every_import_goes_down_the_layers():
    """Stronger than "no cycle": each import points to a lower layer, so the order in docs/design.md holds."""
    assert set(LAYERS) - {ROOT} == _subpackages(), "a new subpackage needs its place in LAYERS and docs/design.md"
    upward = {(a, b): where for (a, b), where in import_graph().items() if LAYERS.index(a) < LAYERS.index(b)}
    assert not upward, "\n".join(f"{a} -> {b}: " + "; ".join(where[:4]) for (a, b), where in sorted(upward.items()))


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check on a copy of the tree with one upward import added (core importing training) must fail."""
    import shutil

    copy = tmp_path / "safe"
    shutil.copytree(SAFE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "core" / "errors.py").write_text((copy / "core" / "errors.py").read_text()
                                              + "\n\ndef _late():\n    from safe.training import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "SAFE", copy)
    edges = import_graph()
    assert any(w.startswith("safe/core/errors.py:") for w in edges[("core", "training")])
    assert cycles(edges)
    with pytest.raises(AssertionError, match="core -> training"):
        test_every_import_goes_down_the_layers()
