"""Out of GPU memory: one error that names the library call, the bytes asked for and the operands.

CuPy reports a failed allocation as ``cupy.cuda.memory.OutOfMemoryError``
("Out of memory allocating N bytes ..."), from deep inside whatever was being
allocated; the CUDA runtime, the driver and cuBLAS report theirs as a status.
:func:`reports_out_of_memory` wraps a public entry point (``gmm``,
``moe_forward``, building a ``FixedCapacityMoE``) so that any of these becomes one
:class:`GpuOutOfMemoryError` saying which call failed, how many bytes were asked
for (when the allocator says), on which device, and the shapes and dtypes of
the call's array arguments, with the original error as its ``__cause__``.

Why a new class rather than CuPy's re-raised: the message must name the call,
and CuPy's class takes sizes, not a message. It derives from ``MemoryError``,
as CuPy's does, so ``except MemoryError`` catches both; code that catches
``cupy.cuda.memory.OutOfMemoryError`` by name must catch ``MemoryError`` (or
this class) around these entry points instead.

Wrapping the entry points, not every allocation, keeps the hot paths free of
it (a ``try`` costs nothing until something is raised). An inner wrapped call
passes its error through unchanged, so the innermost entry point is named.
"""

from __future__ import annotations

import functools
import inspect

from .cublas import CublasError

__all__ = ["GpuOutOfMemoryError", "is_out_of_memory", "out_of_memory", "reports_out_of_memory"]

_CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation (CUDA runtime)
_CUBLAS_STATUS_ALLOC_FAILED = 3


class GpuOutOfMemoryError(MemoryError):
    """A library call ran out of GPU memory (or of pinned host memory for its uploads).

    Attributes
    ----------
    call : str
        The entry point, e.g. ``"gmm"``.
    requested_bytes : int or None
        What the failing allocation asked for, when the allocator said.
    device : int or None
        CuPy's current device when it failed.
    """

    def __init__(self, message: str, call: str, requested_bytes: int | None, device: int | None):
        super().__init__(message)
        self.call = call
        self.requested_bytes = requested_bytes
        self.device = device


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports a failed GPU (or pinned host) allocation: CuPy's
    ``OutOfMemoryError``, ``cudaErrorMemoryAllocation``, the driver's
    ``CUDA_ERROR_OUT_OF_MEMORY`` or ``CUBLAS_STATUS_ALLOC_FAILED``."""
    if isinstance(exc, GpuOutOfMemoryError):
        return True
    module = type(exc).__module__ or ""
    if isinstance(exc, MemoryError):
        return module.startswith("cupy")  # NumPy's host MemoryError is not ours to rename
    if isinstance(exc, CublasError):
        return exc.status == _CUBLAS_STATUS_ALLOC_FAILED
    if module.startswith("cupy") and getattr(exc, "status", None) == _CUDA_ERROR_MEMORY_ALLOCATION:
        return type(exc).__name__ == "CUDARuntimeError"
    return module.startswith("cuda") and "CUDA_ERROR_OUT_OF_MEMORY" in str(exc)


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes:,} bytes ({nbytes / scale:.2f} {unit})"
    return f"{nbytes:,} bytes"


def _current_device() -> int | None:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDevice())
    except Exception:
        return None


def _describe(value) -> str | None:
    """``[4096, 1024] bfloat16`` for an array (anything with shape and dtype), else None."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "__cuda_array_interface__"):
        return None
    try:
        return f"[{', '.join(str(int(d)) for d in shape)}] {dtype}"
    except (TypeError, ValueError):
        return None


def out_of_memory(call: str, cause: BaseException, arrays: str = "") -> GpuOutOfMemoryError:
    """The :class:`GpuOutOfMemoryError` for ``cause`` raised inside ``call``;
    ``arrays`` describes the call's array arguments (may be empty)."""
    requested = getattr(cause, "_size", None)  # CuPy's OutOfMemoryError keeps the size it asked for
    requested = int(requested) if isinstance(requested, int) else None
    device = _current_device()
    what = f"allocating {_size_text(requested)}" if requested is not None else "in an allocation"
    where = f" on device {device}" if device is not None else ""
    operands = f" with {arrays}" if arrays else ""
    message = (
        f"{call}{operands}: out of GPU memory {what}{where} ({type(cause).__name__}: {str(cause).rstrip('.')}). "
        "The call stopped before writing its result; free GPU memory (e.g. "
        "cupy.get_default_memory_pool().free_all_blocks()) or make the call smaller"
    )
    return GpuOutOfMemoryError(message, call, requested, device)


def reports_out_of_memory(call: str):
    """Decorator: an out-of-memory error inside the function becomes a
    :class:`GpuOutOfMemoryError` naming ``call`` and the array arguments.
    Other errors, and one already converted by an inner call, pass unchanged."""

    def wrap(fn):
        signature = inspect.signature(fn)

        def arrays(args, kwargs) -> str:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                return ""
            found = ((name, _describe(value)) for name, value in bound.items())
            return ", ".join(f"{name} {text}" for name, text in found if text)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except GpuOutOfMemoryError:
                raise
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory(call, exc, arrays(args, kwargs)) from exc

        return inner

    return wrap
