"""README.md on CPU: its Python examples compile, its install and test commands
are the ones CI runs, and user-facing docs say nothing about how the project
is developed.

Every ```python block of README.md is run on a GPU by tests/test_readme_gpu.py,
each in a fresh interpreter, so each block must be complete (its own imports
and data). A block whose first line is ``# not run`` is only compiled here:
use it for fragments, and keep it rare.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = "# not run"


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(first line number, source) of every ```language block in ``text``."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None:
            if line.strip() == f"```{language}":
                current, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    assert current is None, f"unclosed ```{language} block from line {start}"
    return blocks


def python_blocks() -> list[tuple[int, str]]:
    return fenced_blocks(README.read_text(), "python")


def runnable_blocks() -> list[tuple[int, str]]:
    return [(line, src) for line, src in python_blocks() if not src.startswith(NOT_RUN)]


@pytest.mark.parametrize(
    "line, source", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_python_block_compiles(line, source):
    compile(source, f"README.md:{line}", "exec")


def test_main_examples_run_as_written():
    runnable = [src for _, src in runnable_blocks()]
    # The layer example: route, forward, compare with the float64 reference.
    assert any("cg.route(" in s and "cg.moe_forward(" in s and "moe_forward_ref(" in s for s in runnable)
    # The graph example: captured on a stream, inputs refilled in place, replayed, synchronized.
    assert any(
        all(
            part in s
            for part in ("FixedCapacityMoE(", "begin_capture()", "cupy.copyto(", "graph.launch(stream)")
        )
        and "stream.synchronize()" in s
        for s in runnable
    )
    assert any("gmm(" in s and "gmm_ref(" in s for s in runnable)


def _commands(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line.startswith("python3 -m ")]


def test_install_and_test_commands_are_the_ones_ci_runs():
    ci = _commands((ROOT / ".ci" / "run").read_text())
    section = README.read_text().split("## Install and test", 1)[1]
    readme = _commands(fenced_blocks(section, "bash")[0][1])
    assert ci == readme == ['python3 -m pip install ".[cu12,test]"', "python3 -m pytest -q tests"]


def test_bare_install_message_is_quoted_as_it_is():
    import sys

    from cublas_grouped.runtime import deps as _deps

    saved = {m: sys.modules.get(m) for m in ("cupy", "cuda.bindings")}
    try:
        sys.modules.update(dict.fromkeys(saved))
        with pytest.raises(_deps.MissingDependencyError) as caught:
            _deps.check_installed()
    finally:
        for module, value in saved.items():
            if value is None:
                sys.modules.pop(module, None)
            else:
                sys.modules[module] = value
    quoted = re.search(r"`MissingDependencyError: (.*?) \.\.\.`", " ".join(README.read_text().split()))
    assert quoted, "README no longer quotes the bare-install message"
    assert str(caught.value).startswith(quoted.group(1)), (str(caught.value), quoted.group(1))


# How the project is developed stays out of the user's docs.
DEVELOPMENT_WORDS = re.compile(
    r"\bissues? ?#?\d+|#\d+\b|\$OUT\b|workplace|development environment|device tool|/work/|\bsession\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize(
    "doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_user_docs_do_not_describe_development(doc):
    found = [
        f"{doc.name}:{number}: {match.group(0)!r}"
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        for match in DEVELOPMENT_WORDS.finditer(line)
    ]
    assert not found, found
