"""The FP8 step's prepared launches on the CPU (GPU side stubbed: tests/host_stubs.py).

Without a timer, ``fp8_kernel_step`` replays launches prepared once per
buffers, T, weights and kernel choice (``moe/fp8_step_launches.py``); with
one it launches each kernel afresh. Both must pass every kernel the same
values (a wrong slot or a stale address differs here) on the first call
and on hits, for new inputs too; every launch of a step of at most
``kernel_step.OVERLAP_MAX_PAIRS`` pairs is overlapped, none of a larger one
or with ``OVERLAP_LAUNCHES`` off; and a probe's change of what picks a GEMM's
kernel (thin tiles, defines) or of the fused quantization prepares anew.
"""

from __future__ import annotations

import pytest
from host_stubs import H100, count_calls, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper_fp8
from cublas_grouped.moe import fixed_capacity as F
from cublas_grouped.moe import fp8_step, layer_cache, placement_launches
from cublas_grouped.moe import kernel_step as S
from cublas_grouped.moe import routing as R

E, K, H, I = 16, 4, 256, 128  # noqa: E741


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100) as rec:
        layer_cache.clear()
        R._local.calls = {}
        yield rec
        layer_cache.clear()
        R._local.calls = {}


def _fp8(shape):
    e, r, c = shape
    scales = fake_array((e, -(-r // 128), -(-c // 128)), "float32")
    return cg.FP8ExpertWeights(fake_array(shape, "uint8"), scales, "block128", True)


def _weights(kind: str):
    """(w1, w2) in the [E, N, K] layout: FP8 where ``kind`` names it."""
    w1 = _fp8((E, 2 * I, H)) if kind in ("both", "w1") else fake_array((E, 2 * I, H))
    w2 = _fp8((E, H, I)) if kind in ("both", "w2") else fake_array((E, H, I))
    return w1, w2


def _queued(rec, out):
    """What the last call queued, the output's address as "out" (fresh each call)."""

    def name(v):
        return "out" if v == out.data.ptr else v

    return [(h, gb, shm, st, tuple(map(name, vals))) for h, gb, shm, st, vals in rec.decoded]


def _inputs(tokens: int, dropped: bool):
    return (
        fake_array((tokens, H)),
        fake_array((tokens, K), "int32"),
        fake_array((tokens, K), "float32"),
        fake_array((1,), "uint64") if dropped else None,
    )


def _timed(res, shape, buf, rows8, x, ids, weights, params, out, dropped, timer=None):
    fp8_step.fp8_kernel_step(res, shape, buf, rows8, x, ids, weights, params, out, dropped, cg.StageTimer())


CASES = {
    "both FP8, 1 token": dict(tokens=1),
    "both FP8, 5 tokens, biases, dropped_pairs": dict(tokens=5, bias=True, dropped=True),
    "both FP8, 5 tokens, unfused": dict(tokens=5, fuse=False),
    "both FP8, 5 tokens, four placement launches": dict(tokens=5, one_launch=False),
    "both FP8, 256 tokens (1024 pairs: overlapped)": dict(tokens=256),
    "both FP8, 300 tokens (1200 pairs: plain)": dict(tokens=300),
    "both FP8, 300 tokens, the histogram, column scan and offsets apart": dict(tokens=300, schedule=False),
    "both FP8, 5 tokens, four placement launches, schedule apart": dict(
        tokens=5, one_launch=False, schedule=False
    ),
    "FP8 w1, 16-bit w2": dict(tokens=5, kind="w1"),
    "16-bit w1, FP8 w2, unfused": dict(tokens=5, kind="w2", fuse=False),
    "both FP8, wide tiles": dict(tokens=5, thin=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_fp8_step_queues_what_the_timed_step_does(gpu, monkeypatch, case):
    opts = CASES[case]
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", opts.get("one_launch", True))
    monkeypatch.setattr(placement_launches, "HISTOGRAM_SCHEDULE", opts.get("schedule", True))
    monkeypatch.setattr(fp8_step, "FUSE_QUANTIZE", opts.get("fuse", True))
    monkeypatch.setattr(hopper_fp8, "THIN", opts.get("thin", True))
    tokens = opts["tokens"]
    w1, w2 = _weights(opts.get("kind", "both"))
    biases = (fake_array((E, 2 * I)), fake_array((E, H))) if opts.get("bias") else (None, None)

    def call(x, ids, weights, dropped, b=biases):
        kw = dict(trans_b=True, fixed_capacity=True, b1=b[0], b2=b[1])
        if dropped is not None:
            kw["dropped_pairs"] = dropped
        return cg.moe_forward(x, ids, weights, w1, w2, **kw)

    # The second and third inputs are all new arrays, each in a slot of the
    # prepared launches; the third has new biases too, whose addresses are
    # fixed in the launches: they key the prepared steps.
    inputs = [_inputs(tokens, opts.get("dropped", False)) for _ in range(3)]
    new_biases = (fake_array((E, 2 * I)), fake_array((E, H))) if opts.get("bias") else biases
    for step, (x, ids, weights, dropped) in enumerate(inputs):
        b = new_biases if step == 2 else biases
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "fp8_kernel_step", _timed)
            gpu.clear()
            want = _queued(gpu, call(x, ids, weights, dropped, b))
            assert gpu.overlapped == []  # the timed step launches plainly
        for _ in range(2):  # prepared (or a hit of the last input's), then a hit
            gpu.clear()
            assert _queued(gpu, call(x, ids, weights, dropped, b)) == want
            small = tokens * K <= S.OVERLAP_MAX_PAIRS
            assert gpu.overlapped == (list(range(len(want))) if small else [])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(S, "OVERLAP_LAUNCHES", False)
            gpu.clear()
            assert _queued(gpu, call(x, ids, weights, dropped, b)) == want and gpu.overlapped == []
    one_block = tokens * K <= 1024
    once = opts.get("one_launch", True) and one_block
    fp8 = opts.get("kind", "both")
    fused1 = opts.get("fuse", True) and fp8 in ("both", "w1")  # the placement's gather writes e4m3, any size
    quantizes = (fp8 in ("both", "w1") and not fused1) + (
        fp8 in ("both", "w2") and not opts.get("fuse", True)
    )
    # place (or the histogram with the schedule, or the histogram, column scan
    # and offsets; assign, gather), the quantize launches, GEMM 1, the
    # activation, GEMM 2, the combine.
    apart = 5 - one_block if not opts.get("schedule", True) else 3
    assert len(want) == (1 if once else apart) + quantizes + 4


def test_a_probes_change_of_the_kernel_choice_prepares_anew(gpu, monkeypatch):
    """Thin tiles on, off and on again between steps of one layer, a define
    changed, the fused quantization switched: each step queues what the timed
    step queues under the same settings (a launch prepared under others would
    replay another kernel or grid, as probe A/Bs by define once did)."""
    w1, w2 = _weights("both")
    x, ids, weights, _ = _inputs(5, False)

    def forward():
        return cg.moe_forward(x, ids, weights, w1, w2, trans_b=True, fixed_capacity=True)

    settings = [
        (hopper_fp8, "THIN", False),
        (hopper_fp8, "THIN", True),
        (hopper_fp8, "DEFINES", {**hopper_fp8.DEFINES, "FP8_A_BOX_ROWS": 32}),
        (fp8_step, "FUSE_QUANTIZE", False),
    ]
    seen = set()
    for module, name, value in settings:
        monkeypatch.setattr(module, name, value)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "fp8_kernel_step", _timed)
            gpu.clear()
            want = _queued(gpu, forward())
        gpu.clear()
        assert _queued(gpu, forward()) == want, f"{name} = {value}"
        seen.add(str(want))
    assert len(seen) == len(settings)  # every setting changed what runs


# Python and C calls of one FP8 step (both weights FP8, T=1, one placement
# launch, fused quantization), on stubs (2026-11-27): 43 replaying the
# prepared, overlapped launches; 163 launching each kernel afresh (timer
# marks left out); 254 before the step was prepared (the FP8 GEMMs' tensor
# maps and arguments built at every launch, then launched through cuda.core).
FP8_STEP_BUDGET = 45


class _NoMarks:
    def mark(self, name, stream):
        pass


def test_fp8_step_hot_path_stays_short(gpu, monkeypatch):
    w1, w2 = _weights("both")
    x, ids, weights, _ = _inputs(1, False)
    seen = []
    monkeypatch.setattr(
        F, "fp8_kernel_step", lambda *args: seen.append(args) or fp8_step.fp8_kernel_step(*args)
    )
    cg.moe_forward(x, ids, weights, w1, w2, trans_b=True, fixed_capacity=True)
    (args,) = seen
    step = lambda timer=None: fp8_step.fp8_kernel_step(*args, timer)  # noqa: E731
    step()
    prepared, afresh = count_calls(step, repeat=10), count_calls(lambda: step(_NoMarks()), repeat=10)
    assert prepared <= FP8_STEP_BUDGET < afresh


def test_the_fp8_step_shares_the_16_bit_steps_overlap_rule(monkeypatch):
    """One rule for both steps (kernel_step.overlapped): the same settings."""
    assert S.overlapped(S.OVERLAP_MAX_PAIRS) and not S.overlapped(S.OVERLAP_MAX_PAIRS + 1)
    monkeypatch.setattr(S, "OVERLAP_LAUNCHES", False)
    assert not S.overlapped(1)


@pytest.mark.parametrize("kind", ["both", "w1", "w2"])
def test_the_default_path_runs_the_fp8_step_and_never_waits(gpu, kind):
    """On SM 9.0 under AUTO, moe_forward with FP8 weights (no timer, no
    fixed_capacity) queues what the FP8 kernel step with fixed_capacity=True
    queues, counting dropped pairs into the stream's counter, then one 8-byte
    copy of that counter to pinned memory; it reads nothing back and waits
    for nothing. With algorithm="sm90_grouped" it keeps the counts-on-the-host
    path (one copy of the counts)."""
    import numpy as np

    from cublas_grouped.moe.dropped_pairs import stream_dropped_pairs
    from cublas_grouped.runtime.device import stream_resources

    w1, w2 = _weights(kind)
    x, ids, weights, _ = _inputs(5, False)
    copied = []

    def no_wait(arr):
        copied.append(arr.shape)
        counts = np.zeros(arr.shape, arr.dtype)
        counts[:10] = 2  # 5 tokens x 4 choices on 10 experts
        return counts

    gpu.host_values = no_wait
    for _ in range(2):  # the first call makes the stream's counter; then a hit
        cg.moe_forward(x, ids, weights, w1, w2, trans_b=True)
    state = stream_dropped_pairs(stream_resources(0, None))
    gpu.clear()
    want = _queued(
        gpu,
        cg.moe_forward(
            x, ids, weights, w1, w2, trans_b=True, fixed_capacity=True, dropped_pairs=state.device
        ),
    )
    gpu.clear()
    got = _queued(gpu, cg.moe_forward(x, ids, weights, w1, w2, trans_b=True))
    assert got == want and copied == [] and gpu.syncs == []
    assert [c[2] for c in gpu.copies if c[3] == 2] == [8]  # cudaMemcpyDeviceToHost: the counter's copy
    gpu.clear()
    cg.moe_forward(x, ids, weights, w1, w2, trans_b=True, algorithm="sm90_grouped")
    assert copied == [(E,)], "another algorithm: the counts come to the host"
