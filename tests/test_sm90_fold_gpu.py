"""v15's fold on an SM 9.0 GPU (``SM90_FOLD_ROWS=16``): a group's last 1 .. 16
rows past a whole tile computed by the tile before them (a swapped m64n16
product beside its MMAs) and their own tail tile skipped. Against float64,
NaN-poisoned outputs, rows past the sizes never written: every group size
from 112 to 300 (no fold, folds of 1 .. 16 rows, a 17-row tail that is not
folded, two whole tiles and folds), both weight layouts, bf16 and fp16, the
plain product, the gated epilogue and the row-scale epilogue, many tiles per
CTA and one CTA per tile, the masked layout, the layer; and the tile counter
still counts every tile once, the skipped ones too."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned

from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.backends import hopper_variants as V
from cublas_grouped.moe import kernels as K
from cublas_grouped.moe.gate_up import pack_gate_up
from cublas_grouped.runtime.device import resolve_stream, resources

pytestmark = pytest.mark.gpu

TOL = 1e-2
GUARD = 7.0
DTYPES = [ml_dtypes.bfloat16, np.float16]
# Sizes around the fold: none (112, 128), folds of 1, 7 and 16 rows (129,
# 135, 144), an unfolded tail (145), two tiles with and without a fold (256,
# 257, 272, 273), an empty group, a group of one tile's fold alone (16: the
# group's first tile is never skipped).
FOLD_SIZES = [129, 0, 144, 112, 16, 135, 145, 256, 257, 272, 273, 128, 1]


@pytest.fixture(autouse=True)
def _fold_on(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel runs on SM 9.0 GPUs only")
    monkeypatch.setattr(V, "FOLD_MAX_ROWS_PER_GROUP", 1 << 40)  # the fold at any rows per group
    monkeypatch.setattr(V, "FOLD_MIN_ROWS_PER_GROUP", 0)


def _res():
    import cupy

    return resources(cupy.cuda.Device().id, resolve_stream(None))


def _reference(a64, w64, sizes, trans_b):
    wk = np.swapaxes(w64, 1, 2) if trans_b else w64  # [E, K, N]
    out, start = [], 0
    for g, size in enumerate(sizes):
        out.append(a64[start : start + size] @ wk[g])
        start += size
    return np.concatenate(out) if out else np.zeros((0, wk.shape[2]))


def _plain(sizes, n, k, trans_b, dtype, seed):
    """(out, expected, M) of the plain product over ``sizes``, 3 spare rows."""
    import cupy

    rng = np.random.default_rng(seed)
    e, m = len(sizes), int(sum(sizes))
    a, a64 = device_random(rng, (m + 3, k), dtype)
    shape = (e, n, k) if trans_b else (e, k, n)
    w, w64 = device_random(rng, shape, dtype, scale=k**-0.5)
    out = poisoned((m + 3, n), dtype)
    out[m:] = GUARD
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    problem = (e, m + 3, n, k, trans_b, np.dtype(dtype))
    hopper.grouped_rows(_res(), problem, (a.data.ptr, w.data.ptr, out.data.ptr), sizes_dev)
    return out, _reference(a64[:m], w64, sizes, trans_b), m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("n, k", [(512, 256), (200, 136)])  # N = 200: a partial tile (and boxes past N)
def test_fold_against_float64(n, k, trans_b, dtype):
    import cupy

    out, expected, m = _plain(FOLD_SIZES, n, k, trans_b, dtype, n + k)
    check_close(out[:m], expected, TOL, f"fold N={n} K={k} trans_b={trans_b}")
    assert (cupy.asnumpy(out[m:]).astype(np.float64) == GUARD).all(), "rows past the sizes' sum were written"


@pytest.mark.parametrize("trans_b", [False, True])
def test_every_group_size_from_112_to_300(trans_b):
    """One group of each size in turn, beside a second group that starts
    right after it (the fold's box reads the next group's rows: never stored)."""
    for size in range(112, 301):
        out, expected, m = _plain([size, 37], 256, 128, trans_b, ml_dtypes.bfloat16, size)
        check_close(out[:m], expected, TOL, f"size {size} trans_b={trans_b}")


@pytest.mark.parametrize("schedule, limit", [("persistent", 3), ("persistent", None), ("per_tile", None)])
def test_each_schedule_and_the_tile_counter(monkeypatch, schedule, limit):
    """Three CTAs walking every tile, one CTA per SM, one CTA per tile: the
    same result bit for bit, and the counter counts each tile once (skipped
    tail tiles are taken from it like the others)."""
    import cupy

    from cublas_grouped.gemm.backends.hopper_schedule import schedule_buffers

    sizes = FOLD_SIZES * 4
    monkeypatch.setattr(hopper, "SCHEDULE", schedule)
    monkeypatch.setattr(hopper, "GRID_LIMIT", limit)
    out, expected, m = _plain(sizes, 512, 192, True, ml_dtypes.bfloat16, 5)
    check_close(out[:m], expected, TOL, f"{schedule} limit={limit}")
    # One atomic per tile after each CTA's first, and one per CTA that finds
    # none left: the schedule's tile count (ceil(m_g / 128) a group, times
    # two 256-column tiles), skipped tail tiles included.
    taken = int(cupy.asnumpy(schedule_buffers(_res(), len(sizes))[3])[0])
    assert taken == sum(-(-s // hopper.BLOCK_M) for s in sizes) * 2
    first = out.copy()
    again, _, _ = _plain(sizes, 512, 192, True, ml_dtypes.bfloat16, 5)
    assert bool((first.view(cupy.uint16) == again.view(cupy.uint16)).all()), "not bitwise repeatable"


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_epilogue_folds(bias, trans_b):
    import cupy
    from test_sm90_epilogue_gpu import _act

    dtype, hidden, inter, act = ml_dtypes.bfloat16, 136, 384, "silu"
    sizes = FOLD_SIZES
    rng = np.random.default_rng(11)
    e, m = len(sizes), int(sum(sizes))
    x, x64 = device_random(rng, (m + 3, hidden), dtype)
    shape = (e, 2 * inter, hidden) if trans_b else (e, hidden, 2 * inter)
    w1, w1_64 = device_random(rng, shape, dtype, scale=hidden**-0.5)
    b1, b1_64 = device_random(rng, (e, 2 * inter), dtype, scale=0.5)
    packed = pack_gate_up(w1, trans_b=trans_b)
    out = poisoned((m + 3, inter), dtype)
    out[m:] = GUARD
    codes = tuple((f"ACT_{n.upper()}", c) for n, c in K.ACTIVATIONS.items())
    epilogue = hopper.GatedEpilogue(K.ACTIVATIONS[act], codes, b1.data.ptr if bias else 0)
    problem = (e, m + 3, 2 * inter, hidden, trans_b, np.dtype(dtype))
    ptrs = (x.data.ptr, packed.data.ptr, out.data.ptr)
    hopper.grouped_rows(_res(), problem, ptrs, cupy.asarray(sizes, dtype=cupy.int32), epilogue=epilogue)
    z = _reference(x64[:m], w1_64, sizes, trans_b)
    if bias:
        z = z + np.repeat(b1_64, sizes, axis=0)
    check_close(out[:m], _act(z[:, :inter], act) * z[:, inter:], TOL, f"gated fold bias={bias}")
    assert (cupy.asnumpy(out[m:]).astype(np.float64) == GUARD).all(), "rows past the sizes' sum were written"


@pytest.mark.parametrize("trans_b", [False, True])
def test_row_scale_epilogue_folds(trans_b):
    import cupy

    dtype, n, k, sizes = np.float16, 320, 128, FOLD_SIZES
    rng = np.random.default_rng(12)
    e, m = len(sizes), int(sum(sizes))
    a, a64 = device_random(rng, (m + 3, k), dtype)
    shape = (e, n, k) if trans_b else (e, k, n)
    w, w64 = device_random(rng, shape, dtype, scale=k**-0.5)
    b, b64 = device_random(rng, (e, n), dtype, scale=0.5)
    scale64 = rng.uniform(-1.5, 1.5, m + 3)
    scale = cupy.asarray(scale64.astype(np.float32))
    out = poisoned((m + 3, n), dtype)
    out[m:] = GUARD
    epilogue = hopper_row_scale(scale.data.ptr, b.data.ptr)
    problem = (e, m + 3, n, k, trans_b, np.dtype(dtype))
    ptrs = (a.data.ptr, w.data.ptr, out.data.ptr)
    hopper.grouped_rows(_res(), problem, ptrs, cupy.asarray(sizes, dtype=cupy.int32), epilogue=epilogue)
    z = _reference(a64[:m], w64, sizes, trans_b) + np.repeat(b64, sizes, axis=0)
    s32 = scale64[:m].astype(np.float32).astype(np.float64)
    check_close(out[:m], s32[:, None] * z, TOL, f"row scale fold trans_b={trans_b}")
    assert (cupy.asnumpy(out[m:]).astype(np.float64) == GUARD).all(), "rows past the sizes' sum were written"


def hopper_row_scale(scale, bias):
    from cublas_grouped.gemm.backends.hopper_variants import RowScaleEpilogue

    return RowScaleEpilogue(scale, bias)


def test_masked_layout_folds():
    """[E, C, K] rows with counts on the device: a count of C - 16 .. C past a
    whole tile folds inside the group's capacity; rows past each count keep
    what they held."""
    import cupy

    dtype, e, cap, n, k = ml_dtypes.bfloat16, 5, 160, 256, 128
    counts = [144, 160, 129, 0, 150]
    rng = np.random.default_rng(13)
    a, a64 = device_random(rng, (e, cap, k), dtype)
    w, w64 = device_random(rng, (e, n, k), dtype, scale=k**-0.5)
    out = cupy.full((e, cap, n), GUARD, dtype=dtype)
    problem = (e, e * cap, n, k, True, np.dtype(dtype))
    ptrs = (a.data.ptr, w.data.ptr, out.data.ptr)
    hopper.masked_fixed_capacity(_res(), problem, ptrs, cupy.asarray(counts, dtype=cupy.int32), cap)
    got = cupy.asnumpy(out).astype(np.float64)
    for g, c in enumerate(counts):
        if c:
            check_close(out[g, :c], a64[g, :c] @ w64[g].T, TOL, f"masked group {g} count {c}")
        assert (got[g, c:] == GUARD).all(), f"rows past group {g}'s count were written"


@pytest.mark.parametrize("trans_b", [False, True])
def test_the_fold_gives_the_unfolded_bits(monkeypatch, trans_b):
    """The fold's rows come out bit for bit as their own tail tile gives them:
    the swapped m64n16 product sums each output over K in the same order
    (measured equal on every benchmark shape; this keeps it so)."""
    import cupy

    folded, _, _ = _plain(FOLD_SIZES, 512, 320, trans_b, ml_dtypes.bfloat16, 21)
    monkeypatch.setattr(V, "FOLD_MAX_ROWS_PER_GROUP", 0)  # no fold
    plain, _, _ = _plain(FOLD_SIZES, 512, 320, trans_b, ml_dtypes.bfloat16, 21)
    assert bool((folded.view(cupy.uint16) == plain.view(cupy.uint16)).all())


@pytest.mark.parametrize("fixed", [False, True])
def test_the_layer_with_the_fold_matches_the_layer_without(monkeypatch, fixed):
    """moe_forward on the kernel with and without the fold, on routing that
    leaves many experts 1 .. 16 rows past a whole tile: the same bits."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(14)
    t, h, inter, e, k = 1100, 256, 256, 8, 2
    x, _ = device_random(rng, (t, h), ml_dtypes.bfloat16)
    w1, _ = device_random(rng, (e, h, 2 * inter), ml_dtypes.bfloat16, scale=h**-0.5)
    w2, _ = device_random(rng, (e, inter, h), ml_dtypes.bfloat16, scale=inter**-0.5)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    kw = {"fixed_capacity": True} if fixed else {}
    args = (x, cupy.asarray(ids), cupy.asarray(weights), w1, w2)
    with_fold = cg.moe_forward(*args, **kw).copy()
    monkeypatch.setattr(V, "FOLD_MAX_ROWS_PER_GROUP", 0)  # no fold
    without = cg.moe_forward(*args, **kw)
    assert not bool(cupy.isnan(with_fold).any())
    assert bool((with_fold.view(cupy.uint16) == without.view(cupy.uint16)).all()), f"layer fixed={fixed}"
