"""Every runnable ```python block of README.md runs as written on a GPU.

Each block runs in a fresh interpreter with this tree on PYTHONPATH, from an
empty folder, so a block that leans on another block's names fails here.
Blocks whose first line is ``# not run`` are skipped (tests/test_readme.py
compiles them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_readme import ROOT, runnable_blocks


@pytest.mark.gpu
@pytest.mark.parametrize(
    "line, source", runnable_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_block_runs(line, source, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"README.md block at line {line} failed:\n{out.stdout}\n{out.stderr}"
