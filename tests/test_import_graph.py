"""The package import graph has no cycles (lazy imports inside functions included): `spec` imports nothing
of scalelab but its errors, `train` never imports `study`, and no two packages import each other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "scalelab"


def package_graph() -> dict[str, set[str]]:
    """{package or top-level module: the scalelab packages/modules it imports}, every import statement."""
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        source = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "scalelab" and len(parts) > 1 and parts[1] != source:
                    edges.setdefault(source, set()).add(parts[1])
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_package_imports_itself_through_others():
    edges = package_graph()
    assert {"spec", "study", "train", "fit", "models"} <= set(edges)  # the walk found the code
    cycles = {p: sorted(_reachable(edges, p)) for p in edges if p in _reachable(edges, p)}
    assert not cycles, cycles


def test_spec_and_train_stay_below_study():
    edges = package_graph()
    assert edges["spec"] == {"errors"}
    assert "study" not in _reachable(edges, "train") and "study" not in _reachable(edges, "models")
