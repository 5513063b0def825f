"""Sync-free decode: a fixed-capacity MoE layer that CUDA graphs can capture.

The dynamic layer copies the per-expert counts to the host, because cuBLAS
takes sizes there. This one never does. For a step of T tokens, each expert's
rows are cut into chunks of ``C = min(T, 16)`` rows, and every GEMM is one
``cublasGemmBatchedEx`` over a fixed number of chunk problems: the most any
routing can need, ``P = (T*k + min(E, T*k) * (C - 1)) // C``. A kernel on the
device fills the pointer arrays from the counts: real chunks first, in expert
order; the problems left over re-point at the last real chunk's weights
(already in L2) and write to a scratch buffer, so an expert without tokens
costs no weight bandwidth. Every launch has fixed sizes for a given T, so a
captured graph can be replayed with new tokens and new routing, and no
routing can overflow it.

Memory: rows, GEMM 1 output, activation and GEMM 2 output for ``P * C`` rows
(at most ``T*k + min(E, T*k) * 15``), plus a few small index arrays.
Compute: the GEMMs run those ``P * C`` rows instead of ``T * k``; at decode
sizes the weight reads dominate.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from . import _moe_kernels as K
from ._arrays import as_cupy, cuda_dtype, view
from ._device import resolve_stream, resources
from ._executor import GroupedGemmExecutor, Operands, RowLayout
from ._moe import _arch, _check_routing, _check_tokens, _device_of, _executor, check_layer_args
from ._plan import GemmPlan

__all__ = ["StaticMoE"]

# Rows per GEMM problem of a fixed-capacity step (see LayerSpec.chunk).
SLOT_CHUNK_ROWS = 16


class StaticMoE:
    """MoE layer with a fixed token capacity and no host synchronization.

    Parameters
    ----------
    w1, w2, b1, b2, activation, gated, trans_b
        As in :func:`cublas_grouped.moe_forward`.
    top_k : int
        Experts per token.
    max_tokens : int
        Capacity: the most tokens one :meth:`forward` accepts. Buffers for it
        are allocated here, once.

    Notes
    -----
    Run :meth:`forward` once eagerly for each token count before capturing
    it (the first call compiles kernels and sets up the cuBLAS workspace,
    neither of which may happen inside a capture). A call with more than
    ``max_tokens`` tokens raises ``ValueError`` before any GPU work; nothing
    is ever dropped. Expert ids outside ``[0, E)`` are not checked (that would
    need a sync): such pairs contribute nothing to the output.
    """

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
    ):
        import cupy

        fake_ids = _FakeIds((1, top_k))
        num_experts, hidden, inter, width = check_layer_args(
            None, fake_ids, None, w1, w2, b1, b2, activation, gated, trans_b
        )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, {num_experts}]; got {top_k!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int; got {max_tokens!r}")
        self.w1, self.w2 = as_cupy(w1), as_cupy(w2)
        self.b1, self.b2 = (None if b is None else as_cupy(b) for b in (b1, b2))
        self.top_k, self.max_tokens = top_k, max_tokens
        self.activation, self.gated, self.trans_b = activation, gated, trans_b
        self.num_experts, self.hidden, self.inter, self.width = num_experts, hidden, inter, width
        self.executor = _executor(executor)
        self.spec = LayerSpec(num_experts, hidden, inter, width, top_k, gated, activation, trans_b)
        with cupy.cuda.Device(self.w1.device.id):
            self._buffers = SlotBuffers.allocate(self.spec, max_tokens, self.w1.dtype)
            self._out = cupy.empty((max_tokens, hidden), dtype=self.w1.dtype)

    @property
    def nbytes(self) -> int:
        """GPU memory held by this layer's buffers (weights not included)."""
        return self._buffers.nbytes + self._out.nbytes

    def forward(self, x, topk_ids, topk_weights=None, *, stream=None):
        """One step: ``x`` [T, H] with T <= max_tokens -> [T, H].

        The result is a view of a buffer owned by this layer, overwritten by
        the next call (so that a captured graph always writes the same memory).
        """
        x_v = _check_tokens(x)
        _check_routing(topk_ids, topk_weights, x_v.shape[0])
        tokens = x_v.shape[0]
        if tokens > self.max_tokens:
            raise ValueError(
                f"x has {tokens} tokens but this StaticMoE was built for max_tokens="
                f"{self.max_tokens}; build one with a larger capacity"
            )
        if x_v.shape[1] != self.hidden or x_v.dtype != self.w1.dtype:
            raise ValueError(f"x must be {self.w1.dtype} [T, {self.hidden}]; got {x_v.dtype} {x_v.shape}")
        if view(topk_ids, "topk_ids").shape[1] != self.top_k:
            raise ValueError(f"topk_ids must have top_k={self.top_k} columns")
        import cupy

        res = resources(_device_of(x_v), resolve_stream(stream))
        with cupy.cuda.Device(res.device_id), res.cupy_stream:
            out = self._out[:tokens]
            if tokens:
                slot_step(
                    res,
                    self.executor,
                    self.spec,
                    self._buffers,
                    as_cupy(x_v),
                    as_cupy(topk_ids),
                    None if topk_weights is None else as_cupy(topk_weights),
                    (self.w1, self.w2, self.b1, self.b2),
                    out,
                )
        return out


@dataclass(frozen=True)
class LayerSpec:
    """Shape and options of an expert layer (what the slot step needs to know)."""

    num_experts: int
    hidden: int
    inter: int
    width: int  # first GEMM's output: 2 * inter when gated
    top_k: int
    gated: bool
    activation: str
    trans_b: bool

    def chunk(self, tokens: int) -> int:
        """Rows per GEMM problem for a step of ``tokens`` tokens.

        Few, large experts (Mixtral: mean rows per expert above half a chunk)
        get one T-row problem each, so no expert's weights are read twice.
        Many, thin experts (Qwen3, DeepSeek-V3) get 16-row chunks: 16 is the
        row tile cuBLAS picks for such thin problems on Hopper, and T-row
        problems would compute mostly padding (measured: 4-6% faster at T=64).
        """
        if tokens * self.top_k > self.num_experts * SLOT_CHUNK_ROWS // 2:
            return max(1, tokens)
        return max(1, min(tokens, SLOT_CHUNK_ROWS))

    def problems(self, tokens: int) -> int:
        """Upper bound on the chunks any routing of ``tokens`` tokens needs.

        Expert e needs ceil(m_e / C) chunks, at most (m_e + C - 1) / C; summed
        over at most min(E, T*k) active experts whose m_e add up to T*k. And
        m_e <= T, so no expert needs more than ceil(T / C).
        """
        pairs, chunk = tokens * self.top_k, self.chunk(tokens)
        active = min(self.num_experts, pairs)
        # No expert has more than T rows, so none needs more than ceil(T / C) chunks.
        return min((pairs + active * (chunk - 1)) // chunk, active * -(-tokens // chunk))

    def plan(self, n: int, k: int) -> GemmPlan:
        """Shape-only plan: the column-major mapping of a GEMM with N=n, K=k."""
        empty = np.zeros(0, np.int64)
        return GemmPlan(self.num_experts, 0, n, k, False, self.trans_b, empty, np.zeros(1, np.int64), empty)


@dataclass
class SlotBuffers:
    """Every intermediate of a slot step, sized for ``max_tokens`` tokens."""

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
    pointers: object  # uint64 [2, 3, problems]: (GEMM 1, GEMM 2) x (rows, weights, out)

    @classmethod
    def allocate(cls, spec: LayerSpec, max_tokens: int, dtype) -> SlotBuffers:
        import cupy

        slots = spec.problems(max_tokens)
        rows, pairs = slots * spec.chunk(max_tokens), max_tokens * spec.top_k
        i32 = cupy.int32
        return cls(
            cupy.empty((K.num_pair_blocks(pairs), spec.num_experts), dtype=i32),
            cupy.empty(spec.num_experts, dtype=i32),
            cupy.empty(spec.num_experts + 1, dtype=i32),
            cupy.empty(pairs, dtype=i32),
            cupy.empty(rows, dtype=i32),
            cupy.empty((rows, spec.hidden), dtype=dtype),
            cupy.empty((rows, spec.width), dtype=dtype),
            cupy.empty((rows, spec.inter), dtype=dtype),
            cupy.empty((rows, spec.hidden), dtype=dtype),
            cupy.empty((spec.chunk(max_tokens), max(spec.width, spec.hidden)), dtype=dtype),
            cupy.empty((2, 3, slots), dtype=cupy.uint64),
        )

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def cached_slot_buffers(res, spec: LayerSpec, tokens: int, dtype) -> SlotBuffers:
    """Slot buffers kept on the stream's resources, grown to the largest step seen.

    One set per (layer shape, dtype) and stream: later, smaller steps use a
    slice of it, so varying decode batch sizes do not allocate again.
    """
    key = ("slot-buffers", spec, np.dtype(dtype).name)
    cached = res.buffers.get(key)
    if cached is None or cached[0] < tokens:
        cached = (tokens, SlotBuffers.allocate(spec, tokens, dtype))
        res.buffers[key] = cached
    return cached[1]


def slot_step(res, executor, spec: LayerSpec, buf: SlotBuffers, x, ids, weights, params, out) -> None:
    """One sync-free layer step on ``res``'s stream: fixed sizes for a given T.

    ``params`` = (w1, w2, b1, b2) as CuPy arrays (biases may be None).
    """
    w1, w2, b1, b2 = params
    arch = _arch(res)
    stream = res.launch_stream
    tokens, k = ids.shape
    e = spec.num_experts
    pairs, slots, chunk = tokens * k, spec.problems(tokens), spec.chunk(tokens)
    rows = slots * chunk
    nb = K.num_pair_blocks(pairs)
    block_counts = buf.block_counts[:nb]
    pair_to_row, row_to_pair = buf.pair_to_row[:pairs], buf.row_to_pair[:rows]
    pair_to_row.fill(-1)  # pairs with an out-of-range id stay -1 and add nothing
    row_to_pair.fill(-1)
    K.block_histogram(stream, arch, ids, pairs, e, block_counts)
    K.column_scan(stream, arch, block_counts, nb, e, buf.counts)
    layout = RowLayout(align=chunk)
    x_rows, h, act, y = buf.rows[:rows], buf.h[:rows], buf.act[:rows], buf.y[:rows]

    def gemm(which, a, w, c, n, kk, offsets=None):
        plan = spec.plan(n, kk)
        ops = Operands.for_plan(plan, a.data.ptr, w.data.ptr, c.data.ptr, a.dtype.itemsize)
        arrays = executor.build_pointers(
            res,
            buf.counts,
            ops,
            layout,
            chunk_rows=chunk,
            num_problems=0,
            num_slots=slots,
            scratch_c=buf.scratch.data.ptr,
            row_offsets=offsets,
            pointer_arrays=tuple(buf.pointers[which, i, :slots] for i in range(3)),
        )
        if offsets is not None:  # GEMM 1: rows are placed once the offsets exist
            K.assign_rows(stream, arch, ids, pairs, e, block_counts, offsets, pair_to_row, row_to_pair)
            K.gather_rows(stream, arch, x, row_to_pair, k, x_rows)
        handle = res.bind(executor.config.workspace_mb << 20)
        executor.batched(
            handle, plan.dims(chunk), arrays, slots, cuda_dtype(a.dtype, "x"), executor.compute_type(a.dtype)
        )

    gemm(0, x_rows, w1, h, spec.width, spec.hidden, offsets=buf.offsets)
    K.expert_activation(
        stream,
        arch,
        h,
        spec.inter,
        int(spec.gated),
        K.ACTIVATIONS[spec.activation],
        b1,
        row_to_pair,
        ids,
        act,
    )
    gemm(1, act, w2, y, spec.hidden, spec.inter)
    K.combine_rows(stream, arch, y, pair_to_row, weights, ids, b2, tokens, k, out)


class _FakeIds:
    """Stands in for topk_ids when checking weights at construction (no tokens yet)."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.int32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<i4", "data": (0, False), "strides": None, "version": 3}
