"""Fixed-capacity decode: an MoE layer with no host sync, which CUDA graphs can capture.

The dynamic layer copies the per-expert counts to the host, because cuBLAS
takes sizes there. This one never does. For a step of T tokens, each expert's
rows are cut into chunks of C rows (:func:`chunk_rows`), and every GEMM is one
``cublasGemmBatchedEx`` whose problems are the chunks, as many as any routing
can need (:func:`max_chunks`). A kernel on the device fills the pointer
arrays from the counts: real chunks first, in expert order; the problems left
over re-point at the last real chunk's weights (already in L2) and write to a
scratch buffer, so an expert without tokens costs no weight bandwidth. Every
launch has fixed sizes for a given T, so a captured graph can be replayed
with new tokens and new routing.

Why no routing can overflow: a pair whose expert id is outside [0, E) takes
no row (it is counted as dropped), and a token that names the same expert
twice gets one row for it, which the combine adds once per choice (the same
result as two rows). So no expert gets more than T rows, and the bound is
exact. The buffers are sized for the largest need over every T up to the
capacity (:class:`ChunkCapacity`), because the need is not monotonic in T
(the chunk size changes with T). On top of that, the kernels take the length
of every array they write and never write past it.

On SM 9.0 GPUs (bfloat16/float16 layers the kernel takes, the default
algorithm; not single-token steps of layers with at most 8 experts,
measured faster chunked) the GEMMs run on our Hopper kernel instead
(:func:`fixed_capacity_backend`): each expert's rows back to back in T*k
rows, the kernel reading the counts on the device, so it computes no tile
past an expert's rows and no chunk left over, and reads each active expert's
weights once per column tile. Its launches too depend on T alone.

FP8 expert weights in the checkpoint layout (``trans_b``, "block128") with
bfloat16 tokens run there on the FP8 kernel (:mod:`.fp8_step`): the rows
quantized per token on the device before each GEMM, the weights read as they
are (no dense copy). Other FP8 weights are dequantized into a dense copy of
the layer's at every step, then run as 16-bit weights.

Memory: rows, GEMM 1 output, activation and GEMM 2 output for
``ChunkCapacity.rows`` rows (at least T*k), plus a few small index arrays;
on the FP8 kernel step T*k rows, plus their e4m3 codes and scales at both
GEMMs' inputs (:class:`~cublas_grouped.moe.fp8_step.FP8Rows`).
"""

from __future__ import annotations

import numpy as np

from ..gemm.backends.cublas import batched, bound
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import FP8ExpertWeights, dense_scratch, is_fp8
from ..gemm.plan import Operands, RowLayout
from ..gemm.pointers import build_pointers
from ..runtime.arrays import as_cupy, view
from ..runtime.device import finish_setup_work, resolve_stream, resources
from ..runtime.oom import reports_out_of_memory
from . import kernels as K
from .checks import (
    LayerShape,
    check_routing,
    check_tokens,
    device_of,
    executor_or_shared,
    kernel_arch,
    layer_shape,
)
from .chunk_capacity import (
    CHUNK_ROWS,
    MAX_FIXED_CAPACITY_TOKENS,
    ChunkBuffers,
    ChunkCapacity,
    cached_chunk_buffers,
    chunk_gemm_plan,
    chunk_rows,
    max_chunks,
)
from .fp8_step import FP8Rows, fp8_kernel_step, fp8_step_unsupported, has_fp8, layer_weight_nbytes
from .kernel_step import (
    CHUNKED_DECODE_MAX_EXPERTS,
    CHUNKED_DECODE_MAX_TOKENS,
    count_rows,
    fixed_capacity_backend,
    kernel_step,
)
from .step_graphs import StepGraphs

__all__ = [
    "CHUNK_ROWS",
    "MAX_FIXED_CAPACITY_TOKENS",
    "FixedCapacityMoE",
    "ChunkCapacity",
    "ChunkBuffers",
    "chunk_rows",
    "max_chunks",
    "cached_chunk_buffers",
    "check_fixed_capacity_args",
    "fixed_capacity_step",
    "fixed_capacity_backend",
    "CHUNKED_DECODE_MAX_EXPERTS",
    "CHUNKED_DECODE_MAX_TOKENS",
]


class FixedCapacityMoE:
    """MoE layer with a fixed token capacity and no host synchronization.

    Parameters
    ----------
    w1, w2, b1, b2, activation, gated, trans_b, w1_layout
        As in :func:`cublas_grouped.moe_forward`. FP8 weights in the layout
        the FP8 Hopper kernel reads (``trans_b=True``, "block128"; bfloat16
        tokens; an SM 9.0 GPU; the executor's algorithm AUTO or SM90_GROUPED)
        run on it as they are, every step quantizing its activations per row
        on the device (:attr:`fp8_kernel` is then True; no dense copy). Other
        FP8 weights get a dense copy of ``dtype`` (default bfloat16: the
        tokens' dtype), refilled from them at every step and counted in
        :attr:`nbytes`; :attr:`fp8_unsupported` says why (docs/fp8.md).
    top_k : int
        Experts per token.
    max_tokens : int
        Capacity: the most tokens one :meth:`forward` accepts. Buffers that
        hold what any routing of any T <= max_tokens needs are allocated
        here, once (:attr:`nbytes` says how much).
    graphs : bool
        Eager :meth:`forward` calls replay a CUDA graph of the step that the
        layer captures itself on the first call with each token count (on a
        private stream, ordered with the caller's by events; see
        :mod:`cublas_grouped.moe.step_graphs`): the inputs are copied into
        buffers of the layer, then the graph runs, which costs a fraction of
        the host time of launching the step. Default True; False launches
        every kernel on every call. Calls made while the caller captures a
        graph of its own run the step into that capture, as with False.

    Notes
    -----
    Run :meth:`forward` once eagerly for each token count before capturing
    it (the first call compiles kernels and sets up the cuBLAS workspace,
    neither of which may happen inside a capture). A call with more than
    ``max_tokens`` tokens raises ``ValueError`` before any GPU work.

    Expert ids are not checked on the host (that would need a sync). A pair
    whose id is outside ``[0, E)`` adds nothing to its token's output and is
    counted on the device: :meth:`dropped_pairs` returns the count and
    :meth:`check_routing` raises if it is not zero. A token that names one
    expert twice gets that expert's output twice, weighted, as in
    :func:`cublas_grouped.moe_forward`.

    The constructor waits for the current stream (unless it is capturing),
    where it zeroes the layer's counters: a first step on any other stream,
    one made with ``non_blocking=True`` included, then finds them zeroed,
    and finds in place whatever was queued on that stream before (the
    weights' copies, when they were made there). Inputs of a step are the
    caller's to order: make them on the step's stream, or make it wait.

    The layer's buffers belong to one step at a time. Eager calls on
    different streams are ordered (each waits for the previous call's work
    through an event), but a graph replay is not: do not replay a captured
    step on one stream while another step of the same layer runs on another.
    The result is overwritten by the next step.
    """

    @reports_out_of_memory("FixedCapacityMoE")
    def __init__(
        self,
        w1,
        w2,
        top_k: int,
        max_tokens: int,
        *,
        b1=None,
        b2=None,
        activation: str = "silu",
        gated: bool = True,
        trans_b: bool = False,
        executor: GroupedGemmExecutor | None = None,
        graphs: bool = True,
        dtype=None,
        w1_layout: str = "gate_up",
    ):
        import cupy

        opts = {
            "activation": activation,
            "gated": gated,
            "trans_b": trans_b,
            "dtype": dtype,
            "w1_layout": w1_layout,
        }
        shape = layer_shape(w1, w2, top_k, b1=b1, b2=b2, **opts)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= shape.num_experts:
            raise ValueError(f"top_k must be an int in [1, {shape.num_experts}]; got {top_k!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int; got {max_tokens!r}")
        self.shape = shape
        self.executor = executor_or_shared(executor)
        # FP8 weights the FP8 kernel step takes are kept as they are (no
        # dense copy); the step then never runs chunked, so T*k rows suffice.
        self.fp8_unsupported = self._fp8_step_unsupported(shape, w1, w2, max_tokens)
        self.fp8_kernel = has_fp8(w1, w2) and self.fp8_unsupported is None
        if self.fp8_kernel:
            self.capacity = ChunkCapacity.kernel_rows(shape, max_tokens)
            self.w1, self.w2 = (w if is_fp8(w) else as_cupy(w) for w in (w1, w2))
        else:
            self.capacity = ChunkCapacity.of(shape, max_tokens)  # raises before any GPU work
            self.w1, self.w2 = (dense_scratch(w, shape.dtype) for w in (w1, w2))
        self._fp8 = [(w, d) for w, d in zip((w1, w2), (self.w1, self.w2)) if is_fp8(w) and not is_fp8(d)]
        device = _weights_device(self.w1)
        self.b1, self.b2 = (None if b is None else as_cupy(b) for b in (b1, b2))
        self.top_k, self.max_tokens = top_k, max_tokens
        self.activation, self.gated, self.trans_b = activation, gated, trans_b
        self.num_experts, self.hidden = shape.num_experts, shape.hidden
        self.inter, self.width = shape.inter, shape.width
        with cupy.cuda.Device(device):
            self._buffers = ChunkBuffers.allocate(shape, self.capacity)
            self._fp8_rows = FP8Rows.allocate(shape, self.capacity.pairs) if self.fp8_kernel else None
            self._out = cupy.empty((max_tokens, shape.hidden), dtype=shape.dtype)
            self._dropped = cupy.zeros(1, dtype=cupy.uint64)
            finish_setup_work()  # the zeros above land before a step on another stream reads them
        self._last_stream = None  # (StreamResources, Event) of the last eager step
        sizes = (max_tokens, shape.hidden, top_k, shape.dtype, device)
        workspace = self.executor.config.workspace_mb << 20
        self._graphs = StepGraphs(self._step, *sizes, workspace) if graphs else None

    def _fp8_step_unsupported(self, shape, w1, w2, max_tokens: int) -> str | None:
        """Why the FP8 kernel step does not run this layer's FP8 weights
        (:func:`fp8_step_unsupported`); None when it does or none are FP8."""
        if not has_fp8(w1, w2):
            return None
        ChunkCapacity.kernel_rows(shape, max_tokens)  # the capacity's errors before any device query
        sm = self.executor.info_for(_weights_device(w1)).sm
        return fp8_step_unsupported(sm, self.executor.config.algorithm, shape, w1, w2)

    @property
    def nbytes(self) -> int:
        """GPU memory held by this layer's buffers (weights not included; the
        dense copy of FP8 ones is, where the layer keeps one; the quantized
        activations of the FP8 kernel step are)."""
        graphs = 0 if self._graphs is None else self._graphs.nbytes
        dense = sum(d.nbytes for _, d in self._fp8)
        rows8 = 0 if self._fp8_rows is None else self._fp8_rows.nbytes
        return self._buffers.nbytes + self._out.nbytes + self._dropped.nbytes + graphs + dense + rows8

    @property
    def weight_nbytes(self) -> int:
        """GPU bytes of the weights the steps read: FP8 values and scales where
        the FP8 kernel step runs them (:attr:`fp8_kernel`), the dense 16-bit copy
        otherwise (FP8 weights on other paths: the copy, which :attr:`nbytes`
        also counts, the FP8 originals not included)."""
        return layer_weight_nbytes(self.w1, self.w2)

    def _step(self, res, x, ids, weights, out) -> None:
        for w, dense in self._fp8:  # no allocation: a graph of the step captures this
            w.dequantize(dense.dtype, out=dense, stream=res.stream)
        params = (self.w1, self.w2, self.b1, self.b2)
        fixed_capacity_step(
            res, self.executor, self.shape, self._buffers, x, ids, weights, params, out,
            dropped=self._dropped, fp8_rows=self._fp8_rows,
        )  # fmt: skip

    def forward(self, x, topk_ids, topk_weights=None, *, stream=None):
        """One step: ``x`` [T, H] with T <= max_tokens -> [T, H].

        The result is a view of a buffer owned by this layer, overwritten by
        the next call (so that a captured graph always writes the same memory).
        """
        x_v = check_tokens(x)
        check_routing(topk_ids, topk_weights, x_v.shape[0])
        tokens = x_v.shape[0]
        if tokens > self.max_tokens:
            raise ValueError(
                f"x has {tokens} tokens but this FixedCapacityMoE was built for max_tokens="
                f"{self.max_tokens}; build one with a larger capacity"
            )
        if x_v.shape[1] != self.hidden or x_v.dtype != self.shape.dtype:
            raise ValueError(f"x must be {self.shape.dtype} [T, {self.hidden}]; got {x_v.dtype} {x_v.shape}")
        if view(topk_ids, "topk_ids").shape[1] != self.top_k:
            raise ValueError(f"topk_ids must have top_k={self.top_k} columns")
        import cupy

        res = resources(device_of(x_v), resolve_stream(stream))
        with cupy.cuda.Device(res.device_id), res.cupy_stream:
            capturing = cupy.cuda.runtime.streamIsCapturing(res.stream) != 0
            if not capturing:
                self._wait_for_last_step(res)
            out = self._out[:tokens]
            if tokens:
                args = (
                    as_cupy(x_v),
                    as_cupy(topk_ids),
                    None if topk_weights is None else as_cupy(topk_weights),
                )
                if capturing or self._graphs is None:
                    self._step(res, *args, out)
                else:  # replayed from a graph of this layer's own (moe/step_graphs.py)
                    self._graphs.step(res, lambda handle: resources(res.device_id, handle), *args, out)
            if not capturing:
                self._mark_step(res)
        return out

    def _wait_for_last_step(self, res) -> None:
        """Order this step after the previous eager one when it ran on another stream."""
        if self._last_stream is not None and self._last_stream[0] is not res:
            res.cupy_stream.wait_event(self._last_stream[1])

    def _mark_step(self, res) -> None:
        import cupy

        event = self._last_stream[1] if self._last_stream is not None else None
        if event is None:
            event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(res.cupy_stream)
        self._last_stream = (res, event)

    def dropped_pairs(self, *, reset: bool = False) -> int:
        """Pairs whose expert id was outside ``[0, E)``, counted since construction
        or the last ``reset=True`` (graph replays included).

        Copies one integer to the host, after the last eager step's stream
        has finished its work (replays on other streams: synchronize them first).
        """
        import cupy

        stream = self._last_stream[0].cupy_stream if self._last_stream is not None else None
        with cupy.cuda.Device(self._dropped.device.id):
            count = int(cupy.asnumpy(self._dropped, stream=stream)[0])
            if reset:
                if stream is not None:
                    with stream:
                        self._dropped.fill(0)
                else:
                    self._dropped.fill(0)
        return count

    def check_routing(self) -> None:
        """Raise ``ValueError`` if any pair so far had an expert id outside ``[0, E)``."""
        dropped = self.dropped_pairs()
        if dropped:
            raise ValueError(
                f"{dropped} (token, expert) pairs had an expert id outside [0, {self.num_experts}) "
                "and were dropped"
            )


def _weights_device(w) -> int:
    """The device of a layer weight (FP8: of its values)."""
    return device_of(view(w.values if is_fp8(w) else w, "w1"))


def check_fixed_capacity_args(tokens: int, dropped_pairs) -> None:
    """Checks of ``moe_forward(fixed_capacity=True)``: the token count and the counter."""
    if tokens > MAX_FIXED_CAPACITY_TOKENS:
        raise ValueError(
            f"fixed_capacity=True takes at most {MAX_FIXED_CAPACITY_TOKENS} tokens (it is meant for decode "
            f"and small prefill chunks); x has {tokens}"
        )
    if dropped_pairs is not None:
        d_v = view(dropped_pairs, "dropped_pairs")
        if d_v.shape != (1,) or d_v.dtype not in (np.dtype(np.uint64), np.dtype(np.int64)):
            raise ValueError(
                f"dropped_pairs must be a uint64 or int64 array of shape (1,); got {d_v.dtype} {d_v.shape}"
            )


def fixed_capacity_step(
    res, executor, shape: LayerShape, buf: ChunkBuffers, x, ids, weights, params, out, *, dropped=None,
    fp8_rows: FP8Rows | None = None,
) -> None:  # fmt: skip
    """One fixed-capacity layer step on ``res``'s stream: fixed sizes for a given T.

    ``params`` = (w1, w2, b1, b2) as CuPy arrays (biases may be None), or
    with FP8ExpertWeights among the weights, which only the FP8 kernel step
    takes (the caller checked :func:`fp8_step_unsupported`; ``fp8_rows``
    holds its quantized activations for T*k rows).
    ``dropped``: a uint64 [1] device counter to which pairs with an expert id
    outside [0, E) are added, or None.
    """
    w1, w2, b1, b2 = params
    arch = kernel_arch(res)
    stream = res.launch_stream
    tokens, k = ids.shape
    e = shape.num_experts
    pairs = tokens * k
    if fp8_rows is not None or isinstance(w1, FP8ExpertWeights) or isinstance(w2, FP8ExpertWeights):
        if fp8_rows is None:
            raise RuntimeError("the FP8 kernel step needs its quantized-row buffers (fp8_rows)")
        buf.capacity.check_kernel_step(shape, tokens)
        fp8_kernel_step(res, shape, buf, fp8_rows, x, ids, weights, params, out, dropped)
        return
    if (
        fixed_capacity_backend(executor.info_for(res.device_id).sm, executor, shape, w1, w2, tokens)
        == "sm90_grouped"
    ):
        buf.capacity.check_kernel_step(shape, tokens)
        kernel_step(res, shape, buf, x, ids, weights, params, out, dropped)
        return
    buf.capacity.check_step(shape, tokens)
    chunks, chunk = max_chunks(shape, tokens), chunk_rows(shape, tokens)
    rows = chunks * chunk
    block_counts, pair_to_row, row_to_pair = count_rows(res, arch, buf, ids, e, pairs, rows)
    layout = RowLayout.chunk_aligned(chunk)
    x_rows, h, act, y = buf.rows[:rows], buf.h[:rows], buf.act[:rows], buf.y[:rows]

    def gemm(which, a, w, c, n, kk, offsets=None):
        plan = chunk_gemm_plan(shape, n, kk)
        ops = Operands.for_plan(plan, a.data.ptr, w.data.ptr, c.data.ptr, a.dtype.itemsize)
        arrays = build_pointers(
            res,
            buf.counts,
            ops,
            layout,
            arch=arch,
            chunk_rows=chunk,
            num_problems=0,
            num_fixed=chunks,
            scratch_c=buf.scratch.data.ptr,
            row_offsets=offsets,
            pointer_arrays=buf.pointers[which],
        )
        if offsets is not None:  # GEMM 1: rows are placed once the offsets exist
            K.assign_rows(
                stream,
                arch,
                ids,
                pairs,
                e,
                block_counts,
                offsets,
                pair_to_row,
                row_to_pair,
                skip_repeats=True,
                dropped=dropped,
            )
            K.gather_rows(stream, arch, x, pair_to_row, row_to_pair, k, x_rows)
        with bound(res, a.dtype, executor.config) as call:
            batched(call, plan.dims(chunk), arrays, chunks)

    gemm(0, x_rows, w1, h, shape.width, shape.hidden, offsets=buf.offsets)
    K.expert_activation(
        stream,
        arch,
        h,
        shape.inter,
        int(shape.gated),
        K.ACTIVATIONS[shape.activation],
        b1,
        row_to_pair,
        ids,
        act,
        shape.gate_up_block,
    )
    gemm(1, act, w2, y, shape.hidden, shape.inter)
    K.combine_rows(stream, arch, y, pair_to_row, weights, ids, b2, tokens, k, out)
