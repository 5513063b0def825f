"""The exchange and the local experts in chunks, so transfers overlap compute.

With ``overlap_chunks=N`` (:class:`cublas_grouped.distributed.ExpertParallelMoE`)
the exchange is cut by local expert (:func:`cublas_grouped.distributed.plan.chunk_layout`):
chunk c carries, between every pair of ranks, the rows of the receiving
rank's local experts ``lo_c .. hi_c - 1``. Two streams take part:

- the *transfer* stream (one per layer, the device's highest priority, so
  its NCCL kernels get the next free SMs while the experts' kernels run)
  posts every chunk's dispatch at once, then each chunk's combine exchange
  as soon as its results exist;
- the *compute* stream (the caller's) waits for chunk c's rows, runs the
  local experts on them, and marks them done.

So chunk c+1's rows travel while chunk c is computed, and chunk c's results
travel back while chunk c+1 is computed: only the first chunk's dispatch and
the last chunk's combine stay exposed (about 2/N of the transfer time).

Where a chunk's local experts run on the Hopper kernel (:func:`runs_on_kernel`),
they run through ``moe_forward(fixed_capacity=True)``: the same kernel step
as the default path, without its closing copy to the host (of the pairs
dropped for bad ids; received ids are valid by construction), so the host
queues every chunk at once and the GPU has no gap between them. Elsewhere
``moe_forward``'s default path copies the counts to the host per chunk.

Same bits as one chunk: every expert's rows lie in one chunk, in the same
order (source, token, choice), and the local experts compute each row from
that row and the weights alone (the Hopper kernel: tiles of whole rows, no
split of K; cuBLAS: the same M, N, K per expert where the algorithm is
fixed); the results land in the same places of the combine buffer, and the
combine sums each token's rows in choice order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["transfer_stream", "exchange_in_chunks", "runs_on_kernel"]


# Lower is higher; CUDA clamps a priority outside the device's range to the range's
# end, so this asks for the highest there is (H100: -5).
HIGHEST_PRIORITY = -100


def transfer_stream(device_id: int):
    """A new non-blocking stream on ``device_id`` with the device's highest priority."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.cuda.Stream(non_blocking=True, priority=HIGHEST_PRIORITY)


def runs_on_kernel(executor, device_id: int, shape, w1, w2, algorithm, rows: int) -> bool:
    """Whether ``moe_forward`` on ``rows`` received rows (one choice each) takes the
    Hopper kernel step by default: AUTO, at most ``MAX_FIXED_CAPACITY_TOKENS`` rows,
    and :func:`~cublas_grouped.moe.fixed_capacity.fixed_capacity_backend` saying so.
    There ``fixed_capacity=True`` runs the same step (the same bits) with no host copy."""
    from ..gemm.config import Algorithm, coerce_enum
    from ..moe.fixed_capacity import MAX_FIXED_CAPACITY_TOKENS, fixed_capacity_backend

    if (
        coerce_enum(Algorithm, algorithm, "algorithm") is not Algorithm.AUTO
        or rows > MAX_FIXED_CAPACITY_TOKENS
    ):
        return False
    sm = executor.info_for(device_id).sm
    return fixed_capacity_backend(sm, executor, shape, w1, w2, rows) == "sm90_grouped"


def exchange_in_chunks(group, stream, transfer, send_buf, plans, experts, pairs: int):
    """Dispatch, local experts and combine exchange, chunk by chunk (``plans``).

    Parameters
    ----------
    group : the :class:`~cublas_grouped.distributed.ProcessGroup`
    stream : the compute stream (CuPy), current; ``transfer`` : the transfer stream
    send_buf : [P_valid, H] rows in send order (written on ``stream``)
    plans : list of :class:`~cublas_grouped.distributed.plan.ChunkPlan`, the same chunks on every rank
    experts : ``experts(rows, local_ids)`` -> results [rows, H], run on ``stream``
    pairs : rows of the returned buffer (the rank's pairs)

    Returns ``back`` [pairs, H]: every sent row's result at its send-order
    position, written once ``stream`` reaches this point (it waits for the
    transfer stream at the end, so later work on ``stream`` and the freeing
    of the buffers here are ordered after every transfer).
    """
    import cupy

    hidden, dtype = send_buf.shape[1], send_buf.dtype
    item = hidden * dtype.itemsize
    total = plans[-1].rows[1] if plans else 0
    recv_buf = cupy.empty((total, hidden), dtype=dtype)
    back = cupy.empty((pairs, hidden), dtype=dtype)
    ids = [p.local_ids for p in plans]
    local_ids = cupy.asarray(np.concatenate(ids) if ids else np.zeros(0, np.int32)).reshape(-1, 1)

    def spans(runs, base=0):
        return [((off - base) * item, rows * item) for off, rows in runs]

    # The transfer stream starts once the rows are gathered and the buffers (allocated
    # on the compute stream) are free to use.
    transfer.wait_event(stream.record())
    arrived = []
    for plan in plans:
        group.exchange(send_buf.data.ptr, spans(plan.send), recv_buf.data.ptr, spans(plan.recv), transfer.ptr)
        arrived.append(transfer.record())
    results = []  # alive until the compute stream has waited for the transfers that read them
    for plan, event in zip(plans, arrived):
        stream.wait_event(event)
        start, end = plan.rows
        y = experts(recv_buf[start:end], local_ids[start:end]) if end > start else recv_buf[start:end]
        results.append(y)
        transfer.wait_event(stream.record())
        group.exchange(y.data.ptr, spans(plan.recv, start), back.data.ptr, spans(plan.send), transfer.ptr)
    stream.wait_event(transfer.record())
    return back
