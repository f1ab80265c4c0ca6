"""Package layout: nothing below imports from above (a model package never imports ``tl``, ``pl``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pertpy_gnn"
#: packages below ``tl`` / ``pl``: they may import each other and the top-level private modules only
LOWER = ("gears", "compass", "pp", "datasets")
UPPER = ("tl", "pl")


def _imported_modules(path: Path) -> list[str]:
    """Absolute dotted names of the modules imported by ``path`` (relative imports resolved)."""
    package = ["pertpy_gnn", *path.relative_to(SRC).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
    return out


@pytest.mark.parametrize("pkg", LOWER)
def test_model_packages_do_not_import_tl_or_pl(pkg):
    bad = [
        f"{p.relative_to(SRC)}: {m}"
        for p in sorted((SRC / pkg).rglob("*.py"))
        for m in _imported_modules(p)
        if any(m == f"pertpy_gnn.{u}" or m.startswith(f"pertpy_gnn.{u}.") for u in UPPER)
    ]
    assert not bad, "imports from above: " + "; ".join(bad)


def test_resolver_sees_relative_imports():
    # the check above can fail: the resolver maps ``from ..tl import x`` inside gears/ to pertpy_gnn.tl
    mods = _imported_modules(SRC / "tl" / "_prediction.py")
    assert "pertpy_gnn._prediction" in mods
