"""Fixed-capacity decode on the GPU: every token count, rising and falling, for a
few-large-expert and a many-small-expert layer, eager, graph-captured and
through ``moe_forward(fixed_capacity=True)``, against float64, with every buffer poisoned before each step.

Routings include the worst case for the chunk count (built by the CPU test of
the bound), all tokens on the fewest experts, ids outside [0, E) and repeated
ids within a token.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import check_close, device_random, wait_for_current_stream
from test_capacity import routing_with_counts, worst_counts

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

MAX_TOKENS = 64
# (name, experts, top_k, hidden, inter, biases)
LAYERS = [("few-large", 8, 2, 256, 128, False), ("many-small", 64, 6, 128, 64, True)]
# Every T, largest first, then rising and falling again: capacity needs are
# not monotonic in T, and later steps reuse buffers sized earlier.
STEPS = [MAX_TOKENS, *range(1, MAX_TOKENS), *range(MAX_TOKENS - 1, 0, -1)]


def make_layer(rng, experts, hidden, inter, biases):
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), np.float32, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), np.float32, scale=inter**-0.5)
    if not biases:
        return (w1, w2, None, None), (w1_64, w2_64, None, None)
    b1, b1_64 = device_random(rng, (experts, 2 * inter), np.float32, scale=0.1)
    b2, b2_64 = device_random(rng, (experts, hidden), np.float32, scale=0.1)
    return (w1, w2, b1, b2), (w1_64, w2_64, b1_64, b2_64)


def step_routing(rng, step, tokens, experts, k):
    """Host ids and weights for one step: random, worst case, or crowded."""
    kind = step % 3
    if kind == 0:
        ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    elif kind == 1:  # the most chunk problems any routing of T tokens needs
        from cublas_grouped.moe.checks import LayerShape
        from cublas_grouped.moe.fixed_capacity import chunk_rows

        chunk = chunk_rows(LayerShape(experts, 8, 4, 8, k, True, "silu", False, np.dtype(np.float32)), tokens)
        ids = routing_with_counts(worst_counts(experts, k, tokens, chunk), tokens, k)
        ids = rng.permutation(experts)[ids]  # not always the low experts
    else:  # every token on the same k experts
        ids = np.tile(rng.choice(experts, k, replace=False), (tokens, 1))
    w = rng.random((tokens, k)).astype(np.float32) + 0.05
    return ids.astype(np.int32), w


def poison(layer):
    """NaN in every float buffer of the layer, and a wrong (in-bounds) row in
    the index buffers, so a step that reads anything it did not write fails."""
    import cupy

    buf = layer._buffers
    for array in (buf.rows, buf.h, buf.act, buf.y, buf.scratch, layer._out):
        array.fill(np.nan)
    for array in (buf.pair_to_row, buf.row_to_pair, buf.offsets, buf.counts):
        array.fill(0)
    buf.pointers.fill(0)  # a pointer left unwritten would fault
    cupy.cuda.get_current_stream().synchronize()


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases", LAYERS)
def test_fixed_capacity_eager_every_step_size(name, experts, k, hidden, inter, biases):
    rng = np.random.default_rng(experts)
    weights, weights64 = make_layer(rng, experts, hidden, inter, biases)
    w1, w2, b1, b2 = weights
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=MAX_TOKENS, b1=b1, b2=b2)
    for step, tokens in enumerate(STEPS):
        import cupy

        x, x64 = device_random(rng, (tokens, hidden), np.float32)
        ids, w = step_routing(rng, step, tokens, experts, k)
        poison(layer)
        out = layer.forward(x, cupy.asarray(ids), cupy.asarray(w))
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        check_close(out, expected, 1e-5, f"{name} eager T={tokens} step {step}")
    assert layer.dropped_pairs() == 0


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases", LAYERS)
def test_fixed_capacity_graphs_every_step_size(name, experts, k, hidden, inter, biases):
    import cupy

    rng = np.random.default_rng(experts + 1)
    weights, weights64 = make_layer(rng, experts, hidden, inter, biases)
    w1, w2, b1, b2 = weights
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # the weights were made on the null stream
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=MAX_TOKENS, b1=b1, b2=b2)
    graphs = {}
    with stream:
        for tokens in STEPS[:MAX_TOKENS]:  # one graph per T, captured on buffers refilled in place
            x_buf = cupy.zeros((tokens, hidden), dtype=cupy.float32)
            ids_buf = cupy.zeros((tokens, k), dtype=cupy.int32)
            ids_buf[:] = cupy.arange(k, dtype=cupy.int32)
            w_buf = cupy.ones((tokens, k), dtype=cupy.float32)
            layer.forward(x_buf, ids_buf, w_buf)  # eager first, outside the capture
            stream.begin_capture()
            out = layer.forward(x_buf, ids_buf, w_buf)
            graphs[tokens] = (stream.end_capture(), x_buf, ids_buf, w_buf, out)
    for step, tokens in enumerate(STEPS):
        graph, x_buf, ids_buf, w_buf, out = graphs[tokens]
        with stream:  # x copied in on the stream that reads it (not the null stream)
            x, x64 = device_random(rng, (tokens, hidden), np.float32)
            ids, w = step_routing(rng, step, tokens, experts, k)
            poison(layer)
            x_buf[...] = x
            ids_buf[...] = cupy.asarray(ids)
            w_buf[...] = cupy.asarray(w)
            graph.launch(stream)
        stream.synchronize()
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        check_close(out, expected, 1e-5, f"{name} graph T={tokens} step {step}")
    assert layer.dropped_pairs() == 0


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases", LAYERS)
def test_moe_forward_fixed_capacity_every_step_size(name, experts, k, hidden, inter, biases):
    import cupy

    rng = np.random.default_rng(experts + 2)
    weights, weights64 = make_layer(rng, experts, hidden, inter, biases)
    w1, w2, b1, b2 = weights
    dropped = cupy.zeros(1, dtype=cupy.uint64)
    # A fresh stream: its cached buffers start empty and grow with the first step.
    stream = cupy.cuda.Stream(non_blocking=True)
    for step, tokens in enumerate([*range(1, MAX_TOKENS + 1), *STEPS]):
        x, x64 = device_random(rng, (tokens, hidden), np.float32)
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        cupy.cuda.Device().synchronize()  # inputs written on another stream
        out = cg.moe_forward(
            x,
            ids_d,
            w_d,
            w1,
            w2,
            b1=b1,
            b2=b2,
            fixed_capacity=True,
            dropped_pairs=dropped,
            stream=stream,
        )
        stream.synchronize()
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        check_close(out, expected, 1e-5, f"{name} fixed_capacity T={tokens} step {step}")
    assert int(dropped.get()[0]) == 0


def _bad_ids(rng, tokens, experts, k):
    """Distinct ids with about a quarter replaced by values outside [0, E)."""
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    bad = rng.random(ids.shape) < 0.25
    ids[bad] = rng.choice([-1, -7, experts, experts + 3, 2**31 - 1], int(bad.sum()))
    return ids.astype(np.int32), bad


def test_out_of_range_ids_are_dropped_and_counted():
    import cupy

    rng = np.random.default_rng(5)
    experts, k, hidden, inter = 16, 4, 64, 32
    weights, weights64 = make_layer(rng, experts, hidden, inter, True)
    w1, w2, b1, b2 = weights
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=40, b1=b1, b2=b2)
    counter = cupy.zeros(1, dtype=cupy.int64)
    total = 0
    for tokens in (1, 7, 23, 40):
        x, x64 = device_random(rng, (tokens, hidden), np.float32)
        ids, bad = _bad_ids(rng, tokens, experts, k)
        w = rng.random((tokens, k)).astype(np.float32)
        # Reference: a dropped pair adds nothing, as if its weight were zero.
        ids_ok, w_ok = np.where(bad, 0, ids), np.where(bad, 0.0, w)
        expected = ref.moe_forward_ref(x64, ids_ok, w_ok, *weights64)
        out = layer.forward(x, cupy.asarray(ids), cupy.asarray(w))
        check_close(out, expected, 1e-5, f"FixedCapacityMoE with bad ids T={tokens}")
        out = cg.moe_forward(
            x,
            cupy.asarray(ids),
            cupy.asarray(w),
            w1,
            w2,
            b1=b1,
            b2=b2,
            fixed_capacity=True,
            dropped_pairs=counter,
        )
        check_close(out, expected, 1e-5, f"fixed_capacity with bad ids T={tokens}")
        total += int(bad.sum())
    assert total > 0
    assert int(counter.get()[0]) == total
    assert layer.dropped_pairs() == total
    with pytest.raises(
        ValueError, match=rf"{total} \(token, expert\) pairs had an expert id outside \[0, 16\)"
    ):
        layer.check_routing()
    assert layer.dropped_pairs(reset=True) == total
    assert layer.dropped_pairs() == 0
    layer.check_routing()  # nothing dropped since the reset


def test_repeated_ids_count_once_per_choice():
    """A token naming one expert twice gets its output twice, weighted, as on the
    synchronizing path; the repeats cannot push an expert past T rows."""
    import cupy

    rng = np.random.default_rng(6)
    experts, k, hidden, inter, tokens = 8, 2, 128, 64, 64
    weights, weights64 = make_layer(rng, experts, hidden, inter, True)
    w1, w2, b1, b2 = weights
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=tokens, b1=b1, b2=b2)
    # Expert 0 named twice by every token: with a row per pair it would need
    # 2T rows, more than the T-row chunks leave room for.
    crowded = np.zeros((tokens, k), dtype=np.int32)
    mixed = np.stack([rng.choice(experts, k) for _ in range(tokens)]).astype(np.int32)  # some repeats
    # With a row per repeated pair, expert 0 would hold 65 rows (two T-row chunks)
    # and experts 1-7 one chunk each: 9 chunks where the bound allows 8.
    overflowing = np.zeros((tokens, k), dtype=np.int32)
    overflowing[32] = (0, 1)
    for t in range(33, tokens):
        overflowing[t] = (1 + t % 7, 1 + (t + 1) % 7)
    for ids in (crowded, mixed, overflowing):
        x, x64 = device_random(rng, (tokens, hidden), np.float32)
        w = rng.random((tokens, k)).astype(np.float32)
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        args = (x, cupy.asarray(ids), cupy.asarray(w))
        check_close(layer.forward(*args), expected, 1e-5, "FixedCapacityMoE with repeats")
        check_close(
            cg.moe_forward(*args, w1, w2, b1=b1, b2=b2, fixed_capacity=True),
            expected,
            1e-5,
            "fixed_capacity with repeats",
        )
        check_close(cg.moe_forward(*args, w1, w2, b1=b1, b2=b2), expected, 1e-5, "dynamic with repeats")
    assert layer.dropped_pairs() == 0


def test_steps_on_two_streams_are_ordered():
    """Eager steps of one layer on two streams: a step waits for the previous
    one, so its buffers are not overwritten while that one still runs."""
    import cupy

    rng = np.random.default_rng(7)
    experts, k, hidden, inter = 8, 2, 1024, 4096  # big enough that a step takes a while
    weights, weights64 = make_layer(rng, experts, hidden, inter, False)
    w1, w2, _, _ = weights
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=64)
    first, second = (cupy.cuda.Stream(non_blocking=True) for _ in range(2))
    for step in range(4):
        x1, _ = device_random(rng, (64, hidden), np.float32)
        ids1, w1_ = step_routing(rng, step, 64, experts, k)
        tokens = 17 + 11 * step
        x2, x2_64 = device_random(rng, (tokens, hidden), np.float32)
        ids2, w2_ = step_routing(rng, step + 1, tokens, experts, k)
        args1 = (x1, cupy.asarray(ids1), cupy.asarray(w1_))
        args2 = (x2, cupy.asarray(ids2), cupy.asarray(w2_))
        cupy.cuda.Device().synchronize()  # inputs written on another stream
        layer.forward(*args1, stream=first)  # still running...
        out = layer.forward(*args2, stream=second)  # ...when this is queued
        with second:
            copy = out.copy()
        second.synchronize()
        check_close(
            copy, ref.moe_forward_ref(x2_64, ids2, w2_, *weights64), 1e-5, f"second stream step {step}"
        )


def _hold_current_stream(milliseconds: float) -> None:
    """Queue a kernel that spins for about ``milliseconds`` on the current stream."""
    import cupy

    spin = cupy.RawKernel(
        r"""extern "C" __global__ void spin(long long ns) {
            unsigned long long t0, t;
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
            do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
        }""",
        "spin",
    )
    spin((1,), (1,), (np.int64(milliseconds * 1e6),))


def test_first_step_on_another_stream_waits_for_the_construction():
    """The layer is built on the legacy default stream while it is busy (its
    counters' zeros queued behind 200 ms of work), and its first step runs at
    once on a non-blocking stream, which does not wait for that stream: the
    step must still see the zeros (the dropped pairs it counts survive, its
    output is right). Before ``runtime.device.finish_setup_work`` the zeros
    landed after the step and erased its count."""
    import cupy

    rng = np.random.default_rng(9)
    experts, k, hidden, inter, tokens = 16, 4, 64, 32, 24
    weights, weights64 = make_layer(rng, experts, hidden, inter, False)
    w1, w2, _, _ = weights
    ids, bad = _bad_ids(rng, tokens, experts, k)
    w = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), np.float32)
    cupy.cuda.Device().synchronize()  # the test's data is in place
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
    # Kernels compiled and launches prepared first: the timed step's host work is short.
    cg.FixedCapacityMoE(w1, w2, k, max_tokens=tokens, graphs=False).forward(x, ids_d, w_d, stream=stream)
    stream.synchronize()
    _hold_current_stream(200)
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=tokens, graphs=False)
    out = layer.forward(x, ids_d, w_d, stream=stream)
    with stream:
        got = out.copy()
    stream.synchronize()
    ids_ok, w_ok = np.where(bad, 0, ids), np.where(bad, 0.0, w)
    check_close(got, ref.moe_forward_ref(x64, ids_ok, w_ok, *weights64), 1e-5, "first step")
    assert bad.sum() > 0 and layer.dropped_pairs() == int(bad.sum())
    cupy.cuda.Device().synchronize()


def test_assign_rows_never_writes_past_its_row_capacity():
    """A row buffer shorter than the counts need: the pairs whose rows fall past
    it get -1 and are counted as dropped; nothing past the buffer is touched."""
    import cupy

    from cublas_grouped.moe import kernels as K
    from cublas_grouped.runtime.device import device_info
    from cublas_grouped.runtime.nvrtc import arch_for

    rng = np.random.default_rng(9)
    tokens, experts, k = 300, 8, 2
    ids_h = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    plan = ref.plan_ref(ids_h, experts)
    pairs, held, guard = tokens * k, tokens * k - 37, 16
    arch = arch_for(device_info().sm)
    stream = cupy.cuda.get_current_stream()
    from cuda.core import Stream

    launch_stream = Stream.from_handle(stream.ptr)
    ids = cupy.asarray(ids_h)
    nb = K.num_pair_blocks(pairs)
    block_counts = cupy.empty((nb, experts), dtype=cupy.int32)
    counts = cupy.empty(experts, dtype=cupy.int32)
    K.block_histogram(launch_stream, arch, ids, pairs, experts, block_counts)
    K.column_scan(launch_stream, arch, block_counts, nb, experts, counts)
    offsets = cupy.asarray(plan["row_offsets"])
    pair_to_row = cupy.full(pairs, 12345, dtype=cupy.int32)
    row_to_pair = cupy.full(held + guard, -1, dtype=cupy.int32)
    dropped = cupy.zeros(1, dtype=cupy.uint64)
    K.assign_rows(
        launch_stream,
        arch,
        ids,
        pairs,
        experts,
        block_counts,
        offsets,
        pair_to_row,
        row_to_pair[:held],
        dropped=dropped,
    )
    stream.synchronize()
    want = plan["pair_to_row"].astype(np.int64)
    want[want >= held] = -1
    assert cupy.asnumpy(pair_to_row).tolist() == want.tolist()
    assert int(dropped.get()[0]) == pairs - held
    assert (cupy.asnumpy(row_to_pair[held:]) == -1).all()
    assert cupy.asnumpy(row_to_pair[:held]).tolist() == plan["row_to_pair"][:held].tolist()


@pytest.mark.parametrize("algorithm", ["cublas_grouped", "sm90_grouped"])
@pytest.mark.parametrize("experts, k", [(128, 8), (8, 2)])
def test_any_int32_ids_are_safe(algorithm, experts, k):
    """Ids drawn from the whole int32 range and from a few experts with many
    repeats (as uninitialized memory might hold): every step completes, the
    output equals float64 of the in-range pairs, the drop count is exact. Both
    step kinds (the kernel one on SM 9.0 only)."""
    import cupy

    if algorithm == "sm90_grouped" and cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel step runs on SM 9.0 only")
    import ml_dtypes

    rng = np.random.default_rng(experts + k)
    hidden, inter = 128, 64
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), ml_dtypes.bfloat16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), ml_dtypes.bfloat16, scale=inter**-0.5)
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm=algorithm))
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=64, executor=executor, graphs=False)
    total = 0
    for step, tokens in enumerate([16, 1, 64, 33, 16, 64]):
        if step % 2:
            ids = rng.integers(-(2**31), 2**31, (tokens, k), dtype=np.int64).astype(np.int32)
            ids[rng.random(ids.shape) < 0.3] = rng.integers(0, experts)
        else:
            ids = rng.integers(0, min(experts, 3), (tokens, k)).astype(np.int32)  # heavy repeats
        bad = (ids < 0) | (ids >= experts)
        w = rng.random((tokens, k)).astype(np.float32)
        x, x64 = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
        out = layer.forward(x, cupy.asarray(ids), cupy.asarray(w))
        expected = ref.moe_forward_ref(x64, np.where(bad, 0, ids), np.where(bad, 0.0, w), w1_64, w2_64)
        check_close(out, expected, 2e-2, f"{algorithm} E={experts} T={tokens} step {step}")
        total += int(bad.sum())
    assert layer.dropped_pairs() == total
