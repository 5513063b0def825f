"""The overlapped exchange (``overlap_chunks``) on the CPU: the chunk plan, threads
as ranks against the float64 one-GPU layer and bit for bit against one chunk,
the order of the two streams' work, and the refusals.

Threads play the ranks as in tests/test_distributed_layer_cpu.py (NumPy for
CuPy, a mailbox for NCCL); the local experts here compute each row on its
own, as the GPU's do, so that chunking cannot change a row's bits.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from test_distributed_layer_cpu import Dev, _arr, _problem, _run, _Stream, fake_stack  # noqa: F401

from cublas_grouped.distributed import ExpertParallelMoE, chunk_bounds, chunk_layout, dispatch_model
from cublas_grouped.distributed import layer as layer_mod
from cublas_grouped.distributed import overlap as overlap_mod
from cublas_grouped.distributed.plan import placement, receive_layout, send_layout
from cublas_grouped.testing import moe_forward_ref

FIXED_CAPACITY_CALLS = []  # the fixed_capacity flag of every local expert call


def _rowwise_experts(x, ids, weights, w1, w2, b1=None, b2=None, fixed_capacity=False, **kw):
    """The local experts, one row at a time (a row's result cannot depend on the others)."""
    assert weights is None and ids.shape[1] == 1
    FIXED_CAPACITY_CALLS.append((x.shape[0], fixed_capacity))
    x, ids, w1, w2 = (np.asarray(a) for a in (x, ids, w1, w2))
    b1, b2 = (None if b is None else np.asarray(b) for b in (b1, b2))
    out = np.full(x.shape, np.nan, x.dtype)
    for i in range(x.shape[0]):
        out[i] = moe_forward_ref(x[i : i + 1], ids[i : i + 1], None, w1, w2, b1, b2)[0]
    return _arr(out)


@pytest.fixture
def overlap_stack(fake_stack, monkeypatch):  # noqa: F811
    monkeypatch.setattr(layer_mod, "moe_forward", _rowwise_experts)
    monkeypatch.setattr(layer_mod, "transfer_stream", lambda device: _Stream())
    # No GPU to ask: chunks of an even number of rows "run on the kernel" (sync-free call).
    monkeypatch.setattr(layer_mod, "runs_on_kernel", lambda ex, dev, shape, w1, w2, alg, rows: rows % 2 == 0)
    FIXED_CAPACITY_CALLS.clear()


def test_chunk_bounds():
    assert chunk_bounds(8, 1) == [(0, 8)]
    assert chunk_bounds(8, 3) == [(0, 2), (2, 5), (5, 8)]
    assert chunk_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2)]  # no more chunks than local experts
    assert chunk_bounds(1, 3) == [(0, 1)]


@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_chunk_layout_covers_every_row_once_in_expert_order(chunks):
    rng = np.random.default_rng(chunks)
    world, epr = 3, 4
    send = rng.integers(0, 5, (world, epr))
    send[1] = 0  # nothing for rank 1
    recv = rng.integers(0, 5, (world, epr))
    recv[:, 2] = 0  # local expert 2 receives nothing
    plans = chunk_layout(send, recv, chunks)
    assert [p.experts for p in plans] == chunk_bounds(epr, chunks)
    # Send side: the runs tile the send buffer exactly, each (destination, chunk) once.
    runs = sorted(run for p in plans for run in p.send if run[1])
    assert sum(n for _, n in runs) == send.sum()
    assert all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:])) and (not runs or runs[0][0] == 0)
    _, offsets = send_layout(send.reshape(-1), placement(world * epr, world))
    for p in plans:
        lo, hi = p.experts
        for d, (off, n) in enumerate(p.send):
            assert off == offsets[d] + send[d, :lo].sum() and n == send[d, lo:hi].sum()
    # Receive side: chunk-major, contiguous, and each expert's rows in source order.
    assert plans[0].rows[0] == 0 and plans[-1].rows[1] == recv.sum()
    ids = np.concatenate([p.local_ids for p in plans])
    for p, q in zip(plans, plans[1:]):
        assert p.rows[1] == q.rows[0]
    for p in plans:
        lo, hi = p.experts
        assert [n for _, n in p.recv] == recv[:, lo:hi].sum(axis=1).tolist()
        assert p.local_ids.dtype == np.int32 and p.local_ids.size == p.rows[1] - p.rows[0]
        assert set(p.local_ids.tolist()) <= set(range(lo, hi))
    _, _, one_chunk_ids = receive_layout(recv)
    for e in range(epr):  # the same rows per expert as one chunk: same count, same source order
        assert np.count_nonzero(ids == e) == np.count_nonzero(one_chunk_ids == e)
    if chunks == 1:
        (p,) = plans
        rows, offsets, local = receive_layout(recv)
        assert p.recv == [(int(o), int(n)) for o, n in zip(offsets[:-1], rows)]
        assert p.local_ids.tolist() == local.tolist()


CASES = [
    (2, (40, 25), "skewed"),
    (4, (0, 1, 17, 30), "uniform"),  # a rank with no tokens
    (4, (8, 3), "last_rank"),  # every other rank receives nothing
    (3, (12,), "uniform"),
]


@pytest.mark.parametrize("world,tokens,kind", CASES)
def test_overlap_chunks_equal_the_one_gpu_layer_and_one_chunk_bitwise(overlap_stack, world, tokens, kind):
    rng = np.random.default_rng(world * 31 + sum(tokens))
    experts, k = 12, 3
    w1, w2, data = _problem(rng, world, tokens, experts, k, kind=kind)
    epr = experts // world

    def rank_fn(group):
        r, mine = group.rank, slice(group.rank * epr, (group.rank + 1) * epr)
        x, ids, w = data[r]
        outs = {}
        for chunks in (1, 2, 3, 4):
            layer = ExpertParallelMoE(
                group, Dev(w1[mine]), Dev(w2[mine]), experts, k, overlap_chunks=chunks
            )  # fmt: skip
            outs[chunks] = np.array(layer(Dev(x), Dev(ids), Dev(w)))
            outs[chunks, "traffic"] = {key: v.tolist() for key, v in layer.last_traffic.items()}
        return outs

    model = dispatch_model([d[1] for d in data], experts)
    for r, got in enumerate(_run(world, rank_fn)):
        assert not isinstance(got, Exception), f"rank {r}: {got!r}"
        x, ids, w = data[r]
        ref = moe_forward_ref(x, ids, w, w1, w2)
        for chunks in (1, 2, 3, 4):
            np.testing.assert_allclose(got[chunks], ref, rtol=2e-5, atol=2e-6, err_msg=f"{chunks} chunks")
            assert got[chunks].tobytes() == got[1].tobytes(), f"rank {r}, {chunks} chunks: bits differ"
            assert got[chunks, "traffic"]["sent"] == model[r].send_rows.tolist()
            assert got[chunks, "traffic"]["received"] == model[r].recv_counts.sum(axis=1).tolist()
    if kind == "last_rank":
        assert all(sum(got[2, "traffic"]["received"]) == 0 for got in _run(world, rank_fn)[:-1])
    # Chunks went both ways (sync-free where "on the kernel"); one chunk never does.
    assert {fixed for _, fixed in FIXED_CAPACITY_CALLS} == {True, False}
    assert all(n % 2 == 0 for n, fixed in FIXED_CAPACITY_CALLS if fixed)


def test_all_tokens_to_one_rank_with_biases(overlap_stack):
    """Everything routed to rank 0's experts; b1 and b2 travel with the chunks."""
    rng = np.random.default_rng(8)
    world, experts, k, hidden = 2, 8, 2, 16
    w1, w2, _ = _problem(rng, world, (1,), experts, k, hidden=hidden)
    b1 = rng.standard_normal((experts, w1.shape[2])).astype(np.float32)
    b2 = rng.standard_normal((experts, hidden)).astype(np.float32)
    xs = [rng.standard_normal((t, hidden)).astype(np.float32) for t in (9, 6)]
    ids = [np.array([rng.choice(4, k, replace=False) for _ in range(x.shape[0])], np.int32) for x in xs]

    def rank_fn(group):
        r, mine = group.rank, slice(4 * group.rank, 4 * group.rank + 4)
        outs = []
        for chunks in (1, 3):
            layer = ExpertParallelMoE(
                group, Dev(w1[mine]), Dev(w2[mine]), experts, k, b1=Dev(b1[mine]), b2=Dev(b2[mine]),
                overlap_chunks=chunks,
            )  # fmt: skip
            outs.append(np.array(layer(Dev(xs[r]), Dev(ids[r]), None)))
        return outs, layer.last_traffic["received"].tolist()

    results = _run(world, rank_fn)
    for r, got in enumerate(results):
        assert not isinstance(got, Exception), f"rank {r}: {got!r}"
        (one, three), received = got
        np.testing.assert_allclose(
            three, moe_forward_ref(xs[r], ids[r], None, w1, w2, b1, b2), rtol=2e-5, atol=2e-5
        )
        assert one.tobytes() == three.tobytes()
    assert results[1][1] == [0, 0] and results[0][1] == [18, 12]


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2", None])
def test_bad_overlap_chunks_is_refused_by_name(overlap_stack, bad):
    w1, w2 = np.zeros((2, 16, 12), np.float32), np.zeros((2, 6, 16), np.float32)
    got = _run(2, lambda g: ExpertParallelMoE(g, Dev(w1), Dev(w2), 4, 2, overlap_chunks=bad))
    for e in got:
        assert isinstance(e, ValueError) and str(e) == f"overlap_chunks must be an int >= 1; got {bad!r}", e


def test_ranks_that_disagree_on_overlap_chunks_refuse(overlap_stack):
    rng = np.random.default_rng(4)
    w1, w2, data = _problem(rng, 2, (5, 5), 4, 2)

    def rank_fn(group):
        r, mine = group.rank, slice(2 * group.rank, 2 * group.rank + 2)
        layer = ExpertParallelMoE(group, Dev(w1[mine]), Dev(w2[mine]), 4, 2, overlap_chunks=1 + r)
        x, ids, w = data[r]
        return layer(Dev(x), Dev(ids), Dev(w))

    for r, got in enumerate(_run(2, rank_fn)):
        assert isinstance(got, ValueError), f"rank {r}: {got!r}"
        assert str(got).startswith(f"rank {r}: the ranks' layers or inputs disagree on overlap chunks ")


class _Log:
    """Streams that log their work: what each waits for, and where each exchange goes."""

    def __init__(self):
        self.ops = []  # (stream name, op, detail)

    def stream(self, name, ptr):
        log = self

        class S:
            def record(self):
                log.ops.append((name, "record", None))
                return types.SimpleNamespace(stream=name, at=len(log.ops) - 1, done=True)

            def wait_event(self, event):
                log.ops.append((name, "wait", (event.stream, event.at)))

        s = S()
        s.ptr = ptr
        return s


def test_streams_order_the_chunks(fake_stack):  # noqa: F811
    """Chunk c's experts wait for chunk c's rows only; every dispatch is posted before
    any combine (so none waits behind another chunk's compute); chunk c's results go
    back after its experts; the compute stream ends waiting for the last transfer."""
    log = _Log()
    compute, transfer = log.stream("compute", 1), log.stream("transfer", 2)

    class Group:
        def exchange(self, send_ptr, sends, recv_ptr, recvs, stream_ptr):
            log.ops.append(({1: "compute", 2: "transfer"}[stream_ptr], "exchange", (sends, recvs)))

    def experts(rows, local):
        log.ops.append(("compute", "experts", sorted(set(np.asarray(local).reshape(-1).tolist()))))
        return _arr(np.array(rows))

    send = np.array([[2, 0, 1, 3], [1, 1, 0, 2]])  # 2 ranks, 4 local experts
    recv = np.array([[1, 2, 0, 0], [0, 1, 1, 4]])
    plans = chunk_layout(send, recv, 2)
    send_buf = _arr(np.arange(send.sum() * 3, dtype=np.float32).reshape(-1, 3))
    overlap_mod.exchange_in_chunks(Group(), compute, transfer, send_buf, plans, experts, 10)
    ops = log.ops

    def last_record_before(i, stream):
        return max(j for j in range(i) if ops[j][0] == stream and ops[j][1] == "record")

    xfer = [i for i, op in enumerate(ops) if op[1] == "exchange"]
    assert all(ops[i][0] == "transfer" for i in xfer) and len(xfer) == 4
    dispatch, combine = xfer[:2], xfer[2:]
    row = 3 * 4  # bytes of a row: 3 float32
    # Send runs: rank 0's experts 0-1 at row 0 (2 rows), rank 1's at row 6 (2); then experts
    # 2-3: rank 0's at row 2 (4 rows), rank 1's at row 8 (2). Receive: chunk-major.
    assert [ops[i][2] for i in dispatch] == [
        ([(0, 2 * row), (6 * row, 2 * row)], [(0, 3 * row), (3 * row, 1 * row)]),
        ([(2 * row, 4 * row), (8 * row, 2 * row)], [(4 * row, 0), (4 * row, 5 * row)]),
    ]
    # The first thing the transfer stream does: wait for the compute stream (the gathered rows).
    first = next(op for op in ops if op[0] == "transfer")
    assert first[1] == "wait" and first[2][0] == "compute"
    calls = [i for i, op in enumerate(ops) if op[1] == "experts"]
    assert [ops[i][2] for i in calls] == [[0, 1], [2, 3]]
    for c, i in enumerate(calls):
        wait = max(j for j in range(i) if ops[j][0] == "compute" and ops[j][1] == "wait")
        arrived = ops[wait][2]
        assert arrived[0] == "transfer" and dispatch[c] < arrived[1] < (dispatch + [10**9])[c + 1]
        assert dispatch[-1] < i  # every dispatch was posted before any compute
    for c, i in enumerate(combine):
        wait = max(j for j in range(i) if ops[j][0] == "transfer" and ops[j][1] == "wait")
        assert ops[wait][2][0] == "compute" and calls[c] < ops[wait][2][1] < i
        # Combine: from the chunk's results (offsets within it) back to the send-order runs.
        sends, recvs = ops[i][2]
        assert recvs == ops[dispatch[c]][2][0] and sends[0][0] == 0
    assert ops[-1][:2] == ("compute", "wait") and ops[-1][2] == (
        "transfer",
        last_record_before(len(ops), "transfer"),
    )


def test_ep_bench_overlap_report():
    from cublas_grouped.tools.ep_bench import format_report

    def run(world, ms, overlap=None):
        row = {
            "tokens_per_rank": 4096,
            "layer_ms": ms,
            "stage_ms": {"dispatch": 1.0, "combine_exchange": 1.0} if world > 1 else {},
            "dispatch_bytes": 1e8,
            "combine_bytes": 1e8,
            "dispatch_gbs": 100.0 if world > 1 else None,
            "combine_gbs": 100.0 if world > 1 else None,
            "alltoall_busbw": 150.0 if world > 1 else None,
            "allreduce_busbw": 150.0 if world > 1 else None,
        }
        if overlap is not None:
            row["overlap"] = overlap
        return {"world": world, "experts": 256, "requested_experts": 256, "rows": [row]}

    faster = [
        {"chunks": 2, "layer_ms": 10.5, "same_bits": True, "base_ms": 11.0},
        {"chunks": 4, "layer_ms": 9.8, "same_bits": True, "base_ms": 11.0},
    ]
    text = "\n".join(format_report([run(1, 14.0), run(2, 11.0, faster)]))
    # 1.2 ms of 2.0 ms of transfers hidden; tokens/s with overlap 2 * 4096 / 9.8 ms; scaling 2 * 14 / 9.8.
    assert (
        "  2     4096      4       11.00               9.80      2.00         60%     835918    2.86     yes"
        in text
    )
    assert (
        "PASS overlap faster: 9.80 vs 11.00 ms, 60% of the transfer time hidden with overlap_chunks=4, "
        "2 GPUs, 4096 tokens/rank" in text
    )
    slower = [
        {"chunks": 2, "layer_ms": 11.4, "same_bits": True, "base_ms": 11.0},
        {"chunks": 4, "error": "X: y"},
    ]
    text = "\n".join(format_report([run(2, 11.0, slower)]))
    assert (
        "MISS overlap not faster: 11.40 vs 11.00 ms at best (overlap_chunks=2): keep overlap_chunks=1" in text
    )
    assert "  2 GPUs, 4096 tokens/rank, 4 chunks: X: y" in text and "-20%" in text
    other_bits = [
        {"chunks": 3, "layer_ms": 9.0, "same_bits": False, "base_ms": 11.0},
        {"chunks": 2, "layer_ms": 10.95, "same_bits": True, "base_ms": 11.0},  # within the noise margin
    ]
    text = "\n".join(format_report([run(2, 11.0, other_bits)]))
    assert "MISS overlap changed the output's bits (overlap_chunks=3), 2 GPUs, 4096 tokens/rank" in text
    assert "MISS overlap not faster: 10.95 vs 11.00 ms at best (overlap_chunks=2)" in text
    assert "PASS overlap" not in text
    assert "overlap" not in "\n".join(format_report([run(2, 11.0)]))  # not measured: no section


def test_runs_on_kernel_follows_the_default_paths_choice():
    """Sync-free chunks exactly where moe_forward's default path takes the Hopper kernel
    step: AUTO, SM 9.0, a 16-bit layer the kernel fits, not a few-expert decode call."""
    from cublas_grouped.gemm.config import Algorithm
    from cublas_grouped.moe.checks import layer_shape
    from cublas_grouped.moe.fixed_capacity import MAX_FIXED_CAPACITY_TOKENS

    class Executor:
        def __init__(self, sm, algorithm=Algorithm.AUTO):
            self.sm, self.config = sm, types.SimpleNamespace(algorithm=algorithm)

        def info_for(self, device_id):
            return types.SimpleNamespace(sm=self.sm)

    def weights(experts, dtype=np.float16, hidden=64, inter=32):
        return Dev(np.zeros((experts, hidden, 2 * inter), dtype)), Dev(
            np.zeros((experts, inter, hidden), dtype)
        )

    def on(executor, experts, rows, algorithm="auto", dtype=np.float16):
        w1, w2 = weights(experts, dtype)
        shape = layer_shape(w1, w2, 1)
        return overlap_mod.runs_on_kernel(executor, 0, shape, w1, w2, algorithm, rows)

    hopper = Executor((9, 0))
    assert on(hopper, 16, 1) and on(hopper, 16, 4096) and on(hopper, 4, 65) and on(hopper, 8, 64)
    assert on(hopper, 16, MAX_FIXED_CAPACITY_TOKENS) and not on(hopper, 16, MAX_FIXED_CAPACITY_TOKENS + 1)
    assert not on(hopper, 8, 1) and not on(hopper, 4, 1)  # few-expert single-row calls keep cuBLAS
    assert not on(hopper, 16, 4096, algorithm="sequential")
    assert not on(hopper, 16, 4096, dtype=np.float32)
    assert not on(Executor((8, 0)), 16, 4096)
    assert not on(Executor((9, 0), Algorithm.CUBLAS_GROUPED), 16, 4096)
