"""The cuBLAS back end: every algorithm as free functions over a validated plan.

In cuBLAS's column-major terms each group computes ``out^T = op(W)^T @ rows^T``,
so the cuBLAS A operand is the weights side and B the rows side (see
:meth:`GemmPlan.dims`). Nothing here checks arguments or synchronizes: the
executor checked, and every call is queued on the stream of ``res`` (the
stream's resources from ``runtime.device.resources``).

Which layout each algorithm runs on is :func:`.plan.layout_for`'s rule:

- SEQUENTIAL: one ``cublasGemmEx`` per non-empty expert, on any layout;
- CUBLAS_GROUPED: one ``cublasGemmGroupedBatchedEx``, grouped-contiguous or
  chunk-aligned rows;
- CHUNKED_BATCHED: one ``cublasGemmBatchedEx`` over C-row chunks of
  chunk-aligned rows, or, on grouped-contiguous rows (``gmm``), over chunks
  whose last one overlaps, with the smaller groups in one grouped call;
- PADDED_STRIDED: one ``cublasGemmStridedBatchedEx`` over padded capacity.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ...runtime import cublas as _cublas
from ...runtime import nvrtc as _kernels
from ...runtime.arrays import cuda_dtype
from ...runtime.device import DeviceInfo
from ...runtime.nvrtc import arch_for
from ..config import Algorithm, GroupedGemmConfig, compute_type_for
from ..plan import CublasDims, GemmPlan, Operands, RowLayout, choose_chunk_rows, packed_chunks
from ..pointers import (
    POINTER_THREADS,
    SIGNATURE,
    build_pointers,
    device_sizes,
    pointer_kernel,
    upload_pointers,
)

__all__ = [
    "CublasCall",
    "bound",
    "run",
    "sequential",
    "grouped",
    "chunk_aligned_batched",
    "chunked_contiguous",
    "padded_strided",
    "batched",
    "grouped_call",
    "PreparedGrouped",
    "PreparedDeviceGrouped",
]


@dataclass(frozen=True)
class CublasCall:
    """What the cuBLAS calls of one run share: the stream's handle, the
    element type (cudaDataType_t) and the compute type (cublasComputeType_t)."""

    handle: int
    data_type: int
    compute: int


class bound:
    """``res``'s cuBLAS handle set up for ``config`` (workspace, math mode) and
    inputs of ``dtype``, as a context manager yielding a :class:`CublasCall`.
    Pedantic math (``use_tensor_cores=False``) is undone on exit: the handle is
    shared by everything on the stream. (A class, not a generator: it is
    entered on every step of the fixed-capacity layer.)"""

    __slots__ = ("_call", "_pedantic")

    def __init__(self, res, dtype, config: GroupedGemmConfig):
        handle = res.bind(config.workspace_mb << 20)
        self._call = CublasCall(handle, cuda_dtype(dtype, "a"), _compute(dtype, config))
        self._pedantic = not config.use_tensor_cores

    def __enter__(self) -> CublasCall:
        if self._pedantic:
            _cublas.set_math_mode(self._call.handle, _cublas.MathMode.PEDANTIC)
        return self._call

    def __exit__(self, *exc) -> None:
        if self._pedantic:
            _cublas.set_math_mode(self._call.handle, _cublas.MathMode.DEFAULT)


def run(
    plan: GemmPlan,
    ops: Operands,
    dtype,
    algorithm: Algorithm,
    res,
    *,
    config: GroupedGemmConfig,
    info: DeviceInfo,
    layout: RowLayout | None = None,
    sizes_dev=None,
) -> None:
    """Run ``plan`` with ``algorithm`` on rows laid out as ``layout``.

    ``layout`` defaults to grouped-contiguous rows; ``info`` is the device of
    ``res``'s stream; ``sizes_dev`` the row counts on the device when the
    caller has them (else they are uploaded where a kernel needs them).
    """
    layout = layout or _CONTIGUOUS
    if config.use_tensor_cores:
        # Nothing to undo afterwards: the handle needs no context manager.
        call = CublasCall(
            res.bind(config.workspace_mb << 20), cuda_dtype(dtype, "a"), _compute(dtype, config)
        )
        _run(call, plan, ops, algorithm, res, config, info, layout, sizes_dev)
        return
    with bound(res, dtype, config) as call:
        _run(call, plan, ops, algorithm, res, config, info, layout, sizes_dev)


_CONTIGUOUS = RowLayout.contiguous()
_compute_types: dict[tuple, int] = {}


def _compute(dtype, config: GroupedGemmConfig) -> int:
    """compute_type_for(dtype, config's precision and math), remembered."""
    key = (dtype, config.compute_precision, config.use_tensor_cores)
    compute = _compute_types.get(key)
    if compute is None:
        compute = _compute_types[key] = compute_type_for(
            dtype, config.compute_precision, config.use_tensor_cores
        )
    return compute


_arches: dict[tuple, str] = {}


def _arch(sm: tuple) -> str:
    arch = _arches.get(sm)
    if arch is None:
        arch = _arches[sm] = arch_for(sm)
    return arch


def _run(call, plan, ops, algorithm, res, config, info, layout, sizes_dev) -> None:
    if algorithm is Algorithm.SEQUENTIAL:
        sequential(call, plan, ops, layout)
    elif algorithm is Algorithm.CUBLAS_GROUPED:
        grouped(call, plan, ops, layout, res, sizes_dev=sizes_dev, arch=_arch(info.sm))
    elif algorithm is Algorithm.CHUNKED_BATCHED and layout.align == 1 and not layout.stride:
        chunk = config.chunk_rows or choose_chunk_rows(plan.sizes)
        chunked_contiguous(call, plan, ops, res, chunk, grouped_ok=info.supports_grouped_gemm())
    elif algorithm is Algorithm.CHUNKED_BATCHED:
        chunk_aligned_batched(call, plan, ops, layout, res, sizes_dev=sizes_dev, arch=_arch(info.sm))
    elif algorithm is Algorithm.PADDED_STRIDED:
        padded_strided(call, plan, ops, layout)
    else:
        raise ValueError(f"cannot run algorithm {algorithm}")


def _gemm_ex(call: CublasCall, d: CublasDims, a_ptr: int, b_ptr: int, c_ptr: int) -> None:
    _cublas.gemm_ex(
        call.handle, d.transa, d.transb, d.m, d.n, d.k, 1.0, b_ptr, call.data_type, d.lda,
        a_ptr, call.data_type, d.ldb, 0.0, c_ptr, call.data_type, d.ldc, call.compute,
    )  # fmt: skip


def sequential(call: CublasCall, plan: GemmPlan, ops: Operands, layout: RowLayout, experts=None) -> None:
    """One ``cublasGemmEx`` per expert of ``experts`` (default: every non-empty one)."""
    offsets = layout.offsets(plan.sizes)
    for e in plan.active if experts is None else experts:
        a_ptr, b_ptr, c_ptr = ops.at(int(offsets[e]), int(e))
        _gemm_ex(call, plan.dims(int(plan.sizes[e])), a_ptr, b_ptr, c_ptr)


def grouped(
    call: CublasCall, plan: GemmPlan, ops: Operands, layout: RowLayout, res, *, sizes_dev=None, arch=None
) -> None:
    """One ``cublasGemmGroupedBatchedEx``, one group per non-empty expert; the
    pointers are built on the device from the counts."""
    if sizes_dev is None:
        # The counts are on the host only: one upload of the pointers themselves
        # costs less host time than uploading the counts and launching the kernel.
        starts = layout.offsets(plan.sizes)[plan.active]
        arrays = upload_pointers(res, "grouped-pointers", ops, starts, plan.active)
    else:
        sizes32 = device_sizes(plan, res, sizes_dev)
        arrays = build_pointers(res, sizes32, ops, layout, arch=arch, num_problems=len(plan.active))
    grouped_call(call, plan, plan.sizes[plan.active], arrays)


_local = threading.local()


def _group_arrays(plan: GemmPlan, rows: np.ndarray) -> dict[str, int]:
    """Addresses of the host arrays of one grouped call (per-group dims, alpha, beta, group sizes),
    from a per-thread cache: only the rows change between calls of one shape.
    cuBLAS reads them during the call, so the next call may overwrite them."""
    cache = getattr(_local, "group_arrays", None)
    if cache is None:
        cache = _local.group_arrays = {}
    count = len(rows)
    key = (count, plan.n, plan.k, plan.trans_a, plan.trans_b)
    arrays = cache.get(key)
    if arrays is None:
        if len(cache) > 256:
            cache.clear()
        arrays = plan.dims_arrays(rows)
        arrays["group_size"] = np.ones(count, dtype=np.int32)
        arrays["alpha"] = np.ones(count, dtype=np.float32)
        arrays["beta"] = np.zeros(count, dtype=np.float32)
        # Their addresses, taken once (``ndarray.ctypes`` costs a microsecond each time).
        addresses = {name: a.ctypes.data for name, a in arrays.items()}
        cache[key] = (arrays, addresses)
        return addresses
    arrays, addresses = arrays
    # Exactly one of m/n/k carries the group's rows (see GemmPlan.dims_arrays).
    arrays["k" if plan.trans_a else "n"][:] = rows
    return addresses


def grouped_call(call: CublasCall, plan: GemmPlan, rows: np.ndarray, arrays) -> None:
    """One ``cublasGemmGroupedBatchedEx``, one group per problem of ``rows`` rows,
    over device pointer arrays (addresses: rows, weights, out)."""
    a_arr, b_arr, c_arr = arrays
    count = len(rows)
    h = _group_arrays(plan, rows)  # addresses of arrays the per-thread cache keeps alive
    t = call.data_type
    _cublas.gemm_grouped_batched_ex(
        call.handle, h["transa"], h["transb"], h["m"], h["n"], h["k"], h["alpha"], b_arr, t, h["lda"],
        a_arr, t, h["ldb"], h["beta"], c_arr, t, h["ldc"], count, h["group_size"], call.compute,
    )  # fmt: skip


def _grouped_host_args(plan: GemmPlan, dtype, config: GroupedGemmConfig):
    """The host arrays of one grouped call over ``plan``'s active groups (one
    problem per group), and the call's arguments after the pointer arrays:
    (arrays, args). The caller keeps ``arrays`` alive: cuBLAS reads them
    during each call."""
    count = len(plan.active)
    arrays = plan.dims_arrays(plan.sizes[plan.active])
    arrays["group_size"] = np.ones(count, dtype=np.int32)
    arrays["alpha"] = np.ones(count, dtype=np.float32)
    arrays["beta"] = np.zeros(count, dtype=np.float32)
    h = {name: a.ctypes.data for name, a in arrays.items()}
    t = cuda_dtype(dtype, "a")
    args = (h["transa"], h["transb"], h["m"], h["n"], h["k"], h["alpha"], t, h["lda"], h["ldb"],
            h["beta"], h["ldc"], count, h["group_size"], _compute(dtype, config))  # fmt: skip
    return arrays, args


class PreparedGrouped:
    """CUBLAS_GROUPED of one plan on grouped-contiguous rows with host sizes,
    prepared once (for the plan cache of eager calls, ``gemm.call_cache``): the
    per-group host arrays, the pointer table's offsets, the types and the entry
    point. A call adds the three base addresses to the offsets and uploads the
    table into a device buffer of its own (skipped when the addresses are the
    last call's: CuPy's pool often hands a decode loop the same blocks), then
    calls cuBLAS: what :func:`run` does for this case, minus the work that
    depends only on the plan. Not thread-safe, and bound to one stream (its
    table is reused, in stream order): the plan cache keys entries by stream
    and keeps them per thread. ``config.use_tensor_cores`` must be True.
    """

    def __init__(self, plan: GemmPlan, dtype, config: GroupedGemmConfig):
        active = plan.active
        count = len(active)
        ops = Operands.for_plan(plan, 0, 0, 0, np.dtype(dtype).itemsize)
        self._offsets = np.array(ops.at(plan.offsets[active], active), dtype=np.uint64)  # [3, count]
        self._bases = np.zeros((3, 1), dtype=np.uint64)
        self._table = np.empty((3, count), dtype=np.uint64)
        self._flat = self._table.reshape(-1)
        self._device_table = None  # uint64 [3 * count] on the device, made at the first call
        self._last = None  # the base addresses the device table holds
        self._host, self._args = _grouped_host_args(plan, dtype, config)
        self._fn = _cublas.entry_point(_cublas.GROUPED_SYMBOL)
        self._workspace = config.workspace_mb << 20
        self._step = 8 * count

    def __call__(self, res, sizes_dev, a: int, b: int, c: int) -> None:
        """Queue the product of rows at ``a``, weights at ``b``, out at ``c`` on
        ``res``'s stream (whose device must be current); ``sizes_dev`` is unused
        (the sizes are the plan's), as in :class:`PreparedDeviceGrouped`'s call."""
        bases = (a, b, c)
        if bases != self._last:
            if self._device_table is None:
                import cupy

                self._device_table = cupy.empty(self._flat.size, dtype=cupy.uint64)
            self._last = None  # unknown until the copy is queued
            self._bases[:, 0] = bases
            np.add(self._offsets, self._bases, out=self._table)
            res.copy_to_device(self._device_table.data.ptr, self._flat)
            self._last = bases
        rows = self._device_table.data.ptr  # the rows, weights and out tables, back to back
        weights, out = rows + self._step, rows + 2 * self._step
        ta, tb, m, n, k, alpha, t, lda, ldb, beta, ldc, count, sizes, compute = self._args
        handle = res.bind(self._workspace)
        status = self._fn(
            handle, ta, tb, m, n, k, alpha, weights, t, lda, rows, t, ldb, beta, out, t, ldc, count, sizes, compute
        )  # fmt: skip
        _cublas.check_status(status, _cublas.GROUPED_SYMBOL)


class PreparedDeviceGrouped:
    """CUBLAS_GROUPED of one plan with the sizes on the device (the MoE layer's
    GEMMs: the counts are on both sides), prepared once per plan: the pointer
    kernel's constant arguments, the per-group host arrays and the entry point.
    A call launches the pointer kernel (``gemm.pointers.build_pointers``'s work)
    and calls cuBLAS: what :func:`run` does for this case. ``layout`` is
    grouped-contiguous or chunk-aligned; ``config.use_tensor_cores`` must be
    True; the operands must be 16-byte aligned (the caller checks)."""

    def __init__(self, plan: GemmPlan, layout: RowLayout, dtype, config: GroupedGemmConfig, arch: str):
        self._count = len(plan.active)
        self._kernel = pointer_kernel(arch)
        itemsize = np.dtype(dtype).itemsize
        self._strides = Operands.for_plan(plan, 0, 0, 0, itemsize)
        self._layout = (len(plan.sizes), layout.align)
        self._host, self._args = _grouped_host_args(plan, dtype, config)
        self._fn = _cublas.entry_point(_cublas.GROUPED_SYMBOL)
        self._workspace = config.workspace_mb << 20

    def __call__(self, res, sizes_dev, a: int, b: int, c: int) -> None:
        """Queue the product on ``res``'s stream: rows at ``a``, weights at ``b``,
        out at ``c``, int32 sizes ``sizes_dev`` (a CuPy array) on the device."""
        count, s = self._count, self._strides
        table = res.buffer("pointers", 24 * max(count, 1)).data.ptr
        rows, weights, out = table, table + 8 * count, table + 16 * count
        experts, align = self._layout
        _kernels.launch_signed(
            res.launch_stream, self._kernel, 1, POINTER_THREADS, SIGNATURE,
            (sizes_dev.data.ptr, experts, align, 0, 0, count, a, s.a_row_bytes, s.a_expert_bytes,
             b, s.b_row_bytes, s.b_expert_bytes, c, s.c_row_bytes, s.c_expert_bytes, 0, rows, weights, out, 0),
        )  # fmt: skip
        ta, tb, m, n, k, alpha, t, lda, ldb, beta, ldc, count, sizes, compute = self._args
        handle = res.bind(self._workspace)
        status = self._fn(
            handle, ta, tb, m, n, k, alpha, weights, t, lda, rows, t, ldb, beta, out, t, ldc, count, sizes, compute
        )  # fmt: skip
        _cublas.check_status(status, _cublas.GROUPED_SYMBOL)


def batched(call: CublasCall, d: CublasDims, pointer_arrays, count: int) -> None:
    """One ``cublasGemmBatchedEx`` of ``count`` equal problems over device pointer
    arrays (addresses: rows, weights, out)."""
    a_arr, b_arr, c_arr = pointer_arrays
    t = call.data_type
    _cublas.gemm_batched_ex(
        call.handle, d.transa, d.transb, d.m, d.n, d.k, 1.0, b_arr, t, d.lda,
        a_arr, t, d.ldb, 0.0, c_arr, t, d.ldc, count, call.compute,
    )  # fmt: skip


def chunk_aligned_batched(
    call: CublasCall, plan: GemmPlan, ops: Operands, layout: RowLayout, res, *, sizes_dev=None, arch=None
) -> None:
    """CHUNKED_BATCHED on chunk-aligned rows: every expert's block cut into
    ``layout.align``-row chunks, all in one batched call."""
    chunk = layout.align
    sizes32 = device_sizes(plan, res, sizes_dev)
    count = int((-(-plan.sizes // chunk)).sum())
    arrays = build_pointers(res, sizes32, ops, layout, arch=arch, chunk_rows=chunk, num_problems=count)
    batched(call, plan.dims(chunk), arrays, count)


def chunked_contiguous(
    call: CublasCall, plan: GemmPlan, ops: Operands, res, chunk: int, *, grouped_ok: bool
) -> None:
    """CHUNKED_BATCHED on grouped-contiguous rows (``gmm``): groups of at least
    ``chunk`` rows run as chunks whose last one overlaps (see :func:`packed_chunks`);
    smaller groups run in one grouped call (``grouped_ok``), else one by one."""
    starts, groups = packed_chunks(plan.sizes, plan.offsets, chunk)
    small = np.flatnonzero((plan.sizes > 0) & (plan.sizes < chunk))
    # Both pointer tables are uploaded before the first GEMM, so a failed upload
    # (out of memory) leaves the output as it was.
    chunks = upload_pointers(res, "chunk-pointers", ops, starts, groups) if len(starts) else None
    smalls = (
        upload_pointers(res, "small-pointers", ops, plan.offsets[small], small)
        if grouped_ok and len(small)
        else None
    )
    if len(starts):
        batched(call, plan.dims(chunk), chunks, len(starts))
    if not len(small):
        return
    if grouped_ok:
        grouped_call(call, plan, plan.sizes[small], smalls)
    else:
        sequential(call, plan, ops, RowLayout.contiguous(), experts=small)


def padded_strided(call: CublasCall, plan: GemmPlan, ops: Operands, layout: RowLayout) -> None:
    """One ``cublasGemmStridedBatchedEx`` over padded capacity: every expert
    computes ``layout.stride`` rows, padding included."""
    cap = layout.stride
    d = plan.dims(cap)
    itemsize = np.dtype(np.float32).itemsize if call.data_type == _cublas.DataType.R_32F else 2
    _cublas.gemm_strided_batched_ex(
        call.handle, d.transa, d.transb, d.m, d.n, d.k, 1.0,
        ops.b, call.data_type, d.lda, ops.b_expert_bytes // itemsize,
        ops.a, call.data_type, d.ldb, cap * ops.a_row_bytes // itemsize,
        0.0, ops.c, call.data_type, d.ldc, cap * ops.c_row_bytes // itemsize,
        plan.num_experts, call.compute,
    )  # fmt: skip
