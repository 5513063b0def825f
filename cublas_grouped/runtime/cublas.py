"""Layer 1: a thin, checked ctypes binding over the cuBLAS entry points we use.

The library is found with ``cuda.pathfinder`` (CUDA 12 or 13 wheels, or a
system toolkit) and loaded lazily, on first use. Every function here is a
one-to-one wrapper: integer handles and pointers in, a ``CublasError`` out on
any status other than ``CUBLAS_STATUS_SUCCESS``. Nothing here knows about
arrays, row-major layouts or streams beyond their integer handles.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, c_double, c_int, c_int64, c_size_t, c_void_p

__all__ = [
    "CublasError",
    "CublasUnavailableError",
    "GROUPED_GEMM_MIN_VERSION",
    "Op",
    "DataType",
    "ComputeType",
    "MathMode",
    "load",
    "library_path",
    "version",
    "create",
    "destroy",
    "set_stream",
    "set_workspace",
    "set_math_mode",
    "get_property",
    "gemm_ex",
    "gemm_batched_ex",
    "gemm_strided_batched_ex",
    "gemm_grouped_batched_ex",
    "REQUIRED_SYMBOLS",
    "GROUPED_SYMBOL",
]

# cublasGemmGroupedBatchedEx first shipped in cuBLAS 12.5 (version 120500).
GROUPED_GEMM_MIN_VERSION = 120500
GROUPED_SYMBOL = "cublasGemmGroupedBatchedEx"


class Op:
    """cublasOperation_t."""

    N = 0
    T = 1


class DataType:
    """cudaDataType_t values for the element types this package supports."""

    R_32F = 0
    R_64F = 1
    R_16F = 2
    R_16BF = 14


class ComputeType:
    """cublasComputeType_t."""

    C16F = 64
    C32F = 68
    C32F_PEDANTIC = 69
    C64F = 70
    C32F_FAST_16F = 74
    C32F_FAST_16BF = 75
    C32F_FAST_TF32 = 77


class MathMode:
    """cublasMath_t."""

    DEFAULT = 0
    PEDANTIC = 2
    TF32_TENSOR_OP = 3


_STATUS_NAMES = {
    0: "CUBLAS_STATUS_SUCCESS",
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
    16: "CUBLAS_STATUS_LICENSE_ERROR",
}


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than success.

    Attributes
    ----------
    status : int
        The raw ``cublasStatus_t`` value.
    status_name : str
        Its symbolic name, e.g. ``"CUBLAS_STATUS_INVALID_VALUE"``.
    function : str
        The cuBLAS function that failed.
    """

    def __init__(self, status: int, function: str):
        self.status = int(status)
        self.status_name = _STATUS_NAMES.get(self.status, f"CUBLAS_STATUS_UNKNOWN_{self.status}")
        self.function = function
        super().__init__(f"{function} failed: {self.status_name} ({self.status})")


class CublasUnavailableError(RuntimeError):
    """libcublas could not be loaded, or lacks a function this package needs."""


_VOIDP_P = POINTER(c_void_p)
_INT_P = POINTER(c_int)

# name -> argtypes. The status return type (int) is set for all of them.
_PROTOTYPES: dict[str, list] = {
    "cublasCreate_v2": [_VOIDP_P],
    "cublasDestroy_v2": [c_void_p],
    "cublasGetVersion_v2": [c_void_p, _INT_P],
    "cublasGetProperty": [c_int, _INT_P],
    "cublasSetStream_v2": [c_void_p, c_void_p],
    "cublasSetWorkspace_v2": [c_void_p, c_void_p, c_size_t],
    "cublasSetMathMode": [c_void_p, c_int],
    # handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
    # beta, C, Ctype, ldc, computeType, algo
    "cublasGemmEx": [
        c_void_p,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_void_p,
        c_int,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_int,
        c_int,
    ],
    # as GemmEx with pointer arrays and batchCount before computeType
    "cublasGemmBatchedEx": [
        c_void_p,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_void_p,
        c_int,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ],
    # as GemmEx with a stride after each leading dimension and batchCount
    "cublasGemmStridedBatchedEx": [
        c_void_p,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_int64,
        c_void_p,
        c_int,
        c_int,
        c_int64,
        c_void_p,
        c_void_p,
        c_int,
        c_int,
        c_int64,
        c_int,
        c_int,
        c_int,
    ],
    # handle, transa[], transb[], m[], n[], k[], alpha[], Aarray, Atype, lda[],
    # Barray, Btype, ldb[], beta[], Carray, Ctype, ldc[], group_count,
    # group_size[], computeType. Size arrays live on the host; the pointer
    # arrays live on the device.
    "cublasGemmGroupedBatchedEx": [
        c_void_p,
        c_void_p,
        c_void_p,
        c_void_p,
        c_void_p,
        c_void_p,
        c_void_p,
        c_void_p,
        c_int,
        c_void_p,
        c_void_p,
        c_int,
        c_void_p,
        c_void_p,
        c_void_p,
        c_int,
        c_void_p,
        c_int,
        c_void_p,
        c_int,
    ],
}
REQUIRED_SYMBOLS = tuple(name for name in _PROTOTYPES if name != GROUPED_SYMBOL)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_missing: frozenset[str] = frozenset()


def load() -> ctypes.CDLL:
    """Load libcublas once (thread-safe) and declare every prototype.

    Raises
    ------
    CublasUnavailableError
        If the library cannot be found, or lacks one of ``REQUIRED_SYMBOLS``.
    """
    global _lib, _lib_path, _missing
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        try:
            import cuda.pathfinder as pathfinder

            loaded = pathfinder.load_nvidia_dynamic_lib("cublas")
        except Exception as exc:  # pathfinder raises several error types
            raise CublasUnavailableError(
                "could not load libcublas through cuda.pathfinder; install the "
                "'cu12' or 'cu13' extra of cublas_grouped (it brings NVIDIA's "
                f"cuBLAS wheel): {exc}"
            ) from exc
        lib = ctypes.CDLL(loaded.abs_path)
        missing = set()
        for name, argtypes in _PROTOTYPES.items():
            fn = _lookup(lib, name)
            if fn is None:
                missing.add(name)
                continue
            fn.argtypes = argtypes
            fn.restype = c_int
        required_missing = sorted(missing - {GROUPED_SYMBOL})
        if required_missing:
            raise CublasUnavailableError(f"{loaded.abs_path} lacks {', '.join(required_missing)}")
        _missing = frozenset(missing)
        _lib_path = loaded.abs_path
        _lib = lib
        return lib


def _lookup(lib: ctypes.CDLL, name: str):
    # A library may export only the plain name of a ``_v2`` entry point
    # (cuBLAS keeps both today); accept either, so one release's renaming does
    # not break the other.
    for candidate in (name, name.removesuffix("_v2")):
        try:
            fn = getattr(lib, candidate)
        except AttributeError:
            continue
        if candidate != name:
            setattr(lib, name, fn)
        return fn
    return None


def library_path() -> str:
    """Absolute path of the libcublas that was loaded."""
    load()
    assert _lib_path is not None
    return _lib_path


def has_symbol(name: str) -> bool:
    """Whether the loaded libcublas exports ``name``."""
    load()
    return name not in _missing


def _check(status: int, function: str) -> None:
    if status != 0:
        raise CublasError(status, function)


def get_property(which: int) -> int:
    """``cublasGetProperty``: 0 major, 1 minor, 2 patch. Needs no GPU."""
    value = c_int()
    _check(load().cublasGetProperty(which, ctypes.byref(value)), "cublasGetProperty")
    return value.value


def version() -> int:
    """cuBLAS version as ``major * 10000 + minor * 100 + patch``, e.g. 130100.

    Read with ``cublasGetProperty``, so it works without a GPU or a handle.
    """
    return get_property(0) * 10000 + get_property(1) * 100 + get_property(2)


def create() -> int:
    """``cublasCreate``: a new handle bound to the current device."""
    handle = c_void_p()
    _check(load().cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
    return int(handle.value or 0)


def destroy(handle: int) -> None:
    """``cublasDestroy``."""
    _check(load().cublasDestroy_v2(c_void_p(handle)), "cublasDestroy")


def set_stream(handle: int, stream: int) -> None:
    """``cublasSetStream``: all later calls on ``handle`` run on ``stream``."""
    _check(load().cublasSetStream_v2(c_void_p(handle), c_void_p(stream)), "cublasSetStream")


def set_workspace(handle: int, ptr: int, nbytes: int) -> None:
    """``cublasSetWorkspace``: a user-owned workspace for ``handle``."""
    _check(
        load().cublasSetWorkspace_v2(c_void_p(handle), c_void_p(ptr), c_size_t(nbytes)),
        "cublasSetWorkspace",
    )


def set_math_mode(handle: int, mode: int) -> None:
    """``cublasSetMathMode``."""
    _check(load().cublasSetMathMode(c_void_p(handle), mode), "cublasSetMathMode")


def _scalar(value: float, compute_type: int):
    """alpha/beta in the scale type cuBLAS expects for ``compute_type``."""
    if compute_type == ComputeType.C64F:
        return c_double(value)
    if compute_type == ComputeType.C16F:
        raise ValueError("16-bit compute (half scale type) is not used by this package")
    return ctypes.c_float(value)


# cuBLAS picks its own kernel; CUBLAS_GEMM_DEFAULT is the only algo we pass.
_GEMM_DEFAULT = -1


def gemm_ex(
    handle, transa, transb, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc, compute_type
) -> None:
    """``cublasGemmEx`` (column-major): C = alpha op(A) op(B) + beta C."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _check(
        load().cublasGemmEx(
            c_void_p(handle),
            transa,
            transb,
            m,
            n,
            k,
            ctypes.byref(al),
            c_void_p(a),
            a_type,
            lda,
            c_void_p(b),
            b_type,
            ldb,
            ctypes.byref(be),
            c_void_p(c),
            c_type,
            ldc,
            compute_type,
            _GEMM_DEFAULT,
        ),
        "cublasGemmEx",
    )


def gemm_batched_ex(
    handle,
    transa,
    transb,
    m,
    n,
    k,
    alpha,
    a_array,
    a_type,
    lda,
    b_array,
    b_type,
    ldb,
    beta,
    c_array,
    c_type,
    ldc,
    batch_count,
    compute_type,
) -> None:
    """``cublasGemmBatchedEx``: ``*_array`` are device arrays of device pointers."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _check(
        load().cublasGemmBatchedEx(
            c_void_p(handle),
            transa,
            transb,
            m,
            n,
            k,
            ctypes.byref(al),
            c_void_p(a_array),
            a_type,
            lda,
            c_void_p(b_array),
            b_type,
            ldb,
            ctypes.byref(be),
            c_void_p(c_array),
            c_type,
            ldc,
            batch_count,
            compute_type,
            _GEMM_DEFAULT,
        ),
        "cublasGemmBatchedEx",
    )


def gemm_strided_batched_ex(
    handle,
    transa,
    transb,
    m,
    n,
    k,
    alpha,
    a,
    a_type,
    lda,
    stride_a,
    b,
    b_type,
    ldb,
    stride_b,
    beta,
    c,
    c_type,
    ldc,
    stride_c,
    batch_count,
    compute_type,
) -> None:
    """``cublasGemmStridedBatchedEx``; strides are in elements."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _check(
        load().cublasGemmStridedBatchedEx(
            c_void_p(handle),
            transa,
            transb,
            m,
            n,
            k,
            ctypes.byref(al),
            c_void_p(a),
            a_type,
            lda,
            stride_a,
            c_void_p(b),
            b_type,
            ldb,
            stride_b,
            ctypes.byref(be),
            c_void_p(c),
            c_type,
            ldc,
            stride_c,
            batch_count,
            compute_type,
            _GEMM_DEFAULT,
        ),
        "cublasGemmStridedBatchedEx",
    )


def gemm_grouped_batched_ex(
    handle,
    transa_array,
    transb_array,
    m_array,
    n_array,
    k_array,
    alpha_array,
    a_array,
    a_type,
    lda_array,
    b_array,
    b_type,
    ldb_array,
    beta_array,
    c_array,
    c_type,
    ldc_array,
    group_count,
    group_size,
    compute_type,
) -> None:
    """``cublasGemmGroupedBatchedEx`` (cuBLAS >= 12.5).

    The per-group arrays (``transa_array`` ... ``group_size``, alpha and beta)
    are host addresses (e.g. of NumPy arrays) that must stay alive for the
    call; ``a_array``, ``b_array`` and ``c_array`` are device arrays of device
    pointers, one per problem.
    """
    lib = load()
    if GROUPED_SYMBOL in _missing:
        raise CublasUnavailableError(
            f"{GROUPED_SYMBOL} needs cuBLAS >= 12.5; the loaded library ({_lib_path}) is version {version()}"
        )
    _check(
        lib.cublasGemmGroupedBatchedEx(
            c_void_p(handle),
            c_void_p(transa_array),
            c_void_p(transb_array),
            c_void_p(m_array),
            c_void_p(n_array),
            c_void_p(k_array),
            c_void_p(alpha_array),
            c_void_p(a_array),
            a_type,
            c_void_p(lda_array),
            c_void_p(b_array),
            b_type,
            c_void_p(ldb_array),
            c_void_p(beta_array),
            c_void_p(c_array),
            c_type,
            c_void_p(ldc_array),
            group_count,
            c_void_p(group_size),
            compute_type,
        ),
        GROUPED_SYMBOL,
    )
