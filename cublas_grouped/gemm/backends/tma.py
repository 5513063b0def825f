"""TMA descriptors of C-contiguous device tensors given by bare addresses
(built through cuda.core; the Hopper kernels' launchers cache them)."""

from __future__ import annotations

import numpy as np

__all__ = ["DeviceTensor", "tiled_map"]


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


def tiled_map(ptr: int, shape: tuple[int, ...], box: tuple[int, ...], dtype):
    """A tiled TMA descriptor of a C-contiguous tensor of ``shape``: boxes of
    ``box`` (both outermost first), the 128-byte swizzle wgmma reads, zeros
    outside the tensor."""
    # The enums are not re-exported by cuda.core 1.2; their module is.
    from cuda.core._tensor_map import TensorMapOOBFill, TensorMapSwizzle
    from cuda.core.utils import StridedMemoryView

    itemsize = np.dtype(dtype).itemsize
    view = StridedMemoryView.from_cuda_array_interface(DeviceTensor(ptr, shape, itemsize), stream_ptr=-1)
    return view.as_tensor_map(
        tuple(box),
        data_type=np.dtype(dtype),
        swizzle=TensorMapSwizzle.SWIZZLE_128B,
        oob_fill=TensorMapOOBFill.NONE,  # NONE fills zeros (NAN_REQUEST_ZERO_FMA would fill NaN)
    )
