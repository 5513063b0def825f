"""tools/kernel_mutants.py on the CPU: every kernel program has the defines
its launcher passes in the tool's compile step (a program missing there stops
`--check` before any mutant compiles), and every mutant's line is found."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("kernel_mutants", ROOT / "tools" / "kernel_mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_mutants"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_kernel_program_has_its_defines_in_the_compile_step():
    from cublas_grouped.moe import backward_kernels, kernels

    tool = _tool()
    named = set(re.findall(r'^\s+"(\w+)": \w+\.DEFINES,$', tool._COMPILE, flags=re.M))
    known = named | set(kernels.DEFINES) | set(backward_kernels.DEFINES)
    programs = {p.stem for p in (ROOT / "kernels").glob("*.cu")}
    assert programs <= known, f"no defines in kernel_mutants._COMPILE for {sorted(programs - known)}"


def test_every_mutant_line_occurs_as_often_as_it_says():
    tool = _tool()
    for m in tool.MUTANTS:
        lines = [line.strip() for line in (ROOT / "kernels" / m.file).read_text().splitlines()]
        assert lines.count(m.original) == m.count, (m.name, m.original)
