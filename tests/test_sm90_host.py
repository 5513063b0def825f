"""The host side of the SM 9.0 paths (CPU, GPU side stubbed: tests/host_stubs.py):
prepared launches replay exactly what the unprepared path queues, every bad
call still raises after hits, and call budgets hold the hot paths short."""

from __future__ import annotations

import numpy as np
import pytest
from host_stubs import H100, STREAM, count_calls, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.moe import layer_cache
from cublas_grouped.moe import routing as R

E, K, H, I = 16, 4, 64, 128  # noqa: E741  (I a multiple of 128: gate_up_blocked runs too)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100) as rec:
        counts = np.zeros(E, np.int32)
        counts[:K] = 1
        rec.host_values = lambda arr: counts.copy() if arr.shape == (E,) else np.zeros(arr.shape, arr.dtype)
        layer_cache.clear()
        R._local.calls = {}
        yield rec
        layer_cache.clear()
        R._local.calls = {}


def _arrays(tokens=1, bias=False, weights=True):
    t = dict(
        x=fake_array((tokens, H)),
        ids=fake_array((tokens, K), "int32"),
        weights=fake_array((tokens, K), "float32") if weights else None,
        w1=fake_array((E, H, 2 * I)),
        w2=fake_array((E, I, H)),
    )
    if bias:
        t["b1"], t["b2"] = fake_array((E, 2 * I)), fake_array((E, H))
    return t


def _queued(rec, out):
    """What the last call queued, the output's address as "out" (fresh each call)."""

    def name(v):
        return "out" if v == out.data.ptr else v

    launches = [(h, gb, shm, st, tuple(map(name, vals))) for h, gb, shm, st, vals in rec.decoded]
    return launches, [tuple(map(name, m)) for m in rec.memsets]


VARIANTS = {
    "plain": dict(),
    "biases, no weights": dict(bias=True, weights=False),
    "fused gate_up_blocked": dict(bias=True, layout="gate_up_blocked"),
    "fused gate_up_blocked, epilogue at every size": dict(bias=True, layout="gate_up_blocked", epi=True),
    "fixed_capacity": dict(fixed=True),
    "fixed_capacity, dropped_pairs, 5 tokens": dict(fixed=True, dropped=True, tokens=5),
    "256 tokens (1024 pairs: one block, overlapped)": dict(tokens=256),
    "300 tokens (two blocks of pairs)": dict(tokens=300),
    "fixed_capacity, 300 tokens": dict(fixed=True, tokens=300),
}


def _places_once(monkeypatch, one_launch: bool, pairs: int, schedule: bool = True) -> bool:
    """Set kernel_step.PLACE_IN_ONE_LAUNCH (and placement_launches.HISTOGRAM_SCHEDULE
    to ``schedule``); whether a step of ``pairs`` pairs over this file's E
    experts then places its rows in one launch (only at one block of pairs: a
    larger step keeps the launches apart either way)."""
    from cublas_grouped.moe import kernel_step as S
    from cublas_grouped.moe import placement_launches as P

    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", one_launch)
    monkeypatch.setattr(P, "HISTOGRAM_SCHEDULE", schedule)
    once = S.places_in_one_launch(E, pairs)
    assert once == (one_launch and pairs <= 1024)
    return once


def _gated_epilogue(monkeypatch, opts) -> bool:
    """Whether the step (this file's T = ``opts["tokens"]``, E and K) runs
    GEMM 1's gated epilogue, w1 packed: at every size with ``opts["epi"]`` (the
    default rule); the packed variants without it set the rule's rows per
    expert to 16, so these decode-sized steps run GEMM 1 and then the
    activation kernel on the packed columns (the other form of the step)."""
    from cublas_grouped.moe import kernel_step as S

    rows = opts.get("tokens", 1) * K
    if opts.get("epi"):
        assert S.GATED_EPILOGUE_MIN_ROWS_PER_GROUP == 0
    else:
        monkeypatch.setattr(S, "GATED_EPILOGUE_MIN_ROWS_PER_GROUP", 16)
        assert not opts.get("layout") or rows <= 16 * E
    return bool(opts.get("layout")) and rows > S.GATED_EPILOGUE_MIN_ROWS_PER_GROUP * E


def _handles(name: str) -> set:
    """The handles of moe.kernels' kernel ``name`` (any dtype) looked up so far."""
    from cublas_grouped.moe import kernels as Kn

    return {kernel.handle for key, kernel in Kn._found.items() if key[1] == name}


@pytest.mark.parametrize(
    "one_launch, schedule",
    [(True, True), (False, True), (False, False)],
    ids=["one launch", "histogram with the schedule", "histogram, column scan, offsets"],
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prepared_step_queues_what_the_timed_step_does(gpu, monkeypatch, variant, one_launch, schedule):
    """The kernel step without a timer replays prepared launches; with one it
    launches each kernel afresh: both must pass every kernel the same values
    (a wrong slot or a stale address differs here), on the first call and on
    hits, for new inputs too; with the decode placement in one launch
    (place_one_block) and in four."""
    from cublas_grouped.moe import fixed_capacity as F
    from cublas_grouped.moe import kernel_step as S
    from cublas_grouped.moe import layer as L

    opts = VARIANTS[variant]
    once = _places_once(monkeypatch, one_launch, opts.get("tokens", 1) * K, schedule)
    epilogue = _gated_epilogue(monkeypatch, opts)
    t = _arrays(opts.get("tokens", 1), opts.get("bias", False), opts.get("weights", True))
    kw = dict(b1=t.get("b1"), b2=t.get("b2"), w1_layout=opts.get("layout", "gate_up"))
    if opts.get("fixed"):
        kw["fixed_capacity"] = True
    if opts.get("dropped"):
        kw["dropped_pairs"] = fake_array((1,), "uint64")

    def call(x, ids, weights, dropped, biases):
        if dropped is not None:
            kw["dropped_pairs"] = dropped
        kw["b1"], kw["b2"] = biases
        return cg.moe_forward(x, ids, weights, t["w1"], t["w2"], **kw)

    def timed(res, shape, buf, x, ids, weights, params, out, dropped, timer=None):
        S.kernel_step(res, shape, buf, x, ids, weights, params, out, dropped, timer or cg.StageTimer())

    # The second inputs are all new arrays (x, ids, weights, the dropped counter):
    # each goes in a slot of the prepared launches, which must write it there.
    new_weights = fake_array(t["weights"].shape, "float32") if t["weights"] is not None else None
    new_dropped = fake_array((1,), "uint64") if opts.get("dropped") else None
    # New biases too: their addresses are fixed in the prepared launches, so
    # they key the prepared steps (a step prepared for the old ones must not run);
    # b1 changes first alone, then b2 alone: each must key the prepared steps.
    b1, b2 = (fake_array((E, 2 * I)), fake_array((E, H))) if opts.get("bias") else (None, None)
    inputs = [
        (t["x"], t["ids"], t["weights"], kw.get("dropped_pairs"), (t.get("b1"), t.get("b2"))),
        (
            fake_array(t["x"].shape),
            fake_array(t["ids"].shape, "int32"),
            new_weights,
            new_dropped,
            (b1, t.get("b2")),
        ),
        (fake_array(t["x"].shape), fake_array(t["ids"].shape, "int32"), new_weights, new_dropped, (b1, b2)),
    ]
    for x, ids, weights, dropped, biases in inputs:
        with pytest.MonkeyPatch.context() as mp:
            for module in (F, L):
                mp.setattr(module, "kernel_step", timed)
            mp.setattr(S, "TIME_PREPARED", False)  # the timed step launches afresh
            gpu.clear()
            want = _queued(gpu, call(x, ids, weights, dropped, biases))
            assert gpu.overlapped == []  # the timed step launches plainly
        for _ in range(2):  # prepared, then a hit
            gpu.clear()
            got = _queued(gpu, call(x, ids, weights, dropped, biases))
            assert got == want
            # Every launch of a prepared step of at most OVERLAP_MAX_PAIRS pairs is
            # overlapped (kernel_step.OVERLAP_LAUNCHES), none of a larger one.
            small = x.shape[0] * K <= S.OVERLAP_MAX_PAIRS
            assert gpu.overlapped == (list(range(len(got[0]))) if small else [])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(S, "OVERLAP_LAUNCHES", False)
            gpu.clear()
            assert _queued(gpu, call(x, ids, weights, dropped, biases)) == want and gpu.overlapped == []
        with pytest.MonkeyPatch.context() as mp:
            # Timed with TIME_PREPARED (the benchmark's split): the prepared
            # launches, plainly (a timer's mark ends each stage), the same values.
            for module in (F, L):
                mp.setattr(module, "kernel_step", timed)
            gpu.clear()
            assert _queued(gpu, call(x, ids, weights, dropped, biases)) == want and gpu.overlapped == []
        # 8 launches with the activation in GEMM 1's epilogue (w1 packed, past
        # decode sizes or forced), else 9 (one offsets
        # launch), one fewer with one block of pairs (no column scan), 3 fewer
        # again placed in one launch (histogram, offsets, assign_rows and
        # gather_rows in one); with the histogram writing the schedule, 2
        # fewer than 9 (no column scan, no offsets launch) at any size; no
        # memset of row_to_pair (the histogram or the one launch writes it
        # all), and none of the default path's dropped-ids counter (zeroed once,
        # it accumulates): that path queues one 8-byte copy of it to pinned
        # memory per call instead (moe/dropped_pairs.py), the fixed-capacity
        # path none.
        one_block = x.shape[0] * K <= 1024
        fewer = 2 if schedule and not once else one_block + 3 * once
        assert len(want[0]) == (8 if epilogue else 9) - fewer
        assert len(want[1]) == 0
        import cupy

        to_host = [c[2] for c in gpu.copies if c[3] == cupy.cuda.runtime.memcpyDeviceToHost]
        assert to_host == ([] if opts.get("fixed") else [8])
        placements = [sum(h in _handles(n) for h, *_ in want[0]) for n in ("place_one_block", "assign_rows")]
        assert placements == ([1, 0] if once else [0, 1])


@pytest.mark.parametrize(
    "one_launch, schedule",
    [(True, True), (False, True), (False, False)],
    ids=["one launch", "histogram with the schedule", "histogram, column scan, offsets"],
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_offsets_launch_and_a_tile_counter_per_gemm(gpu, monkeypatch, variant, one_launch, schedule):
    """The step writes the GEMMs' schedule once, before both GEMMs (the offsets
    kernel over T*k rows, so valid counts are never cut, or place_one_block
    with T*k pairs and tiles of BLOCK_M rows); GEMM 1 takes its tiles from
    tile counter 0 and GEMM 2 from counter 1 of that same schedule, which
    that one launch zeroed: a GEMM 2 reading counter 0 would find GEMM 1's
    count and skip its tiles. The placement's pair_to_row is the combine's."""
    from cublas_grouped.gemm.backends import hopper

    opts = VARIANTS[variant]
    t = _arrays(opts.get("tokens", 1), opts.get("bias", False), opts.get("weights", True))
    kw = dict(b1=t.get("b1"), b2=t.get("b2"), w1_layout=opts.get("layout", "gate_up"))
    if opts.get("fixed"):
        kw["fixed_capacity"] = True
    tokens = t["x"].shape[0]
    once = _places_once(monkeypatch, one_launch, tokens * K, schedule)
    for _ in range(3):  # first call, prepared, a hit
        gpu.clear()
        cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], **kw)
        handles = [d[0] for d in gpu.decoded]
        scan = hopper.offsets_kernel().handle
        gemms = [i for i, d in enumerate(gpu.decoded) if isinstance(d[4][0], tuple)]  # tensor-map arguments
        assert len(gemms) == 2
        first, second = (gpu.decoded[i][4] for i in gemms)
        (combine,) = [d[4] for d in gpu.decoded if d[0] in _handles("sum_rows")]
        if once:
            # No offsets, histogram or assign_rows launch: place_one_block, the
            # step's first launch, writes what they would.
            assert scan not in handles and not set(handles) & (
                _handles("assign_rows") | _handles("expert_block_histogram")
            )
            assert handles[0] in _handles("place_one_block") and gemms[0] > 0
            place = gpu.decoded[0][4]
            assert place[1:4] == (tokens * K, K, E) and place[8] == hopper.BLOCK_M
            base = first[3]  # the schedule's first array, row_offsets
            assert place[10:14] == hopper.schedule_addresses(base, E, 0)
            # GEMM 1 (not gathering) reads the rows the one launch gathered.
            assert place[18] != 0 and first[0][0] == first[1][0] == place[18]
            assert combine[2] == place[14]
        elif schedule:
            # The histogram, the step's first launch, writes the counts, the
            # block bases and the schedule (no column scan, no offsets
            # launch); assign_rows, next, places by them.
            assert scan not in handles and not set(handles) & _handles("expert_column_scan")
            assert handles[0] in _handles("expert_histogram_schedule")
            histogram, assign = gpu.decoded[0][4], gpu.decoded[1][4]
            assert handles[1] in _handles("assign_rows")
            assert histogram[1:4] == (tokens * K, K, E) and histogram[8] == hopper.BLOCK_M
            base = first[3]  # the schedule's first array, row_offsets
            assert histogram[10:14] == hopper.schedule_addresses(base, E, 0) and assign[6] == base
            # block_counts become the bases assign_rows reads; row_to_pair, all T*k rows, reset.
            assert histogram[5] == assign[5] and histogram[6:8] == (assign[9], tokens * K)
            assert histogram[14] != 0 and histogram[14] not in (histogram[9], *histogram[10:14])  # the ticket
            (gather,) = [d[4] for d in gpu.decoded if d[0] in _handles("gather_rows_by_token")]
            assert combine[2] == assign[8] and first[0][0] == first[1][0] == gather[7] != 0
            assert gather[2:4] == (assign[8], assign[9]), "the gather walks assign_rows' pair_to_row"
        else:
            assert handles.count(scan) == 1
            scan_args = gpu.decoded[handles.index(scan)][4]
            assert handles.index(scan) < gemms[0]
            assert scan_args[1:4] == (E, tokens * K, 0), "E, M = T*k (no valid count is cut), contiguous"
            base = scan_args[4]
            # The histogram (the step's first launch) resets row_to_pair, all T*k
            # rows of it, which assign_rows then fills; with one block of pairs it
            # writes the counts the offsets kernel reads (no column scan launch),
            # else the column scan does.
            one_block = tokens * K <= 1024
            histogram, assign = gpu.decoded[0][4], gpu.decoded[2 if one_block else 3][4]
            assert histogram[-3:-1] == (assign[9], tokens * K) and assign[7] == tokens * K
            assert histogram[-1] == (scan_args[0] if one_block else 0)
            if not one_block:
                assert gpu.decoded[1][4][-1] == scan_args[0], "the column scan writes the counts"
            (gather,) = [d[4] for d in gpu.decoded if d[0] in _handles("gather_rows_by_token")]
            assert combine[2] == assign[8] and first[0][0] == first[1][0] == gather[7] != 0
            assert gather[2:4] == (assign[8], assign[9]), "the gather walks assign_rows' pair_to_row"
        assert first[3:7] == hopper.schedule_addresses(base, E, 0)
        assert second[3:7] == hopper.schedule_addresses(base, E, 1)
        assert second[6] == first[6] + 4


def test_layer_errors_still_raise_after_hits(gpu):
    """On SM 9.0 a cached call replays prepared launches: every bad call must
    still raise exactly as it does uncached (tests/test_layer_cache.py's list)."""
    from test_layer_cache import check_errors_still_raise_after_hits

    check_errors_still_raise_after_hits()


def test_ids_outside_the_experts_raise_at_a_later_call(gpu):
    """The default path on SM 9.0 never waits for the GPU: it reads no count
    back and synchronizes nothing; each call queues an 8-byte copy of the
    stream's dropped-pairs counter to pinned memory. A later call that finds
    a nonzero count there waits, raises before queuing any work, and zeroes
    the count (the next call runs); check_expert_ids waits and raises at
    once, and is quiet when nothing was dropped."""
    from cublas_grouped.moe.dropped_pairs import check_expert_ids, stream_dropped_pairs
    from cublas_grouped.runtime.device import stream_resources

    t = _arrays()

    def call():
        return cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"])

    def no_copy_back(arr):
        raise AssertionError(f"a synchronizing copy of {arr.shape} to the host")

    gpu.host_values = no_copy_back
    for _ in range(3):  # prepared, then hits
        gpu.clear()
        call()
        assert gpu.syncs == [] and gpu.launches
    state = stream_dropped_pairs(stream_resources(0, None))
    (copy,) = [c for c in gpu.copies if c[3] == 2]  # cudaMemcpyDeviceToHost
    assert copy[:3] == (state.pinned.ptr, state.device.data.ptr, 8)
    state.host[0] = 3  # what the copy brings back when 3 pairs named no expert
    gpu.clear()
    with pytest.raises(
        ValueError,
        match=rf"held 3 ids outside \[0, E\) in earlier moe_forward calls on this stream \(E of the layers called since the last report: {E}\)",
    ):
        call()
    assert gpu.launches == [] and gpu.syncs == [STREAM], "raised after one wait, before any work"
    assert [m[:3] for m in gpu.memsets] == [(state.device.data.ptr, 0, 8)] and state.host[0] == 0
    gpu.clear()
    call()
    assert gpu.launches and gpu.syncs == []
    check_expert_ids()
    state.host[0] = 2
    with pytest.raises(ValueError, match=r"held 2 ids outside .* in moe_forward calls on this stream"):
        check_expert_ids()
    check_expert_ids()  # zeroed by the report
    # The stream as a raw handle (any device it was used on, or the one named);
    # a stream no call used: nothing to check.
    for kw in ({"stream": STREAM}, {"stream": STREAM, "device": 0}, {"device": 0}):
        state.host[0] = 4
        with pytest.raises(ValueError, match="held 4 ids outside"):
            check_expert_ids(**kw)
    state.host[0] = 4
    check_expert_ids(stream=STREAM + 1)
    check_expert_ids(stream=STREAM, device=1)
    assert state.host[0] == 4, "another stream or device: this stream's count stays"
    # Inside a capture of the stream: no wait (the capture forbids it); the
    # mirror's count raises as read and stays, for the check after the capture.
    with pytest.MonkeyPatch.context() as mp:
        import cupy

        mp.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda stream: 1)
        gpu.clear()
        with pytest.raises(ValueError, match="held 4 ids outside .* in earlier moe_forward"):
            call()
        assert gpu.syncs == [] and gpu.launches == [] and state.host[0] == 4
    with pytest.raises(ValueError, match="held 4 ids outside"):
        check_expert_ids()


# Python and C calls of a repeated moe_forward at T=1 on SM 9.0 (48 for the
# default path run alone, 49 after this file's other tests, since it stopped
# waiting for its dropped-pairs count, counted 2026-11-27 later: no memset or
# synchronizing copy, one async copy; counted
# 2026-11-27 with the kernel's choice in the prepared step's key, so that a
# probe's define or threshold change prepares new launches: 50 and 59; with
# the step's launches overlapped: 48 and 58; 2026-11-26 on
# this file's shapes: 47 and 58 (default, fixed_capacity) with
# one offsets launch per step, no memset and, for one block of pairs, no
# column scan launch; 49 and 60 before those; earlier the same day 45 and 53;
# 80 and 101 before the backend choice was remembered, 182 and 203 before the
# prepared step, 271 and 292 before the prepared GEMM launches).
KERNEL_STEP_BUDGETS = {False: 49, True: 59}


@pytest.mark.parametrize("fixed", [False, True])
def test_kernel_step_hot_path_stays_short(gpu, fixed):
    t = _arrays()

    def call():
        return cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], fixed_capacity=fixed)

    call()
    call()
    assert count_calls(call, repeat=10) <= KERNEL_STEP_BUDGETS[fixed]


def test_histogram_counts_need_one_block_of_pairs(gpu):
    from cublas_grouped.moe import kernels as Kn

    ids, blocks, counts = (
        fake_array((300, K), "int32"),
        fake_array((2, E), "int32"),
        fake_array((E,), "int32"),
    )
    with pytest.raises(
        ValueError, match=r"^counts from the histogram needs one block of pairs; 1200 pairs take more$"
    ):
        Kn.block_histogram(0x5000, "sm_90a", ids, 1200, E, blocks, counts=counts)
    gpu.clear()
    Kn.block_histogram(0x5000, "sm_90a", ids[:256], 1024, E, blocks[:1], counts=counts)  # one block: taken
    assert gpu.decoded[0][4][-1] == counts.data.ptr


def _named_kernels(monkeypatch) -> dict:
    """Stand-in kernels, one per (kernel, defines), so that each recorded launch
    can be named with the defines it was compiled with: handle -> (name, defines)."""
    from cublas_grouped.runtime import nvrtc

    class Kernel:  # hashable, as the launchers' caches need
        def __init__(self, handle):
            self.handle = handle

    kernels, made = {}, {}

    def get_kernel(name, kernel, arch, *, defines=None):
        key = (kernel, tuple(sorted((defines or {}).items())))
        if key not in made:
            made[key] = Kernel(0x9000 + len(made))
            kernels[made[key].handle] = (kernel, dict(defines or {}))
        return made[key]

    monkeypatch.setattr(nvrtc, "get_kernel", get_kernel)
    return kernels


def _second_call(gpu, prepared: bool, call) -> None:
    """``call`` twice on the kernel step, timed (launched afresh) or prepared
    (replayed); only the second call's launches stay recorded."""
    from cublas_grouped.moe import fixed_capacity as F
    from cublas_grouped.moe import kernel_step as S
    from cublas_grouped.moe import layer as L

    def timed(res, shape, buf, x, ids, weights, params, out, dropped, timer=None):
        S.kernel_step(res, shape, buf, x, ids, weights, params, out, dropped, timer or cg.StageTimer())

    with pytest.MonkeyPatch.context() as mp:
        if not prepared:
            for module in (F, L):
                mp.setattr(module, "kernel_step", timed)
            mp.setattr(S, "TIME_PREPARED", False)  # the timed step launches afresh
        call()
        gpu.clear()
        call()


def _by_name(gpu, kernels) -> dict:
    """The recorded launches' argument values and defines, by kernel name."""
    by_name = {}
    for handle, _, _, _, values in gpu.decoded:
        name, defines = kernels.get(handle, (None, {}))
        by_name.setdefault(name, []).append((values, defines))
    return by_name


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("activation, bias", [("silu", True), ("gelu", True), ("silu", False)])
def test_packed_w1_runs_the_gated_epilogue_only_where_it_pays(
    gpu, monkeypatch, prepared, forced, activation, bias
):
    """w1 packed, at decode sizes: by the default rule
    (GATED_EPILOGUE_MIN_ROWS_PER_GROUP 0) GEMM 1 is compiled with
    SM90_EPILOGUE_ACT = the layer's activation and the three activation
    codes, gets b1, and no activation kernel runs. With the rule at 16 rows
    per expert (not "forced"), GEMM 1 is the plain kernel and the activation
    kernel reads h in the packed column order (gate_up_block 128) with b1.
    Timed and prepared."""
    from cublas_grouped.moe import kernel_step as S
    from cublas_grouped.moe import kernels as Kn

    assert S.GATED_EPILOGUE_MIN_ROWS_PER_GROUP == 0
    if not forced:
        monkeypatch.setattr(S, "GATED_EPILOGUE_MIN_ROWS_PER_GROUP", 16)
    kernels = _named_kernels(monkeypatch)
    t = _arrays(5, bias=bias)
    kw = dict(b1=t.get("b1"), b2=t.get("b2"), w1_layout="gate_up_blocked", activation=activation)
    b1 = t["b1"].data.ptr if bias else 0
    _second_call(
        gpu, prepared, lambda: cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], **kw)
    )
    by_name = _by_name(gpu, kernels)
    (gemm1, defines1), _ = by_name["grouped_gemm_nn_bf16"]
    if forced:
        assert defines1["SM90_EPILOGUE_ACT"] == Kn.ACTIVATIONS[activation]
        assert all(defines1[f"ACT_{name.upper()}"] == code for name, code in Kn.ACTIVATIONS.items())
        assert gemm1[12] == b1 and "expert_activation_bf16" not in by_name
    else:
        assert "SM90_EPILOGUE_ACT" not in defines1 and gemm1[12] == 0
        ((act, _),) = by_name["expert_activation_bf16"]
        assert act[1:6] == (I, 1, 128, Kn.ACTIVATIONS[activation], b1)


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("bias, weights", [(True, True), (False, False)])
def test_gemm2_weighs_the_rows_the_placement_weighed(gpu, monkeypatch, prepared, bias, weights, one_launch):
    """The step's placement (assign_rows, or at decode place_one_block) gets
    the routing weights and writes row weights into a buffer; GEMM 2 gets b2
    and that same buffer (its row-scale epilogue, compiled with
    SM90_EPILOGUE_ROW_SCALE); the combine is sum_rows, with no weights, ids
    or bias of its own. Timed and prepared, the placement in one launch and in
    four."""
    t = _arrays(5, bias, weights)
    assert _places_once(monkeypatch, one_launch, 5 * K) == one_launch
    kernels = _named_kernels(monkeypatch)
    _second_call(
        gpu,
        prepared,
        lambda: cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], b2=t.get("b2")),
    )
    by_name = _by_name(gpu, kernels)
    gemms = by_name["grouped_gemm_nn_bf16"]
    assert len(gemms) == 2
    (gemm1, defines1), (gemm2, defines2) = gemms
    weights_ptr = t["weights"].data.ptr if weights else 0
    if one_launch:
        assert "assign_rows" not in by_name
        ((place, _),) = by_name["place_one_block_bf16"]
        given, row_weights = place[5], place[16]
        # It gathers too: GEMM 1 (not gathering) reads its rows.
        assert place[18] != 0 and gemm1[0][0] == place[18]
    else:
        assert "place_one_block_bf16" not in by_name
        ((assign, _),) = by_name["assign_rows"]
        given, row_weights = assign[11], assign[12]
    assert given == weights_ptr and row_weights != 0, "the placement gets the weights and a row-weight buffer"
    assert "SM90_EPILOGUE_ROW_SCALE" not in defines1 and defines2["SM90_EPILOGUE_ROW_SCALE"] == 1
    assert len(gemm1) == 13 and len(gemm2) == 14
    assert gemm2[12:] == ((t["b2"].data.ptr if bias else 0), row_weights), "GEMM 2: b2, then the row weights"
    ((combine, _),) = by_name["sum_rows_bf16"]
    assert combine[4] == K and "combine_rows_bf16" not in by_name


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "afresh"])
@pytest.mark.parametrize("layout", ["gate_up", "gate_up_blocked"])
@pytest.mark.parametrize("one_launch", [True, False])
def test_the_timed_step_marks_each_stage_in_order(gpu, monkeypatch, one_launch, layout, prepared):
    """moe_forward with a StageTimer on the kernel step marks each stage's end
    (what the benchmark's stage split reads), in both placement forms, and with
    w1 packed and GEMM 1's gated epilogue forced; an empty stage (the gather
    inside the one placement launch, the activation inside GEMM 1) is still
    marked, so the split's columns stay the same. The same marks whether the
    timed step replays its prepared launches (TIME_PREPARED) or not, each
    right after its stage's last launch."""
    from cublas_grouped.moe import kernel_step as S

    monkeypatch.setattr(S, "TIME_PREPARED", prepared)
    _places_once(monkeypatch, one_launch, K)
    monkeypatch.setattr(S, "GATED_EPILOGUE_MIN_ROWS_PER_GROUP", 0)  # the epilogue where w1 is packed
    t = _arrays(1)
    after = {}  # stage: (launches queued so far, the last one's kernel handle)

    class Timer(cg.StageTimer):
        def mark(self, name, stream):
            after[name] = (len(gpu.decoded), gpu.decoded[-1][0] if gpu.decoded else None)
            super().mark(name, stream)

    timer = Timer()
    cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], timer=timer, w1_layout=layout)
    names = [name for name, _ in timer._marks]
    assert names[-6:] == ["plan", "gather", "gemm1", "activation", "gemm2", "combine"], names
    ours = set().union(*(_handles(n) for n in ("place_one_block", "assign_rows", "gather_rows_by_token")))
    ours |= _handles("expert_activation") | _handles("sum_rows")
    fused = layout == "gate_up_blocked"
    assert after["plan"][1] in _handles("place_one_block" if one_launch else "assign_rows")
    assert after["gather"][1] in _handles("place_one_block" if one_launch else "gather_rows_by_token")
    assert after["gemm1"][0] == after["gather"][0] + 1 and after["gemm1"][1] not in ours  # GEMM 1
    assert after["activation"][0] == after["gemm1"][0] + (0 if fused else 1)
    assert fused or after["activation"][1] in _handles("expert_activation")
    assert after["gemm2"][0] == after["activation"][0] + 1 and after["gemm2"][1] not in ours  # GEMM 2
    assert after["combine"] == (len(gpu.decoded), gpu.decoded[-1][0]) and after["combine"][1] in _handles(
        "sum_rows"
    )
