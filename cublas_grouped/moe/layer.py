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

from ..gemm.config import Algorithm, coerce_enum
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import dense_weights
from ..runtime.arrays import as_cupy
from ..runtime.device import stream_resources
from ..runtime.oom import reports_out_of_memory
from . import kernels as K
from . import layer_cache as _layers
from .backward import check_context_options, forward_with_context
from .checks import check_layer_args, check_tokens, device_of, executor_or_shared, kernel_arch
from .dispatch import plan_dispatch, run_expert_gemm
from .fixed_capacity import cached_chunk_buffers, check_fixed_capacity_args, fixed_capacity_step

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
        call, then run as 16-bit weights; correct, slower (docs/fp8.md).
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
        grows with ``min(E, T*k)``, so it is not meant for prefill. Expert ids
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

    Returns
    -------
    GPU array [T, H] of x's dtype. Deterministic: two runs give identical bits.
    Without ``fixed_capacity``, one small synchronizing copy (the per-expert
    counts) happens per call.
    """
    options = (activation, gated, trans_b, algorithm, fixed_capacity)
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
    shape = check_layer_args(x_v, topk_ids, topk_weights, w1, w2, b1, b2, activation, gated, trans_b)
    coerce_enum(Algorithm, algorithm, "algorithm")
    if fixed_capacity:
        check_fixed_capacity_args(x_v.shape[0], dropped_pairs)
    elif dropped_pairs is not None:
        raise ValueError(
            "dropped_pairs applies only with fixed_capacity=True (the synchronizing path raises on bad ids)"
        )
    executor = executor_or_shared(executor)
    keep_context = check_context_options(return_context, recompute, fixed_capacity)  # before any GPU work
    # FP8ExpertWeights: dequantized to x's dtype for this call (docs/fp8.md); others pass through.
    w1, w2 = (dense_weights(w, x_v.dtype, stream) for w in (w1, w2))
    if keep_context:
        return forward_with_context(
            x_v, shape, topk_ids, topk_weights, (w1, w2, b1, b2), executor=executor,
            algorithm=algorithm, stream=stream, timer=timer, recompute=recompute,
        )  # fmt: skip
    import cupy

    res = stream_resources(device_of(x_v), stream)
    _layers.store(key, (shape, executor, res))
    params = tuple(None if p is None else as_cupy(p) for p in (w1, w2, b1, b2))
    weights = None if topk_weights is None else as_cupy(topk_weights)
    counter = None if dropped_pairs is None else as_cupy(dropped_pairs)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        args = (res, executor, shape, as_cupy(x_v), as_cupy(topk_ids), weights, params)
        return _forward(*args, algorithm, timer, fixed_capacity, counter)


def _forward(res, executor, shape, x, ids, weights, params, algorithm, timer, fixed_capacity, dropped):
    """The layer on checked CuPy arrays, on ``res``'s stream and device (current)."""
    import cupy

    w1, w2, b1, b2 = params
    tokens = x.shape[0]
    if fixed_capacity:
        out = cupy.ndarray((tokens, shape.hidden), x.dtype)
        if tokens:
            buf = cached_chunk_buffers(res, shape, tokens)
            fixed_capacity_step(res, executor, shape, buf, x, ids, weights, params, out, dropped=dropped)
        return out
    hidden, inter, width = shape.hidden, shape.inter, shape.width
    if timer is not None:
        timer.mark("start", res.cupy_stream)
    inp = plan_dispatch(
        res, executor, x, ids, weights, shape.num_experts, algorithm, width, timer, (hidden, inter)
    )  # fmt: skip
    rows = inp.rows.shape[0]
    h = cupy.ndarray((rows, width), inp.rows.dtype)
    run_expert_gemm(executor, res, inp, inp.rows, w1, h, shape.trans_b)
    if timer is not None:
        timer.mark("gemm1", res.cupy_stream)
    act = cupy.ndarray((rows, inter), h.dtype)
    arch = kernel_arch(res)
    if rows:
        K.expert_activation(
            res.launch_stream, arch, h, inter, int(shape.gated), K.ACTIVATIONS[shape.activation], b1,
            inp.row_to_pair, ids, act,
        )  # fmt: skip
    if timer is not None:
        timer.mark("activation", res.cupy_stream)
    y = cupy.ndarray((rows, hidden), h.dtype)
    # The down projection may run another algorithm on the same row layout.
    run_expert_gemm(executor, res, inp, act, w2, y, shape.trans_b, inp.second_algorithm)
    if timer is not None:
        timer.mark("gemm2", res.cupy_stream)
    out = cupy.ndarray((inp.num_tokens, hidden), h.dtype)
    if inp.num_tokens:
        K.combine_rows(
            res.launch_stream, arch, y, inp.pair_to_row, weights, ids, b2, inp.num_tokens, inp.top_k, out
        )  # fmt: skip
    if timer is not None:
        timer.mark("combine", res.cupy_stream)
    return out
