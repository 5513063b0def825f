"""The fold in the FP8 kernel on an SM 9.0 GPU (``FP8_FOLD_ROWS=16``): a group's
last 1 .. 16 rows past a whole tile computed by the tile before them (a
swapped m64n16k32 product of the b stage and those rows, promoted per stage
with each row's own scale) and their own tail tile skipped. Against float64
of the dequantized operands, NaN-poisoned outputs, rows past the sizes never
written: group sizes around the fold (none, 1 .. 16 rows, a 17-row tail that
is not folded, two whole tiles and folds), K with one, an odd number and a
partial last scale block, N with a tail; every size from 112 to 300; three
CTAs walking all tiles with the tile counter counting each tile once, the
skipped ones too; the same bits as the kernel without the fold; the FP8
layer with and without it."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import poisoned
from test_fp8_sm90_gpu import BF16, _case, _check

from cublas_grouped.gemm.backends import hopper, hopper_fp8

pytestmark = pytest.mark.gpu

# Sizes around the fold: none (112, 128), folds of 1, 7 and 16 rows (129,
# 135, 144), an unfolded tail (145), two tiles with and without a fold (256,
# 257, 272, 273), an empty group, a group of 16 rows (its first tile is never
# skipped), one row.
FOLD_SIZES = [129, 0, 144, 112, 16, 135, 145, 256, 257, 272, 273, 128, 1]


@pytest.fixture(autouse=True)
def _fold_at_any_size(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel runs on SM 9.0 GPUs only")
    monkeypatch.setattr(hopper_fp8, "FOLD_MIN_ROWS_PER_GROUP", 0)


def _run(a_q, a_s, wq, sizes, n, fold: bool, monkeypatch):
    """The FP8 product over ``sizes`` (on the device) into a NaN-poisoned
    output, with the fold on or off."""
    import cupy

    monkeypatch.setattr(hopper_fp8, "FOLD", fold)
    assert hopper_fp8.fold_tiles(a_q.shape[0], len(sizes)) == fold
    out = poisoned((a_q.shape[0], n), BF16)
    hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(list(sizes), dtype=cupy.int32), out=out)
    return out


@pytest.mark.parametrize(
    "n, k",
    [
        (256, 2048),  # 16 K stages
        (264, 400),  # K = 3 * 128 + 16: an odd stage count and a partial scale block; N = 2 * 128 + 8
        (136, 7168),  # DeepSeek-V3's K; N = 128 + 8
        (128, 128),  # one K stage
    ],
)
def test_fold_against_float64_and_the_unfolded_bits(n, k, monkeypatch):
    rng = np.random.default_rng(n + k)
    a_q, a_s, wq, ref = _case(rng, FOLD_SIZES, n, k)
    folded = _run(a_q, a_s, wq, FOLD_SIZES, n, True, monkeypatch)
    _check(folded, ref, f"fp8 fold N={n} K={k}")
    plain = _run(a_q, a_s, wq, FOLD_SIZES, n, False, monkeypatch)
    same = (folded.view(np.uint16) == plain.view(np.uint16)).all()
    assert bool(same), "the fold's rows differ from the tail tile's"


def test_every_group_size_from_112_to_300(monkeypatch):
    """One group of each size in turn, beside a second that starts right after
    it (the fold's box reads the next group's rows: never stored)."""
    rng = np.random.default_rng(5)
    for size in range(112, 301):
        a_q, a_s, wq, ref = _case(rng, [size, 37], 256, 256)
        _check(_run(a_q, a_s, wq, [size, 37], 256, True, monkeypatch), ref, f"fp8 fold size {size}")


def test_three_ctas_and_the_tile_counter(monkeypatch):
    """Three CTAs walk every tile (folding and skipping among them); the
    counter holds one draw per tile of the schedule, skipped tails included;
    bitwise repeatable."""
    import cupy

    from cublas_grouped.runtime.device import stream_resources

    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", 3)
    sizes = FOLD_SIZES * 3
    rng = np.random.default_rng(9)
    a_q, a_s, wq, ref = _case(rng, sizes, 264, 400)
    first = _run(a_q, a_s, wq, sizes, 264, True, monkeypatch)
    _check(first, ref, "fp8 fold, 3 CTAs")
    tiles = len(hopper.tile_schedule(sizes)) * -(-264 // hopper_fp8.BLOCK_N)
    counter = hopper.schedule_buffers(stream_resources(cupy.cuda.Device().id, None), len(sizes))[3]
    assert int(counter.get()[0]) == tiles
    again = _run(a_q, a_s, wq, sizes, 264, True, monkeypatch)
    assert bool((first.view(np.uint16) == again.view(np.uint16)).all()), "not bitwise repeatable"


def test_fp8_layer_with_and_without_the_fold(monkeypatch):
    """The FP8 layer (both GEMMs on the FP8 kernel) at 160 rows a group, so
    that many groups end 1 .. 16 rows past a tile: the same bits with the fold
    as without it."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(21)
    tokens, e, k, hidden, inter = 320, 4, 2, 256, 256
    x = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(BF16))
    w1 = cupy.asarray((rng.standard_normal((e, 2 * inter, hidden)) * hidden**-0.5).astype(BF16))
    w2 = cupy.asarray((rng.standard_normal((e, hidden, inter)) * inter**-0.5).astype(BF16))
    ids = cupy.asarray(np.stack([rng.permutation(e)[:k] for _ in range(tokens)]).astype(np.int32))
    weights = cupy.asarray(rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32))
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    outs = []
    for fold in (True, False):
        monkeypatch.setattr(hopper_fp8, "FOLD", fold)
        outs.append(cg.moe_forward(x, ids, weights, q1, q2, trans_b=True).copy())
    assert not bool(cupy.isnan(outs[0].astype(cupy.float32)).any())
    assert bool((outs[0].view(np.uint16) == outs[1].view(np.uint16)).all())
