"""Layer 3a: turn any GPU array into (pointer, shape, strides, dtype, device).

Validation works on the array's ``__cuda_array_interface__`` alone, so every
argument check runs before any GPU work (and can be tested without a GPU).
Arrays that only speak DLPack are imported zero-copy through CuPy first.

Element types: CuPy and JAX carry a NumPy dtype, which wins. bfloat16 has no
typestr of its own: torch publishes it as an untyped 2-byte void ('<V2'), so
for such a typestr the type is read from the producer's DLPack export when it
has one (DLPack's bfloat16 code says exactly what it is), else from the
interface's ``descr``. The answer is kept per (array type, its dtype object),
so the export happens once per type, not once per call. :func:`as_cupy` then
wraps the same memory with that dtype: no copy, no second read of the interface.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import cublas as _cublas

__all__ = [
    "ArrayView",
    "view",
    "cuda_dtype",
    "SUPPORTED_DTYPES",
    "as_cupy",
    "dlpack_dtype",
    "dlpack_export_dtype",
    "cupy_array_type",
]

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


# dlpack.h's DLDataTypeCode values this library can meet (kDLOpaqueHandle = 3,
# kDLComplex = 5 and the float8 codes have no dtype here).
_DLPACK_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}
DLPACK_BFLOAT = 4
# DLDeviceType values of memory a GPU kernel can read: kDLCUDA, kDLCUDAManaged.
_DLPACK_GPU_DEVICES = (2, 13)


def dlpack_dtype(code: int, bits: int, lanes: int = 1) -> np.dtype:
    """NumPy dtype of a DLPack ``DLDataType`` (bfloat16 included), or ``TypeError``."""
    if lanes == 1 and bits % 8 == 0:
        if code == DLPACK_BFLOAT and bits == 16:
            return BFLOAT16
        kind = _DLPACK_KINDS.get(code)
        if kind is not None:
            try:
                return np.dtype(f"{kind}{bits // 8}")
            except TypeError:
                pass
    raise TypeError(f"DLPack element type (code {code}, {bits} bits, {lanes} lanes) has no NumPy dtype here")


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    # dlpack.h's DLTensor, up to its dtype: all this module reads.
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
    ]


# Where the DLTensor sits in each capsule's struct: first in DLManagedTensor
# ("dltensor"); after version (2 x uint32), manager_ctx, deleter and flags
# (8 bytes each) in DLManagedTensorVersioned ("dltensor_versioned").
_CAPSULE_OFFSETS = {b"dltensor": 0, b"dltensor_versioned": 32}


# Private prototypes (the shared ctypes.pythonapi entries keep whatever others set).
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi)
)
_capsule_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _capsule_pointer(capsule, name: bytes) -> int | None:
    if not _capsule_is_valid(capsule, name):
        return None
    return _capsule_get_pointer(capsule, name)


def dlpack_export_dtype(obj) -> np.dtype:
    """The element type ``obj`` states in its DLPack export (``obj.__dlpack__()``).

    Only the capsule's ``DLTensor.dtype`` is read; the capsule is left
    unconsumed, so the producer's own destructor frees it. On a GPU the export
    asks for no stream synchronization (``stream=-1``): nothing is read from
    the memory.
    """
    device = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else None
    try:
        capsule = obj.__dlpack__(stream=-1) if device in _DLPACK_GPU_DEVICES else obj.__dlpack__()
    except TypeError:  # a producer without the stream keyword
        capsule = obj.__dlpack__()
    for name, offset in _CAPSULE_OFFSETS.items():
        ptr = _capsule_pointer(capsule, name)
        if ptr:
            t = _DLTensor.from_address(ptr + offset)
            return dlpack_dtype(t.dtype.code, t.dtype.bits, t.dtype.lanes)
    raise TypeError(f"{type(obj).__name__}.__dlpack__() returned no DLPack tensor capsule")


# (array type, its own dtype object, typestr) -> NumPy dtype, for arrays whose
# dtype is not a NumPy one (torch): filled on first sight of each.
_FOREIGN_DTYPES: dict[tuple, np.dtype] = {}


def _foreign_dtype(obj, cai: dict) -> np.dtype:
    typestr = cai["typestr"]
    own = getattr(obj, "dtype", None)
    key = None
    if own is not None:  # without a dtype object of its own, only the interface can say
        try:
            descr = cai.get("descr")
            key = (type(obj), own, typestr, None if descr is None else repr(descr))
            hash(key)
        except TypeError:
            key = None
    dtype = _FOREIGN_DTYPES.get(key) if key is not None else None
    if dtype is not None:
        return dtype
    dtype = None
    if typestr[1:2] == "V" and hasattr(obj, "__dlpack__"):
        # An untyped void: DLPack has a code for bfloat16, the typestr has none.
        try:
            dtype = dlpack_export_dtype(obj)
        except Exception:  # a failed export leaves the interface's own word
            dtype = None
    if dtype is None:
        dtype = _dtype_from_typestr(typestr, cai.get("descr"))
    if key is not None:
        _FOREIGN_DTYPES[key] = dtype
    return dtype


def _interface(obj):
    """(object, its __cuda_array_interface__ or None). torch refuses the interface
    of a tensor that requires grad: such a tensor is read through ``detach()``
    (the same memory), since results here are plain arrays outside autograd
    anyway (``cublas_grouped.torch`` has the differentiable functions)."""
    try:
        return obj, getattr(obj, "__cuda_array_interface__", None)
    except RuntimeError:
        if not getattr(obj, "requires_grad", False):
            raise
        return _interface(obj.detach())
    except (KeyError, TypeError):
        # An interface that cannot describe the type (older torch has no
        # typestr for bfloat16): DLPack, when there is one, can.
        if not hasattr(obj, "__dlpack__"):
            raise
        return obj, None


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


def cupy_array_type() -> type:
    """``cupy.ndarray``, or a type no object has when CuPy cannot be imported
    (hot paths compare ``type(x) is cupy_array_type()``: no import, no isinstance walk)."""
    return _CUPY_NDARRAY if _CUPY_NDARRAY is not None else _cupy_ndarray()


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
    obj, cai = _interface(obj)
    if cai is None and hasattr(obj, "__dlpack__"):
        obj = _from_dlpack(obj, name)
        cai = obj.__cuda_array_interface__
    if cai is None:
        raise TypeError(
            f"{name} must be a GPU array exposing __cuda_array_interface__ or DLPack "
            f"(CuPy, torch, JAX...); got {type(obj).__name__}"
        )
    shape = tuple(int(s) for s in cai["shape"])
    own = getattr(obj, "dtype", None)
    if isinstance(own, np.dtype):
        dtype = own  # CuPy, JAX: exact, bfloat16 included
    else:
        dtype = _foreign_dtype(obj, cai)
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


def _from_dlpack(obj, name: str):
    """A DLPack-only array as a CuPy array (zero-copy); host memory refused."""
    device = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else None
    if device is not None and int(device) not in _DLPACK_GPU_DEVICES:
        raise TypeError(f"{name} is in host memory (DLPack device type {int(device)}); pass a GPU array")
    import cupy

    return cupy.from_dlpack(obj)


def is_host_array(obj) -> bool:
    """Whether ``obj`` is host data (a sequence, NumPy, a torch CPU tensor, a JAX
    CPU array) rather than a GPU array: where a host copy is wanted (sizes)."""
    if isinstance(obj, np.ndarray):
        return True
    try:
        if getattr(obj, "__cuda_array_interface__", None) is not None:
            return False
    except (RuntimeError, KeyError, TypeError):  # a GPU tensor that will not say (see _interface)
        return False
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None:
        return int(device()[0]) not in _DLPACK_GPU_DEVICES
    return not hasattr(obj, "__dlpack__")


def as_cupy(obj, name: str = "array"):
    """``obj`` (any GPU array, or an :class:`ArrayView`) as a CuPy array over the
    same memory, with the dtype :func:`view` found (torch's bfloat16 included).

    No copy: a foreign array is wrapped as CuPy memory that keeps ``obj`` alive.
    """
    import cupy

    if isinstance(obj, cupy.ndarray):
        return obj
    v = view(obj, name)
    if isinstance(v.obj, cupy.ndarray):
        return v.obj
    shape, strides, isz = v.shape, v.strides, v.dtype.itemsize
    if 0 in shape:
        return cupy.empty(shape, dtype=v.dtype)
    # The elements the view can reach, negative strides included.
    lo = hi = 0
    for d, s in zip(shape, strides):
        if s < 0:
            lo += (d - 1) * s
        else:
            hi += (d - 1) * s
    device = -1 if v.device is None else v.device  # -1: CuPy asks the driver
    mem = cupy.cuda.UnownedMemory(v.ptr + lo * isz, (hi - lo + 1) * isz, v.obj, device)
    ptr = cupy.cuda.MemoryPointer(mem, -lo * isz)
    return cupy.ndarray(shape, v.dtype, ptr, strides=tuple(s * isz for s in strides))
