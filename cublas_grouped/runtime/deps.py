"""Plain errors for a missing CUDA stack: no extra installed, no driver, no GPU.

CuPy and cuda-bindings come with the ``cu12`` or ``cu13`` extra, not with a
bare ``pip install cublas_grouped``; :func:`check_installed` says so when this
module is imported (``cublas_grouped/__init__.py`` imports it). Without a GPU,
CUDA's own error is often misleading (with no driver at all, the CUDA runtime
reports "driver version is insufficient"), so :func:`cupy_on_gpu` finds out
what is really missing and says that.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

__all__ = [
    "MissingDependencyError",
    "GpuUnavailableError",
    "check_installed",
    "cupy_on_gpu",
    "explain_no_gpu",
]

# NVIDIA's minimum Linux driver for each CUDA major version (CUDA 12.0 GA and
# 13.0 GA; later minor releases run on these through minor version compatibility).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}

INSTALL_HINT = (
    'install the package with one of its extras: pip install "cublas_grouped[cu12]" (CUDA 12, NVIDIA driver '
    f'>= {MIN_DRIVER[12]}) or pip install "cublas_grouped[cu13]" (CUDA 13, driver >= {MIN_DRIVER[13]})'
)


class MissingDependencyError(ImportError):
    """CuPy or cuda-bindings is not installed (the package was installed without an extra)."""


class GpuUnavailableError(RuntimeError):
    """No usable NVIDIA GPU: no driver, no visible device, or a driver too old for the CUDA wheels."""


# (module to find, what to call it in the message)
_REQUIRED = (("cupy", "CuPy"), ("cuda.bindings", "cuda-bindings"))


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed() -> None:
    """Raise :class:`MissingDependencyError` naming the extras if CuPy or cuda-bindings is missing.

    Only looks the modules up (no import), so it costs microseconds.
    """
    missing = [name for module, name in _REQUIRED if not _importable(module)]
    if missing:
        raise MissingDependencyError(
            f"cublas_grouped needs {' and '.join(missing)}, which this installation lacks; {INSTALL_HINT}"
        )


# Checked when the package is imported: nothing else works without them.
check_installed()


def _driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports (e.g. 12040), or None if no driver loads."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return version.value
        except AttributeError:
            pass
    return None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def explain_no_gpu(error: str, driver_version: int | None, runtime_version: int | None) -> str:
    """Say in plain words why CUDA found no usable GPU.

    Parameters
    ----------
    error : str
        The CUDA error as CuPy raised it (kept at the end of the message).
    driver_version : int or None
        ``cuDriverGetVersion`` (e.g. 12040 for 12.4), None when no driver library loads.
    runtime_version : int or None
        The CUDA version CuPy was built for (``cudaRuntimeGetVersion``).
    """
    if driver_version is None:
        lib = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
        reason = (
            f"No NVIDIA driver was found ({lib} could not be loaded), so there is no GPU to run on. "
            "cublas_grouped needs an NVIDIA GPU with its driver installed: "
            f"driver >= {MIN_DRIVER[12]} for the cu12 extra, >= {MIN_DRIVER[13]} for cu13."
        )
    elif runtime_version is not None and driver_version // 1000 < runtime_version // 1000:
        need = MIN_DRIVER.get(runtime_version // 1000)
        reason = (
            f"The NVIDIA driver supports CUDA {_cuda_text(driver_version)}, but CuPy here is built for "
            f"CUDA {_cuda_text(runtime_version)}: update the driver"
            + (f" (CUDA {runtime_version // 1000} needs >= {need})" if need else "")
            + ' or install the extra that matches it (pip install "cublas_grouped[cu12]" for CUDA 12).'
        )
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        reason = (
            f"No NVIDIA GPU is visible to CUDA (the driver, for CUDA {_cuda_text(driver_version)}, is installed"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + ")."
        )
    return f"{reason} (CUDA reported: {error})"


_gpu_seen = False


def cupy_on_gpu():
    """The ``cupy`` module, once CUDA has shown it can see a GPU.

    The first call asks CUDA for the device count; on failure it raises
    :class:`GpuUnavailableError` with the real reason. Later calls return at once.
    """
    global _gpu_seen
    import cupy

    if _gpu_seen:
        return cupy
    runtime = cupy.cuda.runtime
    cause = None
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as exc:
        count, cause = 0, exc
    if count == 0:
        error = str(cause) if cause is not None else "cudaGetDeviceCount found 0 devices"
        try:
            runtime_version = runtime.runtimeGetVersion()
        except Exception:
            runtime_version = None
        raise GpuUnavailableError(explain_no_gpu(error, _driver_cuda_version(), runtime_version)) from cause
    _gpu_seen = True
    return cupy
