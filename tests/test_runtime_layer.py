"""The runtime layer stays the bottom of the package (CPU, source only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parent.parent / "cublas_grouped" / "runtime"
MODULES = sorted(p.name for p in RUNTIME.glob("*.py"))


def _imported(tree: ast.Module) -> list[str]:
    """Absolute names of everything a module imports, relative imports resolved
    against ``cublas_grouped.runtime``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.append(node.module or "")
            else:
                base = ["cublas_grouped", "runtime"][: 3 - node.level]
                names.append(".".join(base + ([node.module] if node.module else [])))
    return names


@pytest.mark.parametrize("name", MODULES)
def test_runtime_imports_nothing_above_it(name):
    tree = ast.parse((RUNTIME / name).read_text())
    ours = [n for n in _imported(tree) if n.split(".")[0] == "cublas_grouped"]
    assert all(n == "cublas_grouped.runtime" or n.startswith("cublas_grouped.runtime.") for n in ours), ours


@pytest.mark.parametrize("name", MODULES)
def test_runtime_module_says_what_it_is_for_and_stays_short(name):
    text = (RUNTIME / name).read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()[0]) > 20, name
    assert len(text.splitlines()) <= 500, name
