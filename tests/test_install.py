"""The installed wheel ships the CUDA sources and finds them (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run outside the source tree, so that only the installed copy (if any) is seen.
PROBE = """
import importlib.metadata, json
try:
    files = [str(f) for f in importlib.metadata.files("cublas_grouped") or []]
except importlib.metadata.PackageNotFoundError:
    files = None
kernel_dir = None
if files is not None:
    import cublas_grouped._kernels as k
    kernel_dir = str(k.kernel_dir())
print(json.dumps({"files": files, "kernel_dir": kernel_dir}))
"""


def test_kernel_sources_found():
    from cublas_grouped._kernels import kernel_dir, kernel_files

    assert {"pointers", "routing", "dispatch", "activation", "combine"} <= set(kernel_files())
    assert (kernel_dir() / "common.cuh").is_file()


def test_installed_distribution_ships_and_finds_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    if found["files"] is None:
        pytest.skip("cublas_grouped is not installed (running from the source tree)")
    shipped = {f.rsplit("/", 1)[-1] for f in found["files"] if f.startswith("cublas_grouped/kernels/")}
    assert {"pointers.cu", "dispatch.cu", "routing.cu", "common.cuh"} <= shipped
    assert found["kernel_dir"].endswith("cublas_grouped/kernels")
    assert "site-packages" in found["kernel_dir"] or "dist-packages" in found["kernel_dir"]
