"""Layer 2: compile the CUDA sources under ``kernels/`` with NVRTC and launch them.

Each ``kernels/<name>.cu`` is one NVRTC program, compiled through ``cuda.core``
for the exact architecture of the device it runs on (``sm_80``, ``sm_90``...).
The constants a kernel shares with its launcher (block sizes, flag bits) are
written once, in the launcher's Python module, and reach the source as NVRTC
defines (``get_kernel(..., defines={"ROUTE_THREADS": ROUTE_THREADS})``); the
sources have no defaults and stop with ``#error`` when one is missing, so the
two sides cannot drift.
This module knows no kernel's constants: callers pass them.

Compiled programs are cached in memory per (file, architecture, defines) and
on disk in a ``cuda.core.utils.FileStreamProgramCache`` whose key covers the
source, the options (the defines among them) and the NVRTC version, so a stale
or foreign entry is never reused.

The disk cache lives in ``$CUBLAS_GROUPED_CACHE_DIR`` when that is set, else in
``~/.cache/cublas_grouped/kernels``. Setting ``CUBLAS_GROUPED_CACHE_DIR=off``
disables it (compiles then happen once per process).

Kernels are looked up by plain ``extern "C"`` names, so a cached cubin needs no
C++ name mapping.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

from . import launch as _fast

__all__ = [
    "KernelCompileError",
    "kernel_dir",
    "kernel_files",
    "load_source",
    "define_items",
    "compile_source",
    "get_kernel",
    "launch",
    "arch_for",
]

_CACHE_ENV = "CUBLAS_GROUPED_CACHE_DIR"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


class KernelCompileError(RuntimeError):
    """NVRTC rejected one of the package's kernel sources; the message has the log."""


def kernel_dir() -> Path:
    """Directory holding the ``.cu`` sources.

    In an installed wheel the top-level ``kernels/`` folder is shipped as the
    package ``cublas_grouped.kernels``; in a source checkout it sits beside the
    package directory.
    """
    package = Path(__file__).resolve().parent.parent  # cublas_grouped/
    installed = package / "kernels"
    if installed.is_dir() and any(installed.glob("*.cu")):
        return installed
    source_tree = package.parent / "kernels"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError(
        "cublas_grouped's CUDA sources were not found: neither the installed "
        f"package data 'cublas_grouped/kernels' nor {source_tree} exists"
    )


def kernel_files() -> list[str]:
    """Names (without ``.cu``) of every kernel source file."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


def load_source(name: str) -> str:
    """Source of ``kernels/<name>.cu`` with its local ``#include "x.cuh"`` inlined.

    Inlining here (instead of passing an include path to NVRTC) keeps the
    whole program in one string, which is what the disk cache keys on.
    """
    root = kernel_dir()
    seen: set[str] = set()

    def expand(text: str) -> str:
        def repl(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand((root / header).read_text())

        return _INCLUDE.sub(repl, text)

    return expand((root / f"{name}.cu").read_text())


_lock = threading.Lock()
_compiled: dict[tuple, object] = {}
_disk_cache = None
_disk_cache_ready = False


def _program_cache():
    """The shared FileStreamProgramCache, or None when disabled/unavailable."""
    global _disk_cache, _disk_cache_ready
    if _disk_cache_ready:
        return _disk_cache
    _disk_cache_ready = True
    location = os.environ.get(_CACHE_ENV)
    if location and location.lower() in ("off", "0", "none"):
        return None
    path = Path(location) if location else Path.home() / ".cache" / "cublas_grouped" / "kernels"
    try:
        from cuda.core.utils import FileStreamProgramCache

        _disk_cache = FileStreamProgramCache(path, max_size_bytes=256 << 20)
    except OSError:
        # An unwritable cache directory must not stop the library: compile in memory.
        _disk_cache = None
    return _disk_cache


def arch_for(compute_capability: tuple[int, int]) -> str:
    """NVRTC architecture string for a compute capability, e.g. (9, 0) -> 'sm_90'."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"


Defines = tuple[tuple[str, int], ...]


def define_items(defines: Mapping[str, int] | None) -> Defines:
    """``defines`` as sorted ``(name, value)`` pairs: the form that keys the caches.

    Raises
    ------
    ValueError
        If a name is not a C identifier.
    TypeError
        If a value is not an int (bools are refused too: a flag is 0 or 1).
    """
    items = []
    for name, value in sorted((defines or {}).items()):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"define name must be a C identifier; got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"define {name} must be an int; got {type(value).__name__} {value!r}")
        items.append((name, int(value)))
    return tuple(items)


def compile_source(name: str, arch: str, defines: Mapping[str, int] | None = None):
    """Compile ``kernels/<name>.cu`` for ``arch`` and return the ``ObjectCode``.

    ``defines`` (name -> int) are passed to NVRTC as ``-D name=value``; they
    are the constants the source shares with its launcher, and part of both
    cache keys. Needs NVRTC but no GPU. Results are cached in memory and on disk.

    Raises
    ------
    KernelCompileError
        With the NVRTC log, if the source does not compile (a required define
        that is missing stops it with an ``#error`` naming the define).
    """
    items = define_items(defines)
    key = (name, arch, items)
    obj = _compiled.get(key)
    if obj is not None:
        return obj
    with _lock:
        obj = _compiled.get(key)
        if obj is not None:
            return obj
        from cuda.core import Program, ProgramOptions

        source = load_source(name)
        macros = [(macro, str(value)) for macro, value in items] or None
        options = ProgramOptions(arch=arch, std="c++17", name=f"{name}.cu", define_macro=macros)
        try:
            program = Program(source, code_type="c++", options=options)
            cache = _program_cache()
            if cache is not None:
                obj = program.compile("cubin", cache=cache)
            else:
                obj = program.compile("cubin")
        except Exception as exc:
            given = ", ".join(f"{macro}={value}" for macro, value in items) or "none"
            raise KernelCompileError(
                f"NVRTC failed to compile kernels/{name}.cu for {arch} (defines: {given}):\n{exc}"
            ) from exc
        _compiled[key] = obj
        return obj


_kernels: dict[tuple, object] = {}


def get_kernel(name: str, kernel: str, arch: str, *, defines: Mapping[str, int] | None = None):
    """The launchable ``cuda.core.Kernel`` ``kernel`` from ``kernels/<name>.cu``,
    compiled for ``arch`` with ``defines`` (see :func:`compile_source`)."""
    key = (name, kernel, arch, define_items(defines))
    found = _kernels.get(key)
    if found is None:
        found = compile_source(name, arch, defines).get_kernel(kernel)
        _kernels[key] = found
    return found


def launch(stream, kernel, grid, block, args, shmem: int = 0) -> None:
    """Launch ``kernel`` on ``stream`` (a raw handle, or anything with ``__cuda_stream__``).

    ``args`` must already be typed (NumPy scalars for integers and pointers),
    so that each parameter has the width the kernel declares. All-scalar
    argument lists take the cheap driver path of :mod:`.launch`; others
    (tensor maps) go through ``cuda.core``.
    """
    handle = stream if isinstance(stream, int) else int(stream.handle)
    if _fast.launch_scalars(handle, kernel, grid, block, args, shmem):
        return
    from cuda.core import LaunchConfig
    from cuda.core import launch as core_launch

    if isinstance(stream, int):
        from cuda.core import Stream

        stream = Stream.from_handle(stream)

    config = LaunchConfig(grid=grid, block=block, shmem_size=shmem)
    core_launch(stream, config, kernel, *args)
