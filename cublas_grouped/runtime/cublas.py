"""Layer 1: the cuBLAS binding, declared from one table of C prototypes.

:data:`PROTOTYPES` lists every entry point this package calls, with its
parameters as the cuBLAS header names them; :func:`load` finds libcublas with
``cuda.pathfinder`` (CUDA 12 or 13 wheels, or a system toolkit), once and
lazily, and sets each function's ctypes prototype from that table. Above it
sits one thin function per entry point: integer handles and pointers in, a
:class:`CublasError` naming the status out on anything but
``CUBLAS_STATUS_SUCCESS``. Nothing here knows about arrays, row-major layouts
or streams beyond their integer handles.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, c_double, c_int, c_int64, c_size_t, c_void_p
from dataclasses import dataclass

__all__ = [
    "CublasError",
    "CublasUnavailableError",
    "CTYPES",
    "Prototype",
    "PROTOTYPES",
    "REQUIRED_SYMBOLS",
    "GROUPED_SYMBOL",
    "GROUPED_GEMM_MIN_VERSION",
    "Op",
    "DataType",
    "ComputeType",
    "MathMode",
    "load",
    "library_path",
    "has_symbol",
    "version",
    "get_property",
    "create",
    "destroy",
    "set_stream",
    "set_workspace",
    "set_math_mode",
    "gemm_ex",
    "gemm_batched_ex",
    "gemm_strided_batched_ex",
    "gemm_grouped_batched_ex",
    "entry_point",
    "check_status",
]


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


# The parameter types a prototype may use, as ctypes sees them. Enumerations
# (cublasOperation_t, cudaDataType, cublasComputeType_t, ...) are C ints;
# handles and streams are opaque pointers; "void*" is any host or device address.
CTYPES: dict[str, type] = {
    "int": c_int,
    "enum": c_int,
    "int64": c_int64,
    "size_t": c_size_t,
    "void*": c_void_p,
    "handle": c_void_p,
    "stream": c_void_p,
    "int*": POINTER(c_int),
    "handle*": POINTER(c_void_p),
}


@dataclass(frozen=True)
class Prototype:
    """One cuBLAS entry point as its C header declares it.

    Attributes
    ----------
    params : str
        Comma-separated ``"type name"`` pairs in the header's order and with
        its names; each type is a key of :data:`CTYPES`.
    since : int
        First cuBLAS version (``major * 10000 + minor * 100``) that exports it;
        0 for entry points every supported cuBLAS has, without which
        :func:`load` refuses the library.
    restype : type
        ctypes return type: ``cublasStatus_t`` (a C int) for every entry here.
    """

    params: str
    since: int = 0
    restype: type = c_int

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for decl in self.params.split(","):
            ctype, name = decl.split()
            pairs.append((ctype, name))
        return pairs

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter names, in order."""
        return tuple(name for _, name in self._pairs())

    @property
    def argtypes(self) -> tuple[type, ...]:
        """The ctypes argument types, in order."""
        return tuple(CTYPES[ctype] for ctype, _ in self._pairs())


# cublasGemmGroupedBatchedEx first shipped in cuBLAS 12.5.
GROUPED_GEMM_MIN_VERSION = 120500
GROUPED_SYMBOL = "cublasGemmGroupedBatchedEx"

#: Every cuBLAS entry point this package calls. For the GEMMs, ``alpha`` and
#: ``beta`` point to host scalars; ``A``/``B``/``C`` are device addresses, or
#: for the batched and grouped calls device arrays of device addresses; the
#: grouped call's size arrays (``m_array`` ... ``group_size``) live on the host.
PROTOTYPES: dict[str, Prototype] = {
    "cublasCreate_v2": Prototype("handle* handle"),
    "cublasDestroy_v2": Prototype("handle handle"),
    "cublasGetProperty": Prototype("enum type, int* value"),
    "cublasSetStream_v2": Prototype("handle handle, stream streamId"),
    "cublasSetWorkspace_v2": Prototype("handle handle, void* workspace, size_t workspaceSizeInBytes"),
    "cublasSetMathMode": Prototype("handle handle, enum mode"),
    "cublasGemmEx": Prototype(
        "handle handle, enum transa, enum transb, int m, int n, int k, void* alpha, "
        "void* A, enum Atype, int lda, void* B, enum Btype, int ldb, void* beta, "
        "void* C, enum Ctype, int ldc, enum computeType, enum algo"
    ),
    "cublasGemmBatchedEx": Prototype(
        "handle handle, enum transa, enum transb, int m, int n, int k, void* alpha, "
        "void* Aarray, enum Atype, int lda, void* Barray, enum Btype, int ldb, void* beta, "
        "void* Carray, enum Ctype, int ldc, int batchCount, enum computeType, enum algo"
    ),
    "cublasGemmStridedBatchedEx": Prototype(
        "handle handle, enum transa, enum transb, int m, int n, int k, void* alpha, "
        "void* A, enum Atype, int lda, int64 strideA, void* B, enum Btype, int ldb, int64 strideB, "
        "void* beta, void* C, enum Ctype, int ldc, int64 strideC, int batchCount, "
        "enum computeType, enum algo"
    ),
    GROUPED_SYMBOL: Prototype(
        "handle handle, void* transa_array, void* transb_array, void* m_array, void* n_array, "
        "void* k_array, void* alpha_array, void* Aarray, enum Atype, void* lda_array, "
        "void* Barray, enum Btype, void* ldb_array, void* beta_array, void* Carray, enum Ctype, "
        "void* ldc_array, int group_count, void* group_size, enum computeType",
        since=GROUPED_GEMM_MIN_VERSION,
    ),
}
REQUIRED_SYMBOLS = tuple(name for name, proto in PROTOTYPES.items() if not proto.since)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_functions: dict[str, object] = {}
_missing: frozenset[str] = frozenset()


def _lookup(lib, name: str):
    # A library may export only the plain name of a ``_v2`` entry point
    # (cuBLAS keeps both today); accept either, so one release's renaming does
    # not break the other.
    for candidate in (name, name.removesuffix("_v2")):
        try:
            return getattr(lib, candidate)
        except AttributeError:
            continue
    return None


def _version_text(value: int) -> str:
    return f"{value // 10000}.{value // 100 % 100}"


def _bind(lib, path: str) -> tuple[dict[str, object], frozenset[str]]:
    """Set every prototype of :data:`PROTOTYPES` on ``lib``'s functions.

    Returns the functions found and the names missing; raises
    :class:`CublasUnavailableError` naming the functions and the library's
    version when one of :data:`REQUIRED_SYMBOLS` is missing.
    """
    functions, missing = {}, set()
    for name, proto in PROTOTYPES.items():
        fn = _lookup(lib, name)
        if fn is None:
            missing.add(name)
            continue
        fn.argtypes = proto.argtypes
        fn.restype = proto.restype
        functions[name] = fn
    required = sorted(missing.intersection(REQUIRED_SYMBOLS))
    if required:
        found = "of unknown version"
        if "cublasGetProperty" in functions:
            parts = []
            for which in (0, 1, 2):
                value = c_int()
                functions["cublasGetProperty"](which, ctypes.byref(value))
                parts.append(str(value.value))
            found = "version " + ".".join(parts)
        raise CublasUnavailableError(
            f"{path} ({found}) lacks {', '.join(required)}, which cublas_grouped needs"
        )
    return functions, frozenset(missing)


def load() -> ctypes.CDLL:
    """Load libcublas once (thread-safe) and declare every prototype of :data:`PROTOTYPES`.

    Raises
    ------
    CublasUnavailableError
        If the library cannot be found, or lacks one of ``REQUIRED_SYMBOLS``
        (the message names them and the version found).
    """
    global _lib, _lib_path, _functions, _missing
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
        _functions, _missing = _bind(lib, loaded.abs_path)
        _lib_path = loaded.abs_path
        _lib = lib
        return lib


def library_path() -> str:
    """Absolute path of the libcublas that was loaded."""
    load()
    assert _lib_path is not None
    return _lib_path


def has_symbol(name: str) -> bool:
    """Whether the loaded libcublas exports ``name`` (a key of :data:`PROTOTYPES`)."""
    load()
    return name not in _missing


def _call(name: str, *args) -> None:
    """Call entry point ``name`` with ``args``; raise on any status but success."""
    if _lib is None:
        load()
    if name in _missing:
        since = PROTOTYPES[name].since
        raise CublasUnavailableError(
            f"{name} needs cuBLAS >= {_version_text(since)}; the loaded library ({_lib_path}) "
            f"is version {version()}"
        )
    status = _functions[name](*args)
    if status != 0:
        raise CublasError(status, name.removesuffix("_v2"))


def entry_point(name: str):
    """The ctypes function of entry point ``name`` (a key of :data:`PROTOTYPES`),
    prototype set, for callers that repeat one call many times and want to
    skip :func:`_call`'s lookups: they must pass its result to :func:`check_status`.

    Raises
    ------
    CublasUnavailableError
        If the loaded library lacks ``name`` (the message names the version needed).
    """
    load()
    if name in _missing:
        _call(name)  # raises, naming the version needed and the one loaded
    return _functions[name]


def check_status(status: int, name: str) -> None:
    """Raise :class:`CublasError` for a ``status`` of entry point ``name`` other than success."""
    if status != 0:
        raise CublasError(status, name.removesuffix("_v2"))


def get_property(which: int) -> int:
    """``cublasGetProperty``: 0 major, 1 minor, 2 patch. Needs no GPU."""
    value = c_int()
    _call("cublasGetProperty", which, ctypes.byref(value))
    return value.value


def version() -> int:
    """cuBLAS version as ``major * 10000 + minor * 100 + patch``, e.g. 130100.

    Read with ``cublasGetProperty``, so it works without a GPU or a handle.
    """
    return get_property(0) * 10000 + get_property(1) * 100 + get_property(2)


def create() -> int:
    """``cublasCreate``: a new handle bound to the current device."""
    handle = c_void_p()
    _call("cublasCreate_v2", ctypes.byref(handle))
    return int(handle.value or 0)


def destroy(handle: int) -> None:
    """``cublasDestroy``."""
    _call("cublasDestroy_v2", handle)


def set_stream(handle: int, stream: int) -> None:
    """``cublasSetStream``: all later calls on ``handle`` run on ``stream``."""
    _call("cublasSetStream_v2", handle, stream)


def set_workspace(handle: int, ptr: int, nbytes: int) -> None:
    """``cublasSetWorkspace``: a user-owned workspace for ``handle``."""
    _call("cublasSetWorkspace_v2", handle, ptr, nbytes)


def set_math_mode(handle: int, mode: int) -> None:
    """``cublasSetMathMode``."""
    _call("cublasSetMathMode", handle, mode)


def _scalar(value: float, compute_type: int):
    """alpha/beta, by reference, in the scale type cuBLAS expects for ``compute_type``.

    The common ones (1 and 0) are made once and shared: cuBLAS only reads them."""
    found = _SCALARS.get((value, compute_type))
    if found is not None:
        return found
    if compute_type == ComputeType.C64F:
        return ctypes.byref(c_double(value))
    if compute_type == ComputeType.C16F:
        raise ValueError("16-bit compute (half scale type) is not used by this package")
    return ctypes.byref(ctypes.c_float(value))


_SCALARS = {
    (value, compute): ctypes.byref(c_double(value) if compute == ComputeType.C64F else ctypes.c_float(value))
    for value in (0.0, 1.0)
    for compute in (ComputeType.C32F, ComputeType.C32F_PEDANTIC, ComputeType.C32F_FAST_16F,
                    ComputeType.C32F_FAST_16BF, ComputeType.C32F_FAST_TF32, ComputeType.C64F)
}  # fmt: skip


# cuBLAS picks its own kernel; CUBLAS_GEMM_DEFAULT is the only algo we pass.
_GEMM_DEFAULT = -1


def gemm_ex(
    handle, transa, transb, m, n, k, alpha, a, a_type, lda, b, b_type, ldb, beta, c, c_type, ldc, compute_type
) -> None:
    """``cublasGemmEx`` (column-major): C = alpha op(A) op(B) + beta C."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _call(
        "cublasGemmEx",
        handle, transa, transb, m, n, k, al, a, a_type, lda, b, b_type, ldb, be, c, c_type, ldc,
        compute_type, _GEMM_DEFAULT,
    )  # fmt: skip


def gemm_batched_ex(
    handle, transa, transb, m, n, k, alpha, a_array, a_type, lda, b_array, b_type, ldb, beta,
    c_array, c_type, ldc, batch_count, compute_type,
) -> None:  # fmt: skip
    """``cublasGemmBatchedEx``: ``*_array`` are device arrays of device pointers."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _call(
        "cublasGemmBatchedEx",
        handle, transa, transb, m, n, k, al, a_array, a_type, lda, b_array, b_type, ldb, be,
        c_array, c_type, ldc, batch_count, compute_type, _GEMM_DEFAULT,
    )  # fmt: skip


def gemm_strided_batched_ex(
    handle, transa, transb, m, n, k, alpha, a, a_type, lda, stride_a, b, b_type, ldb, stride_b,
    beta, c, c_type, ldc, stride_c, batch_count, compute_type,
) -> None:  # fmt: skip
    """``cublasGemmStridedBatchedEx``; strides are in elements."""
    al, be = _scalar(alpha, compute_type), _scalar(beta, compute_type)
    _call(
        "cublasGemmStridedBatchedEx",
        handle, transa, transb, m, n, k, al, a, a_type, lda, stride_a, b, b_type, ldb, stride_b,
        be, c, c_type, ldc, stride_c, batch_count, compute_type, _GEMM_DEFAULT,
    )  # fmt: skip


def gemm_grouped_batched_ex(
    handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, a_array, a_type,
    lda_array, b_array, b_type, ldb_array, beta_array, c_array, c_type, ldc_array, group_count,
    group_size, compute_type,
) -> None:  # fmt: skip
    """``cublasGemmGroupedBatchedEx`` (cuBLAS >= 12.5).

    The per-group arrays (``transa_array`` ... ``group_size``, alpha and beta)
    are host addresses (e.g. of NumPy arrays) that must stay alive for the
    call; ``a_array``, ``b_array`` and ``c_array`` are device arrays of device
    pointers, one per problem.
    """
    _call(
        GROUPED_SYMBOL,
        handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, a_array, a_type,
        lda_array, b_array, b_type, ldb_array, beta_array, c_array, c_type, ldc_array, group_count,
        group_size, compute_type,
    )  # fmt: skip
