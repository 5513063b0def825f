"""Fewer launches per eager call on SM 9.0 (GPU): the offsets kernel reads
gmm's device sizes in place (int32 and int64) and makes them safe itself, and
the layer step runs it once for both GEMMs, which take their tiles from two
counters it zeroed.

- the offsets kernel's schedule against a host reference: valid, negative,
  past and short of M, huge sizes, 1 to 2000 groups, both layouts, both
  counters zeroed from a poisoned buffer;
- gmm with device sizes of both dtypes against float64, NaN-poisoned outputs
  with guard rows;
- the layer step (one offsets launch, two counters) bit for bit equal to the
  step as it ran before (the offsets kernel again before GEMM 2, counter 0),
  T = 1 .. 70 and 4096, and against float64;
- gmm with device sizes and the layer's own graphs replayed with new sizes;
- the histogram with the schedule (one launch for the histogram, column scan
  and offsets kernel) against a NumPy model and the three launches, at sizes
  where its staging of the columns changes shape, and replayed from a graph.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes, wait_for_current_stream
from test_device_sizes_host import clamp_reference

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper, hopper_sizes

pytestmark = pytest.mark.gpu
BF16 = ml_dtypes.bfloat16
POISON = 0x3FFFFFFF  # offsets far out of range, counters far past every tile


@pytest.fixture(autouse=True)
def _hopper_only(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the Hopper kernel's paths run on SM 9.0 GPUs only")
    monkeypatch.delenv(hopper_sizes.CHECK_ENV, raising=False)


def _schedule_reference(sizes, m: int, capacity: int):
    """(row_offsets, row_ends, tile_offsets) the offsets kernel must write."""
    s = np.maximum(np.asarray(sizes).astype(np.int64), 0)
    e = len(s)
    if capacity > 0:
        used = np.minimum(s, capacity)
        first, end = np.arange(e, dtype=np.int64) * capacity, e * capacity
    else:
        used = clamp_reference(s, m).astype(np.int64)
        first, end = np.concatenate(([0], np.cumsum(used)[:-1])).astype(np.int64), int(used.sum())
    tiles = -(-used // hopper.BLOCK_M)
    return np.append(first, end), first + used, np.concatenate(([0], np.cumsum(tiles)))


def _run_offsets(sizes_dev, e: int, m: int, capacity: int):
    import cupy

    from cublas_grouped.runtime.device import stream_resources

    res = stream_resources(cupy.cuda.Device().id, None)
    hopper.schedule_buffers(res, e)  # sized first, so that it is the buffer poisoned
    res.buffers["sm90-offsets"].view(cupy.int32).fill(POISON)
    hopper.schedule_offsets(res, sizes_dev, e, m, capacity)
    cupy.cuda.get_current_stream().synchronize()
    return [x.get() for x in hopper.schedule_buffers(res, e)]


@pytest.mark.parametrize("capacity", [0, 200])
@pytest.mark.parametrize("dtype", ["int32", "int64", "int16", "uint8"])
@pytest.mark.parametrize("experts", [1, 5, 256, 1024, 1025, 2000])
def test_offsets_kernel_matches_its_reference(dtype, experts, capacity):
    """Every schedule int the GEMMs read, for any sizes of the dtype (int16 and
    uint8 are cast to int64 first); 1025 and 2000 groups take the block's
    carry across passes of 1024 threads."""
    import cupy

    rng = np.random.default_rng(experts + capacity)
    info = np.iinfo(dtype)
    m = 1000
    cases = [
        random_sizes(rng, experts, m),  # valid: unchanged
        rng.integers(max(info.min, -50), min(info.max, 60), experts),  # negatives, past and short of m
        np.zeros(experts, np.int64),
    ]
    if dtype == "int64":
        cases.append(rng.integers(0, 2**40, experts))  # each past M, sum past 2**63 / 2**31: no overflow
        cases.append(np.full(experts, -(2**62)))
    if dtype == "int32":
        cases.append(np.full(experts, 2**31 - 1))
        cases.append(np.full(experts, -(2**31)))
    for sizes in cases:
        host = np.asarray(sizes).astype(dtype)
        row_offsets, row_ends, tile_offsets, counters = _run_offsets(cupy.asarray(host), experts, m, capacity)
        want = _schedule_reference(host, m, capacity)
        what = f"{dtype} E={experts} C={capacity}: {host[:6]}"
        np.testing.assert_array_equal(row_offsets, want[0], what)
        np.testing.assert_array_equal(row_ends, want[1], what)
        np.testing.assert_array_equal(tile_offsets, want[2], what)
        assert counters.tolist() == [0, 0], f"{what}: both tile counters zeroed"
        if capacity == 0:
            assert row_ends.max(initial=0) <= m and (row_ends >= row_offsets[:-1]).all()


SIZE_CASES = {
    "valid": [50, 0, 129, 1, 120, 0],
    "negative": [-5, 100, -(2**31), 190, 0, 3],
    "past M": [100, 250, 0, 90, 7, 1],
    "short of M": [10, 0, 20, 0, 0, 1],
    "huge": [2**31 - 1, 5, 0, 0, 0, 7],
}


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", sorted(SIZE_CASES))
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_gmm_device_sizes_against_float64(dtype, case, trans_b):
    """Two launches, no copy: the rows of the clamped sizes match float64,
    every other row of out and the guard rows after it stay NaN, on the
    checked call and on hits (prepared launches)."""
    import cupy

    rng = np.random.default_rng(len(case) + int(trans_b))
    m, k, n, e = 300, 128, 256, 6
    sizes = np.array(SIZE_CASES[case], dtype=np.int64)
    if case == "huge" and dtype == "int64":
        sizes[0] = 2**40
    used = clamp_reference(sizes, m)
    rows = int(used.sum())
    a, a64 = device_random(rng, (m, k), BF16)
    b, b64 = device_random(rng, (e, n, k) if trans_b else (e, k, n), BF16, scale=k**-0.5)
    want = ref.gmm_ref(a64, b64, used, trans_b=trans_b)
    sizes_dev = cupy.asarray(sizes.astype(dtype))
    for step in range(3):
        buf = poisoned((m + 8, n), BF16)
        cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=buf[:m])
        what = f"{dtype} {case} step {step}"
        if rows:
            check_close(buf[:rows], want[:rows], 1e-2, what)
        rest = cupy.asnumpy(buf[rows:]).astype(np.float64)
        assert np.isnan(rest).all(), f"{what}: a row past the clamped sizes (or past M) was written"


def _old_order(monkeypatch):
    """The step as it ran before (on the timed path): the placement in four
    launches at every T, a memset of row_to_pair,
    the histogram and the column scan launched apart, and the offsets kernel
    again before GEMM 2, which then takes its tiles from counter 0."""
    import cupy

    from cublas_grouped.moe import kernel_step
    from cublas_grouped.moe import kernels as K

    def count_rows(res, arch, buf, ids, e, pairs, rows=None):
        rows = pairs if rows is None else rows
        nb = K.num_pair_blocks(pairs)
        block_counts, row_to_pair = buf.block_counts[:nb], buf.row_to_pair[:rows]
        cupy.cuda.runtime.memsetAsync(row_to_pair.data.ptr, 0xFF, row_to_pair.nbytes, res.stream)
        K.block_histogram(res.launch_stream, arch, ids, pairs, e, block_counts, skip_repeats=True)
        K.column_scan(res.launch_stream, arch, block_counts, nb, e, buf.counts)
        return block_counts, buf.pair_to_row[:pairs], row_to_pair

    monkeypatch.setattr(kernel_step, "count_rows", count_rows)
    monkeypatch.setattr(kernel_step, "PLACE_IN_ONE_LAUNCH", False)  # decode's one launch: four again
    real = hopper.grouped_rows

    def grouped_rows(res, problem, ptrs, sizes, *, counter=0, scanned=False, **kw):
        if counter == 1:
            return real(res, problem, ptrs, sizes, scanned=False, counter=0, **kw)
        return real(res, problem, ptrs, sizes, scanned=scanned, counter=counter, **kw)

    monkeypatch.setattr(hopper, "grouped_rows", grouped_rows)


@pytest.mark.parametrize("layout", ["gate_up", "gate_up_blocked"])
@pytest.mark.parametrize("tokens", [*range(1, 71), 4096])
def test_step_bitwise_equal_to_two_offsets_launches(monkeypatch, tokens, layout):
    """moe_forward on the kernel step (AUTO, 32 experts): the prepared step
    (one offsets launch, no memset, no column scan for one block of pairs)
    and the timed one equal, bit for bit, the step as it ran before
    (:func:`_old_order`); all match float64."""
    import cupy

    from cublas_grouped.moe import kernel_step as S

    rng = np.random.default_rng(tokens)
    experts, k, hidden, inter = 32, 4, 256, 128
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), BF16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), BF16, scale=inter**-0.5)
    w1_run = cg.pack_gate_up(w1) if layout == "gate_up_blocked" else w1
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), BF16)
    ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)

    def run(timer=None):
        return cg.moe_forward(x, ids_d, w_d, w1_run, w2, timer=timer, w1_layout=layout)

    new = [run(), run(), run(cg.StageTimer())]  # prepared, a hit, timed (prepared too)
    with pytest.MonkeyPatch.context() as mp:
        _old_order(mp)
        mp.setattr(S, "TIME_PREPARED", False)  # launched afresh: the old order applies
        old = run(cg.StageTimer())
    for i, got in enumerate(new):
        assert bool((got.view(cupy.uint16) == old.view(cupy.uint16)).all()), (
            f"T={tokens} run {i}: not bitwise"
        )
    check_close(new[0], ref.moe_forward_ref(x64, ids, w, w1_64, w2_64), 2e-2, f"T={tokens}")


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_gmm_graph_replays_new_device_sizes(dtype):
    """gmm with device sizes captured once, replayed after the sizes were
    overwritten in place (valid, negative, past M): each replay computes the
    new clamped sizes."""
    import cupy

    rng = np.random.default_rng(7)
    m, k, n, e = 256, 64, 128, 4
    a, a64 = device_random(rng, (m, k), BF16)
    b, b64 = device_random(rng, (e, k, n), BF16, scale=0.125)
    sizes_dev = cupy.asarray(np.array([64, 64, 64, 64], dtype=dtype))
    out = poisoned((m, n), BF16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out's NaN were made on the null stream
    with stream:
        cg.gmm(a, b, sizes_dev, out=out)  # the checked call: prepared before capture
        stream.synchronize()
        stream.begin_capture()
        cg.gmm(a, b, sizes_dev, out=out)
        graph = stream.end_capture()
    for new in ([0, 200, 6, 50], [-3, 300, 10, 0], [1, 1, 1, 253], [256, 0, 0, 0]):
        used = clamp_reference(new, m)
        with stream:
            out.fill(np.nan)
            sizes_dev[...] = cupy.asarray(np.array(new, dtype=dtype))
            graph.launch(stream)
        stream.synchronize()
        rows = int(used.sum())
        check_close(out[:rows], ref.gmm_ref(a64, b64, used)[:rows], 1e-2, f"replay {new}")
        assert np.isnan(cupy.asnumpy(out[rows:]).astype(np.float64)).all()


def test_layer_graphs_equal_eager_steps_bitwise():
    """FixedCapacityMoE's own graphs (the step's launches captured with its
    own schedule buffer and its two counters) equal eager steps bit for bit
    as T rises and falls."""
    import cupy

    rng = np.random.default_rng(9)
    experts, k, hidden, inter = 64, 4, 256, 128
    w1, _ = device_random(rng, (experts, hidden, 2 * inter), BF16, scale=hidden**-0.5)
    w2, _ = device_random(rng, (experts, inter, hidden), BF16, scale=inter**-0.5)
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    graphed = cg.FixedCapacityMoE(w1, w2, k, max_tokens=256, executor=executor)
    eager = cg.FixedCapacityMoE(w1, w2, k, max_tokens=256, graphs=False, executor=executor)
    for tokens in (1, 7, 70, 256, 3, 70, 1):
        ids = cupy.asarray(
            np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        )
        w = cupy.asarray(rng.random((tokens, k)).astype(np.float32))
        x, _ = device_random(rng, (tokens, hidden), BF16)
        want = eager.forward(x, ids, w).copy()
        got = graphed.forward(x, ids, w)
        assert bool((got.view(cupy.uint16) == want.view(cupy.uint16)).all()), f"T={tokens}: not bitwise"


def test_sm90_host_sizes_prepared_against_float64():
    """SM90_GROUPED on host sizes: the sizes uploaded once per cache entry,
    then two prepared launches per hit; every hit matches float64 with a
    NaN-poisoned output, for several sizes interleaved (each its own entry
    and upload), and a graph captured on a hit replays it."""
    import cupy

    rng = np.random.default_rng(11)
    m, k, n, e = 300, 128, 256, 6
    a, a64 = device_random(rng, (m, k), BF16)
    b, b64 = device_random(rng, (e, k, n), BF16, scale=k**-0.5)
    cases = [np.array(c) for c in ([50, 0, 129, 1, 120, 0], [300, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 295])]
    wants = [ref.gmm_ref(a64, b64, s) for s in cases]
    for step in range(3):
        for sizes, want in zip(cases, wants):
            out = poisoned((m, n), BF16)
            cg.gmm(a, b, sizes, out=out, algorithm="sm90_grouped")
            check_close(out, want, 1e-2, f"step {step} sizes {sizes}")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out = poisoned((m, n), BF16)  # its NaN fill on the stream that then writes it
        cg.gmm(a, b, cases[0], out=out, algorithm="sm90_grouped")
        cg.gmm(a, b, cases[0], out=out, algorithm="sm90_grouped")  # a hit: prepared, uploaded
        stream.synchronize()
        stream.begin_capture()
        cg.gmm(a, b, cases[0], out=out, algorithm="sm90_grouped")
        graph = stream.end_capture()
        out.fill(np.nan)
        cg.gmm(a, b, cases[1], out=poisoned((m, n), BF16), algorithm="sm90_grouped")  # another entry between
        graph.launch(stream)
    stream.synchronize()
    check_close(out, wants[0], 1e-2, "graph replay of a host-sizes hit")


def test_auto_choice_for_the_tiny_host_sizes_case(capsys):
    """The host benchmark's `gmm tiny, host sizes (auto)` case (E=4, 16 x 256
    x 256 bf16, sizes 4, 4, 4, 4): prints what AUTO chose (with the
    environment's CUBLAS_GROUPED_AUTOTUNE) and whether the entry is prepared;
    the result must match float64 whatever it chose."""
    import cupy

    from cublas_grouped.gemm import call_cache

    rng = np.random.default_rng(12)
    a, a64 = device_random(rng, (16, 256), BF16)
    b, b64 = device_random(rng, (4, 256, 256), BF16, scale=256**-0.5)
    sizes = np.array([4, 4, 4, 4], dtype=np.int64)
    call_cache.clear()
    for _ in range(3):
        out = cg.gmm(a, b, sizes)
    check_close(out, ref.gmm_ref(a64, b64, sizes), 1e-2, "gmm tiny, host sizes (auto)")
    entries = [x for x in call_cache._local.calls.values() if x.algorithm is not None]
    with capsys.disabled():
        for x in entries:
            print(f"\nAUTO chose {x.algorithm.value}; prepared: {type(x.prepared).__name__}")
    cupy.cuda.get_current_stream().synchronize()
    assert entries


@pytest.mark.parametrize("tokens, extra_rows", [(1, 0), (70, 0), (300, 5000), (4096, 0)])
def test_histogram_resets_rows_and_counts_as_before(tokens, extra_rows):
    """The histogram kernel resets row_to_pair (the memset it replaces: every
    byte 0xFF) over exactly the rows asked, grid-stride past its pair blocks,
    and its block counts stay those of the pairs that take a row (ids outside
    [0, E) and repeats skipped); with one block of pairs, the column scan's
    results it writes itself equal the scan kernel's, bit for bit."""
    import cupy

    from cublas_grouped.moe import kernels as K
    from cublas_grouped.runtime.nvrtc import arch_for

    rng = np.random.default_rng(tokens)
    e, k = 40, 4
    ids = rng.integers(-2, e + 2, (tokens, k)).astype(np.int32)  # out of range and repeats included
    pairs = tokens * k
    rows = pairs + extra_rows
    nb = K.num_pair_blocks(pairs)
    guard = cupy.full(rows + 64, 12345, dtype=cupy.int32)
    counts = cupy.full((nb, e), -7, dtype=cupy.int32)
    stream = cupy.cuda.get_current_stream()
    arch = arch_for(cg.device_info().sm)
    ids_d = cupy.asarray(ids)
    K.block_histogram(stream.ptr, arch, ids_d, pairs, e, counts, skip_repeats=True, reset=guard[:rows])
    stream.synchronize()
    host = guard.get()
    assert (host[:rows] == -1).all() and (host[rows:] == 12345).all()
    flat = ids.reshape(-1)
    want = np.zeros((nb, e), np.int32)
    for p, x in enumerate(flat):
        j = p % k
        if 0 <= x < e and x not in flat[p - j : p]:
            want[p // K.PAIRS_PER_BLOCK, x] += 1
    np.testing.assert_array_equal(counts.get(), want)
    # The column scan's results, from the scan kernel and (one block of pairs:
    # decode) from the histogram itself: equal.
    totals = cupy.full(e, -7, dtype=cupy.int32)
    K.column_scan(stream.ptr, arch, counts, nb, e, totals)
    if nb == 1:
        bases, totals1 = cupy.full((1, e), -7, dtype=cupy.int32), cupy.full(e, -7, dtype=cupy.int32)
        K.block_histogram(stream.ptr, arch, ids_d, pairs, e, bases, skip_repeats=True, counts=totals1)
        stream.synchronize()
        assert (bases.get() == counts.get()).all() and (totals1.get() == totals.get()).all()
    stream.synchronize()
    np.testing.assert_array_equal(totals.get(), want.sum(axis=0))


def _pair_counts(ids: np.ndarray, e: int, nb: int) -> np.ndarray:
    """[nb, E]: each block of pairs' count per expert, ids outside [0, E) and repeats skipped."""
    from cublas_grouped.moe import kernels as K

    flat, k = ids.reshape(-1), ids.shape[1]
    want = np.zeros((nb, e), np.int64)
    for p, x in enumerate(flat):
        j = p % k
        if 0 <= x < e and x not in flat[p - j : p]:
            want[p // K.PAIRS_PER_BLOCK, x] += 1
    return want


@pytest.mark.parametrize(
    "tokens, experts, k",
    [
        (1, 40, 4),  # one block of pairs
        (300, 40, 4),  # two blocks
        (4096, 128, 8),  # Qwen3 at prefill: 32 blocks, the columns staged at once
        (16384, 128, 8),  # 128 blocks: the columns staged in two chunks of experts
        (2048, 1000, 8),  # a last chunk of fewer experts
        (65536, 8, 2),  # 128 blocks of few experts
        (9000, 3000, 8),  # more experts than the histogram's shared counters: several passes
    ],
)
def test_histogram_schedule_writes_what_its_three_launches_write(tokens, experts, k):
    """expert_histogram_schedule (the step's histogram, column scan and offsets
    kernel in one launch) against a NumPy model and bit for bit against the
    three launches, from poisoned buffers, row_to_pair reset to its end and
    not past it; launched three times in a row (the ticket set back to 0
    each time) and replayed from a graph with new ids."""
    import cupy

    from cublas_grouped.moe import kernels as K
    from cublas_grouped.runtime.device import stream_resources
    from cublas_grouped.runtime.nvrtc import arch_for

    rng = np.random.default_rng(tokens + experts)
    pairs = tokens * k
    nb = K.num_pair_blocks(pairs)
    arch = arch_for(cg.device_info().sm)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ticket = cupy.zeros(1, dtype=cupy.uint32)
        ids_d = cupy.empty((tokens, k), dtype=cupy.int32)

    def outputs():
        return (
            cupy.full((nb, experts), POISON, dtype=cupy.int32),  # block counts, then bases
            cupy.full(pairs + 64, 12345, dtype=cupy.int32),  # row_to_pair and a guard
            cupy.full(experts, POISON, dtype=cupy.int32),  # counts
            cupy.full(hopper.schedule_ints(experts), POISON, dtype=cupy.int32),
        )

    def launch(out):
        blocks, rows, counts, schedule = out
        K.histogram_schedule(
            stream.ptr,
            arch,
            ids_d,
            pairs,
            experts,
            blocks,
            rows[:pairs],
            hopper.BLOCK_M,
            counts,
            hopper.schedule_addresses(schedule.data.ptr, experts),
            ticket,
        )

    def check(ids, out, what):
        blocks, rows, counts, schedule = (a.get() for a in out)
        per_block = _pair_counts(ids, experts, nb)
        want_counts = per_block.sum(axis=0)
        bases = np.cumsum(per_block, axis=0) - per_block
        np.testing.assert_array_equal(blocks, bases, err_msg=f"{what}: block bases")
        np.testing.assert_array_equal(counts, want_counts, err_msg=f"{what}: counts")
        assert (rows[:pairs] == -1).all() and (rows[pairs:] == 12345).all(), f"{what}: row_to_pair reset"
        row_offsets, row_ends, tile_offsets = _schedule_reference(want_counts, pairs, 0)
        e = experts
        np.testing.assert_array_equal(schedule[: e + 1], row_offsets, err_msg=f"{what}: row_offsets")
        np.testing.assert_array_equal(schedule[e + 1 : 2 * e + 1], row_ends, err_msg=f"{what}: row_ends")
        np.testing.assert_array_equal(schedule[2 * e + 1 : 3 * e + 2], tile_offsets, err_msg=f"{what}: tiles")
        assert (schedule[3 * e + 2 :] == 0).all(), f"{what}: tile counters"
        assert int(ticket.get()[0]) == 0, f"{what}: ticket left at {int(ticket.get()[0])}"

    def new_ids():
        ids = rng.integers(-1, experts + 1, (tokens, k)).astype(np.int32)  # out of range and repeats too
        ids_d.set(ids, stream=stream)
        return ids

    with stream:  # every fill and copy on the one stream
        for i in range(3):
            ids = new_ids()
            out = outputs()
            stream.synchronize()
            launch(out)
            stream.synchronize()
            check(ids, out, f"T={tokens} E={experts} launch {i}")
        # The three launches it replaces write the same bits.
        blocks, _, counts, schedule = out
        old = outputs()
        K.block_histogram(
            stream.ptr, arch, ids_d, pairs, experts, old[0], skip_repeats=True, reset=old[1][:pairs]
        )
        K.column_scan(stream.ptr, arch, old[0], nb, experts, old[2])
        res = stream_resources(cupy.cuda.Device().id, stream)
        hopper.schedule_offsets(res, old[2], experts, pairs, storage=old[3])
        stream.synchronize()
        for name, a, b in zip(
            ("bases", "counts", "schedule"), (blocks, counts, schedule), (old[0], old[2], old[3])
        ):
            assert bool((a == b).all()), f"T={tokens} E={experts}: {name} differ from the three launches'"
        # A graph of the launch, replayed with new ids.
        out = outputs()
        stream.synchronize()
        stream.begin_capture()
        launch(out)
        graph = stream.end_capture()
        for i in range(2):
            ids = new_ids()
            graph.launch(stream)
            stream.synchronize()
            check(ids, out, f"T={tokens} E={experts} replay {i}")
