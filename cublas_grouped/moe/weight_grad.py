"""The backward's weight-gradient GEMMs: ``out[e] = a_e^T @ b_e`` on the forward's row layout.

A weight gradient is a K-grouped product: each expert's rows are the
reduction. Splitting that reduction over chunks would need partial sums
added afterwards (scratch, and a fixed-order reduction to stay
deterministic), so no path here splits it. Instead, every path runs each
expert's whole block of rows in one cuBLAS problem:

- ``STRIDED`` (padded capacity): one ``cublasGemmStridedBatchedEx``, every
  expert over ``capacity`` rows;
- ``BUCKETED`` (chunk-aligned rows): experts whose blocks (rows rounded up
  to the chunk) have the same length share one ``cublasGemmBatchedEx``, one
  call per distinct length;
- ``GROUPED``: one ``cublasGemmGroupedBatchedEx`` over the exact rows;
- ``SEQUENTIAL``: one ``cublasGemmEx`` per expert.

STRIDED and BUCKETED also reduce over padding rows; that is exact because
the backward leaves zeros in the padding rows of both operands (the gather
writes zeros there, and so does the activation-backward kernel for ``dz``
and ``w a``). :func:`weight_grad_path` picks the path with the least
expected time from the constants below (docs/backward.md derives them).
"""

from __future__ import annotations

import enum

import numpy as np

from ..gemm.backends.cublas import batched, bound
from ..gemm.config import Algorithm
from ..gemm.plan import GemmPlan, Operands, ProblemStats
from ..gemm.pointers import upload_pointers
from ..gemm.select import select_algorithm
from ..runtime import cublas as _cublas

__all__ = [
    "WeightGradPath",
    "weight_grad_path",
    "expected_times",
    "bucket_experts",
    "weight_grad",
    "CALL_US",
    "BATCHED_TFLOPS",
    "GROUPED_TFLOPS",
    "SEQUENTIAL_TFLOPS",
    "WRITE_GBPS",
]

# The cost model's constants (H100, cuBLAS 13.1, bf16, docs/benchmarks.md,
# 2026-11-26). A call costs at least CALL_US: Qwen3's first GEMM as 128
# cublasGemmEx calls took 1.12 ms at 4096 tokens (8.75 us each, far above
# their FLOPs). A batched or strided call over many experts reaches the
# padded-capacity forward's rate on the same shapes (535 TFLOP/s), the grouped
# call 264-280, one call per large expert 287 (DeepSeek-V3, 4096 tokens).
# Every path writes the whole gradient once: [E, K, N], no faster than HBM.
CALL_US = 8.75
BATCHED_TFLOPS = 535.0
GROUPED_TFLOPS = 270.0
SEQUENTIAL_TFLOPS = 287.0
WRITE_GBPS = 3000.0


class WeightGradPath(enum.Enum):
    """How one weight-gradient GEMM runs (see the module docstring)."""

    STRIDED = "strided"
    BUCKETED = "bucketed"
    GROUPED = "grouped"
    SEQUENTIAL = "sequential"


def _call_us(flops, out_bytes, tflops: float):
    """Expected microseconds of one call (or of each, for arrays of calls)."""
    return np.maximum(CALL_US, np.maximum(flops / tflops * 1e-6, out_bytes / WRITE_GBPS * 1e-3))


def bucket_experts(blocks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(rows, experts)`` for each distinct non-zero block length of ``blocks``
    (rows per expert in the layout), shortest first; experts ascending."""
    active = np.flatnonzero(blocks)
    lengths = np.unique(blocks[active])
    return [(int(r), active[blocks[active] == r]) for r in lengths]


def _blocks(layout, sizes: np.ndarray) -> np.ndarray:
    """Rows each expert's block spans in the layout (0 for experts without rows)."""
    if layout.stride:
        return np.where(sizes > 0, layout.stride, 0)
    return np.diff(layout.offsets(sizes))


def expected_times(layout, sizes: np.ndarray, k: int, n: int, itemsize: int, grouped_ok: bool) -> dict:
    """Expected microseconds of each path that can run on ``layout`` for a
    ``[E, k, n]`` gradient over per-expert rows ``sizes`` (the cost model)."""
    out_e = float(k) * n * itemsize
    per_row = 2.0 * k * n
    active = sizes[sizes > 0]
    # Fewest calls first: on equal times (all bound by the write) the first wins.
    times = {}
    if layout.stride:
        e = len(sizes)
        times[WeightGradPath.STRIDED] = _call_us(per_row * e * layout.stride, e * out_e, BATCHED_TFLOPS)
    elif layout.align > 1:
        times[WeightGradPath.BUCKETED] = sum(
            _call_us(per_row * rows * len(ex), len(ex) * out_e, BATCHED_TFLOPS)
            for rows, ex in bucket_experts(_blocks(layout, sizes))
        )
    if grouped_ok and not layout.stride:
        times[WeightGradPath.GROUPED] = _call_us(per_row * active.sum(), len(active) * out_e, GROUPED_TFLOPS)
    # One array operation: this runs on the host between launches, once per gradient.
    times[WeightGradPath.SEQUENTIAL] = float(_call_us(per_row * active, out_e, SEQUENTIAL_TFLOPS).sum())
    return {path: float(t) for path, t in times.items()}


def weight_grad_path(executor, inp, n: int, k: int, dtype, device_id: int) -> WeightGradPath:
    """The path of a ``[E, k, n]`` weight gradient on ``inp``'s layout.

    Padded capacity and chunk-aligned rows: the least expected time of the
    paths that run there (:func:`expected_times`). Grouped-contiguous rows
    (the forward chose SEQUENTIAL or a grouped call): cuBLAS's rule of AUTO,
    as before (no bucket pays there: the exact counts rarely repeat).
    """
    layout, sizes = inp.layout, inp.counts_host
    info = executor.info_for(device_id)
    if layout.stride or layout.align > 1:
        times = expected_times(layout, sizes, k, n, np.dtype(dtype).itemsize, info.supports_grouped_gemm())
        return min(times, key=times.get)  # the first of equal times
    stats = ProblemStats.from_sizes(sizes, n, k, np.dtype(dtype).name)
    chosen = executor.fallback(select_algorithm(stats, info, table=None), device_id)
    return WeightGradPath.GROUPED if chosen is Algorithm.CUBLAS_GROUPED else WeightGradPath.SEQUENTIAL


def _zero_empty(res, out, sizes: np.ndarray) -> None:
    """Exact zeros for experts without rows: one memset per run of them."""
    import cupy

    edges = np.flatnonzero(np.diff(np.concatenate(([0], (sizes == 0).astype(np.int8), [0]))))
    per_expert = out.nbytes // len(sizes)
    for start, stop in zip(edges[::2], edges[1::2]):
        cupy.cuda.runtime.memsetAsync(
            out.data.ptr + int(start) * per_expert, 0, int(stop - start) * per_expert, res.stream
        )


def _strided(call, plan: GemmPlan, a, b, out, capacity: int) -> None:
    """Every expert over ``capacity`` rows of padded capacity, one call."""
    d = plan.dims(capacity)
    k, n = plan.k, plan.n
    _cublas.gemm_strided_batched_ex(
        call.handle, d.transa, d.transb, d.m, d.n, d.k, 1.0,
        b.data.ptr, call.data_type, d.lda, capacity * n,
        a.data.ptr, call.data_type, d.ldb, capacity * k,
        0.0, out.data.ptr, call.data_type, d.ldc, k * n,
        plan.num_experts, call.compute,
    )  # fmt: skip


def _bucketed(call, res, plan: GemmPlan, ops: Operands, layout) -> None:
    """One batched call per distinct block length; one upload of all pointers."""
    offsets = layout.offsets(plan.sizes)
    buckets = bucket_experts(_blocks(layout, plan.sizes))
    experts = np.concatenate([ex for _, ex in buckets])
    base, _, _ = upload_pointers(res, "weight-grad-pointers", ops, offsets[experts], experts)
    count, first = len(experts), 0
    for rows, ex in buckets:
        arrays = tuple(base + 8 * (first + count * i) for i in range(3))
        batched(call, plan.dims(rows), arrays, len(ex))
        first += len(ex)


def weight_grad(executor, res, inp, a, b, path: WeightGradPath):
    """``out[e] = a_e^T @ b_e`` over each expert's rows of ``inp``'s layout
    ([E, K, N] of a's dtype; exact zeros for experts without rows)."""
    import cupy

    sizes, layout = inp.counts_host, inp.layout
    k, n = a.shape[1], b.shape[1]
    out = cupy.empty((inp.num_experts, k, n), dtype=a.dtype)
    if not out.size:
        return out
    active = np.flatnonzero(sizes)
    offsets = layout.offsets(sizes)
    plan = GemmPlan(inp.num_experts, a.shape[0], n, k, True, False, sizes, offsets, active)
    if path is WeightGradPath.STRIDED:
        # Experts without rows reduce over zero padding rows: exact zeros, no memset.
        with bound(res, a.dtype, executor.config) as call:
            _strided(call, plan, a, b, out, layout.stride)
        return out
    _zero_empty(res, out, sizes)
    if not len(active):
        return out
    ops = Operands.for_plan(plan, a.data.ptr, b.data.ptr, out.data.ptr, a.dtype.itemsize)
    if path is WeightGradPath.BUCKETED:
        with bound(res, a.dtype, executor.config) as call:
            _bucketed(call, res, plan, ops, layout)
        return out
    algorithm = Algorithm.CUBLAS_GROUPED if path is WeightGradPath.GROUPED else Algorithm.SEQUENTIAL
    executor.run(plan, ops, a.dtype, algorithm, res, layout=layout, sizes_dev=inp.tokens_per_expert)
    return out
