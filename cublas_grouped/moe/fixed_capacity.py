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

Memory: rows, GEMM 1 output, activation and GEMM 2 output for
``ChunkCapacity.rows`` rows, plus a few small index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..gemm.backends.cublas import batched, bound
from ..gemm.executor import GroupedGemmExecutor
from ..gemm.fp8 import dense_scratch, is_fp8
from ..gemm.plan import GemmPlan, Operands, RowLayout, shape_plan
from ..gemm.pointers import build_pointers
from ..runtime.arrays import as_cupy, view
from ..runtime.device import resolve_stream, resources
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
]

# Rows per chunk of a fixed-capacity step with many thin experts (see chunk_rows).
CHUNK_ROWS = 16
# Kernel arguments and row indices are int32.
INT32_LIMIT = 2**31
# Most tokens of one fixed-capacity step. Sizing walks every T up to the
# capacity (about 1.5 us each); fixed capacity is for decode and small
# prefill chunks, far below this.
MAX_FIXED_CAPACITY_TOKENS = 2**18


class FixedCapacityMoE:
    """MoE layer with a fixed token capacity and no host synchronization.

    Parameters
    ----------
    w1, w2, b1, b2, activation, gated, trans_b
        As in :func:`cublas_grouped.moe_forward`. FP8 weights get a dense copy
        of ``dtype`` (default bfloat16: the tokens' dtype), refilled from
        them at every step and counted in :attr:`nbytes` (docs/fp8.md).
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
    ):
        import cupy

        opts = {"activation": activation, "gated": gated, "trans_b": trans_b, "dtype": dtype}
        shape = layer_shape(w1, w2, top_k, b1=b1, b2=b2, **opts)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= shape.num_experts:
            raise ValueError(f"top_k must be an int in [1, {shape.num_experts}]; got {top_k!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int; got {max_tokens!r}")
        self.shape = shape
        self.capacity = ChunkCapacity.of(shape, max_tokens)  # raises before any GPU work
        self.w1, self.w2 = (dense_scratch(w, shape.dtype) for w in (w1, w2))
        self._fp8 = [(w, d) for w, d in zip((w1, w2), (self.w1, self.w2)) if is_fp8(w)]
        self.b1, self.b2 = (None if b is None else as_cupy(b) for b in (b1, b2))
        self.top_k, self.max_tokens = top_k, max_tokens
        self.activation, self.gated, self.trans_b = activation, gated, trans_b
        self.num_experts, self.hidden = shape.num_experts, shape.hidden
        self.inter, self.width = shape.inter, shape.width
        self.executor = executor_or_shared(executor)
        with cupy.cuda.Device(self.w1.device.id):
            self._buffers = ChunkBuffers.allocate(shape, self.capacity)
            self._out = cupy.empty((max_tokens, shape.hidden), dtype=shape.dtype)
            self._dropped = cupy.zeros(1, dtype=cupy.uint64)
        self._last_stream = None  # (StreamResources, Event) of the last eager step
        sizes = (max_tokens, shape.hidden, top_k, shape.dtype, self.w1.device.id)
        workspace = self.executor.config.workspace_mb << 20
        self._graphs = StepGraphs(self._step, *sizes, workspace) if graphs else None

    @property
    def nbytes(self) -> int:
        """GPU memory held by this layer's buffers (weights not included; the dense copy of FP8 ones is)."""
        graphs = 0 if self._graphs is None else self._graphs.nbytes
        dense = sum(d.nbytes for _, d in self._fp8)
        return self._buffers.nbytes + self._out.nbytes + self._dropped.nbytes + graphs + dense

    def _step(self, res, x, ids, weights, out) -> None:
        for w, dense in self._fp8:  # no allocation: a graph of the step captures this
            w.dequantize(dense.dtype, out=dense, stream=res.stream)
        params = (self.w1, self.w2, self.b1, self.b2)
        fixed_capacity_step(
            res, self.executor, self.shape, self._buffers, x, ids, weights, params, out, dropped=self._dropped
        )

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
        if x_v.shape[1] != self.hidden or x_v.dtype != self.w1.dtype:
            raise ValueError(f"x must be {self.w1.dtype} [T, {self.hidden}]; got {x_v.dtype} {x_v.shape}")
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


def chunk_rows(shape: LayerShape, tokens: int) -> int:
    """Rows per chunk (C) for a step of ``tokens`` tokens.

    Few, large experts (Mixtral: mean rows per expert ``T*k/E`` above half
    a chunk, i.e. ``T*k > 8*E``) get one T-row chunk each, so no expert's
    weights are read twice. Many, thin experts (Qwen3, DeepSeek-V3) get
    ``min(T, 16)``-row chunks: 16 is the row tile cuBLAS picks for such thin
    problems on Hopper, and T-row chunks would compute mostly padding
    (measured: 4-6% faster at T=64).
    """
    if tokens * shape.top_k > shape.num_experts * CHUNK_ROWS // 2:
        return max(1, tokens)
    return max(1, min(tokens, CHUNK_ROWS))


def max_chunks(shape: LayerShape, tokens: int) -> int:
    """The most chunks any routing of ``tokens`` tokens needs (exact).

    With P = T*k pairs, A = min(E, P) experts that can be active and C
    rows per chunk: each active expert's first chunk costs at least one
    row, every further chunk C more, and no expert has more than T rows
    (repeats share a row), so at most ``A + (P - A) // C`` chunks and at
    most ``A * ceil(T / C)``. Routings reach the smaller of the two.
    """
    pairs, chunk = tokens * shape.top_k, chunk_rows(shape, tokens)
    active = min(shape.num_experts, pairs)
    return min(active + (pairs - active) // chunk, active * -(-tokens // chunk))


def _gemm_plan(shape: LayerShape, n: int, k: int) -> GemmPlan:
    """Shape-only plan: the column-major mapping of a GEMM with N=n, K=k (made once per shape)."""
    return shape_plan(shape.num_experts, n, k, shape.trans_b)


@dataclass(frozen=True)
class ChunkCapacity:
    """What a fixed-capacity step's buffers hold: the largest need over every
    token count up to ``max_tokens`` (the need is not monotonic in T, because
    the chunk size changes with T)."""

    max_tokens: int
    pairs: int  # max_tokens * top_k
    chunks: int  # most chunks (problems of the batched GEMM) of any step
    rows: int  # most rows (chunks * chunk rows) of any step
    chunk_rows: int  # largest chunk (the scratch output's rows)

    @classmethod
    def of(cls, shape: LayerShape, max_tokens: int) -> ChunkCapacity:
        """Capacity for every step of 1..``max_tokens`` tokens.

        ``ValueError`` above :data:`MAX_FIXED_CAPACITY_TOKENS` tokens or past
        the int32 limits of the kernels, before any allocation.
        """
        pairs = max_tokens * shape.top_k
        if max_tokens > MAX_FIXED_CAPACITY_TOKENS or pairs >= INT32_LIMIT:
            raise ValueError(
                f"max_tokens={max_tokens} is too large: a fixed-capacity step takes at most "
                f"{MAX_FIXED_CAPACITY_TOKENS} tokens and fewer than 2**31 (token, expert) pairs"
            )
        chunks = rows = largest = 0
        for tokens in range(1, max_tokens + 1):  # every T: the need is not monotonic in T
            chunk, step_chunks = chunk_rows(shape, tokens), max_chunks(shape, tokens)
            chunks = max(chunks, step_chunks)
            rows = max(rows, step_chunks * chunk)
            largest = max(largest, chunk)
        if rows >= INT32_LIMIT:
            raise ValueError(f"max_tokens={max_tokens} needs {rows} rows; rows must stay below 2**31")
        return cls(max_tokens, pairs, chunks, rows, largest)

    def check_step(self, shape: LayerShape, tokens: int) -> None:
        """Refuse a step the buffers cannot hold (an internal error: never truncate)."""
        pairs, chunks, chunk = tokens * shape.top_k, max_chunks(shape, tokens), chunk_rows(shape, tokens)
        rows = chunks * chunk
        if pairs > self.pairs or chunks > self.chunks or rows > self.rows or chunk > self.chunk_rows:
            raise RuntimeError(
                f"a step of {tokens} tokens needs {pairs} pairs, {chunks} chunks, {rows} rows "
                f"and {chunk}-row chunks but the buffers hold {self.pairs}, {self.chunks}, "
                f"{self.rows} and {self.chunk_rows}"
            )


@dataclass
class ChunkBuffers:
    """Every intermediate of a fixed-capacity step, sized by a :class:`ChunkCapacity`."""

    capacity: ChunkCapacity
    block_counts: object
    counts: object
    offsets: object
    pair_to_row: object
    row_to_pair: object
    rows: object
    h: object
    act: object
    y: object
    scratch: object
    pointers: object  # uint64 [2, 3, chunks]: (GEMM 1, GEMM 2) x (rows, weights, out)

    @classmethod
    def allocate(cls, shape: LayerShape, capacity: ChunkCapacity) -> ChunkBuffers:
        """Allocate every buffer on the current device, in ``shape.dtype``."""
        import cupy

        rows, i32, dtype = capacity.rows, cupy.int32, shape.dtype
        return cls(
            capacity,
            cupy.empty((K.num_pair_blocks(capacity.pairs), shape.num_experts), dtype=i32),
            cupy.empty(shape.num_experts, dtype=i32),
            cupy.empty(shape.num_experts + 1, dtype=i32),
            cupy.empty(capacity.pairs, dtype=i32),
            cupy.empty(rows, dtype=i32),
            cupy.empty((rows, shape.hidden), dtype=dtype),
            cupy.empty((rows, shape.width), dtype=dtype),
            cupy.empty((rows, shape.inter), dtype=dtype),
            cupy.empty((rows, shape.hidden), dtype=dtype),
            cupy.empty((capacity.chunk_rows, max(shape.width, shape.hidden)), dtype=dtype),
            cupy.empty((2, 3, capacity.chunks), dtype=cupy.uint64),
        )

    @property
    def nbytes(self) -> int:
        """GPU memory of every buffer."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if f.name != "capacity")


def cached_chunk_buffers(res, shape: LayerShape, tokens: int) -> ChunkBuffers:
    """Chunk buffers kept on the stream's resources for ``moe_forward(fixed_capacity=True)``.

    One set per layer shape (dtype included) and stream, sized for every step
    up to the largest T seen, rounded up to a power of two so that slowly
    rising decode batch sizes reallocate only a few times.
    """
    key = ("chunk-buffers", shape)
    cached = res.buffers.get(key)
    if cached is None or cached.capacity.max_tokens < tokens:
        max_tokens = max(tokens, min(1 << (tokens - 1).bit_length(), MAX_FIXED_CAPACITY_TOKENS))
        cached = ChunkBuffers.allocate(shape, ChunkCapacity.of(shape, max_tokens))
        res.buffers[key] = cached
    return cached


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
    res, executor, shape: LayerShape, buf: ChunkBuffers, x, ids, weights, params, out, *, dropped=None
) -> None:
    """One fixed-capacity layer step on ``res``'s stream: fixed sizes for a given T.

    ``params`` = (w1, w2, b1, b2) as CuPy arrays (biases may be None).
    ``dropped``: a uint64 [1] device counter to which pairs with an expert id
    outside [0, E) are added, or None.
    """
    import cupy

    w1, w2, b1, b2 = params
    arch = kernel_arch(res)
    stream = res.launch_stream
    tokens, k = ids.shape
    e = shape.num_experts
    buf.capacity.check_step(shape, tokens)
    pairs, chunks, chunk = tokens * k, max_chunks(shape, tokens), chunk_rows(shape, tokens)
    rows = chunks * chunk
    nb = K.num_pair_blocks(pairs)
    block_counts = buf.block_counts[:nb]
    pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:rows]
    # Rows of partial chunks stay -1 (every byte 0xFF): gathered as zeros.
    cupy.cuda.runtime.memsetAsync(row_to_pair.data.ptr, 0xFF, row_to_pair.nbytes, res.stream)
    K.block_histogram(stream, arch, ids, pairs, e, block_counts, skip_repeats=True)
    K.column_scan(stream, arch, block_counts, nb, e, buf.counts)
    layout = RowLayout.chunk_aligned(chunk)
    x_rows, h, act, y = buf.rows[:rows], buf.h[:rows], buf.act[:rows], buf.y[:rows]

    def gemm(which, a, w, c, n, kk, offsets=None):
        plan = _gemm_plan(shape, n, kk)
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
            K.gather_rows(stream, arch, x, row_to_pair, k, x_rows)
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
    )
    gemm(1, act, w2, y, shape.hidden, shape.inter)
    K.combine_rows(stream, arch, y, pair_to_row, weights, ids, b2, tokens, k, out)
