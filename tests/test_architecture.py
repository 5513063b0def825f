"""The package's shape, read from its sources (CPU): sub-packages import one way
(runtime -> gemm -> moe -> distributed -> tools, the tools also through the
public API), no module imports another in a circle, no private name crosses a
sub-package, and every module says what it is for and stays short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cublas_grouped"
# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = ("runtime", "gemm", "moe", "distributed", "tools")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of ``name``'s
    source, relative imports resolved; ``from pkg import mod`` counts as
    importing ``pkg.mod`` when that is a module of ours."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [alias.name for alias in node.names]
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            found += [(s, []) for s in subs] or [(module, names)]
    return [(m, n) for m, n in found if m.split(".")[0] == "cublas_grouped"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_one_way(name):
    mine = _layer(name)
    if mine is None:
        return  # the top level (re-exports, shims, testing) may use any layer
    for module, _ in _imports(name):
        if mine == "tools" and module == "cublas_grouped":
            continue  # the tools use the public API, as users do
        other = _layer(module)
        assert other is not None, f"{name} imports {module}, which is not in a layer"
        assert LAYERS.index(other) <= LAYERS.index(mine), f"{name} ({mine}) imports {module} ({other})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_sub_package(name):
    for module, names in _imports(name):
        if _layer(module) != _layer(name):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{name} takes {private} from {module}"


def test_no_import_circle():
    graph = {name: {m for m, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}
    # A package's __init__ imported by its own modules is not a circle of code.
    done, active = set(), []

    def visit(node):
        if node in active:
            raise AssertionError("import circle: " + " -> ".join(active[active.index(node) :] + [node]))
        if node in done:
            return
        active.append(node)
        for nxt in graph[node]:
            if not (MODULES[nxt].name == "__init__.py" and node.startswith(nxt + ".")):
                visit(nxt)
        active.pop()
        done.add(node)

    for name in graph:
        visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_says_what_it_is_for_and_stays_short(name):
    text = MODULES[name].read_text()
    if not text.strip():
        return  # an empty package marker
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()[0]) > 20, f"{name}: no docstring saying what it is for"
    assert len(text.splitlines()) <= MAX_LINES, f"{name}: {len(text.splitlines())} lines"
    assert "../shared" not in text, f"{name}: a docstring points outside the repository"
