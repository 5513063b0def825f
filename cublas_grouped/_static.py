"""Sync-free decode: a fixed-capacity MoE layer that CUDA graphs can capture.

The dynamic layer copies the per-expert counts to the host, because cuBLAS
takes sizes there. This one never does. For a step of T tokens it reserves
``S = min(E, T * k)`` *slots* of ``T`` rows each (no expert can get more than
T rows: a token picks an expert at most once), and runs each GEMM as one
``cublasGemmBatchedEx`` of S problems of T rows. A kernel on the device fills
the slots' pointer arrays: slot s gets the s-th expert that has tokens; slots
left over re-point at the last active expert's weights (already in L2) and
write to a scratch buffer, so an expert without tokens costs no weight
bandwidth. Every launch has fixed sizes for a given T, so a captured graph
can be replayed with new tokens and new routing.

Memory: rows, GEMM 1 output, activation and GEMM 2 output for
``S * T`` rows (``S = min(E, max_tokens * k)``), plus a few small index arrays.
Compute: the GEMMs run ``S * T`` rows instead of ``T * k``; at decode sizes the
weight reads dominate, and padding rows cost little.
"""

from __future__ import annotations

import numpy as np

from . import _moe_kernels as K
from ._arrays import as_cupy, cuda_dtype, view
from ._device import resolve_stream, resources
from ._executor import GroupedGemmExecutor, Operands, RowLayout
from ._moe import _arch, _check_routing, _check_tokens, _device_of, _executor, check_layer_args
from ._plan import GemmPlan

__all__ = ["StaticMoE"]


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
        self.w1, self.w2, self.b1, self.b2 = as_cupy(w1), as_cupy(w2), b1, b2
        self.top_k, self.max_tokens = top_k, max_tokens
        self.activation, self.gated, self.trans_b = activation, gated, trans_b
        self.num_experts, self.hidden, self.inter, self.width = num_experts, hidden, inter, width
        self.executor = _executor(executor)
        dtype = self.w1.dtype
        slots = self.slots(max_tokens)
        rows = slots * max_tokens
        pairs = max_tokens * top_k
        with cupy.cuda.Device(self.w1.device.id):
            self._block_counts = cupy.empty((K.num_pair_blocks(pairs), num_experts), dtype=cupy.int32)
            self._counts = cupy.empty(num_experts, dtype=cupy.int32)
            self._offsets = cupy.empty(num_experts + 1, dtype=cupy.int32)
            self._pair_to_row = cupy.empty(pairs, dtype=cupy.int32)
            self._row_to_pair = cupy.empty(rows, dtype=cupy.int32)
            self._rows = cupy.empty((rows, hidden), dtype=dtype)
            self._h = cupy.empty((rows, width), dtype=dtype)
            self._act = cupy.empty((rows, inter), dtype=dtype)
            self._y = cupy.empty((rows, hidden), dtype=dtype)
            self._scratch = cupy.empty((max_tokens, max(width, hidden)), dtype=dtype)
            self._ptrs = cupy.empty((2, 3, slots), dtype=cupy.uint64)
            self._out = cupy.empty((max_tokens, hidden), dtype=dtype)

    def slots(self, tokens: int) -> int:
        """GEMM problems per step of ``tokens`` tokens: at most one per expert."""
        return min(self.num_experts, tokens * self.top_k)

    @property
    def nbytes(self) -> int:
        """GPU memory held by this layer's buffers (weights not included)."""
        return sum(
            a.nbytes
            for a in (
                self._block_counts,
                self._counts,
                self._offsets,
                self._pair_to_row,
                self._row_to_pair,
                self._rows,
                self._h,
                self._act,
                self._y,
                self._scratch,
                self._ptrs,
                self._out,
            )
        )

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
                self._step(
                    res,
                    as_cupy(x_v),
                    as_cupy(topk_ids),
                    None if topk_weights is None else as_cupy(topk_weights),
                    tokens,
                    out,
                )
        return out

    def _step(self, res, x, ids, weights, tokens, out) -> None:
        arch = _arch(res)
        stream = res.launch_stream
        k, e = self.top_k, self.num_experts
        pairs, slots = tokens * k, self.slots(tokens)
        rows = slots * tokens
        nb = K.num_pair_blocks(pairs)
        block_counts = self._block_counts[:nb]
        pair_to_row, row_to_pair = self._pair_to_row[:pairs], self._row_to_pair[:rows]
        pair_to_row.fill(-1)  # pairs with an out-of-range id stay -1 and add nothing
        row_to_pair.fill(-1)
        K.block_histogram(stream, arch, ids, pairs, e, block_counts)
        K.column_scan(stream, arch, block_counts, nb, e, self._counts)
        layout = RowLayout(slot_stride=tokens)
        x_rows, h, act, y = self._rows[:rows], self._h[:rows], self._act[:rows], self._y[:rows]
        ptrs1 = self._pointers(
            res, 0, layout, slots, x_rows, self.w1, h, self.width, self.hidden, offsets=self._offsets
        )
        K.assign_rows(stream, arch, ids, pairs, e, block_counts, self._offsets, pair_to_row, row_to_pair)
        K.gather_rows(stream, arch, x, row_to_pair, k, x_rows)
        self._gemm(res, ptrs1, tokens, slots, self.width, self.hidden)
        K.expert_activation(
            stream,
            arch,
            h,
            self.inter,
            int(self.gated),
            K.ACTIVATIONS[self.activation],
            None if self.b1 is None else as_cupy(self.b1),
            row_to_pair,
            ids,
            act,
        )
        ptrs2 = self._pointers(res, 1, layout, slots, act, self.w2, y, self.hidden, self.inter)
        self._gemm(res, ptrs2, tokens, slots, self.hidden, self.inter)
        K.combine_rows(
            stream,
            arch,
            y,
            pair_to_row,
            weights,
            ids,
            None if self.b2 is None else as_cupy(self.b2),
            tokens,
            k,
            out,
        )

    def _plan(self, n: int, k: int) -> GemmPlan:
        """Shape-only plan: the column-major mapping for a GEMM with N=n, K=k."""
        return GemmPlan(
            self.num_experts,
            0,
            n,
            k,
            False,
            self.trans_b,
            np.zeros(0, np.int64),
            np.zeros(1, np.int64),
            np.zeros(0, np.int64),
        )

    def _pointers(self, res, which, layout, slots, rows, w, out, n, k, offsets=None):
        ops = Operands.for_plan(
            self._plan(n, k), rows.data.ptr, w.data.ptr, out.data.ptr, rows.dtype.itemsize
        )
        arrays = tuple(self._ptrs[which, i, :slots] for i in range(3))
        return self.executor.build_pointers(
            res,
            self._counts,
            ops,
            layout,
            num_problems=0,
            num_slots=slots,
            scratch_c=self._scratch.data.ptr,
            row_offsets=offsets,
            pointer_arrays=arrays,
        )

    def _gemm(self, res, arrays, tokens, slots, n, k) -> None:
        dtype = self.w1.dtype
        handle = res.bind(self.executor.config.workspace_mb << 20)
        dims = self._plan(n, k).dims(tokens)
        self.executor.batched(
            handle, dims, arrays, slots, cuda_dtype(dtype, "x"), self.executor.compute_type(dtype)
        )


class _FakeIds:
    """Stands in for topk_ids when checking weights at construction (no tokens yet)."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.int32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<i4", "data": (0, False), "strides": None, "version": 3}
