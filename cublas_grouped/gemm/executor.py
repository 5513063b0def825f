"""Layer 4: the grouped GEMM executor: check the arguments, choose the
algorithm, hand the plan to a back end.

:class:`GroupedGemmExecutor` owns no GPU memory itself: the cuBLAS handle,
workspace and scratch buffers come from ``runtime.device.resources``, one set
per (device, thread, stream), so one executor may be used from several threads
at once. What it runs is described in :mod:`.plan` (shapes, row layouts,
addresses); how each algorithm runs lives in :mod:`.backends`; AUTO asks
:mod:`.select` and :mod:`.autotune`.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..runtime import device as _device
from ..runtime.arrays import ArrayView, as_cupy, cuda_dtype, is_host_array, view
from ..runtime.device import DeviceInfo, resolve_stream, resources
from ..runtime.nvrtc import arch_for
from . import call_cache as _cache
from .autotune import gmm_algorithm
from .backends import cublas as _cublas_backend
from .backends import hopper as _hopper_backend
from .backends.hopper_device import PreparedDeviceSizes, PreparedHostSizes
from .backends.hopper_sizes import checks_device_sizes
from .config import Algorithm, GroupedGemmConfig, compute_type_for
from .plan import (
    GemmPlan,
    Operands,
    ProblemStats,
    RowLayout,
    check_group_sizes,
    host_group_sizes,
    layout_for,
    misaligned,
    plan_gmm,
)
from .select import select_algorithm

__all__ = ["GroupedGemmExecutor"]

_warned: set[str] = set()


# cuBLAS's grouped and batched calls take their matrices through arrays of
# device pointers, which it cannot inspect: it picks kernels from the leading
# dimensions and assumes the pointers are aligned to match. On an H100 with
# cuBLAS 13.1, bf16 operands 2 bytes past a 16-byte boundary (views one
# element into a buffer) made CUBLAS_GROUPED and CHUNKED_BATCHED fault with a
# misaligned address (a sticky error that ends the CUDA context), while
# SEQUENTIAL (cublasGemmEx, which sees each pointer) gave right results. So
# those algorithms need 16-byte aligned operands and SEQUENTIAL runs otherwise.
POINTER_ARRAY_ALIGNMENT = 16
_POINTER_ARRAY_ALGORITHMS = frozenset({Algorithm.CUBLAS_GROUPED, Algorithm.CHUNKED_BATCHED})


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _is_host(obj) -> bool:
    return is_host_array(obj)  # torch CPU tensors and JAX CPU arrays included


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
            return self.fallback(fixed, device)
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

    def fallback(self, algorithm: Algorithm, device_id: int | None = None) -> Algorithm:
        """``algorithm``, or what runs in its place on ``device_id`` (default
        :attr:`device_id`): SEQUENTIAL for CUBLAS_GROUPED where cuBLAS is older
        than 12.5, with a one-time warning."""
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
        """Grouped GEMM on grouped-contiguous rows; see :func:`cublas_grouped.gmm` for the semantics.

        Returns ``out`` (allocated when ``None``). A call whose key (shapes,
        dtypes, strides, alignment, device, stream, sizes, options) a checked
        call of this thread had already skips the checks and choices
        (:mod:`.call_cache` says what is keyed and why that is complete).
        """
        key, handle = _cache.call_key(self, a, b, group_sizes, trans_a, trans_b, out, stream, algorithm)
        copied = None
        if key is not None:
            entry = _cache.lookup(key, self.config)
            if entry is not None and entry.action is _cache.COPY_SIZES:
                import cupy

                # cuBLAS takes sizes on the host: this copy waits for the stream.
                copied = cupy.asnumpy(group_sizes, stream=resources(entry.device_id, handle).cupy_stream)
                entry = _cache.lookup((*key, copied.dtype.str, copied.tobytes()), self.config)
            if entry is not None:
                return self._run_cached(entry, handle, stream is None, a, b, group_sizes, out)
        return self._execute_checked(a, b, group_sizes, trans_a, trans_b, out, stream, algorithm, key, copied)

    def _run_cached(self, entry: _cache.CachedCall, handle: int, current: bool, a, b, group_sizes, out):
        import cupy

        res = resources(entry.device_id, handle)
        sizes_dev = group_sizes if entry.device_sizes else None
        if current and cupy.cuda.runtime.getDevice() == entry.device_id:
            # The caller's current device and stream already: nothing to switch.
            return self._launch(entry, res, a.data.ptr, b.data.ptr, out, sizes_dev)
        with cupy.cuda.Device(entry.device_id), res.cupy_stream:
            return self._launch(entry, res, a.data.ptr, b.data.ptr, out, sizes_dev)

    def _launch(self, entry: _cache.CachedCall, res, a_ptr: int, b_ptr: int, out, sizes_dev):
        """The GPU work of a checked (or cached) call, on ``res``'s stream and
        device, which the caller has made current. Returns ``out``."""
        import cupy

        if out is None:
            out = cupy.ndarray(entry.out_shape, entry.dtype)
        # ``out`` may be any GPU array (a torch tensor): its address through the interface.
        out_v = None if type(out) is cupy.ndarray else view(out, "out")
        out_ptr = out.data.ptr if out_v is None else out_v.ptr
        action = entry.action
        if action is _cache.RUN:
            if entry.prepared is not None:
                entry.prepared(res, sizes_dev, a_ptr, b_ptr, out_ptr)
            else:
                plan = entry.plan
                ops = Operands.for_plan(plan, a_ptr, b_ptr, out_ptr, entry.dtype.itemsize)
                self.run(plan, ops, entry.dtype, entry.algorithm, res, sizes_dev=sizes_dev)
        elif action is _cache.ZERO:
            nbytes = out.nbytes if out_v is None else out_v.nbytes
            cupy.cuda.runtime.memsetAsync(out_ptr, 0, nbytes, res.stream)
        if entry.zero_groups:
            # After the GEMMs: a call that fails (out of memory) leaves out as it was.
            _zero_empty_groups(view(out, "out"), entry.plan.sizes, res.stream)
        return out

    def _execute_checked(self, a, b, group_sizes, trans_a, trans_b, out, stream, algorithm, key, copied):
        """:meth:`execute` with every check; stores what it decided under ``key``."""
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
        if (
            on_device and num_groups != plan.num_experts
        ):  # the length needs no copy: checked here for every path
            raise ValueError(f"group_sizes has {num_groups} entries but b has {plan.num_experts} groups")
        out_v = self._check_out(out, plan, a_v)
        # The call's device: its capabilities decide, not those of the device used first.
        device_id = a_v.device if a_v.device is not None else self.device_id
        self._check_dtype_supported(a_v.dtype, device_id)
        algorithm = Algorithm(algorithm) if algorithm is not None else self.config.algorithm
        if algorithm is Algorithm.PADDED_STRIDED:
            raise ValueError(
                "algorithm=PADDED_STRIDED needs the padded row layout of the MoE layer (padded capacity); "
                "gmm on grouped-contiguous rows supports AUTO, CUBLAS_GROUPED, SEQUENTIAL and CHUNKED_BATCHED"
            )
        if algorithm is Algorithm.CHUNKED_BATCHED and trans_a:
            raise ValueError(
                "algorithm=CHUNKED_BATCHED cannot run with trans_a: chunks would split the "
                "reduction over each group's rows"
            )
        # Checks done: GPU work from here on.
        import cupy

        entry = _cache.CachedCall(
            self.config, _cache.RUN, plan, algorithm, a_v.dtype, device_id, plan.out_shape
        )
        res = resources(device_id, resolve_stream(stream, device_id))
        with cupy.cuda.Device(device_id), res.cupy_stream:
            out_ptr = out_v.ptr if out_v is not None else 0  # a fresh out is aligned
            if (
                on_device
                and sizes_v.is_c_contiguous()  # the kernels read E consecutive sizes
                and self._sizes_stay_on_device(
                    algorithm, plan, a_v.dtype, device_id, (a_v.ptr, b_v.ptr, out_ptr)
                )
            ):
                # The sm90 kernel reads the sizes where they are: no copy, no sync
                # (backends/hopper_sizes.py: what is guaranteed without a check).
                if algorithm is Algorithm.AUTO:
                    entry.auto_state = _cache.choice_state()  # CUBLAS_GROUPED_CHECK_DEVICE_SIZES among it
                entry.algorithm, entry.device_sizes = Algorithm.SM90_GROUPED, True
                entry.action = _cache.ZERO if plan.zero_product else _cache.RUN
                if 0 in plan.out_shape:
                    entry.action = _cache.EMPTY
                elif entry.action is _cache.RUN:
                    entry.prepared = PreparedDeviceSizes(plan, a_v.dtype)
                _cache.store(key, entry)
                return self._launch(entry, res, a_v.ptr, b_v.ptr, out, as_cupy(group_sizes, "group_sizes"))
            sizes_dev = None
            if on_device:
                copy = _cache.CachedCall(self.config, _cache.COPY_SIZES, device_id=device_id)
                if algorithm is Algorithm.AUTO:  # AUTO may not copy once the check variable is unset
                    copy.auto_state = _cache.choice_state()
                _cache.store(key, copy)
                sizes_dev = as_cupy(group_sizes, "group_sizes")
                if copied is None:
                    # cuBLAS takes sizes on the host: this copy waits for the stream.
                    copied = cupy.asnumpy(sizes_dev, stream=res.cupy_stream)  # blocking copy
                key = None if key is None else (*key, copied.dtype.str, copied.tobytes())
                sizes = check_group_sizes(copied.astype(np.int64), plan.num_experts, plan.total_rows)
                plan = plan_gmm(a_v, b_v, sizes, trans_a=trans_a, trans_b=trans_b, num_experts=num_groups)
                entry.plan, entry.device_sizes = plan, True
            if out_v is None:
                out = cupy.ndarray(plan.out_shape, a_v.dtype)
                out_v = view(out, "out")
            if out_v.nbytes == 0:
                entry.action = _cache.EMPTY  # N = 0, M = 0, or K = 0 with trans_a: nothing to write
            elif plan.zero_product:
                # cuBLAS refuses K = 0 (a zero leading dimension); the empty sum is zero.
                entry.action = _cache.ZERO
            elif len(plan.active) == 0:
                entry.action, entry.zero_groups = _cache.SKIP, plan.trans_a
            else:
                if algorithm is Algorithm.AUTO:
                    # Tables, else (once per shape class) timing the candidates on scratch
                    # before this call, else the rules: see .autotune.
                    entry.auto_state = _cache.choice_state()  # before choosing: a measurement changes it
                    ops = Operands.for_plan(plan, a_v.ptr, b_v.ptr, out_v.ptr, a_v.itemsize)
                    info = self.info_for(device_id)
                    algorithm = gmm_algorithm(self, info, plan, ops, a_v.dtype, res, sizes_dev)
                entry.algorithm = self.fallback(algorithm, device_id)
                entry.zero_groups = plan.trans_a and len(plan.active) < plan.num_experts
                entry.prepared = self._prepare(entry, res, a_v.ptr, b_v.ptr, out_v.ptr, sizes_dev)
            _cache.store(key, entry)
            return self._launch(entry, res, a_v.ptr, b_v.ptr, out, sizes_dev)

    def _prepare(self, entry: _cache.CachedCall, res, a_ptr: int, b_ptr: int, out_ptr: int, sizes_dev):
        """The back end's prepared call for ``entry``, where one exists: CUBLAS_GROUPED
        with aligned operands, on host sizes or on int32 device sizes (what
        :meth:`run` would do the same way); SM90_GROUPED on host sizes."""
        if entry.algorithm is Algorithm.SM90_GROUPED and sizes_dev is None:
            sm = self.info_for(entry.device_id).sm
            return PreparedHostSizes.for_call(res, entry.plan, entry.dtype, sm, (a_ptr, b_ptr, out_ptr))
        if (
            entry.algorithm is not Algorithm.CUBLAS_GROUPED
            or not self.config.use_tensor_cores
            or misaligned(a_ptr, b_ptr, out_ptr, POINTER_ARRAY_ALIGNMENT) is not None
        ):
            return None
        if sizes_dev is None:
            return _cublas_backend.PreparedGrouped(entry.plan, entry.dtype, self.config)
        if sizes_dev.dtype != np.int32:
            return None  # cast on every call by the back end
        arch = arch_for(self.info_for(entry.device_id).sm)
        layout = RowLayout.contiguous()
        return _cublas_backend.PreparedDeviceGrouped(entry.plan, layout, entry.dtype, self.config, arch)

    def _sizes_stay_on_device(
        self, algorithm: Algorithm, plan: GemmPlan, dtype, device_id: int, pointers
    ) -> bool:
        """Whether device sizes can stay on the device, unchecked (backends/hopper_sizes.py
        says what holds then): by SM90_GROUPED where it runs (``pointers``: a, b,
        out), asked for or taken by AUTO unless ``CUBLAS_GROUPED_CHECK_DEVICE_SIZES``."""
        if algorithm is Algorithm.AUTO:
            if checks_device_sizes() or plan.trans_a:
                return False
        elif algorithm is not Algorithm.SM90_GROUPED:
            return False
        if _hopper_backend.misaligned(*pointers) is not None:
            return False
        return _hopper_backend.unsupported(self.info_for(device_id).sm, dtype, plan) is None

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

    # -- dispatch to a back end --------------------------------------------------
    def run(
        self,
        plan: GemmPlan,
        ops: Operands,
        dtype: np.dtype,
        algorithm: Algorithm,
        res,
        *,
        layout: RowLayout | None = None,
        sizes_dev=None,
    ) -> None:
        """Run a validated plan with a concrete ``algorithm`` on ``res``'s stream (no checks).

        The one place that picks a back end: SM90_GROUPED runs our Hopper
        kernel (:mod:`.backends.hopper`) where it can, else, with a one-time
        warning, CUBLAS_GROUPED on the same grouped-contiguous rows; every
        other algorithm is a cuBLAS strategy (:mod:`.backends.cublas`).
        """
        info = self.info_for(res.device_id)
        if algorithm is Algorithm.SM90_GROUPED:
            reason = _hopper_backend.unsupported(info.sm, dtype, plan) or _hopper_backend.misaligned(
                ops.a, ops.b, ops.c
            )
            if reason is None:
                _hopper_backend.grouped_contiguous(res, plan, ops, dtype, sizes_dev=sizes_dev)
                return
            _warn_once(f"algorithm SM90_GROUPED {reason}: running CUBLAS_GROUPED instead")
            algorithm = self.fallback(Algorithm.CUBLAS_GROUPED, res.device_id)
        if algorithm in _POINTER_ARRAY_ALGORITHMS:
            reason = misaligned(ops.a, ops.b, ops.c, POINTER_ARRAY_ALIGNMENT)
            if reason is not None:
                _warn_once(f"algorithm {algorithm.name} {reason}: running SEQUENTIAL instead")
                algorithm = Algorithm.SEQUENTIAL
        _cublas_backend.run(
            plan,
            ops,
            dtype,
            algorithm,
            res,
            config=self.config,
            info=info,
            layout=layout,
            sizes_dev=sizes_dev,
        )

    def layout_for(self, algorithm: Algorithm, sizes: np.ndarray) -> RowLayout:
        """Row layout ``algorithm`` needs for these host sizes (:func:`.plan.layout_for`
        with this executor's ``chunk_rows``)."""
        return layout_for(algorithm, sizes, self.config.chunk_rows)
