"""Layer 4: run a grouped GEMM with one of several cuBLAS strategies.

:class:`GroupedGemmExecutor` owns no GPU memory itself: the cuBLAS handle,
workspace and scratch buffers come from :mod:`._device`, one set per (device,
thread, stream), so one executor may be used from several threads at once.

Vocabulary: *rows* is the operand whose rows are grouped by expert (``a``),
*weights* the per-expert matrices (``b``), *out* the result. A
:class:`RowLayout` says where each expert's rows start in the rows/out
buffers: packed back to back (``align=1``, what ``gmm`` takes), each expert
padded to a multiple of ``align`` rows (the chunked layout), or every expert
at ``e * stride`` (the padded strided layout).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..runtime import cublas as _cublas
from ..runtime import device as _device
from ..runtime import nvrtc as _kernels
from ..runtime.arrays import ArrayView, as_cupy, cuda_dtype, view
from ..runtime.device import DeviceInfo, resolve_stream, resources
from .autotune import gmm_algorithm
from .config import Algorithm, GroupedGemmConfig, compute_type_for
from .plan import GemmPlan, check_group_sizes, host_group_sizes, plan_gmm
from .select import ProblemStats, capacity_for, choose_chunk_rows, packed_chunks, select_algorithm

__all__ = ["GroupedGemmExecutor", "RowLayout", "Operands"]


@dataclass(frozen=True)
class RowLayout:
    """Where expert e's rows start in the rows/out buffers.

    - ``stride``: at ``e * stride`` (padded strided layout, ``[E, stride, K]``);
    - otherwise packed, each expert's block rounded up to a multiple of ``align``.
    """

    align: int = 1
    stride: int = 0

    def algorithms(self) -> tuple[Algorithm, ...]:
        """Algorithms that can run on rows laid out this way."""
        if self.stride:
            return (Algorithm.PADDED_STRIDED, Algorithm.SEQUENTIAL)
        chunked = (Algorithm.CHUNKED_BATCHED,) if self.align > 1 else ()
        return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, *chunked)

    def offsets(self, sizes: np.ndarray) -> np.ndarray:
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        if self.stride:
            offsets[:] = np.arange(len(sizes) + 1) * self.stride
        else:
            np.cumsum(-(-sizes // self.align) * self.align, out=offsets[1:])
        return offsets


@dataclass(frozen=True)
class Operands:
    """Device addresses and byte strides of the three operands.

    Each operand's address for a group at row ``r`` of expert ``e`` is
    ``base + r * row_bytes + e * expert_bytes``.
    """

    a: int
    a_row_bytes: int
    a_expert_bytes: int
    b: int
    b_row_bytes: int
    b_expert_bytes: int
    c: int
    c_row_bytes: int
    c_expert_bytes: int

    @classmethod
    def for_plan(cls, plan: GemmPlan, a: int, b: int, c: int, itemsize: int) -> Operands:
        n, k = plan.n, plan.k
        if plan.trans_a:
            return cls(a, k * itemsize, 0, b, n * itemsize, 0, c, 0, k * n * itemsize)
        return cls(a, k * itemsize, 0, b, 0, k * n * itemsize, c, n * itemsize, 0)

    def at(self, row: int, expert: int) -> tuple[int, int, int]:
        return (
            self.a + row * self.a_row_bytes + expert * self.a_expert_bytes,
            self.b + row * self.b_row_bytes + expert * self.b_expert_bytes,
            self.c + row * self.c_row_bytes + expert * self.c_expert_bytes,
        )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _is_host(obj) -> bool:
    return not (hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__")) or isinstance(
        obj, np.ndarray
    )


def _zero_empty_groups(out_v: ArrayView, sizes: np.ndarray, stream: int) -> None:
    """Zero ``out[e]`` of every empty group (they take no part in the GEMM, and
    their ``a_e^T b_e`` is zero): one async memset per run of consecutive empty
    groups, so no index array has to be uploaded."""
    import cupy

    empty = sizes == 0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], empty.astype(np.int8), [0]))))
    group_bytes = out_v.nbytes // len(sizes)
    for start, stop in zip(edges[::2], edges[1::2]):
        cupy.cuda.runtime.memsetAsync(
            out_v.ptr + int(start) * group_bytes, 0, int(stop - start) * group_bytes, stream
        )


class GroupedGemmExecutor:
    """Runs grouped GEMMs on one device with a :class:`GroupedGemmConfig`.

    Parameters
    ----------
    device : int or None
        CUDA device ordinal. ``None``: each call runs on its arrays' device
        (else CuPy's current device) and plans with that device's
        capabilities, so one executor serves every GPU of the process.
    config : GroupedGemmConfig, dict or None
    device_info : DeviceInfo, optional
        Capabilities to plan for instead of querying the GPU (for planning
        and tests on machines without one), on every device. Executing
        still needs a GPU.
    """

    def __init__(self, device: int | None = None, config=None, *, device_info: DeviceInfo | None = None):
        if device is not None and (isinstance(device, bool) or not isinstance(device, int)):
            device = getattr(device, "id", device)
            if not isinstance(device, int):
                raise TypeError(f"device must be an int ordinal or None; got {type(device).__name__}")
        self.config = GroupedGemmConfig.coerce(config)
        self._device = device
        self._info = device_info

    # -- capabilities -------------------------------------------------------
    def info_for(self, device_id: int | None = None) -> DeviceInfo:
        """Capabilities of ``device_id`` (default :attr:`device_id`), or the
        ``device_info`` given at construction. Never kept: with several GPUs
        each call must plan for its own device."""
        if self._info is not None:
            return self._info
        return _device.device_info(self.device_id if device_id is None else device_id)

    @property
    def device_info(self) -> DeviceInfo:
        """Capabilities of :attr:`device_id`."""
        return self.info_for()

    @property
    def device_id(self) -> int:
        """The ordinal given at construction, else CuPy's current device (at each use)."""
        if self._device is not None:
            return self._device
        return self._info.device_id if self._info is not None else _device.current_device()

    def supports_grouped_gemm(self, device_id: int | None = None) -> bool:
        """Whether ``cublasGemmGroupedBatchedEx`` is available (cuBLAS >= 12.5)."""
        return self.info_for(device_id).supports_grouped_gemm()

    def select_algorithm(
        self,
        batch_size: int,
        active_experts: int,
        *,
        num_experts: int | None = None,
        n: int = 4096,
        k: int = 4096,
        dtype: str = "bfloat16",
        max_rows: int | None = None,
        padded_layouts: bool = False,
        device: int | None = None,
    ) -> Algorithm:
        """Algorithm for ``batch_size`` rows spread over ``active_experts`` experts
        on ``device`` (default :attr:`device_id`).

        The configured algorithm wins unless it is AUTO; a fixed algorithm
        the device cannot run falls back as :meth:`execute` would.
        """
        fixed = self.config.algorithm
        if fixed is not Algorithm.AUTO:
            return self._fallback(fixed, device)
        stats = ProblemStats(
            num_experts or max(active_experts, 1),
            active_experts,
            batch_size,
            max_rows if max_rows is not None else batch_size,
            n,
            k,
            dtype,
        )
        return select_algorithm(stats, self.info_for(device), padded_layouts=padded_layouts)

    def _fallback(self, algorithm: Algorithm, device_id: int | None = None) -> Algorithm:
        info = self.info_for(device_id)
        if algorithm is Algorithm.CUBLAS_GROUPED and not info.supports_grouped_gemm():
            _warn_once(
                f"cublasGemmGroupedBatchedEx needs cuBLAS >= 12.5 but {info.cublas_version} "
                "is loaded; running SEQUENTIAL instead"
            )
            return Algorithm.SEQUENTIAL
        return algorithm

    def _check_dtype_supported(self, dtype: np.dtype, device_id: int) -> None:
        info = self.info_for(device_id)
        if dtype.name == "bfloat16" and not info.supports_bfloat16():
            raise ValueError(
                f"bfloat16 needs SM 8.0 or newer; device {device_id} is SM {info.sm[0]}.{info.sm[1]}"
            )

    def compute_type(self, dtype: np.dtype) -> int:
        """cublasComputeType_t this executor uses for inputs of ``dtype``."""
        return compute_type_for(dtype, self.config.compute_precision, self.config.use_tensor_cores)

    # -- public entry points -------------------------------------------------
    def execute_grouped(
        self, a, b, group_sizes, *, trans_a: bool = False, trans_b: bool = False, out=None, stream=None
    ):
        """One ``cublasGemmGroupedBatchedEx`` call (SEQUENTIAL, with a one-time
        warning, where cuBLAS is older than 12.5). Same arguments as :func:`gmm`."""
        return self.execute(
            a,
            b,
            group_sizes,
            trans_a=trans_a,
            trans_b=trans_b,
            out=out,
            stream=stream,
            algorithm=Algorithm.CUBLAS_GROUPED,
        )

    def execute_sequential(
        self, a, b, group_sizes, *, trans_a: bool = False, trans_b: bool = False, out=None, stream=None
    ):
        """One ``cublasGemmEx`` per non-empty group. Same arguments as :func:`gmm`."""
        return self.execute(
            a,
            b,
            group_sizes,
            trans_a=trans_a,
            trans_b=trans_b,
            out=out,
            stream=stream,
            algorithm=Algorithm.SEQUENTIAL,
        )

    def execute(
        self,
        a,
        b,
        group_sizes,
        *,
        trans_a: bool = False,
        trans_b: bool = False,
        out=None,
        stream=None,
        algorithm: Algorithm | str | None = None,
    ):
        """Grouped GEMM on packed rows; see :func:`cublas_grouped.gmm` for the semantics.

        Returns ``out`` (allocated when ``None``).
        """
        a_v, b_v = view(a, "a"), view(b, "b")
        cuda_dtype(a_v.dtype, "a")
        cuda_dtype(b_v.dtype, "b")
        on_device = not _is_host(group_sizes)
        if on_device:
            sizes_v = view(group_sizes, "group_sizes")
            if sizes_v.ndim != 1 or sizes_v.dtype.kind not in "iu":
                raise ValueError(
                    f"group_sizes must be a 1-D integer array; got {sizes_v.dtype} {sizes_v.shape}"
                )
            num_groups = sizes_v.shape[0]
            host_sizes = None
        else:
            num_groups = len(group_sizes) if trans_a else (b_v.shape[0] if b_v.ndim == 3 else None)
            host_sizes = host_group_sizes(
                group_sizes, num_groups if num_groups is not None else len(group_sizes)
            )
        plan = plan_gmm(a_v, b_v, host_sizes, trans_a=trans_a, trans_b=trans_b, num_experts=num_groups)
        out_v = self._check_out(out, plan, a_v)
        # The call's device: its capabilities decide, not those of the device used first.
        device_id = a_v.device if a_v.device is not None else self.device_id
        self._check_dtype_supported(a_v.dtype, device_id)
        algorithm = Algorithm(algorithm) if algorithm is not None else self.config.algorithm
        if algorithm is Algorithm.PADDED_STRIDED:
            raise ValueError(
                "algorithm=PADDED_STRIDED needs the padded row layout of the MoE layer; gmm on "
                "packed rows supports AUTO, CUBLAS_GROUPED, SEQUENTIAL and CHUNKED_BATCHED"
            )
        if algorithm is Algorithm.CHUNKED_BATCHED and trans_a:
            raise ValueError(
                "algorithm=CHUNKED_BATCHED cannot run with trans_a: chunks would split the "
                "reduction over each group's rows"
            )
        # Checks done: GPU work from here on.
        import cupy

        res = resources(device_id, resolve_stream(stream, device_id))
        with cupy.cuda.Device(device_id), res.cupy_stream:
            sizes_dev = None
            if on_device:
                sizes_dev = as_cupy(group_sizes, "group_sizes")
                # cuBLAS takes sizes on the host: this copy waits for the stream.
                host = cupy.asnumpy(sizes_dev, stream=res.cupy_stream)  # blocking copy
                sizes = check_group_sizes(host.astype(np.int64), plan.num_experts, plan.total_rows)
                plan = plan_gmm(a_v, b_v, sizes, trans_a=trans_a, trans_b=trans_b, num_experts=num_groups)
            if out_v is None:
                out = cupy.empty(plan.out_shape, dtype=a_v.dtype)
                out_v = view(out, "out")
            if out_v.nbytes == 0:
                return out  # N = 0, M = 0, or K = 0 with trans_a: nothing to write
            if plan.zero_product:
                # cuBLAS refuses K = 0 (a zero leading dimension); the empty sum is zero.
                cupy.cuda.runtime.memsetAsync(out_v.ptr, 0, out_v.nbytes, res.stream)
                return out
            if plan.trans_a and len(plan.active) < plan.num_experts:
                _zero_empty_groups(out_v, plan.sizes, res.stream)
            if len(plan.active) == 0:
                return out
            if algorithm is Algorithm.AUTO:
                # Tables, else (once per shape class) timing the candidates on scratch
                # before this call, else the rules: see _autotune.
                ops = Operands.for_plan(plan, a_v.ptr, b_v.ptr, out_v.ptr, a_v.itemsize)
                info = self.info_for(device_id)
                algorithm = gmm_algorithm(self, info, plan, ops, a_v.dtype, res, sizes_dev)
            algorithm = self._fallback(algorithm, device_id)
            ops = Operands.for_plan(plan, a_v.ptr, b_v.ptr, out_v.ptr, a_v.itemsize)
            self.run(plan, ops, a_v.dtype, algorithm, res, sizes_dev=sizes_dev)
        return out

    def _check_out(self, out, plan: GemmPlan, a_v: ArrayView) -> ArrayView | None:
        if out is None:
            return None
        out_v = view(out, "out")
        if out_v.shape != plan.out_shape:
            raise ValueError(f"out must have shape {plan.out_shape}; got {out_v.shape}")
        if out_v.dtype != a_v.dtype:
            raise TypeError(f"out must have dtype {a_v.dtype}; got {out_v.dtype}")
        if not out_v.is_c_contiguous():
            raise ValueError(f"out must be C-contiguous; got strides {out_v.strides}")
        if out_v.ptr % out_v.itemsize:
            raise ValueError(f"out is misaligned: address {out_v.ptr:#x}")
        if a_v.device is not None and out_v.device is not None and out_v.device != a_v.device:
            raise ValueError(f"out is on device {out_v.device} but a is on device {a_v.device}")
        return out_v

    # -- algorithms ------------------------------------------------------------
    def run(
        self,
        plan: GemmPlan,
        ops: Operands,
        dtype: np.dtype,
        algorithm: Algorithm,
        res,
        *,
        layout: RowLayout = RowLayout(),
        sizes_dev=None,
    ) -> None:
        """Run a validated plan with ``algorithm`` on ``res``'s stream (no checks)."""
        handle = res.bind(self.config.workspace_mb << 20)
        data_type = cuda_dtype(dtype, "a")
        compute = self.compute_type(dtype)
        if not self.config.use_tensor_cores:
            _cublas.set_math_mode(handle, _cublas.MathMode.PEDANTIC)
        try:
            if algorithm is Algorithm.SEQUENTIAL:
                self._sequential(plan, ops, layout, handle, data_type, compute)
            elif algorithm is Algorithm.CUBLAS_GROUPED:
                self._grouped(plan, ops, layout, handle, data_type, compute, res, sizes_dev)
            elif algorithm is Algorithm.CHUNKED_BATCHED and layout.align == 1 and not layout.stride:
                self._chunked_packed(plan, ops, handle, data_type, compute, res)
            elif algorithm is Algorithm.CHUNKED_BATCHED:
                self._chunked(plan, ops, layout, layout.align, handle, data_type, compute, res, sizes_dev)
            elif algorithm is Algorithm.PADDED_STRIDED:
                self._strided(plan, ops, layout, handle, data_type, compute)
            else:
                raise ValueError(f"cannot run algorithm {algorithm}")
        finally:
            if not self.config.use_tensor_cores:
                _cublas.set_math_mode(handle, _cublas.MathMode.DEFAULT)

    def _sequential(self, plan, ops, layout, handle, data_type, compute) -> None:
        offsets = layout.offsets(plan.sizes)
        for e in plan.active:
            rows = int(plan.sizes[e])
            d = plan.dims(rows)
            a_ptr, b_ptr, c_ptr = ops.at(int(offsets[e]), int(e))
            # cuBLAS A is the weights side, B the rows side (see _plan).
            _cublas.gemm_ex(
                handle,
                d.transa,
                d.transb,
                d.m,
                d.n,
                d.k,
                1.0,
                b_ptr,
                data_type,
                d.lda,
                a_ptr,
                data_type,
                d.ldb,
                0.0,
                c_ptr,
                data_type,
                d.ldc,
                compute,
            )

    def _device_sizes(self, plan, res, sizes_dev):
        """int32 row counts on the device (uploaded when only the host has them)."""
        import cupy

        if sizes_dev is not None:
            return sizes_dev if sizes_dev.dtype == cupy.int32 else sizes_dev.astype(cupy.int32)
        return res.upload("sizes", plan.sizes.astype(np.int32))

    def build_pointers(
        self,
        res,
        sizes_dev,
        ops: Operands,
        layout: RowLayout,
        *,
        chunk_rows: int = 0,
        num_problems: int,
        num_slots: int = 0,
        scratch_c: int = 0,
        row_offsets=None,
        pointer_arrays=None,
    ) -> tuple[int, int, int]:
        """Fill device arrays of A/B/C pointers, one entry per problem, with the
        ``build_pointers`` kernel; returns the three arrays' device addresses.

        ``pointer_arrays`` (three uint64 device arrays) are written when given,
        else a reused per-stream buffer. Addresses, not array views, are passed
        around because slicing device arrays costs host time on every call.
        The kernel never writes past the entries the arrays hold (given
        arrays: their length, which must be at least ``max(num_problems,
        num_slots)`` or ``ValueError`` is raised; the per-stream buffer: that
        maximum), whatever the device counts say.
        """
        if layout.stride:
            raise ValueError("the padded strided layout needs no pointer arrays")
        num_entries = max(num_problems, num_slots)
        if pointer_arrays is None:
            capacity = num_entries
            base = res.buffer("pointers", 3 * 8 * max(capacity, 1)).data.ptr
            a_arr, b_arr, c_arr = (base + i * 8 * capacity for i in range(3))
        else:
            capacity = min(int(p.size) for p in pointer_arrays)
            if capacity < num_entries:
                raise ValueError(
                    f"pointer arrays hold {capacity} entries but {num_entries} problems need them"
                )
            a_arr, b_arr, c_arr = (int(p.data.ptr) for p in pointer_arrays)
        # Compiled for the device of this call's stream, not the executor's first one.
        arch = _kernels.arch_for(self.info_for(res.device_id).sm)
        kernel = _kernels.get_kernel("pointers", "build_pointers", arch)
        i32, i64, u64 = np.int32, np.int64, np.uint64
        args = (
            np.intp(sizes_dev.data.ptr),
            i32(len(sizes_dev)),
            i32(layout.align),
            i32(chunk_rows),
            i32(num_slots),
            i32(capacity),
            u64(ops.a),
            i64(ops.a_row_bytes),
            i64(ops.a_expert_bytes),
            u64(ops.b),
            i64(ops.b_row_bytes),
            i64(ops.b_expert_bytes),
            u64(ops.c),
            i64(ops.c_row_bytes),
            i64(ops.c_expert_bytes),
            u64(scratch_c),
            np.intp(a_arr),
            np.intp(b_arr),
            np.intp(c_arr),
            np.intp(row_offsets.data.ptr if row_offsets is not None else 0),
        )
        _kernels.launch(res.launch_stream, kernel, 1, 1024, args)
        return a_arr, b_arr, c_arr

    def _grouped(self, plan, ops, layout, handle, data_type, compute, res, sizes_dev) -> None:
        sizes32 = self._device_sizes(plan, res, sizes_dev)
        arrays = self.build_pointers(res, sizes32, ops, layout, num_problems=len(plan.active))
        self._grouped_call(handle, plan, plan.sizes[plan.active], arrays, data_type, compute)

    @staticmethod
    def _grouped_call(handle, plan, rows: np.ndarray, arrays, data_type, compute) -> None:
        """One ``cublasGemmGroupedBatchedEx``, one group per problem of ``rows`` rows."""
        a_arr, b_arr, c_arr = arrays
        count = len(rows)
        host = plan.dims_arrays(rows)
        ones = np.ones(count, dtype=np.int32)
        alpha = np.ones(count, dtype=np.float32)
        beta = np.zeros(count, dtype=np.float32)
        addr = lambda x: x.ctypes.data  # noqa: E731 - host arrays stay alive in this frame
        _cublas.gemm_grouped_batched_ex(
            handle, addr(host["transa"]), addr(host["transb"]), addr(host["m"]), addr(host["n"]),
            addr(host["k"]), addr(alpha), b_arr, data_type, addr(host["lda"]), a_arr, data_type,
            addr(host["ldb"]), addr(beta), c_arr, data_type, addr(host["ldc"]), count, addr(ones), compute,
        )  # fmt: skip

    def _chunked_packed(self, plan, ops, handle, data_type, compute, res) -> None:
        """CHUNKED_BATCHED on packed rows (``gmm``): groups of at least ``chunk``
        rows run as chunks whose last one overlaps (see ``packed_chunks``);
        smaller groups run in one grouped call (sequentially without one)."""
        chunk = self.config.chunk_rows or choose_chunk_rows(plan.sizes)
        starts, groups = packed_chunks(plan.sizes, plan.offsets, chunk)
        if len(starts):
            arrays = self._upload_pointers(res, "chunk-pointers", ops, starts, groups)
            self.batched(handle, plan.dims(chunk), arrays, len(starts), data_type, compute)
        small = np.flatnonzero((plan.sizes > 0) & (plan.sizes < chunk))
        if not len(small):
            return
        if self.supports_grouped_gemm(res.device_id):
            arrays = self._upload_pointers(res, "small-pointers", ops, plan.offsets[small], small)
            self._grouped_call(handle, plan, plan.sizes[small], arrays, data_type, compute)
        else:
            for e in small:
                d = plan.dims(int(plan.sizes[e]))
                a_ptr, b_ptr, c_ptr = ops.at(int(plan.offsets[e]), int(e))
                _cublas.gemm_ex(
                    handle,
                    d.transa,
                    d.transb,
                    d.m,
                    d.n,
                    d.k,
                    1.0,
                    b_ptr,
                    data_type,
                    d.lda,
                    a_ptr,
                    data_type,
                    d.ldb,
                    0.0,
                    c_ptr,
                    data_type,
                    d.ldc,
                    compute,
                )

    @staticmethod
    def _upload_pointers(res, name: str, ops: Operands, rows: np.ndarray, experts: np.ndarray):
        """Device pointer arrays (rows, weights, out) for problems at ``rows`` of
        ``experts``, computed on the host and uploaded in one asynchronous copy."""
        table = np.empty((3, len(rows)), dtype=np.uint64)
        for i, (base, row_bytes, expert_bytes) in enumerate(
            (
                (ops.a, ops.a_row_bytes, ops.a_expert_bytes),
                (ops.b, ops.b_row_bytes, ops.b_expert_bytes),
                (ops.c, ops.c_row_bytes, ops.c_expert_bytes),
            )
        ):
            table[i] = base + rows * row_bytes + experts * expert_bytes
        base = res.upload(name, table).data.ptr
        return base, base + 8 * len(rows), base + 16 * len(rows)

    def _chunked(self, plan, ops, layout, chunk, handle, data_type, compute, res, sizes_dev) -> None:
        sizes32 = self._device_sizes(plan, res, sizes_dev)
        count = int((-(-plan.sizes // chunk)).sum())
        a_arr, b_arr, c_arr = self.build_pointers(
            res, sizes32, ops, layout, chunk_rows=chunk, num_problems=count
        )
        self.batched(handle, plan.dims(chunk), (a_arr, b_arr, c_arr), count, data_type, compute)

    @staticmethod
    def batched(handle, d, pointer_arrays, count, data_type, compute) -> None:
        """One ``cublasGemmBatchedEx`` over device pointer arrays (addresses: rows, weights, out)."""
        a_arr, b_arr, c_arr = pointer_arrays
        _cublas.gemm_batched_ex(
            handle, d.transa, d.transb, d.m, d.n, d.k, 1.0, b_arr, data_type, d.lda,
            a_arr, data_type, d.ldb, 0.0, c_arr, data_type, d.ldc, count, compute,
        )  # fmt: skip

    def _strided(self, plan, ops, layout, handle, data_type, compute) -> None:
        cap = layout.stride
        d = plan.dims(cap)
        itemsize = np.dtype(np.float32).itemsize if data_type == _cublas.DataType.R_32F else 2
        _cublas.gemm_strided_batched_ex(
            handle,
            d.transa,
            d.transb,
            d.m,
            d.n,
            d.k,
            1.0,
            ops.b,
            data_type,
            d.lda,
            ops.b_expert_bytes // itemsize,
            ops.a,
            data_type,
            d.ldb,
            cap * ops.a_row_bytes // itemsize,
            0.0,
            ops.c,
            data_type,
            d.ldc,
            cap * ops.c_row_bytes // itemsize,
            plan.num_experts,
            compute,
        )

    def layout_for(self, algorithm: Algorithm, sizes: np.ndarray) -> RowLayout:
        """Row layout an algorithm needs for these host sizes."""
        if algorithm is Algorithm.CHUNKED_BATCHED:
            return RowLayout(align=self.config.chunk_rows or choose_chunk_rows(sizes))
        if algorithm is Algorithm.PADDED_STRIDED:
            return RowLayout(stride=capacity_for(sizes))
        return RowLayout()
