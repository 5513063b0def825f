"""Checked ``gmm`` calls on our Hopper kernel, prepared: the two launches (the
offsets kernel, which reads the sizes in place and makes them safe,
``backends/hopper_sizes.py``; the GEMM) packed once per operands and
replayed, for device-resident sizes (:class:`PreparedDeviceSizes`) and for
host sizes (:class:`PreparedHostSizes`: uploaded once per cache entry, whose
key holds their values, so a hit copies nothing).

A call cache entry (``gemm/call_cache.py``) holds one :class:`PreparedDeviceSizes`
for the plan it checked; the launches it keeps depend on the addresses of
``a`` and ``b`` (the TMA maps hold them), of the stream's schedule buffer
and on the sizes' dtype, and are looked up by exactly those on every call (a
grown buffer or new operands prepare anew). ``out`` and the sizes' address go
into the launches' slots on each call.
"""

from __future__ import annotations

import numpy as np

from ...runtime import launch as _fast
from . import hopper
from .hopper_sizes import READ_DTYPES
from .hopper_variants import choice_key

__all__ = ["PreparedDeviceSizes", "PreparedHostSizes", "MAX_PREPARED_OPERANDS", "offsets_launch"]

# Operand pairs kept per entry (then started over): a decode loop reuses one.
MAX_PREPARED_OPERANDS = 16


class PreparedDeviceSizes:
    """SM90_GROUPED for one checked plan on device sizes: ``(res, sizes_dev, a, b, out)``
    queues what ``hopper.grouped_contiguous`` would (same launches, same arguments)."""

    def __init__(self, plan, dtype):
        self.problem = (plan.num_experts, plan.total_rows, plan.n, plan.k, plan.trans_b, np.dtype(dtype))
        self.tile_bound = hopper.max_tiles(plan.total_rows, plan.num_experts)
        self.launches: dict = {}

    def __call__(self, res, sizes_dev, a: int, b: int, out: int) -> None:
        e = self.problem[0]
        if sizes_dev.dtype not in READ_DTYPES:
            sizes_dev = sizes_dev.astype(np.int64)  # int8/16, unsigned: a cast kernel first
        base = hopper.schedule_base(res, e)
        key = (a, b, base, sizes_dev.dtype, res.device_id, choice_key(hopper.DEFINES))  # as prepared_gemm
        launches = self.launches.get(key)
        if launches is None:
            if len(self.launches) >= MAX_PREPARED_OPERANDS:
                self.launches.clear()
            launches = self.launches[key] = self._prepare(res.device_id, sizes_dev.dtype, a, b, base)
        scan, gemm = launches
        stream = res.stream
        scan(stream, sizes_dev.data.ptr)
        gemm(stream, out)

    def _prepare(self, device_id: int, dtype, a: int, b: int, base: int):
        e, m = self.problem[0], self.problem[1]
        scan = offsets_launch(e, m, base, dtype)
        gemm = hopper.prepared_gemm(device_id, self.problem, (a, b), base, self.tile_bound)
        return scan, gemm


def offsets_launch(e: int, m: int, base: int, dtype):
    """The offsets kernel over ``dtype`` sizes (int32 or int64: read in place)
    of ``e`` groups on grouped-contiguous rows of ``m``, writing the schedule
    ints at ``base``, as a :class:`~cublas_grouped.runtime.launch.FixedLaunch`
    whose one slot is the sizes' address."""
    args = hopper.offsets_args(0, e, m, 0, base)  # the sizes' address: slot 0
    typed = [np.int32(x) if code == "i" else np.int64(x) for code, x in zip(hopper.OFFSETS_SIGNATURE, args)]
    return _fast.FixedLaunch(hopper.offsets_kernel(dtype), 1, hopper.TILE_THREADS, typed, slots=(0,))


class PreparedHostSizes:
    """SM90_GROUPED for one checked plan on host sizes: ``(res, None, a, b, out)``
    queues the offsets kernel over this object's own int32 copy of the plan's
    sizes, then the GEMM (:class:`PreparedDeviceSizes` on that copy).

    The call cache keys host sizes by every value, so the sizes of an entry
    never change: they are uploaded once, when the entry is prepared, and not
    on every call through the stream's upload buffer (a pinned copy and an
    unprepared launch per call: 61 Python and C calls against 25, counted on
    the stubs, which AUTO paid where its measurement chose this kernel for a
    tiny host-sized call). The copy keeps its address, so a graph captured on
    a hit replays it."""

    def __init__(self, res, plan, dtype):
        import cupy

        host = np.ascontiguousarray(plan.sizes, dtype=np.int32)
        self.sizes = cupy.empty(host.shape, dtype=np.int32)
        res.copy_to_device(self.sizes.data.ptr, host)  # on the call's stream, before its launches
        self.device = PreparedDeviceSizes(plan, dtype)

    def __call__(self, res, sizes_dev, a: int, b: int, out: int) -> None:
        self.device(res, self.sizes, a, b, out)

    @classmethod
    def for_call(cls, res, plan, dtype, sm, ptrs):
        """One for ``plan`` on ``res``'s stream where the kernel runs it as
        ``hopper.grouped_contiguous`` would (GPU ``sm``, ``ptrs`` = a, b, out
        addresses), else None (the executor's fallback then warns as before);
        None too while the stream captures a graph (the upload would be
        captured, not run now)."""
        import cupy

        if hopper.unsupported(sm, dtype, plan) is not None or hopper.misaligned(*ptrs) is not None:
            return None
        if cupy.cuda.runtime.streamIsCapturing(res.stream):
            return None
        return cls(res, plan, dtype)
