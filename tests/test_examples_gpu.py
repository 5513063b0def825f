"""The examples run end to end on the GPU (and exit cleanly without one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.gpu
def test_moe_block_example():
    result = run("moe_block.py", "--tokens", "2048")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "relative error vs float64 reference" in result.stdout and "gemm1" in result.stdout


@pytest.mark.gpu
def test_compare_padded_example():
    result = run("compare_padded.py", "--batch-size", "2", "--seq-len", "512", "--num-shared", "1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "speed-up" in result.stdout


def test_examples_without_gpu_exit_with_a_message():
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a GPU is present")
    for script in ("moe_block.py", "compare_padded.py"):
        result = run(script)
        assert result.returncode != 0
        assert "This example needs an NVIDIA GPU" in result.stderr
        assert "Traceback" not in result.stderr
