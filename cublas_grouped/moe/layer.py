"""A whole MoE expert layer in one call, on the GPU.

Data flow of one forward (docs/architecture.md)::

    router logits -> top-k ids and weights -> counts, offsets, permutation
    -> gather rows to expert order -> GEMM 1 (gate|up) -> act(gate) * up
    -> GEMM 2 (down) -> weighted sum of each token's k rows -> output

The only device-to-host copy is the per-expert row counts (E integers),
which every cuBLAS path here needs on the host (sizes, batch counts, or the
algorithm choice). ``fixed_capacity=True`` runs the layer without it (the
:class:`cublas_grouped.FixedCapacityMoE` step).
"""

from __future__ import annotations

import warnings

from ..gemm import fp8_gmm
from ..gemm.config import Algorithm, coerce_enum
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import FP8ExpertWeights, dense_weights, is_fp8
from ..runtime.arrays import as_cupy
from ..runtime.device import stream_resources
from ..runtime.oom import reports_out_of_memory
from . import kernels as K
from . import layer_cache as _layers
from .backward import check_context_options, forward_with_context
from .checks import check_layer_args, check_tokens, device_of, executor_or_shared, kernel_arch
from .dispatch import mark_stage, plan_dispatch, run_expert_gemm
from .dropped_pairs import DROPPED_PAIRS_KEY, stream_dropped_pairs
from .fixed_capacity import (
    MAX_FIXED_CAPACITY_TOKENS,
    cached_chunk_buffers,
    check_fixed_capacity_args,
    fixed_capacity_backend,
    fixed_capacity_step,
)
from .fp8_step import cached_fp8_rows, fp8_step_unsupported
from .kernel_step import kernel_step

__all__ = ["moe_forward", "StageTimer"]


class StageTimer:
    """Collects CUDA events between the stages of :func:`moe_forward`.

    Pass one as ``timer=``; after the stream is synchronized,
    :meth:`times_ms` gives milliseconds per stage, in order.
    """

    def __init__(self):
        self._marks: list[tuple[str, object]] = []

    def mark(self, name: str, stream) -> None:
        """Record an event on ``stream`` that ends the stage ``name``."""
        import cupy

        event = cupy.cuda.Event()
        event.record(stream)
        self._marks.append((name, event))

    def times_ms(self) -> dict[str, float]:
        """Milliseconds per stage, in order (a stage marked twice adds up)."""
        import cupy

        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self._marks, self._marks[1:]):
            out[name] = out.get(name, 0.0) + cupy.cuda.get_elapsed_time(start, end)
        return out


@reports_out_of_memory("moe_forward")
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
    fixed_capacity: bool = False,
    dropped_pairs=None,
    sync_free: bool | None = None,
    return_context: bool = False,
    recompute: bool = False,
    w1_layout: str = "gate_up",
):
    """The MoE expert layer: ``sum_j w[t,j] * (act(x_t @ w1[e] + b1[e]) @ w2[e] + b2[e])``.

    Parameters
    ----------
    x : GPU array [T, H], float32/float16/bfloat16
    topk_ids : int32 [T, k]; topk_weights : float32 [T, k] (e.g. from :func:`route`), or None for weight 1
    w1 : [E, H, 2I] packed gate|up (first I columns the gate) when ``gated``, else [E, H, I];
        with ``trans_b`` the ``nn.Linear`` layout [E, 2I, H].
    w2 : [E, I, H] ([E, H, I] with ``trans_b``)
        Either may be :class:`~cublas_grouped.FP8ExpertWeights` (in the
        ``trans_b`` layout): dequantized to x's dtype into scratch on every
        call, then run as 16-bit weights; correct, slower (docs/fp8.md). On
        SM 9.0, for bfloat16 x without ``return_context``, FP8 weights the
        FP8 kernel reads (``trans_b``, "block128"; docs/fp8.md) run through
        it instead, on rows quantized per token, with no dequantized copy:
        as the FP8 kernel step, which waits for nothing, with
        ``fixed_capacity`` (the executor's algorithm AUTO or SM90_GROUPED)
        and under AUTO without a ``timer`` (ids outside [0, E) then raise as
        on the 16-bit kernel path, below); else on the counts-on-the-host
        path, both GEMMs on SM90_GROUPED's row layout.
    b1, b2 : optional per-expert biases [E, 2I] (or [E, I]) and [E, H]
    activation : "silu" (default), "gelu" (exact, erf) or "relu"
    gated : act(gate) * up when True, act(h) otherwise
    algorithm : GEMM algorithm for both expert GEMMs ("auto" chooses per call)
    timer : optional :class:`StageTimer` to split the time by stage

    fixed_capacity : bool
        Run without copying anything to the host: each expert GEMM becomes one
        batched call over a fixed number of row chunks, enough for any routing
        (the :class:`FixedCapacityMoE` step, buffers cached on the stream).
        Fastest for decode-sized T (see docs/benchmarks.md); the chunk count
        grows with ``min(E, T*k)``, so it is not meant for prefill. On SM 9.0
        GPUs, where our Hopper kernel takes the layer (16-bit, the default
        algorithm), both GEMMs read the counts on the device over T*k rows
        instead: no chunks, fit for prefill too. Expert ids
        are not checked on the host on this path: a pair with an id outside
        [0, E) adds nothing (count them with ``dropped_pairs``). ``algorithm``
        and ``timer`` do not apply.
    dropped_pairs : GPU array, optional
        With ``fixed_capacity`` only: a one-element uint64 or int64 array to
        which the number of pairs with an expert id outside [0, E) is added,
        on the stream, without a sync. Read it when convenient.
    sync_free : bool, optional
        Deprecated name of ``fixed_capacity`` (a ``DeprecationWarning``; it
        goes in the next release).
    return_context : bool
        Also keep what :func:`cublas_grouped.moe_backward` needs and return
        ``(out, ctx)`` (not with ``fixed_capacity``).
    recompute : bool
        With ``return_context``: the context keeps no first-GEMM output and
        the backward recomputes it (docs/backward.md: memory each way).
    w1_layout : "gate_up" (default) or "gate_up_blocked"
        How a gated ``w1`` orders its 2I columns: the gate then the up
        projection, or packed in blocks of 128 by
        :func:`cublas_grouped.pack_gate_up` (I a multiple of 128; not with
        ``return_context``). With the packed layout, the Hopper kernel's
        fixed-capacity step applies the activation in the first GEMM's
        epilogue, so the [rows, 2I] product is never stored; every other
        path gives the same result from the packed columns.

    Returns
    -------
    GPU array [T, H] of x's dtype. Deterministic: two runs give identical bits.
    Without ``fixed_capacity``, on the cuBLAS paths, one small synchronizing
    copy happens per call: of the per-expert counts, before the GEMMs (cuBLAS
    takes sizes on the host); ids outside [0, E) raise ``ValueError`` there.
    On SM 9.0 under AUTO, where our Hopper kernel takes the layer (it reads
    the counts on the device), nothing waits for the GPU: a pair with an id
    outside [0, E) adds nothing and is counted on the GPU, and the count
    raises ``ValueError`` at a later call on the same stream (once an 8-byte
    copy of it has landed in pinned memory) or at once in
    :func:`cublas_grouped.check_expert_ids`, which waits for the stream.
    That path can be captured in a CUDA graph.
    """
    options = (activation, gated, trans_b, algorithm, fixed_capacity, w1_layout)
    key = None
    if sync_free is None and return_context is False and recompute is False:
        key = _layers.layer_key(
            x, topk_ids, topk_weights, w1, w2, b1, b2, options, executor, stream, dropped_pairs
        )
        checked = _layers.lookup(key)
        if checked is not None:
            # Checked before with this key: the arrays are CuPy arrays (see layer_cache).
            import cupy

            shape, executor, res = checked
            args = (res, executor, shape, x, topk_ids, topk_weights, (w1, w2, b1, b2))
            if stream is None and cupy.cuda.runtime.getDevice() == res.device_id:
                return _forward(*args, algorithm, timer, fixed_capacity, dropped_pairs)
            with cupy.cuda.Device(res.device_id), res.cupy_stream:
                return _forward(*args, algorithm, timer, fixed_capacity, dropped_pairs)
    if sync_free is not None:
        warnings.warn(
            "moe_forward(sync_free=...) is deprecated; use fixed_capacity=... (the old name goes "
            "in the next release)",
            DeprecationWarning,
            stacklevel=3,  # past the out-of-memory wrapper
        )
        fixed_capacity = fixed_capacity or bool(sync_free)
    x_v = check_tokens(x)
    shape = check_layer_args(
        x_v, topk_ids, topk_weights, w1, w2, b1, b2, activation, gated, trans_b, w1_layout
    )
    algorithm = coerce_enum(Algorithm, algorithm, "algorithm")
    if fixed_capacity:
        check_fixed_capacity_args(x_v.shape[0], dropped_pairs)
    elif dropped_pairs is not None:
        raise ValueError(
            "dropped_pairs applies only with fixed_capacity=True (the synchronizing path raises on bad ids)"
        )
    executor = executor_or_shared(executor)
    keep_context = check_context_options(return_context, recompute, fixed_capacity)  # before any GPU work
    if keep_context and shape.gate_up_block:
        raise ValueError(
            "return_context=True does not take w1_layout='gate_up_blocked' (the backward reads gate|up)"
        )
    # FP8ExpertWeights: read by the FP8 kernel where it can (SM 9.0, bf16 x),
    # else dequantized to x's dtype for this call (docs/fp8.md); others pass
    # through. The FP8 kernel step (moe/fp8_step.py) runs the layer with
    # fixed_capacity, and on the default path under AUTO where the 16-bit
    # default takes its kernel step (no timer, no context, T within the
    # fixed-capacity bound): nothing waits for the GPU, and on an H200 it was
    # 1.00-1.67x faster than the counts-on-the-host path with the FP8 gmm,
    # its outputs equal bit for bit (docs/benchmarks.md).
    # isinstance inline, not has_fp8: this runs on every fixed-capacity call (hot-path budget).
    fp8_given = isinstance(w1, FP8ExpertWeights) or isinstance(w2, FP8ExpertWeights)
    fp8_step = (
        fp8_given
        and not keep_context
        and (
            fixed_capacity
            or (timer is None and algorithm is Algorithm.AUTO and x_v.shape[0] <= MAX_FIXED_CAPACITY_TOKENS)
        )
        and _fp8_fixed_capacity(x_v, shape, w1, w2, executor)
    )
    if fp8_step:
        fp8 = (is_fp8(w1), is_fp8(w2))  # the FP8 kernel step reads them as they are
    else:
        fp8 = _fp8_kernel_weights(x_v, (w1, w2), algorithm, executor, stream, fixed_capacity or keep_context)
    w1, w2 = (w if fast else dense_weights(w, x_v.dtype, stream) for w, fast in zip((w1, w2), fp8))
    if any(fp8):
        algorithm = Algorithm.SM90_GROUPED  # grouped-contiguous rows, what the FP8 kernel reads
    if keep_context:
        return forward_with_context(
            x_v, shape, topk_ids, topk_weights, (w1, w2, b1, b2), executor=executor,
            algorithm=algorithm, stream=stream, timer=timer, recompute=recompute,
        )  # fmt: skip
    import cupy

    res = stream_resources(device_of(x_v), stream)
    _layers.store(key, (shape, executor, res))
    params = tuple(p if p is None or fast else as_cupy(p) for p, fast in zip((w1, w2, b1, b2), (*fp8, 0, 0)))
    weights = None if topk_weights is None else as_cupy(topk_weights)
    counter = None if dropped_pairs is None else as_cupy(dropped_pairs)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        args = (res, executor, shape, as_cupy(x_v), as_cupy(topk_ids), weights, params)
        return _forward(*args, algorithm, timer, fixed_capacity, counter, fp8, fp8_step)


def _forward(
    res,
    executor,
    shape,
    x,
    ids,
    weights,
    params,
    algorithm,
    timer,
    fixed_capacity,
    dropped,
    fp8=(False, False),
    fp8_step=False,
):
    """The layer on checked CuPy arrays, on ``res``'s stream and device (current).
    ``fp8``: per weight, whether the FP8 kernel reads it (the weight is then
    an FP8ExpertWeights; never on a cache hit, which holds CuPy arrays only);
    ``fp8_step``: the FP8 kernel step runs the layer (moe_forward's rule)."""
    import cupy

    w1, w2, b1, b2 = params
    tokens = x.shape[0]
    if fixed_capacity:
        out = cupy.ndarray((tokens, shape.hidden), x.dtype)
        if tokens and (fp8[0] or fp8[1]):
            buf = cached_chunk_buffers(res, shape, tokens, kernel_only=True)
            rows8 = cached_fp8_rows(res, shape, tokens * shape.top_k)
            fixed_capacity_step(
                res, executor, shape, buf, x, ids, weights, params, out, dropped=dropped, fp8_rows=rows8
            )
        elif tokens:
            sm = executor.info_for(res.device_id).sm
            kernel = fixed_capacity_backend(sm, executor, shape, w1, w2, tokens) == "sm90_grouped"
            buf = cached_chunk_buffers(res, shape, tokens, kernel_only=kernel)
            fixed_capacity_step(res, executor, shape, buf, x, ids, weights, params, out, dropped=dropped)
        return out
    if fp8_step:
        return _kernel_layer(res, shape, x, ids, weights, params, None, fp8_executor=executor)
    if not any(fp8) and _default_kernel_step(res, executor, algorithm, shape, w1, w2, tokens):
        return _kernel_layer(res, shape, x, ids, weights, params, timer)
    hidden, inter, width = shape.hidden, shape.inter, shape.width
    mark_stage(timer, "start", res.cupy_stream)
    inp = plan_dispatch(
        res, executor, x, ids, weights, shape.num_experts, algorithm, width, timer, (hidden, inter)
    )  # fmt: skip
    rows = inp.rows.shape[0]
    h = cupy.ndarray((rows, width), inp.rows.dtype)
    if fp8[0]:
        fp8_gmm.gmm_fp8(inp.rows, w1, inp.tokens_per_expert, out=h, stream=res.cupy_stream)
    else:
        run_expert_gemm(executor, res, inp, inp.rows, w1, h, shape.trans_b)
    mark_stage(timer, "gemm1", res.cupy_stream)
    act = cupy.ndarray((rows, inter), h.dtype)
    arch = kernel_arch(res)
    if rows:
        K.expert_activation(
            res.launch_stream, arch, h, inter, int(shape.gated), K.ACTIVATIONS[shape.activation], b1,
            inp.row_to_pair, ids, act, shape.gate_up_block,
        )  # fmt: skip
    mark_stage(timer, "activation", res.cupy_stream)
    y = cupy.ndarray((rows, hidden), h.dtype)
    # The down projection may run another algorithm on the same row layout.
    if fp8[1]:
        fp8_gmm.gmm_fp8(act, w2, inp.tokens_per_expert, out=y, stream=res.cupy_stream)
    else:
        run_expert_gemm(executor, res, inp, act, w2, y, shape.trans_b, inp.second_algorithm)
    mark_stage(timer, "gemm2", res.cupy_stream)
    out = cupy.ndarray((inp.num_tokens, hidden), h.dtype)
    if inp.num_tokens:
        K.combine_rows(
            res.launch_stream, arch, y, inp.pair_to_row, weights, ids, b2, inp.num_tokens, inp.top_k, out
        )  # fmt: skip
    mark_stage(timer, "combine", res.cupy_stream)
    return out


def _default_kernel_step(res, executor, algorithm, shape, w1, w2, tokens: int) -> bool:
    """Whether the default (synchronizing) path runs the Hopper kernel step:
    under AUTO, where :func:`fixed_capacity_backend` takes the kernel for this
    T (SM 9.0, a layer the kernel fits). It was measured faster than the
    counts-on-the-host path on every prefill case of the benchmark's models
    (docs/kernel-notes.md), and it leaves the GPU no gap for host planning."""
    auto = algorithm is Algorithm.AUTO or algorithm == "auto"  # the default, spelled either way: no coercion
    if (
        not (auto or coerce_enum(Algorithm, algorithm, "algorithm") is Algorithm.AUTO)
        or tokens > MAX_FIXED_CAPACITY_TOKENS
    ):
        return False
    sm = executor.info_for(res.device_id).sm
    return fixed_capacity_backend(sm, executor, shape, w1, w2, tokens) == "sm90_grouped"


def _kernel_layer(res, shape, x, ids, weights, params, timer, fp8_executor=None):
    """The default path on the kernel: the sync-free step, nothing copied to
    the host in a way that waits. Pairs with ids outside [0, E) add nothing
    and are counted on the device; this call raises on the count earlier
    calls left, once their copy of it has landed (moe/dropped_pairs.py), and
    :func:`~cublas_grouped.check_expert_ids` waits and raises at once. The
    output is a new array: nothing of the caller's is written. With
    ``fp8_executor`` (FP8 weights, no timer) the FP8 kernel step runs it."""
    import cupy

    dropped = res.buffers.get(DROPPED_PAIRS_KEY)  # inline: this runs on every call (hot-path budget)
    if dropped is None:
        dropped = stream_dropped_pairs(res)
    elif dropped.host[0]:  # earlier calls' bad ids, read from pinned memory (no wait)
        dropped.report(res, before_call=True)  # raises before any GPU work
    tokens = x.shape[0]
    # Called on res's device and stream, made current by moe_forward (see _forward).
    out = cupy.empty((tokens, shape.hidden), dtype=x.dtype)
    if not tokens:
        return out
    mark_stage(timer, "start", res.cupy_stream)
    buf = cached_chunk_buffers(res, shape, tokens, kernel_only=True)
    if fp8_executor is not None:
        rows8 = cached_fp8_rows(res, shape, tokens * shape.top_k)
        fixed_capacity_step(
            res,
            fp8_executor,
            shape,
            buf,
            x,
            ids,
            weights,
            params,
            out,
            dropped=dropped.device,
            fp8_rows=rows8,
        )
    else:
        buf.capacity.check_kernel_step(shape, tokens)
        kernel_step(res, shape, buf, x, ids, weights, params, out, dropped.device, timer)
    dropped.publish(res, shape.num_experts)  # the running count's copy, queued behind the step
    return out


def _fp8_fixed_capacity(x_v, shape, w1, w2, executor) -> bool:
    """Whether ``fixed_capacity=True`` runs its FP8 weights (the caller saw
    one) on the FP8 kernel step
    (:func:`fp8_step_unsupported` with the executor's algorithm) rather than
    dequantizing them for the call."""
    sm = executor.info_for(device_of(x_v)).sm
    return fp8_step_unsupported(sm, executor.config.algorithm, shape, w1, w2) is None


def _fp8_kernel_weights(x_v, weights, algorithm, executor, stream, other_path: bool) -> tuple[bool, ...]:
    """Per weight: whether the FP8 kernel runs it (``fp8_gmm.kernel_takes``
    with the call's algorithm, or the executor's for AUTO); never on the
    fixed-capacity or context paths (``other_path``), which keep the fallback."""
    if other_path:
        return tuple(False for _ in weights)
    chosen = executor.config.algorithm if algorithm is Algorithm.AUTO else algorithm
    device = device_of(x_v)
    return tuple(fp8_gmm.kernel_takes(w, x_v.dtype, device, chosen, stream) for w in weights)
