"""Checked calls of route and moe_forward (CPU, GPU side stubbed: tests/host_stubs.py).

A repeated call skips its checks; every bad call must still raise exactly as
without the cache, and a hit must queue the same GPU work as the checked call.
"""

from __future__ import annotations

import numpy as np
import pytest
from host_stubs import count_calls, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.moe import layer_cache
from cublas_grouped.moe import routing as R

E, K, H, I = 16, 4, 64, 48  # noqa: E741


# The stubbed GPU is an A100: on SM 9.0 a bf16 layer under AUTO takes the
# Hopper kernel step (moe/kernel_step.py), whose TMA maps and launches need a
# driver; these tests are about the counts-on-the-host path's checks and cache.
A100 = dict(sm=(8, 0), cublas_version=130100, name="NVIDIA A100-SXM4-80GB", multiprocessors=108)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=A100) as rec:
        counts = np.zeros(E, np.int32)
        counts[:K] = 1  # one token, K distinct experts

        rec.host_values = lambda arr: counts.copy() if arr.shape == (E,) else np.zeros(arr.shape, arr.dtype)
        layer_cache.clear()
        R._local.calls = {}
        yield rec
        layer_cache.clear()
        R._local.calls = {}


def _work(rec):
    """What was queued, without the addresses (fresh allocations move them)."""
    launches = [(args[0], args[1:7], args[7]) for args in rec.launches]  # kernel, grid/block, shared memory
    return launches, [name for name, _ in rec.cublas if name.startswith("cublasGemm")], len(rec.memsets)


def _same_work_on_a_hit(rec, call):
    rec.clear()
    call()
    checked = _work(rec)
    for _ in range(2):
        rec.clear()
        call()
        assert _work(rec) == checked
    return checked


def test_route_hit_queues_the_same_launch(gpu):
    logits = fake_array((3, E), "float32")
    launches, _, _ = _same_work_on_a_hit(gpu, lambda: cg.route(logits, K))
    assert len(launches) == 1
    weights, ids = cg.route(logits, K)
    assert weights.shape == ids.shape == (3, K) and weights.dtype == np.float32 and ids.dtype == np.int32
    assert count_calls(lambda: cg.route(logits, K), repeat=10) <= 22  # 18 counted; 50 uncached


def _route_errors(logits):
    wide = fake_array((3, 2 * E), "float32")
    return [
        lambda: cg.route(fake_array((3, E, 1), "float32"), K),
        lambda: cg.route(fake_array((3, E), "float64"), K),
        lambda: cg.route(wide[:, ::2], K),
        lambda: cg.route(fake_array((3, 2000), "float32"), K),
        lambda: cg.route(logits, 0),
        lambda: cg.route(logits, E + 1),
        lambda: cg.route(logits, True),
        lambda: cg.route(logits, 2.0),
        lambda: cg.route(logits, K, scoring="softermax"),
        lambda: cg.route(logits, K, stream=object()),
    ]


def test_route_errors_still_raise_after_hits(gpu):
    logits = fake_array((3, E), "float32")
    expected = []
    for call in _route_errors(logits):
        R._local.calls = {}
        with pytest.raises(Exception) as err:
            call()
        expected.append((type(err.value), str(err.value)))
    cg.route(logits, 1)
    cg.route(logits, 1)  # top_k=1 is cached: True must not pass as 1
    for call, want in zip(_route_errors(logits), expected):
        cg.route(logits, K)
        cg.route(logits, K)
        with pytest.raises(Exception) as err:
            call()
        assert (type(err.value), str(err.value)) == want


def _layer_arrays(dtype="bfloat16"):
    return dict(
        x=fake_array((1, H), dtype),
        ids=fake_array((1, K), "int32"),
        weights=fake_array((1, K), "float32"),
        w1=fake_array((E, H, 2 * I), dtype),
        w2=fake_array((E, I, H), dtype),
    )


@pytest.mark.parametrize("fixed", [False, True])
def test_moe_hit_queues_the_same_work(gpu, fixed):
    t = _layer_arrays()

    def call():
        return cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], fixed_capacity=fixed)

    launches, gemms, _ = _same_work_on_a_hit(gpu, call)
    assert len(launches) >= 6 and len(gemms) == 2
    assert call().shape == (1, H)


def _layer_errors(t):
    x, ids, wts, w1, w2 = t["x"], t["ids"], t["weights"], t["w1"], t["w2"]
    f = cg.moe_forward
    return [
        lambda: f(fake_array((1, H, 1)), ids, wts, w1, w2),
        lambda: f(fake_array((2, 2 * H))[:, ::2], ids, wts, w1, w2),
        lambda: f(x, fake_array((1, K), "int64"), wts, w1, w2),
        lambda: f(x, fake_array((2, K), "int32"), wts, w1, w2),
        lambda: f(x, ids, fake_array((1, K), "float16"), w1, w2),
        lambda: f(x, ids, fake_array((1, K + 1), "float32"), w1, w2),
        lambda: f(x, ids, wts, fake_array((E, H, 2 * I), "float16"), w2),
        lambda: f(x, ids, wts, w1, fake_array((E + 1, I, H))),
        lambda: f(x, ids, wts, fake_array((E, H, 2 * I + 1)), w2),
        lambda: f(x, ids, wts, w1, w2, b1=fake_array((E, I))),
        lambda: f(x, ids, wts, w1, w2, activation="swish"),
        lambda: f(x, ids, wts, w1, w2, algorithm="fastest"),
        lambda: f(x, ids, wts, w1, w2, dropped_pairs=fake_array((1,), "uint64")),
        lambda: f(x, ids, wts, w1, w2, fixed_capacity=True, dropped_pairs=fake_array((2,), "uint64")),
        lambda: f(x, ids, wts, w1, w2, fixed_capacity=1, dropped_pairs=fake_array((1,), "int32")),
        lambda: f(x, ids, wts, w1, w2, return_context=1),
        lambda: f(x, ids, wts, w1, w2, recompute=True),
        lambda: f(x, ids, wts, w1, w2, fixed_capacity=True, return_context=True),
        lambda: f(x, ids, wts, w1, w2, stream=object()),
        lambda: f(x, ids, wts, w1, w2, trans_b=True),
    ]


def test_moe_errors_still_raise_after_hits(gpu):
    check_errors_still_raise_after_hits()


def check_errors_still_raise_after_hits():
    """Each of :func:`_layer_errors`' bad calls raises the same, type and
    message, after good calls have filled the caches (both step kinds)."""
    t = _layer_arrays()
    expected = []
    for call in _layer_errors(t):
        layer_cache.clear()
        with pytest.raises(Exception) as err:
            call()
        expected.append((type(err.value), str(err.value)))
    for call, want in zip(_layer_errors(t), expected):
        for fixed in (False, True):
            for _ in range(2):
                cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], fixed_capacity=fixed)
        with pytest.raises(Exception) as err:
            call()
        assert (type(err.value), str(err.value)) == want


def test_moe_key_changes_with_every_keyed_property():
    t = _layer_arrays()
    opts = ("silu", True, False, "auto", False)
    base = (t["x"], t["ids"], t["weights"], t["w1"], t["w2"], None, None)

    def key(arrays=base, options=opts, executor=None, stream=7, dropped=None):
        return layer_cache.layer_key(*arrays, options, executor, stream, dropped)

    k0 = key()
    assert k0 is not None and key() == k0
    other = _layer_arrays()
    assert key((other["x"], other["ids"], other["weights"], other["w1"], other["w2"], None, None)) == k0

    def swap(i, value):
        arrays = list(base)
        arrays[i] = value
        return key(tuple(arrays))

    variants = [
        swap(0, fake_array((2, H))),
        swap(0, fake_array((1, H), "float16")),
        swap(0, fake_array((1, H), device=1)),
        swap(1, fake_array((1, K), "int64")),
        swap(2, None),
        swap(3, fake_array((E, 2 * I, H))),
        swap(4, fake_array((E, I, H), "float16")),
        swap(5, fake_array((E, 2 * I))),
        swap(6, fake_array((E, H))),
        key(options=("gelu", True, False, "auto", False)),
        key(options=("silu", 1, False, "auto", False)),  # 1 == True, but not the same check
        key(options=("silu", True, True, "auto", False)),
        key(options=("silu", True, False, "sequential", False)),
        key(options=("silu", True, False, "auto", True)),
        key(executor=cg.GroupedGemmExecutor()),
        key(stream=9),
        key(dropped=fake_array((1,), "uint64")),
    ]
    assert None not in variants and k0 not in variants
    assert len(set(variants)) == len(variants)
    assert key(stream=object()) is None
    assert layer_cache.layer_key(np.zeros((1, H)), *base[1:], opts, None, 7, None) is None


def test_dispatch_choices_follow_the_counts_and_the_tuning_state(gpu, monkeypatch):
    from cublas_grouped.gemm import select as S
    from cublas_grouped.moe import dispatch as Dsp

    asked = []
    real = Dsp.choose_algorithms

    def counted(*args, **kwargs):
        asked.append(args[2].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(Dsp, "choose_algorithms", counted)
    t = _layer_arrays()

    def call():
        return cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"])

    call()
    call()
    assert len(asked) == 1, "the same counts: decided once"
    spread = np.zeros(E, np.int32)
    spread[[1, 5, 9, 13]] = 1
    gpu.host_values = lambda arr: spread.copy() if arr.shape == (E,) else np.zeros(arr.shape, arr.dtype)
    call()
    assert len(asked) == 2 and asked[-1] == spread.tolist(), "new counts: decided again"
    S.reset_tuning_cache()
    call()
    assert len(asked) == 3, "a reset tuning state: decided again"
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", "/elsewhere")
    call()
    assert len(asked) == 4, "another tuning folder"
    bad = spread.copy()
    bad[0] = 5  # more rows than pairs: ids outside [0, E) were counted nowhere else
    gpu.host_values = lambda arr: bad.copy() if arr.shape == (E,) else np.zeros(arr.shape, arr.dtype)
    with pytest.raises(ValueError, match="ids outside"):
        call()


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("align", [1, 16])
def test_prepared_device_grouped_call_is_the_executors(gpu, monkeypatch, trans_b, align):
    import ctypes

    from cublas_grouped.gemm.backends.cublas import PreparedDeviceGrouped
    from cublas_grouped.gemm.config import Algorithm
    from cublas_grouped.gemm.plan import GemmPlan, Operands, RowLayout
    from cublas_grouped.runtime import device as D
    from cublas_grouped.runtime import nvrtc as N

    launched = []
    real = N.launch_signed
    monkeypatch.setattr(N, "launch_signed", lambda *a, **kw: (launched.append((a[1:], kw)), real(*a, **kw)))
    counts = np.array([3, 0, 17, 1, 0, 9], dtype=np.int64)
    layout = RowLayout.chunk_aligned(align) if align > 1 else RowLayout.contiguous()
    offsets = layout.offsets(counts)
    n, k = 96, 64
    plan = GemmPlan(6, int(offsets[-1]), n, k, False, trans_b, counts, offsets, np.flatnonzero(counts))
    ex = cg.GroupedGemmExecutor()
    res = D.resources(0, 7)
    sizes_dev = fake_array((6,), "int32")
    a, b, c = 0x7A0000000000, 0x7B0000000000, 0x7C0000000000

    def record():
        calls = []
        for name, args in gpu.cublas:
            if name.startswith("cublasGemm"):
                count = args[17]
                host = [
                    tuple((ctypes.c_int32 * count).from_address(args[i]))
                    for i in (1, 2, 3, 4, 5, 9, 12, 16, 18)
                ]
                scale = [tuple((ctypes.c_float * count).from_address(args[i])) for i in (6, 13)]
                calls.append((name, host, scale, args[7], args[10], args[14], args[8], args[19]))
        out = (list(launched), calls)
        gpu.clear()
        launched.clear()
        return out

    ops = Operands.for_plan(plan, a, b, c, 2)
    ex.run(plan, ops, np.dtype("bfloat16"), Algorithm.CUBLAS_GROUPED, res, layout=layout, sizes_dev=sizes_dev)
    want = record()
    prepared = PreparedDeviceGrouped(
        plan, layout, np.dtype("bfloat16"), ex.config, N.arch_for(D.device_info(0).sm)
    )
    prepared(res, sizes_dev, a, b, c)  # (kept alive: cuBLAS reads its host arrays)
    got = record()
    assert got == want and len(want[0]) == 1 and len(want[1]) == 1


# Python and C calls of a repeated moe_forward at T=1 (counted 2026-11-26 on
# this file's shapes; tools/host_calls.py counts the Qwen3 shape: 155 and 190,
# 468 and 406 uncached; then about 15 more for the choice of the Hopper kernel
# step, asked on every call: 174 and 205 here).
LAYER_BUDGETS = {False: 185, True: 220}


@pytest.mark.parametrize("fixed", [False, True])
def test_layer_hot_path_stays_short(gpu, fixed):
    t = _layer_arrays()

    def call():
        return cg.moe_forward(t["x"], t["ids"], t["weights"], t["w1"], t["w2"], fixed_capacity=fixed)

    call()
    call()
    assert count_calls(call, repeat=10) <= LAYER_BUDGETS[fixed]
