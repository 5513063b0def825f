"""Expert parallelism with a fixed capacity per rank pair: no host copy in a call.

Every (source, destination) pair of ranks exchanges exactly C row slots per
call, so NCCL's message sizes are known on the host in advance and nothing
travels to the host. Per call, on the device:

1. the package's dispatch kernels sort the pairs by expert, stably (the
   order of :mod:`cublas_grouped.distributed.plan`), with no host sync;
2. a pair's slot is its position among the pairs bound for the same rank;
   pairs past C *overflow*: they are counted in a device counter, and their
   tokens' outputs become NaN (``on_overflow="nan"``, the default, so an
   overflow cannot pass unseen) or they add nothing (``"drop"``);
3. rows and local expert ids (-1 for an empty slot) go out in fixed-size
   grouped send/receive; the local experts run as one
   :class:`cublas_grouped.FixedCapacityMoE` step over the R*C slots;
4. results come back in the same slots and the combine kernel sums each
   token's k rows in choice order.

The ranks' agreement is checked once, at construction. A call can be
captured in a CUDA graph (NCCL's operations included) after one eager call
with the same token count: while capturing, the call's temporaries come
from a memory pool of the layer's own, which nothing else reuses.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..moe import kernels as K
from ..moe.checks import kernel_arch
from ..moe.dispatch import mark_stage
from ..moe.fixed_capacity import FixedCapacityMoE
from ..moe.routing import route
from ..runtime.arrays import as_cupy
from ..runtime.device import finish_setup_work, stream_resources
from .layer import SIGNATURE_FIELDS, ExpertParallelMoE, as_bits

__all__ = ["FixedCapacityExpertParallelMoE", "OVERFLOW_POLICIES"]

OVERFLOW_POLICIES = {"nan": 1, "drop": 2}
_FIELDS = (*SIGNATURE_FIELDS, "capacity per rank pair", "max_tokens", "on_overflow")


class FixedCapacityExpertParallelMoE(ExpertParallelMoE):
    """:class:`ExpertParallelMoE` with C row slots per rank pair and no host copy per call.

    Parameters
    ----------
    group, w1, w2, num_experts, top_k, activation, gated, trans_b, executor
        As in :class:`ExpertParallelMoE`.
    capacity : int
        C, the rows one rank may send another per call. ``max_tokens * top_k``
        never overflows; about ``max_tokens * top_k / R`` times a margin suits
        balanced routing. The local experts run as a :class:`FixedCapacityMoE`
        step over R*C rows, whose cost and buffers grow with R*C (not with the
        rows received): this layer is for decode sizes.
    max_tokens : int
        The most tokens one call accepts (buffers are sized for it here).
    on_overflow : "nan" (default) or "drop"
        What a pair past the capacity does to its token's output: make it NaN,
        or add nothing. Either way it is counted (:meth:`overflow_pairs`).

    Construction checks, with one all-reduce, that all ranks agree (including
    on C, ``max_tokens`` and ``on_overflow``). Calls then never wait on the
    host: a rank that refuses a call raises at once while the others' work
    waits on the GPU; :meth:`synchronize` waits with the group's timeout.

    CUDA graphs: run one eager call with a token count, then capture a call
    with that count on every rank (each replay runs the NCCL transfers, so
    every rank replays its graph the same number of times, in the same order
    as its other calls of the group). Refill the captured input arrays in
    place between replays.
    """

    def __init__(
        self,
        group,
        w1,
        w2,
        num_experts: int,
        top_k: int,
        *,
        capacity: int,
        max_tokens: int,
        on_overflow: str = "nan",
        activation: str = "silu",
        gated: bool = True,
        trans_b: bool = False,
        executor=None,
    ):
        super().__init__(
            group,
            w1,
            w2,
            num_experts,
            top_k,
            activation=activation,
            gated=gated,
            trans_b=trans_b,
            executor=executor,
        )
        for name, value in (("capacity", capacity), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow must be one of {sorted(OVERFLOW_POLICIES)}; got {on_overflow!r}")
        self.capacity, self.max_tokens, self.on_overflow = int(capacity), int(max_tokens), on_overflow
        import cupy

        world, hidden, dtype = group.world_size, self.shape.hidden, self.shape.dtype
        slots, pairs = world * self.capacity, self.max_tokens * top_k
        with cupy.cuda.Device(group.device_id):
            self._local = FixedCapacityMoE(
                w1, w2, 1, slots, activation=activation, gated=gated, trans_b=trans_b, executor=executor
            )
            self._block_counts = cupy.empty(K.num_pair_blocks(pairs) * num_experts, dtype=cupy.int32)
            self._counts = cupy.empty(num_experts, dtype=cupy.int32)
            self._offsets = cupy.zeros(num_experts + 1, dtype=cupy.int32)
            self._pair_to_row = cupy.empty(pairs, dtype=cupy.int32)
            self._row_to_pair = cupy.empty(pairs, dtype=cupy.int32)
            # One spare slot at the end: where pairs without a slot are written (never sent).
            self._send_rows = cupy.zeros((slots + 1, hidden), dtype=dtype)
            self._send_ids = cupy.empty(slots + 1, dtype=cupy.int32)
            self._recv_rows = cupy.zeros((slots, hidden), dtype=dtype)
            self._recv_ids = cupy.empty(slots, dtype=cupy.int32)
            # The spare row of the returned results is NaN: overflowing pairs read it with "nan".
            self._back = cupy.zeros((slots + 1, hidden), dtype=dtype)
            self._back[slots].fill(np.nan)
            self._out = cupy.empty((self.max_tokens, hidden), dtype=dtype)
            self._overflow = cupy.zeros(1, dtype=cupy.int64)
            self._graph_pool = None  # temporaries of captured calls (see forward)
            self._last_stream = None  # where the counters were last updated
            self._dropped = cupy.zeros(1, dtype=cupy.uint64)
            stream = cupy.cuda.get_current_stream()
            self._agree(self._signature(False), stream, _FIELDS)
            finish_setup_work()  # the zeros and the NaN row land before a step on another stream

    def _signature(self, refused: bool, x_v=None, ids_v=None) -> np.ndarray:
        base = super()._signature(refused, x_v, ids_v)
        extra = [self.capacity, self.max_tokens, OVERFLOW_POLICIES[self.on_overflow]]
        return np.concatenate([base, np.array(extra, dtype=np.int64)])

    def forward(self, x, topk_ids=None, topk_weights=None, *, router_logits=None, timer=None, stream=None):
        """One call, with no host copy: ``x`` [T, H], T <= ``max_tokens`` -> [T, H].

        The result is a view of a buffer of this layer, overwritten by the next
        call. Expert ids outside [0, E) add nothing and are counted
        (:meth:`dropped_pairs`); pairs past the capacity are counted
        (:meth:`overflow_pairs`) and handled as ``on_overflow`` says. ``stream``:
        as in :meth:`ExpertParallelMoE.forward`.
        """
        import cupy

        x_v, ids_v = self._check_local(x, topk_ids, topk_weights, router_logits)
        if x_v.shape[0] > self.max_tokens:
            raise ValueError(
                f"x has {x_v.shape[0]} tokens but this layer was built for max_tokens={self.max_tokens}"
            )
        res = stream_resources(self.group.device_id, stream)
        self._last_stream = res.cupy_stream
        with cupy.cuda.Device(self.group.device_id), res.cupy_stream:
            # A captured graph keeps using the call's temporaries after they are freed: while
            # capturing, take them from a pool of this layer's own that nothing else draws from.
            capturing = cupy.cuda.runtime.streamIsCapturing(res.stream) != 0
            if capturing and self._graph_pool is None:
                self._graph_pool = cupy.cuda.MemoryPool()
            memory = (
                cupy.cuda.using_allocator(self._graph_pool.malloc) if capturing else contextlib.nullcontext()
            )
            with memory:
                mark_stage(timer, "start", res.cupy_stream)
                if router_logits is not None:
                    topk_weights, topk_ids = route(router_logits, self.shape.top_k, stream=res.cupy_stream)
                weights = None if topk_weights is None else as_cupy(topk_weights)
                return self._step(res, as_cupy(x_v), as_cupy(topk_ids), weights, timer)

    def _slots(self, res, ids):
        """(slot of every pair or the spare slot, whether it has one, local expert, valid id) on the device."""
        import cupy

        tokens, k = ids.shape
        pairs, num_experts = tokens * k, self.num_experts
        world, epr, cap = self.group.world_size, self.placement.experts_per_rank, self.capacity
        p2r = self._pair_to_row[:pairs]
        if pairs:
            arch, launch = kernel_arch(res), res.launch_stream
            nb = K.num_pair_blocks(pairs)
            blocks = self._block_counts[: nb * num_experts].reshape(nb, num_experts)
            K.block_histogram(launch, arch, ids, pairs, num_experts, blocks)
            K.column_scan(launch, arch, blocks, nb, num_experts, self._counts)
            self._offsets[1:] = cupy.cumsum(self._counts)
            K.assign_rows(
                launch,
                arch,
                ids,
                pairs,
                num_experts,
                blocks,
                self._offsets,
                p2r,
                self._row_to_pair[:pairs],
                dropped=self._dropped,
            )
        else:
            self._counts.fill(0)
            self._offsets.fill(0)
        # p2r is each valid pair's row in (expert, pair) order: its place in the send order.
        valid = p2r >= 0
        expert = cupy.where(valid, ids.reshape(-1), 0)
        dest = expert // epr
        pos = p2r - self._offsets[dest * epr]
        fits = valid & (pos < cap)
        slot = cupy.where(fits, dest * cap + pos, world * cap)
        per_rank = self._counts.reshape(world, epr).sum(axis=1)
        self._overflow += cupy.maximum(per_rank - cap, 0).sum()
        return slot, fits, expert - dest * epr, valid

    def _step(self, res, x, ids, weights, timer):
        import cupy

        stream, group = res.cupy_stream, self.group
        tokens, k = ids.shape
        world, cap, hidden = group.world_size, self.capacity, self.shape.hidden
        slot, fits, local, valid = self._slots(res, ids)
        self._send_ids.fill(-1)
        if tokens:
            self._send_ids[slot] = cupy.where(fits, local, -1).astype(cupy.int32)
            as_bits(self._send_rows)[slot] = as_bits(x)[cupy.arange(tokens * k) // k]
        mark_stage(timer, "gather", stream)
        item = hidden * x.dtype.itemsize
        rows = [(d * cap * item, cap * item) for d in range(world)]
        id_spans = [(d * cap * 4, cap * 4) for d in range(world)]
        group.exchange(self._send_ids.data.ptr, id_spans, self._recv_ids.data.ptr, id_spans, stream.ptr)
        group.exchange(self._send_rows.data.ptr, rows, self._recv_rows.data.ptr, rows, stream.ptr)
        mark_stage(timer, "dispatch", stream)
        y = self._local.forward(self._recv_rows, self._recv_ids.reshape(-1, 1), None, stream=stream)
        mark_stage(timer, "experts", stream)
        group.exchange(y.data.ptr, rows, self._back.data.ptr, rows, stream.ptr)
        mark_stage(timer, "combine_exchange", stream)
        out = self._out[:tokens]
        if tokens:
            spare = world * cap if self.on_overflow == "nan" else -1
            row = cupy.where(fits, slot, cupy.where(valid, spare, -1)).astype(cupy.int32)
            K.combine_rows(
                res.launch_stream, kernel_arch(res), self._back, row, weights, ids, None, tokens, k, out
            )
        mark_stage(timer, "combine", stream)
        return out

    def synchronize(self, what: str = "the layer's work", *, stream=None) -> None:
        """Wait for this rank's work so far on ``stream`` (default: the stream of the last
        call, else the current one), with the group's timeout and NCCL error checks."""
        import cupy

        with cupy.cuda.Device(self.group.device_id):
            if stream is None and self._last_stream is not None:
                cupy_stream = self._last_stream
            else:
                cupy_stream = stream_resources(self.group.device_id, stream).cupy_stream
            self.group.wait(cupy_stream.record(), what)

    def _read(self, counter, reset: bool) -> int:
        import cupy

        self.synchronize("reading a counter")
        with cupy.cuda.Device(self.group.device_id):
            value = int(cupy.asnumpy(counter)[0])
            if reset:  # in the order of the layer's calls
                if self._last_stream is not None:
                    with self._last_stream:
                        counter.fill(0)
                else:
                    counter.fill(0)
        return value

    def overflow_pairs(self, *, reset: bool = False) -> int:
        """Pairs that found no slot (past the capacity) since construction or the last reset."""
        return self._read(self._overflow, reset)

    def dropped_pairs(self, *, reset: bool = False) -> int:
        """Pairs with an expert id outside [0, E) since construction or the last reset."""
        return self._read(self._dropped, reset)

    def check_overflow(self) -> None:
        """Raise ``ValueError`` if any pair so far overflowed or named an expert outside [0, E)."""
        over, dropped = self.overflow_pairs(), self.dropped_pairs()
        if over or dropped:
            raise ValueError(
                f"rank {self.group.rank}: {over} pairs found no slot (capacity {self.capacity} rows per rank "
                f"pair) and {dropped} named an expert outside [0, {self.num_experts}); raise the capacity "
                "or fix the routing"
            )

    __call__ = forward
