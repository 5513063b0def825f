"""Checked ``gmm`` calls on our Hopper kernel with device-resident group sizes,
prepared: the two launches (the offsets kernel, which reads the caller's
sizes in place and makes them safe, ``backends/hopper_sizes.py``; the GEMM)
packed once per operands and replayed.

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

__all__ = ["PreparedDeviceSizes", "MAX_PREPARED_OPERANDS"]

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
        key = (a, b, base, sizes_dev.dtype, res.device_id)
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
        args = hopper.offsets_args(0, e, m, 0, base)  # the sizes' address: slot 0
        typed = [
            np.int32(x) if code == "i" else np.int64(x) for code, x in zip(hopper.OFFSETS_SIGNATURE, args)
        ]
        scan = _fast.FixedLaunch(hopper.offsets_kernel(dtype), 1, hopper.TILE_THREADS, typed, slots=(0,))
        gemm = hopper.prepared_gemm(device_id, self.problem, (a, b), base, self.tile_bound)
        return scan, gemm
