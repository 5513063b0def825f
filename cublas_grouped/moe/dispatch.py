"""The dispatch plan and the MoE layer step by step.

:func:`prepare_input` counts each expert's (token, expert) pairs, copies the
counts to the host, lets AUTO pick the GEMM algorithm (which fixes the row
layout), and gathers the tokens' rows into expert order: a
:class:`DispatchPlan`. :func:`expert_gemm` multiplies those rows by each
expert's weights; :func:`scatter_output` and :func:`combine_output` bring the
rows back to token order. :func:`cublas_grouped.moe_forward` runs the same
steps in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..gemm.autotune import layer_times, state_token
from ..gemm.backends.cublas import PreparedDeviceGrouped
from ..gemm.config import Algorithm, coerce_enum
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import dense_weights
from ..gemm.plan import GemmPlan, Operands, ProblemStats, RowLayout
from ..gemm.pointers import build_pointers
from ..gemm.select import choose_layer_algorithms, remembered, select_algorithm, tuning_state
from ..runtime.arrays import ArrayView, as_cupy, cuda_dtype, view
from ..runtime.device import stream_resources
from ..runtime.nvrtc import arch_for
from . import kernels as K
from . import layer_cache as _layers
from .checks import (
    MAX_EXPERTS,
    MAX_PAIRS,
    check_routing,
    check_tokens,
    check_weights,
    device_of,
    executor_or_shared,
    kernel_arch,
)

__all__ = [
    "DispatchPlan",
    "prepare_input",
    "expert_gemm",
    "scatter_output",
    "combine_output",
    "choose_algorithms",
    "plan_dispatch",
    "run_expert_gemm",
    "wait_for_plan",
    "check_expert_outputs",
    "mark_stage",
]


@dataclass
class DispatchPlan:
    """Token rows gathered into expert order, and the plan that put them there.

    Attributes
    ----------
    rows : cupy.ndarray [R, H]
        Expert-ordered rows; R >= T*k when the layout pads experts (padding rows are zero).
    pair_to_row : cupy.ndarray int32 [T*k]
        Row of pair ``t*k + j`` (token t's j-th expert).
    row_to_pair : cupy.ndarray int32 [R]
        Inverse permutation; -1 on padding rows.
    topk_ids, topk_weights : the routing the plan was made from (weights may be None)
    tokens_per_expert : cupy.ndarray int32 [E]
    expert_offsets : cupy.ndarray int32 [E + 1]
        First row of each expert in ``rows``.
    counts_host : numpy.ndarray int64 [E]
        The same counts on the host (what cuBLAS needs).
    algorithm : Algorithm
        The concrete GEMM algorithm the layout was made for.
    layout : RowLayout
    num_tokens, top_k, num_experts : int
        T, k and E.
    stream : int
        The stream :func:`prepare_input` ran on.
    second_algorithm : Algorithm or None
        What AUTO picked for a following GEMM on the same layout (the MoE
        layer's down projection), when the caller said its shape.
    ready : cupy.cuda.Event or None
        Recorded on ``stream`` when this plan's arrays are complete; the later
        steps, called on another stream, make it wait on this event.
    """

    rows: object
    pair_to_row: object
    row_to_pair: object
    topk_ids: object
    topk_weights: object
    tokens_per_expert: object
    expert_offsets: object
    counts_host: np.ndarray
    algorithm: Algorithm
    layout: RowLayout
    num_tokens: int
    top_k: int
    num_experts: int
    stream: int
    second_algorithm: Algorithm | None = None
    ready: object = None
    # (row offsets, active experts) on the host, made once from counts_host and layout.
    _host_layout: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def expert_index(self):
        """Expert of every row (int32 [R]; -1 on padding rows)."""
        import cupy

        flat = self.topk_ids.reshape(-1)
        return cupy.where(self.row_to_pair >= 0, flat[cupy.maximum(self.row_to_pair, 0)], -1).astype(
            cupy.int32
        )


def mark_stage(timer, name: str, stream) -> None:
    """Mark the end of a stage on ``timer`` (a :class:`cublas_grouped.StageTimer` or None)."""
    if timer is not None:
        timer.mark(name, stream)


def wait_for_plan(inp: DispatchPlan, res) -> None:
    """Order work on ``res``'s stream after ``prepare_input``'s, when the streams
    differ (a device-side wait: the host does not block)."""
    if inp.ready is not None and res.stream != inp.stream:
        res.cupy_stream.wait_event(inp.ready)


def choose_algorithms(
    executor, algorithm, counts, n, k, dtype, second_gemm=None, device_id=None
) -> tuple[Algorithm, Algorithm]:
    """(first GEMM's algorithm, which fixes the row layout; second GEMM's algorithm).

    A fixed algorithm (argument or executor config) serves both GEMMs. With
    AUTO, :func:`choose_layer_algorithms` picks the pair when ``second_gemm``
    = (N, K) of the following GEMM is given, else ``select_algorithm`` the first,
    from the tuning tables, else from timing the candidates once per shape class
    on scratch (``gemm.autotune.layer_times``), else from the rules.
    Capabilities and tuning table are those of ``device_id`` (the call's device).
    """
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    if algorithm is Algorithm.AUTO:
        algorithm = executor.config.algorithm
    if algorithm is not Algorithm.AUTO:
        chosen = executor.fallback(algorithm, device_id)
        return chosen, chosen
    info = executor.info_for(device_id)
    # Every decode step repeats the last step's sizes: remember the pair for
    # exactly these inputs (the key names all the choice depends on), so the
    # host, with the GPU idle after the sync, does a dictionary lookup only.
    second_gemm = None if second_gemm is None else tuple(second_gemm)
    key = ("layer-pair", executor.config, tuning_state(info), state_token(), dtype, n, k, second_gemm)
    return remembered(
        key + (counts.dtype.str, counts.tobytes()),
        lambda: _choose_auto(executor, counts, n, k, dtype, second_gemm, device_id, info),
    )


def _choose_auto(executor, counts, n, k, dtype, second_gemm, device_id, info) -> tuple[Algorithm, Algorithm]:
    name = np.dtype(dtype).name
    times, times_key = layer_times(executor, info, Operands.for_plan, counts, dtype)
    if second_gemm is not None:
        first, second = choose_layer_algorithms(
            counts, (n, k), tuple(second_gemm), name, info, times=times, times_key=times_key
        )
        return executor.fallback(first, device_id), executor.fallback(second, device_id)
    stats = ProblemStats.from_sizes(counts, n, k, name)
    first = select_algorithm(stats, info, padded_layouts=True, times=times)
    return executor.fallback(first, device_id), executor.fallback(first, device_id)


def prepare_input(
    tokens,
    routing,
    num_experts: int,
    *,
    algorithm: Algorithm | str = "auto",
    gemm_n: int | None = None,
    executor: GroupedGemmExecutor | None = None,
    stream=None,
) -> DispatchPlan:
    """Plan the dispatch on the GPU and gather ``tokens`` into expert order.

    Parameters
    ----------
    tokens : GPU array [T, H]
    routing : (topk_weights float32 [T, k] or None, topk_ids int32 [T, k])
    num_experts : int
    algorithm : the GEMM algorithm the layout is for ("auto" chooses from the counts)
    gemm_n : N of the GEMM that will consume the rows (for "auto"; default H)

    The per-expert counts are copied to the host (one small synchronizing copy).
    Expert ids outside ``[0, num_experts)`` raise ``ValueError`` once the counts are known.

    Streams: the plan's arrays are complete on ``stream`` once an event
    recorded at the end of this call (``ready``) fires. :func:`expert_gemm`,
    :func:`scatter_output` and :func:`combine_output` called on another stream
    make that stream wait on it, so each step may run on any stream of the
    device. Each step's result is ready on the stream it was computed on: to
    use it on another stream (this one, for instance), order it yourself
    (record a ``cupy.cuda.Event`` there and ``wait_event`` it). Keep ``inp``
    alive until work on other streams that reads it is done: CuPy's memory
    pool may reuse freed memory on the stream that allocated it.
    """
    x_v = check_tokens(tokens)
    topk_weights, topk_ids = routing
    ids_v, _ = check_routing(topk_ids, topk_weights, x_v.shape[0])
    if (
        isinstance(num_experts, bool)
        or not isinstance(num_experts, (int, np.integer))
        or not (1 <= num_experts <= MAX_EXPERTS)
    ):
        raise ValueError(f"num_experts must be an int in [1, {MAX_EXPERTS}]; got {num_experts!r}")
    coerce_enum(Algorithm, algorithm, "algorithm")
    executor = executor_or_shared(executor)
    import cupy

    res = stream_resources(device_of(x_v), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        inp = plan_dispatch(
            res,
            executor,
            as_cupy(x_v),
            as_cupy(ids_v),
            topk_weights,
            int(num_experts),
            algorithm,
            gemm_n or x_v.shape[1],
            None,
        )
        inp.ready = cupy.cuda.Event(block=False, disable_timing=True)
        inp.ready.record(res.cupy_stream)
    return inp


def plan_dispatch(
    res, executor, x, ids, weights, num_experts, algorithm, gemm_n, timer, second_gemm=None
) -> DispatchPlan:
    """The work of :func:`prepare_input` on checked CuPy arrays, on ``res``'s stream.

    ``second_gemm``: (N, K) of the GEMM that follows on the same layout, so
    that AUTO picks both algorithms; ``timer``: marks "plan" and "gather".
    """
    import cupy

    arch = kernel_arch(res)
    stream = res.launch_stream
    num_tokens, top_k = ids.shape
    pairs = num_tokens * top_k
    nb = K.num_pair_blocks(pairs)
    block_counts = cupy.ndarray((nb, num_experts), cupy.int32)
    counts = cupy.ndarray((num_experts,), cupy.int32)
    if pairs:
        K.block_histogram(stream, arch, ids, pairs, num_experts, block_counts)
        K.column_scan(stream, arch, block_counts, nb, num_experts, counts)
    else:
        counts.fill(0)
    counts_host = cupy.asnumpy(counts, stream=res.cupy_stream).astype(np.int64)  # the one sync
    if int(counts_host.sum()) != pairs:
        raise ValueError(f"topk_ids holds {pairs - int(counts_host.sum())} ids outside [0, {num_experts})")

    def decide():
        chosen, second = choose_algorithms(
            executor, algorithm, counts_host, gemm_n, x.shape[1], x.dtype, second_gemm, res.device_id
        )
        layout = executor.layout_for(chosen, counts_host)
        offsets_host = layout.offsets(counts_host)
        total_rows = int(offsets_host[-1])
        if total_rows >= MAX_PAIRS:
            raise ValueError(
                f"the {chosen.value} layout needs {total_rows} rows for {pairs} pairs; rows are int32 "
                "indices in the kernels: choose another algorithm or fewer tokens"
            )
        # The GEMMs' plans on this layout, made by run_expert_gemm: (offsets, active, plans).
        host_layout = (offsets_host, np.flatnonzero(counts_host), {})
        return chosen, second, layout, total_rows, host_layout

    # The same counts as a previous call (every decode step of a model): the same choices.
    second_key = None if second_gemm is None else tuple(second_gemm)
    chosen, second, layout, total_rows, host_layout = _layers.dispatch_decision(
        executor, algorithm, counts_host, gemm_n, x.shape[1], x.dtype, second_key, res.device_id, decide
    )
    offsets = cupy.ndarray((num_experts + 1,), cupy.int32)
    if layout.stride:
        offsets[:] = cupy.arange(num_experts + 1, dtype=cupy.int32) * layout.stride
    else:
        # build_pointers computes the padded offsets on the device; its pointer
        # output is discarded here (the GEMMs build their own).
        num_problems = len(host_layout[1])
        build_pointers(
            res, counts, _NO_OPERANDS, layout, arch=arch, num_problems=num_problems, row_offsets=offsets
        )
    pair_to_row = cupy.ndarray((pairs,), cupy.int32)
    row_to_pair = cupy.ndarray((total_rows,), cupy.int32)
    if total_rows != pairs:
        # -1 on padding rows: every byte 0xFF (a memset costs a quarter of cupy's fill kernel on the host).
        cupy.cuda.runtime.memsetAsync(row_to_pair.data.ptr, 0xFF, row_to_pair.nbytes, res.stream)
    if pairs:
        K.assign_rows(stream, arch, ids, pairs, num_experts, block_counts, offsets, pair_to_row, row_to_pair)
    if timer is not None:
        timer.mark("plan", res.cupy_stream)
    rows = cupy.ndarray((total_rows, x.shape[1]), x.dtype)
    if total_rows:
        K.gather_rows(stream, arch, x, pair_to_row, row_to_pair, top_k, rows)
    if timer is not None:
        timer.mark("gather", res.cupy_stream)
    return DispatchPlan(
        rows,
        pair_to_row,
        row_to_pair,
        ids,
        weights,
        counts,
        offsets,
        counts_host,
        chosen,
        layout,
        num_tokens,
        top_k,
        num_experts,
        res.stream,
        second,
        _host_layout=host_layout,
    )


# Addresses of nothing: the pointer kernel's row offsets are all plan_dispatch wants of it.
_NO_OPERANDS = Operands(0, 0, 0, 0, 0, 0, 0, 0, 0)


def run_expert_gemm(executor, res, inp: DispatchPlan, rows, w, out, trans_b: bool, algorithm=None) -> None:
    """``out = rows @ w[e]`` per expert on ``inp``'s layout, with ``inp.algorithm``
    unless ``algorithm`` is given (CuPy arrays, already checked)."""
    r, k = rows.shape
    n = out.shape[1]
    sizes = inp.counts_host
    if inp._host_layout is None:  # both expert GEMMs of a layer share it
        inp._host_layout = (inp.layout.offsets(sizes), np.flatnonzero(sizes), {})
    offsets, active, plans = inp._host_layout
    # Plans are shared by the calls with the same counts (plan_dispatch's decisions).
    plan = plans.get((r, n, k, trans_b))
    if plan is None:
        plan = plans[(r, n, k, trans_b)] = GemmPlan(
            inp.num_experts, r, n, k, False, trans_b, sizes, offsets, active
        )
    if not len(plan.active):
        return
    algorithm, a, b, c = algorithm or inp.algorithm, rows.data.ptr, w.data.ptr, out.data.ptr
    grouped = algorithm is Algorithm.CUBLAS_GROUPED and not inp.layout.stride
    if grouped and executor.config.use_tensor_cores and not (a | b | c) & 15:
        # What executor.run does for aligned operands, prepared once per plan (decode's usual case).
        found = plans.get(("grouped", r, n, k, trans_b, rows.dtype))
        if found is None or found[0] is not executor.config:
            arch = arch_for(executor.info_for(res.device_id).sm)
            found = (
                executor.config,
                PreparedDeviceGrouped(plan, inp.layout, rows.dtype, executor.config, arch),
            )
            plans[("grouped", r, n, k, trans_b, rows.dtype)] = found
        found[1](res, inp.tokens_per_expert, a, b, c)
        return
    ops = Operands.for_plan(plan, a, b, c, rows.dtype.itemsize)
    executor.run(plan, ops, rows.dtype, algorithm, res, layout=inp.layout, sizes_dev=inp.tokens_per_expert)


def expert_gemm(
    inp: DispatchPlan,
    weights,
    *,
    trans_b: bool = False,
    out=None,
    executor: GroupedGemmExecutor | None = None,
    stream=None,
):
    """``rows @ weights[e]`` for every expert's rows, on the plan's layout.

    Returns a ``[R, N]`` array in the same expert order (padding rows undefined),
    ready on ``stream``. On a stream other than :func:`prepare_input`'s, that
    stream first waits for the plan (see :func:`prepare_input`).
    """
    if not isinstance(inp, DispatchPlan):
        raise TypeError(f"inp must be a DispatchPlan from prepare_input; got {type(inp).__name__}")
    _, n = check_weights(weights, "weights", inp.num_experts, inp.rows.shape[1], trans_b, inp.rows.dtype)
    if out is not None:
        out_v = view(out, "out")
        if (
            out_v.shape != (inp.rows.shape[0], n)
            or out_v.dtype != inp.rows.dtype
            or not out_v.is_c_contiguous()
        ):
            raise ValueError(
                f"out must be a C-contiguous {inp.rows.dtype} array of shape "
                f"{(inp.rows.shape[0], n)}; got {out_v.dtype} {out_v.shape}"
            )
    executor = executor_or_shared(executor)
    import cupy

    res = stream_resources(inp.rows.device.id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        wait_for_plan(inp, res)
        if out is None:
            out = cupy.empty((inp.rows.shape[0], n), dtype=inp.rows.dtype)
        dense = as_cupy(dense_weights(weights, inp.rows.dtype, res.stream))  # FP8: dequantized (docs/fp8.md)
        run_expert_gemm(executor, res, inp, inp.rows, dense, as_cupy(out), trans_b)
    return out


def check_expert_outputs(expert_outputs, inp) -> ArrayView:
    """Checks shared by :func:`scatter_output` and :func:`combine_output`."""
    if not isinstance(inp, DispatchPlan):
        raise TypeError(f"inp must be a DispatchPlan from prepare_input; got {type(inp).__name__}")
    y_v = view(expert_outputs, "expert_outputs")
    rows = inp.rows.shape[0]
    if y_v.ndim != 2 or y_v.shape[0] != rows:
        raise ValueError(
            f"expert_outputs must be 2-D [{rows}, N] (one row per gathered row); got {y_v.shape}"
        )
    cuda_dtype(y_v.dtype, "expert_outputs")
    if not y_v.is_c_contiguous():
        raise ValueError("expert_outputs must be C-contiguous")
    if y_v.device is not None and y_v.device != inp.rows.device.id:
        raise ValueError(f"expert_outputs is on device {y_v.device} but inp on device {inp.rows.device.id}")
    return y_v


def scatter_output(expert_outputs, inp: DispatchPlan, original_shape=None, *, stream=None):
    """Undo the permutation: ``[T * k, N]`` rows in token order (pair ``t*k + j``
    at row ``t*k + j``), bit for bit; reshaped to ``original_shape`` if given.

    Ready on ``stream``, which first waits for :func:`prepare_input`'s work when
    it is another stream; ``expert_outputs`` must already be ordered before
    ``stream`` by the caller (see :func:`prepare_input`)."""
    y_v = check_expert_outputs(expert_outputs, inp)
    pairs, n = inp.pair_to_row.shape[0], y_v.shape[1]
    if original_shape is not None:
        size = int(np.prod(original_shape, dtype=np.int64))
        if size != pairs * n:
            raise ValueError(
                f"original_shape {tuple(original_shape)} holds {size} elements but the output has "
                f"{pairs} x {n} = {pairs * n}"
            )
    import cupy

    res = stream_resources(inp.rows.device.id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        wait_for_plan(inp, res)
        y = as_cupy(y_v)
        out = cupy.empty((pairs, n), dtype=y.dtype)
        if out.shape[0]:
            K.scatter_rows(res.launch_stream, kernel_arch(res), y, inp.pair_to_row, out)
    return out.reshape(original_shape) if original_shape is not None else out


def combine_output(expert_outputs, inp: DispatchPlan, *, bias=None, weighted: bool = True, stream=None):
    """``out[t] = sum_j w[t, j] * (y[row(t, j)] + bias[e])`` in fp32, deterministic (no atomics).

    ``bias``: optional ``[E, N]`` array of ``expert_outputs``' dtype, C-contiguous.
    Ready on ``stream``, which first waits for :func:`prepare_input`'s work when
    it is another stream; ``expert_outputs`` must already be ordered before
    ``stream`` by the caller (see :func:`prepare_input`).
    """
    y_v = check_expert_outputs(expert_outputs, inp)
    if not isinstance(weighted, bool):
        raise TypeError(f"weighted must be a bool; got {type(weighted).__name__}")
    if bias is not None:
        b_v = view(bias, "bias")
        want = (inp.num_experts, y_v.shape[1])
        if b_v.shape != want or b_v.dtype != y_v.dtype or not b_v.is_c_contiguous():
            raise ValueError(
                f"bias must be a C-contiguous {y_v.dtype} array of shape {want}; got {b_v.dtype} {b_v.shape}"
            )
    import cupy

    res = stream_resources(inp.rows.device.id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        wait_for_plan(inp, res)
        y = as_cupy(y_v)
        out = cupy.empty((inp.num_tokens, y.shape[1]), dtype=y.dtype)
        if inp.num_tokens:
            K.combine_rows(
                res.launch_stream,
                kernel_arch(res),
                y,
                inp.pair_to_row,
                as_cupy(inp.topk_weights) if weighted and inp.topk_weights is not None else None,
                inp.topk_ids,
                None if bias is None else as_cupy(bias),
                inp.num_tokens,
                inp.top_k,
                out,
            )
    return out
