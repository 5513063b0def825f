"""Development check that compute-sanitizer sees our kernels (launched through
cuLaunchKernel): build_pointers is told its arrays hold more entries than they
do, so it writes past them; memcheck must report invalid global writes."""

import cupy
import numpy as np

cupy.cuda.set_allocator(None)  # no pool: the write past the array must hit unowned memory

from cublas_grouped.gemm.plan import Operands, RowLayout  # noqa: E402
from cublas_grouped.gemm.pointers import build_pointers  # noqa: E402
from cublas_grouped.runtime.device import stream_resources  # noqa: E402

res = stream_resources(0, None)
sizes = cupy.asarray(np.full(512, 64, dtype=np.int32))
small = [cupy.empty(1, dtype=cupy.uint64) for _ in range(3)]


class Lying:
    """Three one-entry arrays that claim 512 entries."""

    def __init__(self, arr):
        self.data, self.size = arr.data, 512


build_pointers(
    res,
    sizes,
    Operands(0, 0, 0, 0, 0, 0, 0, 0, 0),
    RowLayout.contiguous(),
    num_problems=512,
    pointer_arrays=[Lying(a) for a in small],
)
cupy.cuda.Device().synchronize()
print("canary launched")
