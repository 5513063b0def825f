"""Packaging and installation, on CPU.

- The wheel built from this tree ships the CUDA sources, the tuning tables
  and the license, and the package imported from it finds its kernels there.
- A bare install (no cu12 / cu13 extra) fails on import with a message that
  names the extras; without a GPU, errors say so plainly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What the wheel build must not see: caches, earlier builds, git, mutation runs.
_NOT_COPIED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".benchmarks",
    "mutants",
    "out",
)


def test_kernel_sources_found():
    from cublas_grouped.runtime.nvrtc import kernel_dir, kernel_files

    assert {"pointers", "routing", "dispatch", "activation", "combine"} <= set(kernel_files())
    assert (kernel_dir() / "common.cuh").is_file()


def _setuptools_can_build_wheels() -> bool:
    # pyproject.toml's build-system needs setuptools >= 77 (it also builds wheels without the `wheel` package).
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major = int(re.match(r"\d+", setuptools.__version__).group())
    return major >= 77


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of this tree (so the build leaves nothing in the tree)."""
    if not _setuptools_can_build_wheels():
        pytest.skip("building the wheel needs setuptools >= 77 (pip install '.[test]' brings it)")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + [str(src), "-w", str(work / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    wheels = list((work / "dist").glob("cublas_grouped-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_kernels_tuning_tables_and_license(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    kernels = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    tables = {p.name for p in (ROOT / "cublas_grouped" / "tuning").glob("*.json")}
    assert "common.cuh" in kernels and tables, "the tree itself lost its kernels or tables"
    assert {f"cublas_grouped/kernels/{k}" for k in kernels} <= names
    assert {f"cublas_grouped/tuning/{t}" for t in tables} <= names
    assert any(re.fullmatch(r"cublas_grouped-[^/]+\.dist-info/(licenses/)?LICENSE", n) for n in names), names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(built_wheel).read(metadata).decode()
    for extra in ("cu12", "cu13"):
        assert f"Provides-Extra: {extra}" in text
        assert re.search(rf"Requires-Dist: cupy-cuda{extra[2:]}x.*extra == \"{extra}\"", text), extra


# Run in a subprocess from an empty folder, with only the unpacked wheel on PYTHONPATH.
PROBE = """
import json
import cublas_grouped
from cublas_grouped.runtime.nvrtc import kernel_dir, kernel_files
from cublas_grouped.gemm.tables import SHIPPED_TUNING_DIR
print(json.dumps({
    "package": cublas_grouped.__file__,
    "kernel_dir": str(kernel_dir()),
    "kernels": sorted(kernel_files()),
    "common": (kernel_dir() / "common.cuh").is_file(),
    "tables": sorted(p.name for p in SHIPPED_TUNING_DIR.glob("*.json")),
}))
"""


def test_package_from_the_wheel_finds_its_kernels(built_wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(built_wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["package"]).resolve().is_relative_to(site.resolve()), found["package"]
    assert Path(found["kernel_dir"]).resolve() == (site / "cublas_grouped" / "kernels").resolve()
    assert found["common"]
    assert found["kernels"] == sorted(p.stem for p in (ROOT / "kernels").glob("*.cu"))
    assert found["tables"] == sorted(p.name for p in (ROOT / "cublas_grouped" / "tuning").glob("*.json"))


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("module, name", [("cupy", "CuPy"), ("cuda.bindings", "cuda-bindings")])
def test_bare_install_names_the_extras(module, name):
    # sys.modules[m] = None makes `import m` fail as if m were not installed.
    out = _run_python(f"import sys; sys.modules[{module!r}] = None; import cublas_grouped")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cublas_grouped.runtime.deps.MissingDependencyError: "), out.stderr
    assert f"cublas_grouped needs {name}, which this installation lacks" in last
    assert 'pip install "cublas_grouped[cu12]"' in last and 'pip install "cublas_grouped[cu13]"' in last
    assert "ModuleNotFoundError" not in out.stderr


def test_missing_dependency_error_is_an_import_error():
    from cublas_grouped import MissingDependencyError

    assert issubclass(MissingDependencyError, ImportError)


def test_without_a_gpu_device_info_says_so():
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a GPU is present")
    out = _run_python("import cublas_grouped as cg; cg.device_info()")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cublas_grouped.runtime.deps.GpuUnavailableError: "), out.stderr
    # This CPU machine has no driver, or a driver with no GPU: either way the message says what is missing.
    assert re.search(r"No NVIDIA driver was found|No NVIDIA GPU is visible", last), last


def test_no_gpu_messages():
    from cublas_grouped.runtime.deps import explain_no_gpu

    no_driver = explain_no_gpu(
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient", None, 12090
    )
    assert no_driver.startswith("No NVIDIA driver was found (")
    assert "driver >= 525.60.13 for the cu12 extra, >= 580.65.06 for cu13" in no_driver
    assert no_driver.endswith(
        "(CUDA reported: cudaErrorInsufficientDriver: CUDA driver version is insufficient)"
    )

    old = explain_no_gpu("cudaErrorInsufficientDriver: ...", 12040, 13000)
    assert old.startswith("The NVIDIA driver supports CUDA 12.4, but CuPy here is built for CUDA 13.0: ")
    assert "update the driver (CUDA 13 needs >= 580.65.06)" in old
    assert 'pip install "cublas_grouped[cu12]"' in old

    # A driver new enough but no device (same major version): not blamed on the driver.
    for version in (12040, 13000):
        none = explain_no_gpu("cudaErrorNoDevice: no CUDA-capable device is detected", version, 12090)
        assert none.startswith(f"No NVIDIA GPU is visible to CUDA (the driver, for CUDA {version // 1000}.")


def test_no_gpu_message_names_cuda_visible_devices(monkeypatch):
    from cublas_grouped.runtime.deps import explain_no_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    text = explain_no_gpu("cudaErrorNoDevice", 12090, 12090)
    assert "CUDA_VISIBLE_DEVICES=''" in text


def test_missing_libcublas_names_the_extras(monkeypatch):
    import cuda.pathfinder

    from cublas_grouped.runtime import cublas as _cublas

    def not_found(name):
        raise RuntimeError(f"lib{name} not found")

    monkeypatch.setattr(_cublas, "_lib", None)
    monkeypatch.setattr(cuda.pathfinder, "load_nvidia_dynamic_lib", not_found)
    with pytest.raises(
        _cublas.CublasUnavailableError, match=r"install the 'cu12' or 'cu13' extra .*libcublas not found"
    ):
        _cublas.load()
