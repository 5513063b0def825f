"""Layer 3a: turn any GPU array into (pointer, shape, strides, dtype, device).

Validation works on the array's ``__cuda_array_interface__`` alone, so every
argument check runs before any GPU work (and can be tested without a GPU).
Arrays that only speak DLPack (JAX, for instance) are imported zero-copy
through CuPy first.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import cublas as _cublas

__all__ = ["ArrayView", "view", "cuda_dtype", "SUPPORTED_DTYPES", "as_cupy"]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# The element types every GEMM path accepts, with their cudaDataType.
SUPPORTED_DTYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): _cublas.DataType.R_32F,
    np.dtype(np.float16): _cublas.DataType.R_16F,
    BFLOAT16: _cublas.DataType.R_16BF,
}


def _dtype_from_typestr(typestr: str, descr) -> np.dtype:
    # bfloat16 has no typestr of its own: CuPy and torch publish it as '<V2'
    # (void, 2 bytes) with a descr naming it, or as ml_dtypes' own type.
    if typestr in ("<V2", "|V2"):
        name = ""
        if descr and isinstance(descr, (list, tuple)) and descr and descr[0]:
            name = str(descr[0][0] if isinstance(descr[0], (list, tuple)) else descr[0])
        if "bfloat16" in name or name in ("", "bf16"):
            return BFLOAT16
    return np.dtype(typestr)


@dataclass(frozen=True)
class ArrayView:
    """A GPU array seen as raw memory: what the cuBLAS calls need.

    Attributes
    ----------
    ptr : int
        Device address of element [0, ..., 0].
    shape, strides : tuple of int
        Strides in elements (not bytes).
    dtype : numpy.dtype
    device : int or None
        CUDA device ordinal, when the producer says (CuPy, torch) or it was queried.
    obj : object
        The original array, kept alive by the view.
    """

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    device: int | None
    obj: object

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def is_c_contiguous(self) -> bool:
        expected = 1
        for dim, stride in zip(reversed(self.shape), reversed(self.strides)):
            if dim != 1 and stride != expected:
                return False
            expected *= dim
        return True


def _device_of(obj) -> int | None:
    device = getattr(obj, "device", None)
    for attr in ("id", "index"):
        value = getattr(device, attr, None)
        if isinstance(value, int):
            return value
    return None


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides in elements of a C-contiguous array of ``shape``."""
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


_CUPY_NDARRAY = None


def _cupy_ndarray():
    """``cupy.ndarray``, or a stand-in type no object has when CuPy cannot be imported."""
    global _CUPY_NDARRAY
    if _CUPY_NDARRAY is None:
        try:
            import cupy

            _CUPY_NDARRAY = cupy.ndarray
        except Exception:  # no CuPy, or a broken install: the generic path reports it
            _CUPY_NDARRAY = type("_NoCupy", (), {})
    return _CUPY_NDARRAY


def view(obj, name: str) -> ArrayView:
    """Describe ``obj`` as an :class:`ArrayView`, or raise a ``TypeError`` naming ``name``.

    Host arrays (NumPy, lists) are refused: this library never copies a
    caller's host data to the GPU behind their back.
    """
    if isinstance(obj, ArrayView):
        return obj
    if type(obj) is _cupy_ndarray():
        # CuPy's own attributes: exact dtype, no interface dict to build (the common case).
        if obj.flags.c_contiguous:
            # As the interface does: C-contiguous arrays (empty ones too, whose own
            # strides may be zeros) get the canonical strides.
            strides = _c_strides(obj.shape)
        else:
            itemsize = obj.dtype.itemsize
            strides = tuple(s // itemsize for s in obj.strides)
            if any(s * itemsize != b for s, b in zip(strides, obj.strides)):
                raise ValueError(f"{name} has strides {obj.strides} that are not whole elements")
        return ArrayView(obj.data.ptr, obj.shape, strides, obj.dtype, obj.device.id, obj)
    if isinstance(obj, np.ndarray):
        raise TypeError(
            f"{name} is a NumPy array in host memory; pass a GPU array (e.g. cupy.asarray({name}))"
        )
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None and hasattr(obj, "__dlpack__"):
        obj = as_cupy(obj, name)
        cai = obj.__cuda_array_interface__
    if cai is None:
        raise TypeError(
            f"{name} must be a GPU array exposing __cuda_array_interface__ or DLPack "
            f"(CuPy, torch, JAX...); got {type(obj).__name__}"
        )
    shape = tuple(int(s) for s in cai["shape"])
    own = getattr(obj, "dtype", None)
    if isinstance(own, np.dtype):
        dtype = own  # CuPy: exact, bfloat16 included
    else:
        dtype = _dtype_from_typestr(cai["typestr"], cai.get("descr"))
    ptr = int(cai["data"][0] or 0)
    raw_strides = cai.get("strides")
    if raw_strides is None:
        strides = _c_strides(shape)
    else:
        if any(s % dtype.itemsize for s in raw_strides):
            raise ValueError(f"{name} has strides {tuple(raw_strides)} that are not whole elements")
        strides = tuple(int(s) // dtype.itemsize for s in raw_strides)
    return ArrayView(ptr, shape, strides, dtype, _device_of(obj), obj)


def cuda_dtype(dtype: np.dtype, name: str) -> int:
    """cudaDataType for ``dtype``, or a ``TypeError`` naming the argument."""
    try:
        return SUPPORTED_DTYPES[np.dtype(dtype)]
    except KeyError:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {np.dtype(dtype)}; supported: {supported}") from None


def as_cupy(obj, name: str = "array"):
    """``obj`` as a CuPy array without copying (CAI or DLPack)."""
    import cupy

    if isinstance(obj, cupy.ndarray):
        return obj
    if isinstance(obj, ArrayView):
        obj = obj.obj
    if hasattr(obj, "__cuda_array_interface__"):
        return cupy.asarray(obj)
    if hasattr(obj, "__dlpack__"):
        return cupy.from_dlpack(obj)
    raise TypeError(f"{name} is not a GPU array")
