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
on disk in a :class:`~.kernel_cache.KernelCache`, keyed by the source, the
options (the defines among them) and the NVRTC version, so a stale or foreign
entry is never reused. Every disk entry carries a checksum and is checked
before use; a damaged one is reported (a ``KernelCacheWarning`` naming the
file), recompiled and replaced. So is an entry that passes the checks but that
the driver refuses to load (:func:`get_kernel` then recompiles, and replaces
the entry only when the fresh build loads). Writes are atomic, so processes
of one user can share one cache folder; folders are created private (0700),
and an entry or folder owned by another user or writable by others is never
loaded (see :mod:`.kernel_cache`).

The disk cache lives in ``$CUBLAS_GROUPED_CACHE_DIR`` when that is set, else in
``~/.cache/cublas_grouped/kernels``. Setting ``CUBLAS_GROUPED_CACHE_DIR=off``
disables it (compiles then happen once per process). A location that cannot
be used (no home folder, a path under a regular file, read-only, a full disk,
a folder of another user or one that others can write) gives one ``KernelCacheWarning`` and the process compiles in memory from then on.

Kernels are looked up by plain ``extern "C"`` names, so a cached cubin needs no
C++ name mapping. :func:`launch` names the kernel, grid and block in the
:class:`KernelLaunchError` of a launch that fails.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

from . import launch as _fast
from .kernel_cache import KernelCache, KernelCacheWarning, UntrustedCacheError

__all__ = [
    "KernelCompileError",
    "KernelLaunchError",
    "KernelCacheWarning",
    "kernel_dir",
    "kernel_files",
    "load_source",
    "define_items",
    "compile_source",
    "get_kernel",
    "launch",
    "launch_signed",
    "arch_for",
]

_CACHE_ENV = "CUBLAS_GROUPED_CACHE_DIR"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


class KernelCompileError(RuntimeError):
    """NVRTC rejected one of the package's kernel sources; the message has the log."""


class KernelLaunchError(RuntimeError):
    """A kernel launch failed; the message names the kernel, its file and the launch
    configuration, and the driver's error is the ``__cause__``."""


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
_from_disk: dict[tuple, bytes] = {}  # memory-cache key -> disk key, for programs read from disk
_disk_cache: KernelCache | None = None
_disk_cache_ready = False
_disk_warned = False


def _disable_disk_cache(reason: str) -> None:
    """Stop using the disk cache for this process, with one warning in all."""
    global _disk_cache, _disk_cache_ready, _disk_warned
    _disk_cache, _disk_cache_ready = None, True
    if not _disk_warned:
        _disk_warned = True
        warnings.warn(
            f"cublas_grouped cannot use its kernel cache ({reason}); kernels are compiled in memory "
            f"for this process only (set {_CACHE_ENV} to a writable folder, or to 'off' to silence this)",
            KernelCacheWarning,
            stacklevel=5,
        )


def _program_cache() -> KernelCache | None:
    """The disk cache, or None when disabled or unusable."""
    global _disk_cache, _disk_cache_ready
    if _disk_cache_ready:
        return _disk_cache
    location = os.environ.get(_CACHE_ENV)
    if location and location.lower() in ("off", "0", "none"):
        _disk_cache, _disk_cache_ready = None, True
        return None
    try:
        root = Path(location) if location else Path.home() / ".cache" / "cublas_grouped" / "kernels"
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder")
    except (OSError, RuntimeError, KeyError) as exc:  # Path.home() without HOME: RuntimeError
        _disable_disk_cache(f"{type(exc).__name__}: {exc}")
        return None
    _disk_cache, _disk_cache_ready = KernelCache(root), True
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


def _options(name: str, arch: str, items: Defines):
    from cuda.core import ProgramOptions

    macros = [(macro, str(value)) for macro, value in items] or None
    return ProgramOptions(arch=arch, std="c++17", name=f"{name}.cu", define_macro=macros)


def _compile(name: str, arch: str, items: Defines, source: str, options):
    from cuda.core import Program

    try:
        return Program(source, code_type="c++", options=options).compile("cubin")
    except Exception as exc:
        given = ", ".join(f"{macro}={value}" for macro, value in items) or "none"
        raise KernelCompileError(
            f"NVRTC failed to compile kernels/{name}.cu for {arch} (defines: {given}):\n{exc}"
        ) from exc


def _store(cache: KernelCache, disk_key: bytes, obj) -> None:
    try:
        cache.put(disk_key, bytes(obj.code))
    except OSError as exc:  # read-only, full, or not a folder: compile in memory from now on
        _disable_disk_cache(f"writing {cache.path_for(disk_key)}: {type(exc).__name__}: {exc}")


def _compile_or_read(name: str, arch: str, items: Defines):
    """The program from the disk cache when a sound entry is there, else compiled (and stored)."""
    from cuda.core import ObjectCode
    from cuda.core.utils import make_program_cache_key

    source, options = load_source(name), _options(name, arch, items)
    cache = _program_cache()
    if cache is None:
        return _compile(name, arch, items, source, options)
    disk_key = make_program_cache_key(code=source, code_type="c++", options=options, target_type="cubin")
    try:
        cubin = cache.get(disk_key)
    except UntrustedCacheError as exc:  # another user's folder, or one others can write: never load from it
        _disable_disk_cache(str(exc))
        return _compile(name, arch, items, source, options)
    if cubin is not None:
        _from_disk[(name, arch, items)] = disk_key
        return ObjectCode.from_cubin(cubin, name=f"{name}.cu")
    obj = _compile(name, arch, items, source, options)
    _store(cache, disk_key, obj)
    return obj


def compile_source(name: str, arch: str, defines: Mapping[str, int] | None = None):
    """Compile ``kernels/<name>.cu`` for ``arch`` and return the ``ObjectCode``.

    ``defines`` (name -> int) are passed to NVRTC as ``-D name=value``; they
    are the constants the source shares with its launcher, and part of both
    cache keys. Needs NVRTC but no GPU. Results are cached in memory and on
    disk (checked before use; see the module notes).

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
        if obj is None:
            obj = _compiled[key] = _compile_or_read(name, arch, items)
        return obj


_kernels: dict[tuple, object] = {}
_labels: dict[int, str] = {}  # id(kernel) -> what a launch error calls it (kernels live forever in _kernels)


def _load_fresh(name: str, kernel: str, arch: str, items: Defines, failed: Exception):
    """After ``failed`` (loading a kernel of a program read from disk): compile
    afresh and load that; if it loads, the entry was bad and is replaced."""
    key = (name, arch, items)
    with _lock:
        disk_key = _from_disk.get(key)
        if disk_key is None:
            raise failed
        obj = _compile(name, arch, items, load_source(name), _options(name, arch, items))
        try:
            found = obj.get_kernel(kernel)
        except Exception as exc:
            raise exc from failed  # the fresh build fails too: the entry was not the cause
        _from_disk.pop(key, None)
        _compiled[key] = obj
        cache = _program_cache()
        if cache is not None:
            cache.discard(disk_key, f"could not be loaded ({type(failed).__name__}: {failed})")
            _store(cache, disk_key, obj)
        return found


def get_kernel(name: str, kernel: str, arch: str, *, defines: Mapping[str, int] | None = None):
    """The launchable ``cuda.core.Kernel`` ``kernel`` from ``kernels/<name>.cu``,
    compiled for ``arch`` with ``defines`` (see :func:`compile_source`).

    When the program came from the disk cache and the driver refuses it, it
    is compiled again and the entry replaced if the new build loads.
    """
    items = define_items(defines)
    key = (name, kernel, arch, items)
    found = _kernels.get(key)
    if found is None:
        try:
            found = compile_source(name, arch, defines).get_kernel(kernel)
        except KernelCompileError:
            raise
        except Exception as exc:
            found = _load_fresh(name, kernel, arch, items, exc)
        _labels[id(found)] = f"{kernel} (kernels/{name}.cu, {arch})"
        _kernels[key] = found
    return found


def launch(stream, kernel, grid, block, args, shmem: int = 0) -> None:
    """Launch ``kernel`` on ``stream`` (a raw handle, or anything with ``__cuda_stream__``).

    ``args`` must already be typed (NumPy scalars for integers and pointers),
    so that each parameter has the width the kernel declares. All-scalar
    argument lists take the cheap driver path of :mod:`.launch`; others
    (tensor maps) go through ``cuda.core``.

    Raises
    ------
    KernelLaunchError
        Naming the kernel, its file, grid, block and shared memory, with the
        driver's error (its ``__cause__``).
    """
    try:
        handle = stream if isinstance(stream, int) else int(stream.handle)
        if _fast.launch_scalars(handle, kernel, grid, block, args, shmem):
            return
        from cuda.core import LaunchConfig, Stream
        from cuda.core import launch as core_launch

        if isinstance(stream, int):
            stream = Stream.from_handle(stream)
        config = LaunchConfig(grid=grid, block=block, shmem_size=shmem)
        core_launch(stream, config, kernel, *args)
    except Exception as exc:
        what = _labels.get(id(kernel), "a kernel")
        raise KernelLaunchError(
            f"launch of {what} with grid {grid}, block {block}, {shmem} bytes of shared memory "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc


def launch_signed(stream, kernel, grid: int, block: int, signature: str, args, shmem: int = 0) -> None:
    """:func:`launch` with the parameters' widths given by ``signature`` (struct
    codes, see :func:`.launch.launch_signed`), so ``args`` are plain Python
    ints: the cheapest launch, for the per-call kernels of the MoE layer.

    Raises
    ------
    KernelLaunchError
        As :func:`launch`.
    """
    try:
        _fast.launch_signed(stream if type(stream) is int else int(stream.handle), kernel, grid, block, signature,
                            args, shmem)  # fmt: skip
    except Exception as exc:
        what = _labels.get(id(kernel), "a kernel")
        raise KernelLaunchError(
            f"launch of {what} with grid {grid}, block {block}, {shmem} bytes of shared memory "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
