"""Layer 5: a whole MoE expert layer that never leaves the GPU.

Data flow of one forward (../shared/DESIGN.md)::

    router logits -> top-k ids and weights -> counts, offsets, permutation
    -> gather rows to expert order -> GEMM 1 (gate|up) -> act(gate) * up
    -> GEMM 2 (down) -> weighted sum of each token's k rows -> output

The only device-to-host copy is the per-expert row counts (E integers),
which every cuBLAS path here needs on the host (sizes, batch counts, or the
algorithm choice). :class:`cublas_grouped.StaticMoE` is the variant without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gemm.autotune import layer_times
from ..gemm.config import Algorithm, ComputePrecision, coerce_enum
from ..gemm.executor import GroupedGemmExecutor, Operands, RowLayout
from ..gemm.plan import GemmPlan
from ..gemm.select import ProblemStats, choose_layer_algorithms, select_algorithm
from ..runtime.arrays import ArrayView, as_cupy, cuda_dtype, view
from ..runtime.device import stream_resources
from ..runtime.nvrtc import arch_for
from . import kernels as K

__all__ = [
    "route",
    "GroupedGemmInput",
    "prepare_input",
    "expert_gemm",
    "scatter_output",
    "combine_output",
    "moe_forward",
    "StageTimer",
]

SCORINGS = {"softmax": 0, "sigmoid": 1}
MAX_EXPERTS = 1024
# Pairs (T*k) and expert-ordered rows are int32 indices in the kernels.
MAX_PAIRS = 2**31


class StageTimer:
    """Collects CUDA events between the stages of :func:`moe_forward`.

    Pass one as ``timer=``; after the stream is synchronized,
    :meth:`times_ms` gives milliseconds per stage, in order.
    """

    def __init__(self):
        self._marks: list[tuple[str, object]] = []

    def mark(self, name: str, stream) -> None:
        import cupy

        event = cupy.cuda.Event()
        event.record(stream)
        self._marks.append((name, event))

    def times_ms(self) -> dict[str, float]:
        import cupy

        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self._marks, self._marks[1:]):
            out[name] = out.get(name, 0.0) + cupy.cuda.get_elapsed_time(start, end)
        return out


def _mark(timer, name, stream):
    if timer is not None:
        timer.mark(name, stream)


def _executor(executor: GroupedGemmExecutor | None) -> GroupedGemmExecutor:
    """The caller's executor, or the one ``gmm`` shares (AUTO, full precision)."""
    if executor is None:
        from ..gemm.gmm import _executor as shared

        return shared(ComputePrecision.FP32, Algorithm.AUTO)
    return executor


def _check_routing(topk_ids, topk_weights, num_tokens: int | None):
    ids_v = view(topk_ids, "topk_ids")
    if ids_v.ndim != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k]; got shape {ids_v.shape}")
    if ids_v.dtype != np.int32:
        raise TypeError(f"topk_ids must be int32; got {ids_v.dtype}")
    if not ids_v.is_c_contiguous():
        raise ValueError("topk_ids must be C-contiguous")
    if num_tokens is not None and ids_v.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {ids_v.shape[0]} rows but x has {num_tokens} tokens")
    if ids_v.shape[0] * ids_v.shape[1] >= MAX_PAIRS:
        raise ValueError(
            f"topk_ids has {ids_v.shape[0]} x {ids_v.shape[1]} = {ids_v.shape[0] * ids_v.shape[1]} "
            "(token, expert) pairs; the kernels index pairs and rows with int32, so T*k must stay below 2**31"
        )
    w_v = None
    if topk_weights is not None:
        w_v = view(topk_weights, "topk_weights")
        if w_v.shape != ids_v.shape:
            raise ValueError(f"topk_weights must have the shape of topk_ids {ids_v.shape}; got {w_v.shape}")
        if w_v.dtype != np.float32:
            raise TypeError(f"topk_weights must be float32; got {w_v.dtype}")
        if not w_v.is_c_contiguous():
            raise ValueError("topk_weights must be C-contiguous")
    return ids_v, w_v


def _check_tokens(x) -> ArrayView:
    x_v = view(x, "x")
    if x_v.ndim != 2:
        raise ValueError(f"x must be 2-D [T, H]; got shape {x_v.shape}")
    if not x_v.is_c_contiguous():
        raise ValueError("x must be C-contiguous")
    cuda_dtype(x_v.dtype, "x")
    return x_v


def route(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True, stream=None):
    """Top-k routing on the GPU.

    Parameters
    ----------
    router_logits : GPU array [T, E], float32/float16/bfloat16
    top_k : int, 1 <= top_k <= E <= 1024
    scoring : "softmax" (over all E logits) or "sigmoid" (per logit)
    renormalize : divide the k selected scores by their sum

    Returns
    -------
    (topk_weights float32 [T, k], topk_ids int32 [T, k]), best first; ties go
    to the lower expert id.
    """
    logits = view(router_logits, "router_logits")
    if logits.ndim != 2:
        raise ValueError(f"router_logits must be 2-D [T, E]; got shape {logits.shape}")
    cuda_dtype(logits.dtype, "router_logits")
    if not logits.is_c_contiguous():
        raise ValueError("router_logits must be C-contiguous")
    tokens, experts = logits.shape
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits must have 1 to {MAX_EXPERTS} experts; got {experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be an int in [1, {experts}]; got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {sorted(SCORINGS)}; got {scoring!r}")
    import cupy

    res = stream_resources(_device_of(logits), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        weights = cupy.empty((tokens, top_k), dtype=cupy.float32)
        ids = cupy.empty((tokens, top_k), dtype=cupy.int32)
        if tokens:
            K.route_topk(
                res.launch_stream,
                _arch(res),
                as_cupy(logits),
                int(top_k),
                SCORINGS[scoring],
                int(bool(renormalize)),
                weights,
                ids,
            )
    return weights, ids


def _device_of(v: ArrayView) -> int:
    if v.device is not None:
        return v.device
    from ..runtime.device import current_device

    return current_device()


def _arch(res) -> str:
    from ..runtime.device import device_info

    return arch_for(device_info(res.device_id).sm)


@dataclass
class GroupedGemmInput:
    """Token rows gathered into expert order, and the plan that put them there.

    Attributes
    ----------
    rows : cupy.ndarray [R, H]
        Expert-ordered rows; R >= T*k when the layout pads experts (padding rows are zero).
    pair_to_row : cupy.ndarray int32 [T*k]
        Row of pair ``t*k + j`` (token t's j-th expert).
    row_to_pair : cupy.ndarray int32 [R]
        Inverse permutation; -1 on padding rows.
    tokens_per_expert : cupy.ndarray int32 [E]
    expert_offsets : cupy.ndarray int32 [E + 1]
        First row of each expert in ``rows``.
    counts_host : numpy.ndarray int64 [E]
        The same counts on the host (what cuBLAS needs).
    algorithm : Algorithm
        The concrete GEMM algorithm the layout was made for.
    second_algorithm : Algorithm or None
        What AUTO picked for a following GEMM on the same layout (the MoE
        layer's down projection), when the caller said its shape.
    layout : RowLayout
    stream : int
        The stream :func:`prepare_input` ran on.
    ready : cupy.cuda.Event or None
        Recorded on ``stream`` when this input's arrays are complete; the later
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

    @property
    def expert_index(self):
        """Expert of every row (int32 [R]; -1 on padding rows)."""
        import cupy

        flat = self.topk_ids.reshape(-1)
        return cupy.where(self.row_to_pair >= 0, flat[cupy.maximum(self.row_to_pair, 0)], -1).astype(
            cupy.int32
        )


def _after_prepare(inp: GroupedGemmInput, res) -> None:
    """Order work on ``res``'s stream after ``prepare_input``'s, when the streams
    differ (a device-side wait: the host does not block)."""
    if inp.ready is not None and res.stream != inp.stream:
        res.cupy_stream.wait_event(inp.ready)


def _choose(
    executor, algorithm, counts, n, k, dtype, second_gemm=None, device_id=None
) -> tuple[Algorithm, Algorithm]:
    """(first GEMM's algorithm, which fixes the row layout; second GEMM's algorithm).

    A fixed algorithm (argument or executor config) serves both GEMMs. With
    AUTO, :func:`choose_layer_algorithms` picks the pair when ``second_gemm``
    = (N, K) of the following GEMM is given, else ``select_algorithm`` the first,
    from the tuning tables, else from timing the candidates once per shape class
    on scratch (``_autotune.layer_times``), else from the rules.
    Capabilities and tuning table are those of ``device_id`` (the call's device).
    """
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    if algorithm is Algorithm.AUTO:
        algorithm = executor.config.algorithm
    if algorithm is not Algorithm.AUTO:
        chosen = executor._fallback(algorithm, device_id)
        return chosen, chosen
    info, name = executor.info_for(device_id), np.dtype(dtype).name
    times, times_key = layer_times(executor, info, Operands.for_plan, counts, dtype)
    if second_gemm is not None:
        first, second = choose_layer_algorithms(
            counts, (n, k), tuple(second_gemm), name, info, times=times, times_key=times_key
        )
        return executor._fallback(first, device_id), executor._fallback(second, device_id)
    stats = ProblemStats.from_sizes(counts, n, k, name)
    first = select_algorithm(stats, info, padded_layouts=True, times=times)
    return executor._fallback(first, device_id), executor._fallback(first, device_id)


def prepare_input(
    tokens,
    routing,
    num_experts: int,
    *,
    algorithm: Algorithm | str = "auto",
    gemm_n: int | None = None,
    executor: GroupedGemmExecutor | None = None,
    stream=None,
) -> GroupedGemmInput:
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

    Streams: the input's arrays are complete on ``stream`` once an event
    recorded at the end of this call (``ready``) fires. :func:`expert_gemm`,
    :func:`scatter_output` and :func:`combine_output` called on another stream
    make that stream wait on it, so each step may run on any stream of the
    device. Each step's result is ready on the stream it was computed on: to
    use it on another stream (this one, for instance), order it yourself
    (record a ``cupy.cuda.Event`` there and ``wait_event`` it). Keep ``inp``
    alive until work on other streams that reads it is done: CuPy's memory
    pool may reuse freed memory on the stream that allocated it.
    """
    x_v = _check_tokens(tokens)
    topk_weights, topk_ids = routing
    ids_v, _ = _check_routing(topk_ids, topk_weights, x_v.shape[0])
    if (
        isinstance(num_experts, bool)
        or not isinstance(num_experts, (int, np.integer))
        or not (1 <= num_experts <= MAX_EXPERTS)
    ):
        raise ValueError(f"num_experts must be an int in [1, {MAX_EXPERTS}]; got {num_experts!r}")
    coerce_enum(Algorithm, algorithm, "algorithm")
    executor = _executor(executor)
    import cupy

    res = stream_resources(_device_of(x_v), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        inp = _prepare(
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


def _prepare(
    res, executor, x, ids, weights, num_experts, algorithm, gemm_n, timer, second_gemm=None
) -> GroupedGemmInput:
    import cupy

    arch = _arch(res)
    stream = res.launch_stream
    num_tokens, top_k = ids.shape
    pairs = num_tokens * top_k
    nb = K.num_pair_blocks(pairs)
    block_counts = cupy.empty((nb, num_experts), dtype=cupy.int32)
    counts = cupy.empty(num_experts, dtype=cupy.int32)
    if pairs:
        K.block_histogram(stream, arch, ids, pairs, num_experts, block_counts)
        K.column_scan(stream, arch, block_counts, nb, num_experts, counts)
    else:
        counts.fill(0)
    counts_host = cupy.asnumpy(counts, stream=res.cupy_stream).astype(np.int64)  # the one sync
    if int(counts_host.sum()) != pairs:
        raise ValueError(f"topk_ids holds {pairs - int(counts_host.sum())} ids outside [0, {num_experts})")
    chosen, second = _choose(
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
    offsets = cupy.empty(num_experts + 1, dtype=cupy.int32)
    if layout.stride:
        offsets[:] = cupy.arange(num_experts + 1, dtype=cupy.int32) * layout.stride
    else:
        # build_pointers computes the padded offsets on the device; its pointer
        # output is discarded here (the GEMMs build their own).
        executor.build_pointers(
            res,
            counts,
            Operands(0, 0, 0, 0, 0, 0, 0, 0, 0),
            layout,
            num_problems=int(np.count_nonzero(counts_host)),
            row_offsets=offsets,
        )
    pair_to_row = cupy.empty(pairs, dtype=cupy.int32)
    row_to_pair = cupy.empty(total_rows, dtype=cupy.int32)
    if total_rows != pairs:
        row_to_pair.fill(-1)
    if pairs:
        K.assign_rows(stream, arch, ids, pairs, num_experts, block_counts, offsets, pair_to_row, row_to_pair)
    _mark(timer, "plan", res.cupy_stream)
    rows = cupy.empty((total_rows, x.shape[1]), dtype=x.dtype)
    if total_rows:
        K.gather_rows(stream, arch, x, row_to_pair, top_k, rows)
    _mark(timer, "gather", res.cupy_stream)
    return GroupedGemmInput(
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
    )


def _check_weights(w, name: str, num_experts: int | None, k: int, trans_b: bool, dtype) -> tuple[int, int]:
    w_v = view(w, name)
    if w_v.ndim != 3:
        raise ValueError(f"{name} must be 3-D [E, K, N] ([E, N, K] with trans_b); got shape {w_v.shape}")
    if not w_v.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous")
    if w_v.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like x; got {w_v.dtype}")
    e, kk, n = (w_v.shape[0], w_v.shape[2], w_v.shape[1]) if trans_b else w_v.shape
    if num_experts is not None and e != num_experts:
        raise ValueError(f"{name} has {e} experts; expected {num_experts}")
    if kk != k:
        raise ValueError(f"{name} has K={kk} but its input has {k} columns")
    return e, n


def _run_gemm(executor, res, inp: GroupedGemmInput, rows, w, out, trans_b: bool, algorithm=None) -> None:
    r, k = rows.shape
    n = out.shape[1]
    sizes = inp.counts_host
    plan = GemmPlan(
        inp.num_experts, r, n, k, False, trans_b, sizes, inp.layout.offsets(sizes), np.flatnonzero(sizes)
    )
    ops = Operands.for_plan(plan, rows.data.ptr, w.data.ptr, out.data.ptr, rows.dtype.itemsize)
    if len(plan.active):
        executor.run(
            plan,
            ops,
            rows.dtype,
            algorithm or inp.algorithm,
            res,
            layout=inp.layout,
            sizes_dev=inp.tokens_per_expert,
        )


def expert_gemm(
    inp: GroupedGemmInput,
    weights,
    *,
    trans_b: bool = False,
    out=None,
    executor: GroupedGemmExecutor | None = None,
    stream=None,
):
    """``rows @ weights[e]`` for every expert's rows, on the input's layout.

    Returns a ``[R, N]`` array in the same expert order (padding rows undefined),
    ready on ``stream``. On a stream other than :func:`prepare_input`'s, that
    stream first waits for the input (see :func:`prepare_input`).
    """
    if not isinstance(inp, GroupedGemmInput):
        raise TypeError(f"inp must be a GroupedGemmInput from prepare_input; got {type(inp).__name__}")
    _, n = _check_weights(weights, "weights", inp.num_experts, inp.rows.shape[1], trans_b, inp.rows.dtype)
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
    executor = _executor(executor)
    import cupy

    res = stream_resources(inp.rows.device.id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        _after_prepare(inp, res)
        if out is None:
            out = cupy.empty((inp.rows.shape[0], n), dtype=inp.rows.dtype)
        _run_gemm(executor, res, inp, inp.rows, as_cupy(weights), as_cupy(out), trans_b)
    return out


def _check_expert_outputs(expert_outputs, inp) -> ArrayView:
    """Checks shared by :func:`scatter_output` and :func:`combine_output`."""
    if not isinstance(inp, GroupedGemmInput):
        raise TypeError(f"inp must be a GroupedGemmInput from prepare_input; got {type(inp).__name__}")
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


def scatter_output(expert_outputs, inp: GroupedGemmInput, original_shape=None, *, stream=None):
    """Undo the permutation: ``[T * k, N]`` rows in token order (pair ``t*k + j``
    at row ``t*k + j``), bit for bit; reshaped to ``original_shape`` if given.

    Ready on ``stream``, which first waits for :func:`prepare_input`'s work when
    it is another stream; ``expert_outputs`` must already be ordered before
    ``stream`` by the caller (see :func:`prepare_input`)."""
    y_v = _check_expert_outputs(expert_outputs, inp)
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
        _after_prepare(inp, res)
        y = as_cupy(y_v)
        out = cupy.empty((pairs, n), dtype=y.dtype)
        if out.shape[0]:
            K.scatter_rows(res.launch_stream, _arch(res), y, inp.pair_to_row, out)
    return out.reshape(original_shape) if original_shape is not None else out


def combine_output(expert_outputs, inp: GroupedGemmInput, *, bias=None, weighted: bool = True, stream=None):
    """``out[t] = sum_j w[t, j] * (y[row(t, j)] + bias[e])`` in fp32, deterministic (no atomics).

    ``bias``: optional ``[E, N]`` array of ``expert_outputs``' dtype, C-contiguous.
    Ready on ``stream``, which first waits for :func:`prepare_input`'s work when
    it is another stream; ``expert_outputs`` must already be ordered before
    ``stream`` by the caller (see :func:`prepare_input`).
    """
    y_v = _check_expert_outputs(expert_outputs, inp)
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
        _after_prepare(inp, res)
        y = as_cupy(y_v)
        out = cupy.empty((inp.num_tokens, y.shape[1]), dtype=y.dtype)
        if inp.num_tokens:
            K.combine_rows(
                res.launch_stream,
                _arch(res),
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


def check_layer_args(x_v, topk_ids, topk_weights, w1, w2, b1, b2, activation, gated, trans_b):
    """Validate a whole layer's arguments (shared by the dynamic and static paths).

    Returns (num_experts, hidden, inter, first-GEMM width).
    """
    ids_v, _ = _check_routing(topk_ids, topk_weights, x_v.shape[0] if x_v is not None else None)
    if activation not in K.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(K.ACTIVATIONS)}; got {activation!r}")
    dtype = x_v.dtype if x_v is not None else view(w1, "w1").dtype
    hidden = x_v.shape[1] if x_v is not None else view(w1, "w1").shape[2 if trans_b else 1]
    num_experts, width = _check_weights(w1, "w1", None, hidden, trans_b, dtype)
    if gated and width % 2:
        raise ValueError(f"w1 must have an even output width (gate|up) when gated; got {width}")
    inter = width // 2 if gated else width
    _, h_out = _check_weights(w2, "w2", num_experts, inter, trans_b, dtype)
    if h_out != hidden:
        raise ValueError(f"w2 must map back to hidden={hidden}; its output width is {h_out}")
    for bias, name, cols in ((b1, "b1", width), (b2, "b2", hidden)):
        if bias is not None:
            b_v = view(bias, name)
            if b_v.shape != (num_experts, cols) or b_v.dtype != dtype or not b_v.is_c_contiguous():
                raise ValueError(
                    f"{name} must be a C-contiguous {dtype} array of shape {(num_experts, cols)}; "
                    f"got {b_v.dtype} {b_v.shape}"
                )
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"at most {MAX_EXPERTS} experts are supported; w1 has {num_experts}")
    return num_experts, hidden, inter, width


def _check_sync_free(tokens: int, dropped_pairs) -> None:
    from .fixed_capacity import MAX_STATIC_TOKENS  # _static builds on this module

    if tokens > MAX_STATIC_TOKENS:
        raise ValueError(
            f"sync_free=True takes at most {MAX_STATIC_TOKENS} tokens (it is meant for decode and "
            f"small prefill chunks); x has {tokens}"
        )
    if dropped_pairs is not None:
        d_v = view(dropped_pairs, "dropped_pairs")
        if d_v.shape != (1,) or d_v.dtype not in (np.dtype(np.uint64), np.dtype(np.int64)):
            raise ValueError(
                f"dropped_pairs must be a uint64 or int64 array of shape (1,); got {d_v.dtype} {d_v.shape}"
            )


def moe_forward(
    x,
    topk_ids,
    topk_weights,
    w1,
    w2,
    *,
    b1=None,
    b2=None,
    activation: str = "silu",
    gated: bool = True,
    trans_b: bool = False,
    algorithm: Algorithm | str = "auto",
    executor: GroupedGemmExecutor | None = None,
    stream=None,
    timer: StageTimer | None = None,
    sync_free: bool = False,
    dropped_pairs=None,
):
    """The MoE expert layer: ``sum_j w[t,j] * (act(x_t @ w1[e] + b1[e]) @ w2[e] + b2[e])``.

    Parameters
    ----------
    x : GPU array [T, H], float32/float16/bfloat16
    topk_ids : int32 [T, k]; topk_weights : float32 [T, k] (e.g. from :func:`route`), or None for weight 1
    w1 : [E, H, 2I] packed gate|up (first I columns the gate) when ``gated``, else [E, H, I];
        with ``trans_b`` the ``nn.Linear`` layout [E, 2I, H].
    w2 : [E, I, H] ([E, H, I] with ``trans_b``)
    b1, b2 : optional per-expert biases [E, 2I] (or [E, I]) and [E, H]
    activation : "silu" (default), "gelu" (exact, erf) or "relu"
    gated : act(gate) * up when True, act(h) otherwise
    algorithm : GEMM algorithm for both expert GEMMs ("auto" chooses per call)
    timer : optional :class:`StageTimer` to split the time by stage

    sync_free : bool
        Run without copying anything to the host: each expert GEMM becomes one
        batched call over a fixed number of row chunks, enough for any routing
        (the :class:`StaticMoE` step, buffers cached on the stream). Fastest
        for decode-sized T (see docs/benchmarks.md); the chunk count grows
        with ``min(E, T*k)``, so it is not meant for prefill. Expert ids are
        not checked on the host on this path: a pair with an id outside
        [0, E) adds nothing (count them with ``dropped_pairs``). ``algorithm``
        and ``timer`` do not apply.
    dropped_pairs : GPU array, optional
        With ``sync_free`` only: a one-element uint64 or int64 array to which
        the number of pairs with an expert id outside [0, E) is added, on the
        stream, without a sync. Read it when convenient.

    Returns
    -------
    GPU array [T, H] of x's dtype. Deterministic: two runs give identical bits.
    Without ``sync_free``, one small synchronizing copy (the per-expert counts)
    happens per call.
    """
    x_v = _check_tokens(x)
    num_experts, hidden, inter, width = check_layer_args(
        x_v, topk_ids, topk_weights, w1, w2, b1, b2, activation, gated, trans_b
    )
    coerce_enum(Algorithm, algorithm, "algorithm")
    if sync_free:
        _check_sync_free(x_v.shape[0], dropped_pairs)
    elif dropped_pairs is not None:
        raise ValueError(
            "dropped_pairs applies only with sync_free=True (the synchronizing path raises on bad ids)"
        )
    executor = _executor(executor)
    import cupy

    res = stream_resources(_device_of(x_v), stream)
    if sync_free:
        from .fixed_capacity import LayerSpec, cached_slot_buffers, slot_step

        spec = LayerSpec(
            num_experts,
            hidden,
            inter,
            width,
            view(topk_ids, "topk_ids").shape[1],
            bool(gated),
            activation,
            bool(trans_b),
        )
        params = tuple(None if p is None else as_cupy(p) for p in (w1, w2, b1, b2))
        with cupy.cuda.Device(res.device_id), res.cupy_stream:
            out = cupy.empty((x_v.shape[0], hidden), dtype=x_v.dtype)
            if x_v.shape[0]:
                buf = cached_slot_buffers(res, spec, x_v.shape[0], x_v.dtype)
                weights = None if topk_weights is None else as_cupy(topk_weights)
                counter = None if dropped_pairs is None else as_cupy(dropped_pairs)
                slot_step(
                    res,
                    executor,
                    spec,
                    buf,
                    as_cupy(x_v),
                    as_cupy(topk_ids),
                    weights,
                    params,
                    out,
                    dropped=counter,
                )
        return out
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        _mark(timer, "start", res.cupy_stream)
        ids = as_cupy(topk_ids)
        weights = None if topk_weights is None else as_cupy(topk_weights)
        inp = _prepare(
            res, executor, as_cupy(x_v), ids, weights, num_experts, algorithm, width, timer, (hidden, inter)
        )
        rows = inp.rows.shape[0]
        h = cupy.empty((rows, width), dtype=inp.rows.dtype)
        _run_gemm(executor, res, inp, inp.rows, as_cupy(w1), h, trans_b)
        _mark(timer, "gemm1", res.cupy_stream)
        act = cupy.empty((rows, inter), dtype=h.dtype)
        arch = _arch(res)
        if rows:
            K.expert_activation(
                res.launch_stream,
                arch,
                h,
                inter,
                int(gated),
                K.ACTIVATIONS[activation],
                None if b1 is None else as_cupy(b1),
                inp.row_to_pair,
                ids,
                act,
            )
        _mark(timer, "activation", res.cupy_stream)
        y = cupy.empty((rows, hidden), dtype=h.dtype)
        # The down projection may run another algorithm on the same row layout.
        _run_gemm(executor, res, inp, act, as_cupy(w2), y, trans_b, inp.second_algorithm)
        _mark(timer, "gemm2", res.cupy_stream)
        out = cupy.empty((inp.num_tokens, hidden), dtype=h.dtype)
        if inp.num_tokens:
            K.combine_rows(
                res.launch_stream,
                arch,
                y,
                inp.pair_to_row,
                weights,
                ids,
                None if b2 is None else as_cupy(b2),
                inp.num_tokens,
                inp.top_k,
                out,
            )
        _mark(timer, "combine", res.cupy_stream)
    return out
