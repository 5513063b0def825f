"""TMA descriptors of C-contiguous device tensors given by bare addresses:
built through cuda.core, kept per key for the Hopper kernels' launchers."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

__all__ = ["DeviceTensor", "tiled_map", "tensor_map", "MAP_CACHE_SIZE", "L2_PROMOTION", "L2_PROMOTIONS"]

# How far L2 widens each TMA read from HBM: 0 (the sector asked for), 64,
# 128 or 256 bytes. A K-major operand's box reads 128 bytes of each row per
# stage, rows K elements apart, and the next stage reads the row's next 128
# bytes: 256-byte promotion fetches both with one DRAM access. Read at every
# map build and part of the cache key (so a probe may switch it per call).
L2_PROMOTION = 0
L2_PROMOTIONS = (0, 64, 128, 256)


class DeviceTensor:
    """A C-contiguous device tensor seen through the CUDA array interface
    (unsigned elements of ``itemsize`` bytes: 2 for the 16-bit kernels, 1 for
    e4m3 codes), so that cuda.core can describe it to TMA from a bare address."""

    def __init__(self, ptr: int, shape: tuple[int, ...], itemsize: int = 2):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": f"<u{int(itemsize)}",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }


def tiled_map(ptr: int, shape: tuple[int, ...], box: tuple[int, ...], dtype, promotion: int = 0):
    """A tiled TMA descriptor of a C-contiguous tensor of ``shape``: boxes of
    ``box`` (both outermost first), the 128-byte swizzle wgmma reads, zeros
    outside the tensor, L2 promotion of ``promotion`` bytes (one of
    :data:`L2_PROMOTIONS`; 0: none)."""
    # The enums are not re-exported by cuda.core 1.2; their module is.
    from cuda.core._tensor_map import TensorMapL2Promotion, TensorMapOOBFill, TensorMapSwizzle
    from cuda.core.utils import StridedMemoryView

    itemsize = np.dtype(dtype).itemsize
    view = StridedMemoryView.from_cuda_array_interface(DeviceTensor(ptr, shape, itemsize), stream_ptr=-1)
    return view.as_tensor_map(
        tuple(box),
        data_type=np.dtype(dtype),
        swizzle=TensorMapSwizzle.SWIZZLE_128B,
        l2_promotion=_promotion(TensorMapL2Promotion, promotion),
        oob_fill=TensorMapOOBFill.NONE,  # NONE fills zeros (NAN_REQUEST_ZERO_FMA would fill NaN)
    )


def _promotion(enum, nbytes: int):
    if nbytes not in L2_PROMOTIONS:
        raise ValueError(f"L2 promotion must be one of {L2_PROMOTIONS} bytes; got {nbytes!r}")
    return {0: enum.NONE, 64: enum.L2_64B, 128: enum.L2_128B, 256: enum.L2_256B}[nbytes]


# Descriptors kept (least recently used dropped first): a layer's two GEMMs
# over a few batch shapes and a model's layers need a few dozen; each is 128
# bytes plus its Python object.
MAP_CACHE_SIZE = 256
_maps: OrderedDict[tuple, object] = OrderedDict()
_maps_lock = threading.Lock()


def tensor_map(ptr: int, shape: tuple[int, ...], box: tuple[int, ...], dtype, device_id: int):
    """The TMA descriptor of :func:`tiled_map`, built once per key and reused.

    A descriptor is a pure function of the address, shape, strides (C-contiguous
    here, so given by the shape), element type, box, swizzle (fixed here) and
    L2 promotion (:data:`L2_PROMOTION` when built):
    the key holds all of them and the device. It holds no reference to the
    memory, so a reused descriptor of freed memory is only as wrong as the
    pointer the caller passes; nothing else can go stale. Building one through
    cuda.core costs host time on every call; a hit is a dictionary lookup.
    """
    shape, box, dtype = tuple(map(int, shape)), tuple(map(int, box)), np.dtype(dtype)
    promotion = L2_PROMOTION
    strides, step = [], dtype.itemsize  # C-contiguous byte strides, innermost first
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    key = (int(device_id), int(ptr), shape, tuple(reversed(strides)), dtype.name, box, promotion)
    with _maps_lock:
        found = _maps.get(key)
        if found is not None:
            _maps.move_to_end(key)
            return found
    built = tiled_map(ptr, shape, box, dtype, promotion)
    with _maps_lock:
        _maps[key] = built
        _maps.move_to_end(key)
        while len(_maps) > MAP_CACHE_SIZE:
            _maps.popitem(last=False)
    return built
