"""The Hopper kernel's thin tiles (SM90_THIN: 64 rows x 256 columns, each math
warpgroup 128 of the columns, 5 stages) on an SM 9.0 GPU, forced on every
case and compared with float64 and bit for bit with the tiles chosen
otherwise: both weight layouts, both 16-bit types, a thin tile's second
half partly or wholly past N, schedule tiles of more than 64 rows (two
passes), groups at the schedule table's limit, few CTAs walking many tiles,
a graph replayed with sizes that force second passes, nothing written past
the output; and the MoE step at decode with and without them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import (
    check_close,
    device_random,
    guard_rows_intact,
    guarded_rows,
    poisoned,
    random_sizes,
    wait_for_current_stream,
)

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper, hopper_variants

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
TOL = 1e-2


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")


def _force_thin(monkeypatch, thin: bool) -> None:
    """Every launch on thin tiles (a probe's SM90_THIN=1: any size), or none
    (the rule off: the tiles chosen before them)."""
    monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, "SM90_THIN": int(thin)})
    monkeypatch.setattr(hopper_variants, "THIN_MAX_ROWS_PER_GROUP", 16 if thin else 0)


def _case(rng, sizes, n, k, dtype, trans_b):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b, b64 = device_random(rng, shape, dtype, scale=k**-0.5)
    return a, a64, b, b64


def _same_bits(x, y) -> bool:
    return bool((x.view(np.uint16) == y.view(np.uint16)).all())


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 5, 219, 2246, 8103], 256, 512),  # long groups: two passes of every full schedule tile
        ([0, 0, 300, 0], 128, 64),  # N = 128: the second warpgroup's columns all past N
        ([37, 0, 64, 65, 1], 136, 72),  # 64 rows (one pass), 65 (a second pass of one row); N, K tails
        ([3, 130, 0, 77], 392, 200),  # N = 3 * 128 + 8: the last tile's second half 8 columns in
        ([128, 129, 192, 257, 63], 264, 136),  # pass limits: 128, 129 (a third tile), 192, 257
        ([8] * 8, 8, 8),  # the smallest shape the kernel takes
    ],
)
def test_matches_float64_and_the_other_tiles_bits(sizes, n, k, dtype, trans_b, monkeypatch):
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype, trans_b)
    m = a.shape[0]
    _force_thin(monkeypatch, False)
    other = poisoned((m, n), dtype)
    cg.gmm(a, b, sizes, trans_b=trans_b, out=other, algorithm="sm90_grouped")
    _force_thin(monkeypatch, True)
    buf, out = guarded_rows((m, n), dtype)
    cg.gmm(a, b, sizes, trans_b=trans_b, out=out, algorithm="sm90_grouped")
    what = f"sm90 thin {'nt' if trans_b else 'nn'} {sizes} N={n} K={k}"
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=trans_b), TOL, what)
    assert guard_rows_intact(buf, n), f"{what}: a guard row was written"
    # Each output element sums the same 16-deep K steps in the same order.
    assert _same_bits(out, other), what


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("experts", [1, 128, 597, 598])
def test_many_groups_with_sizes_on_the_device_and_three_ctas(experts, trans_b, monkeypatch):
    """597 groups: the largest schedule a thin launch copies into shared
    memory; 598: read from global memory. Three CTAs walk every tile."""
    import cupy

    _force_thin(monkeypatch, True)
    monkeypatch.setattr(hopper, "GRID_LIMIT", 3)
    rng = np.random.default_rng(experts + 7)
    sizes = random_sizes(rng, experts, 6 * experts + 70)
    a, a64, b, b64 = _case(rng, sizes, 264, 136, ml_dtypes.bfloat16, trans_b)
    out = poisoned((a.shape[0], 264), ml_dtypes.bfloat16)
    cg.gmm(a, b, cupy.asarray(sizes, dtype=cupy.int32), trans_b=trans_b, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=trans_b), TOL, f"sm90 thin E={experts}")


@pytest.mark.parametrize("trans_b", [True, False])
def test_captured_by_the_rule_and_replayed_with_sizes_that_need_second_passes(trans_b, monkeypatch):
    """A decode-sized launch (thin tiles by the rule: M <= 16 E, [E, N, K]
    weights; asked for with [E, K, N] ones) captured with device sizes,
    replayed with sizes that put up to all rows in one group (schedule tiles
    of 128 rows, run as two passes)."""
    import cupy

    if not trans_b:
        monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, "SM90_THIN": 1})

    rng = np.random.default_rng(21)
    experts, m, n, k = 16, 256, 392, 520
    assert m <= hopper_variants.THIN_MAX_ROWS_PER_GROUP * experts
    assert hopper_variants.kernel_defines(hopper.DEFINES, trans_b, m, experts, None, None)["SM90_THIN"] == 1
    a, a64, b, b64 = _case(rng, [m // experts] * experts, n, k, ml_dtypes.bfloat16, trans_b)
    sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
    out = cupy.empty((m, n), dtype=ml_dtypes.bfloat16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out were made on the null stream
    with stream:
        sizes_dev[...] = m // experts
        cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")  # compiles, outside
        stream.begin_capture()
        cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")
        graph = stream.end_capture()
    one = np.zeros(experts, dtype=np.int64)
    one[5] = m
    for sizes in (one, np.array([0, 200, 56] + [0] * (experts - 3)), random_sizes(rng, experts, m)):
        with stream:
            sizes_dev.set(sizes.astype(np.int32), stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=trans_b), TOL, f"replay {sizes.tolist()}")


@pytest.mark.parametrize("trans_b", [True, False])
def test_decode_step_same_bits_with_and_without_thin_tiles(trans_b, monkeypatch):
    """The fixed-capacity kernel step at decode sizes (both GEMMs thin by the
    rule; GEMM 2 with the row-scale epilogue), eager, every T from 1 to 40
    with random, worst-case and crowded routing: float64 within tolerance
    and the same bits as with the tiles chosen before."""
    import cupy
    from test_fixed_capacity_gpu import step_routing

    rng = np.random.default_rng(33 + trans_b)
    experts, k, hidden, inter = 64, 6, 264, 136
    s1 = (experts, 2 * inter, hidden) if trans_b else (experts, hidden, 2 * inter)
    s2 = (experts, hidden, inter) if trans_b else (experts, inter, hidden)
    w1, w1_64 = device_random(rng, s1, ml_dtypes.bfloat16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, s2, ml_dtypes.bfloat16, scale=inter**-0.5)
    ref_w = (np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2)) if trans_b else (w1_64, w2_64)
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    layer = cg.FixedCapacityMoE(w1, w2, k, max_tokens=40, trans_b=trans_b, graphs=False, executor=executor)
    for t in range(1, 41):
        x, x64 = device_random(rng, (t, hidden), ml_dtypes.bfloat16)
        ids, w = step_routing(rng, t, t, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        outs = {}
        for thin in (True, False):
            _force_thin(monkeypatch, thin)
            outs[thin] = layer.forward(x, ids_d, w_d).copy()
        want = ref.moe_forward_ref(x64, ids, w, *ref_w, None, None)
        check_close(outs[True], want, 2e-2, f"thin step T={t}")
        assert _same_bits(outs[True], outs[False]), f"T={t}"
