"""Expert parallelism: an MoE expert layer whose experts are split across ranks.

One :meth:`ExpertParallelMoE.forward` on every rank (each with its own tokens):

1. the ranks check that their layers agree (one all-reduce of a shape
   signature, which also carries "my arguments were refused");
2. each rank counts its (token, choice) pairs per expert and sends every
   rank the counts of that rank's experts (one small grouped send/recv); the
   counts come to the host (the one synchronizing copy; the wait polls NCCL's
   errors and has a timeout);
3. the pairs' token rows travel to their experts' ranks in the order of
   :mod:`cublas_grouped.distributed.plan` (grouped ``ncclSend``/``ncclRecv``
   of variable sizes);
4. each rank runs its local experts on what it received with
   :func:`cublas_grouped.moe_forward` (one choice per row, weight 1);
5. the results travel back, and each source combines its tokens' k rows,
   weighted, in choice order, with the single-GPU layer's combine kernel.

With ``overlap_chunks=N`` > 1, steps 3 to 5's transfers and the local experts
run in N chunks of local experts on two streams, so that transfers overlap
compute (:mod:`cublas_grouped.distributed.overlap`); the same bits where the
local experts compute each row on its own (docs/distributed.md).

Nothing in it depends on timing: two runs give the same bits.
"""

from __future__ import annotations

import numpy as np

from ..moe import kernels as K
from ..moe.checks import check_routing, check_tokens, executor_or_shared, kernel_arch, layer_shape
from ..moe.dispatch import mark_stage
from ..moe.layer import moe_forward
from ..moe.routing import route
from ..runtime.arrays import as_cupy, view
from ..runtime.device import stream_resources
from .group import ProcessGroup
from .overlap import exchange_in_chunks, runs_on_kernel, transfer_stream
from .plan import chunk_layout, placement, receive_layout, send_layout

__all__ = ["ExpertParallelMoE", "SIGNATURE_FIELDS", "as_bits"]

#: What every rank's call must agree on, in the order of the signature vector.
SIGNATURE_FIELDS = (
    "arguments refused on some rank",
    "world size",
    "number of experts E",
    "experts per token k",
    "hidden size H",
    "expert width I",
    "dtype",
    "activation",
    "gated",
    "trans_b",
    "biases (1: b1, 2: b2, 3: both)",
    "overlap chunks",
)
_DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3}
_ACT_CODES = {"silu": 1, "gelu": 2, "relu": 3}


def as_bits(a):
    """``a`` viewed as unsigned integers of its item size: row copies then need no
    arithmetic support for the dtype (bfloat16 included), and copy bits exactly."""
    import cupy

    return a.view({2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[a.dtype.itemsize])


class ExpertParallelMoE:
    """This rank's part of an expert-parallel MoE layer.

    Parameters
    ----------
    group : ProcessGroup
        From :func:`cublas_grouped.distributed.init_process_group`.
    w1, w2 : GPU arrays on the group's device
        This rank's experts only: ``[E/R, H, 2I]`` and ``[E/R, I, H]``
        (``[E/R, 2I, H]`` and ``[E/R, H, I]`` with ``trans_b``), the experts
        ``[rank * E/R, (rank + 1) * E/R)`` of the layer in that order.
    num_experts : int
        E, over all ranks. ``E % R != 0`` is a ``ValueError``.
    top_k : int
        Experts per token, 1 <= k <= E.
    activation, gated, trans_b : as in :func:`cublas_grouped.moe_forward`.
    b1, b2 : GPU arrays or None
        This rank's experts' biases, ``[E/R, 2I]`` (``[E/R, I]`` when not
        gated) and ``[E/R, H]``, as in ``moe_forward``; every rank must give
        the same ones (each call's agreement check compares which are given).
    algorithm, executor : for the local expert GEMMs, as in ``moe_forward``.
    check_shapes : bool
        Check every call that all ranks agree (one small all-reduce and host
        copy). Off saves that step; ranks that disagree then fail in NCCL or hang
        until the group's timeout.
    overlap_chunks : int
        1 (default): dispatch, local experts and combine one after the other
        on the call's stream. N > 1: the exchange and the local experts in
        ``min(N, E/R)`` chunks of local experts, transfers on a stream of the
        layer's own, so that one chunk's transfers overlap another's compute
        (:mod:`cublas_grouped.distributed.overlap`); the same result, bit for
        bit, where the local experts compute each row independently of the
        others (docs/distributed.md). Every rank must give the same N.
    """

    def __init__(
        self,
        group: ProcessGroup,
        w1,
        w2,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "silu",
        gated: bool = True,
        trans_b: bool = False,
        algorithm="auto",
        executor=None,
        check_shapes: bool = True,
        b1=None,
        b2=None,
        overlap_chunks: int = 1,
    ):
        if (
            isinstance(overlap_chunks, bool)
            or not isinstance(overlap_chunks, (int, np.integer))
            or overlap_chunks < 1
        ):
            raise ValueError(f"overlap_chunks must be an int >= 1; got {overlap_chunks!r}")
        self.placement = placement(num_experts, group.world_size)
        self.shape = layer_shape(
            w1, w2, top_k, b1=b1, b2=b2, activation=activation, gated=gated, trans_b=trans_b
        )
        if self.shape.num_experts != self.placement.experts_per_rank:
            raise ValueError(
                f"w1 holds {self.shape.num_experts} experts; with num_experts={num_experts} over "
                f"{group.world_size} ranks each rank holds {self.placement.experts_per_rank}"
            )
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, (int, np.integer))
            or not 1 <= top_k <= num_experts
        ):
            raise ValueError(f"top_k must be an int in [1, {num_experts}]; got {top_k!r}")
        for name, w in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
            if w is None:
                continue
            device = view(w, name).device
            if device is not None and device != group.device_id:
                raise ValueError(f"{name} is on device {device}; this rank's device is {group.device_id}")
        self.group, self.w1, self.w2 = group, w1, w2  # CuPy views are made at call time
        self.b1, self.b2 = b1, b2
        self.algorithm, self.executor = algorithm, executor_or_shared(executor)
        self.check_shapes = bool(check_shapes)
        self.overlap_chunks = int(overlap_chunks)
        self._transfer = None  # the transfer stream of overlapped calls, made at the first one
        #: Rows of the last call: ``sent[d]`` to rank d, ``received[s]`` from rank s (host ints).
        self.last_traffic: dict[str, np.ndarray] = {}

    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first expert."""
        return self.placement.first_expert(self.group.rank)

    def _signature(self, refused: bool, x_v=None, ids_v=None) -> np.ndarray:
        s = self.shape
        hidden = x_v.shape[1] if x_v is not None else s.hidden
        k = ids_v.shape[1] if ids_v is not None else s.top_k
        return np.array(
            [
                int(refused),
                self.group.world_size,
                self.num_experts,
                k,
                hidden,
                s.inter,
                _DTYPE_CODES.get(x_v.dtype.name if x_v is not None else s.dtype.name, 0),
                _ACT_CODES[s.activation],
                int(s.gated),
                int(s.trans_b),
                int(self.b1 is not None) + 2 * int(self.b2 is not None),
                self.overlap_chunks,
            ],
            dtype=np.int64,
        )

    def _check_local(self, x, topk_ids, topk_weights, router_logits):
        """Local checks of one call (no GPU work); returns the views or raises."""
        x_v = check_tokens(x)
        if x_v.shape[1] != self.shape.hidden:
            raise ValueError(f"x has {x_v.shape[1]} columns; the layer's hidden size is {self.shape.hidden}")
        if x_v.dtype != self.shape.dtype:
            raise TypeError(f"x must have dtype {self.shape.dtype} like the weights; got {x_v.dtype}")
        if x_v.device is not None and x_v.device != self.group.device_id:
            raise ValueError(f"x is on device {x_v.device}; this rank's device is {self.group.device_id}")
        if (router_logits is None) == (topk_ids is None):
            raise ValueError("give either topk_ids (with optional topk_weights) or router_logits, not both")
        if router_logits is not None:
            logits = view(router_logits, "router_logits")
            if logits.ndim != 2 or logits.shape != (x_v.shape[0], self.num_experts):
                raise ValueError(
                    f"router_logits must have shape {(x_v.shape[0], self.num_experts)} [T, E]; got {logits.shape}"
                )
            return x_v, None
        ids_v, _ = check_routing(topk_ids, topk_weights, x_v.shape[0])
        if ids_v.shape[1] != self.shape.top_k:
            raise ValueError(
                f"topk_ids has k={ids_v.shape[1]}; the layer was built with top_k={self.shape.top_k}"
            )
        return x_v, ids_v

    def _agree(self, signature: np.ndarray, stream, fields=SIGNATURE_FIELDS) -> None:
        """All-reduce max of (signature, -signature): every rank learns whether all agree.

        ``fields`` names the entries of ``signature`` (the first is the refusal flag).
        """
        import cupy

        buf = cupy.asarray(np.concatenate([signature, -signature]))
        self.group.all_reduce(buf, "max", stream.ptr)
        self.group.wait(stream.record(), "the shape check (all-reduce)")
        host = cupy.asnumpy(buf)
        n = signature.size
        high, low = host[:n], -host[n:]
        if high[0]:
            raise ValueError(
                f"rank {self.group.rank}: another rank refused its arguments to ExpertParallelMoE.forward"
            )
        differ = [fields[i] for i in range(1, n) if high[i] != low[i]]
        if differ:
            raise ValueError(
                f"rank {self.group.rank}: the ranks' layers or inputs disagree on {', '.join(differ)} "
                f"(this rank: {dict(zip(fields[1:], signature[1:].tolist()))})"
            )

    def forward(self, x, topk_ids=None, topk_weights=None, *, router_logits=None, timer=None, stream=None):
        """Run the layer on this rank's tokens; every rank of the group must call it.

        Parameters
        ----------
        x : GPU array [T, H] on this rank's device (T may differ between ranks, and be 0)
        topk_ids : int32 [T, k] global expert ids; topk_weights : float32 [T, k] or None (weight 1)
        router_logits : [T, E] instead of ids and weights: routed with :func:`cublas_grouped.route`
        stream : the stream for this call's work and NCCL transfers (default: CuPy's current one)
        timer : optional :class:`cublas_grouped.StageTimer` (stages: agree, counts,
            gather, dispatch, experts, combine_exchange, combine; dispatch and
            combine_exchange are the NCCL transfers alone; with overlap_chunks > 1
            dispatch, experts and combine_exchange are one stage, overlapped)

        Returns
        -------
        GPU array [T, H] of x's dtype: ``sum_j w[t, j] * expert_{ids[t, j]}(x[t])``.
        Expert ids outside [0, E) raise ``ValueError`` on every rank, once the counts are known.
        """
        import cupy

        try:
            x_v, ids_v = self._check_local(x, topk_ids, topk_weights, router_logits)
        except (ValueError, TypeError):
            if self.check_shapes:  # tell the others, so they raise instead of waiting for us
                with cupy.cuda.Device(self.group.device_id):
                    try:
                        refused = stream_resources(self.group.device_id, stream).cupy_stream
                        self._agree(self._signature(True), refused)
                    except ValueError:
                        pass
            raise
        res = stream_resources(self.group.device_id, stream)
        stream = res.cupy_stream
        with cupy.cuda.Device(self.group.device_id), stream:
            mark_stage(timer, "start", stream)
            if self.check_shapes:
                self._agree(self._signature(False, x_v, ids_v), stream)
            mark_stage(timer, "agree", stream)
            if router_logits is not None:
                topk_weights, topk_ids = route(router_logits, self.shape.top_k, stream=stream)
            return self._forward(res, as_cupy(x_v), as_cupy(topk_ids), topk_weights, timer)

    def _forward(self, res, x, ids, weights, timer):
        import cupy

        stream, group, where = res.cupy_stream, self.group, self.placement
        world, epr, num_experts = group.world_size, where.experts_per_rank, where.num_experts
        tokens, k = ids.shape
        pairs, hidden = tokens * k, x.shape[1]
        flat = ids.reshape(-1)
        # Send order: by (expert, pair index), i.e. by destination rank, expert, token, choice.
        # Ids outside [0, E) sort last, as expert E; sorting also gives the counts, with no
        # host sync (cupy.bincount would synchronize).
        expert = cupy.where((flat >= 0) & (flat < num_experts), flat, num_experts).astype(cupy.int64)
        order = cupy.argsort(expert * max(pairs, 1) + cupy.arange(pairs, dtype=cupy.int64))
        bounds = cupy.searchsorted(expert[order], cupy.arange(num_experts + 2, dtype=cupy.int64))
        counts_all = cupy.diff(bounds).astype(cupy.int32)
        # To each rank d: the counts of d's experts, and (last column) how many of our ids were bad.
        send_counts = cupy.empty((world, epr + 1), dtype=cupy.int32)
        send_counts[:, :epr] = counts_all[:num_experts].reshape(world, epr)
        send_counts[:, epr] = counts_all[num_experts]
        recv_counts = cupy.empty_like(send_counts)
        row_bytes = (epr + 1) * 4
        spans = [(d * row_bytes, row_bytes) for d in range(world)]
        group.exchange(send_counts.data.ptr, spans, recv_counts.data.ptr, spans, stream.ptr)
        both = cupy.concatenate([send_counts.reshape(-1), recv_counts.reshape(-1)])
        group.wait(stream.record(), "the counts exchange")
        host = cupy.asnumpy(both).reshape(2, world, epr + 1)
        mark_stage(timer, "counts", stream)
        bad = host[1, :, epr]
        if bad.any():
            raise ValueError(
                f"rank {group.rank}: topk_ids on ranks {np.flatnonzero(bad).tolist()} name experts outside "
                f"[0, {num_experts}) ({bad.tolist()} pairs)"
            )
        sent_rows, send_offsets = send_layout(host[0, :, :epr].reshape(-1), where)
        recv_rows, recv_offsets, local_ids = receive_layout(host[1, :, :epr])
        self.last_traffic = {"sent": sent_rows, "received": recv_rows}
        item = x.dtype.itemsize * hidden

        # Dispatch: the valid pairs' rows, in send order (bad ids were refused above).
        send_buf = cupy.take(as_bits(x), order // k, axis=0).view(x.dtype)
        mark_stage(timer, "gather", stream)
        if self.overlap_chunks > 1:
            if self._transfer is None:
                self._transfer = transfer_stream(group.device_id)
            plans = chunk_layout(host[0, :, :epr], host[1, :, :epr], self.overlap_chunks)

            def experts(rows, local):
                fixed = runs_on_kernel(
                    self.executor, group.device_id, self.shape, self.w1, self.w2, self.algorithm, rows.shape[0]
                )  # fmt: skip
                if not fixed:  # moe_forward then synchronizes: wait for the chunk as below, with the timeout
                    group.wait(stream.record(), "a chunk's dispatch exchange")
                return self._experts(stream, rows, local, fixed_capacity=fixed)

            back = exchange_in_chunks(group, stream, self._transfer, send_buf, plans, experts, pairs)
            mark_stage(timer, "overlapped", stream)
        else:
            recv_buf = cupy.empty((int(recv_offsets[-1]), hidden), dtype=x.dtype)
            sends = [(send_offsets[d] * item, sent_rows[d] * item) for d in range(world)]
            recvs = [(recv_offsets[s] * item, recv_rows[s] * item) for s in range(world)]
            group.exchange(send_buf.data.ptr, sends, recv_buf.data.ptr, recvs, stream.ptr)
            mark_stage(timer, "dispatch", stream)
            # One choice per received row, weight 1.
            y = recv_buf
            if recv_buf.shape[0]:
                # moe_forward synchronizes once (a count to the host) with no
                # timeout: a peer gone after the counts exchange would leave it
                # blocked behind this receive. Waiting here polls NCCL's error
                # and ends with CollectiveTimeoutError instead (the host waits
                # about as long: the experts' GPU work follows the receive).
                group.wait(stream.record(), "the dispatch exchange")
                y = self._experts(stream, recv_buf, cupy.asarray(local_ids.reshape(-1, 1)))
            mark_stage(timer, "experts", stream)
            # Back to the sources, into send order.
            back = cupy.empty((pairs, hidden), dtype=x.dtype)
            group.exchange(y.data.ptr, recvs, back.data.ptr, sends, stream.ptr)
            mark_stage(timer, "combine_exchange", stream)
        out = cupy.empty((tokens, hidden), dtype=x.dtype)
        if tokens:
            pair_to_row = cupy.empty(pairs, dtype=cupy.int32)
            pair_to_row[order] = cupy.arange(pairs, dtype=cupy.int32)
            w = None if weights is None else as_cupy(weights)
            K.combine_rows(
                res.launch_stream, kernel_arch(res), back, pair_to_row, w, ids, None, tokens, k, out
            )
        mark_stage(timer, "combine", stream)
        return out

    def _experts(self, stream, rows, local_ids, fixed_capacity=False):
        """This rank's experts on received rows, one choice each, weight 1: the weights
        are applied at home, to each row with its b2, as moe_forward weights expert
        output and bias together. ``fixed_capacity``: see :func:`runs_on_kernel`."""
        return moe_forward(
            rows,
            local_ids,
            None,
            as_cupy(self.w1),
            as_cupy(self.w2),
            b1=None if self.b1 is None else as_cupy(self.b1),
            b2=None if self.b2 is None else as_cupy(self.b2),
            activation=self.shape.activation,
            gated=self.shape.gated,
            trans_b=self.shape.trans_b,
            algorithm=self.algorithm,
            executor=self.executor,
            stream=stream,
            fixed_capacity=fixed_capacity,
        )

    __call__ = forward
