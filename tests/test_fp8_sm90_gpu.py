"""The FP8 Hopper kernel (e4m3 x e4m3, block scales) on an SM 9.0 GPU, against a
float64 product of the DEQUANTIZED operands (testing_fp8, the kernels' NumPy
twin): group sizes with zeros and odd counts, 1 to 128 groups, M = 0, K from
128 to 7168 with tails, N tails, NaN-poisoned outputs, rows of very different
magnitudes (each row its own scales), bitwise repeatability, many tiles per CTA,
device sizes in a CUDA graph replayed with new sizes, and gmm's FP8 path against
the dequantizing fallback."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import poisoned, random_sizes, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper, hopper_fp8
from cublas_grouped.testing import moe_forward_ref, rel_error
from cublas_grouped.testing_fp8 import dequantize_ref, grouped_fp8_ref, quantize_ref

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
TOL = 1e-2  # bf16 output rounding (2^-9 relative) and fp32 accumulation order
ROW_TOL = 2e-2  # each row on its own: a wrong row or block scale moves a row by far more


def quantized_rows_ref(v64: np.ndarray) -> np.ndarray:
    """float64 of rows ``v64`` [R, C] after quantize_rows_fp8 (one scale per row per 128 columns)."""
    return dequantize_ref(*quantize_ref(v64.astype(np.float32), 1, 128), 1, 128).astype(np.float64)


def _bf16(v: np.ndarray) -> np.ndarray:
    return v.astype(BF16).astype(np.float64)


def fp8_layer_ref(x64, ids, weights64, d1, d2) -> np.ndarray:
    """float64 of the silu-gated MoE layer as its FP8 kernel path computes it:
    ``x`` and each pair's activations quantized per row per 128 columns, the
    weights ``d1`` [E, H, 2I] and ``d2`` [E, I, H] the dequantized FP8 ones,
    and the two bf16 roundings before the second quantization (the first
    GEMM's output and the activation's), so that the e4m3 codes of the
    activations are the GPU's but for elements next to a rounding boundary."""
    xq = quantized_rows_ref(x64)
    ids = np.asarray(ids, dtype=np.int64)
    inter = d2.shape[1]
    pairs_t, pairs_j = np.nonzero(np.ones(ids.shape, bool))
    experts = ids[pairs_t, pairs_j]
    h = _bf16(np.einsum("ph,phn->pn", xq[pairs_t], d1[experts]))
    g, u = h[:, :inter], h[:, inter:]
    act = quantized_rows_ref(_bf16(g / (1.0 + np.exp(-g)) * u))
    y = np.einsum("pi,pih->ph", act, d2[experts]) * weights64[pairs_t, pairs_j][:, None]
    out = np.zeros((ids.shape[0], d2.shape[2]))
    np.add.at(out, pairs_t, y)
    return out


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel runs on SM 9.0 GPUs only")


def _case(rng, sizes, n, k, *, row_spread=True):
    """Quantized operands on the GPU (by the library's kernels) and the float64
    reference from their bytes."""
    import cupy

    m, e = int(np.sum(sizes)), len(sizes)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if row_spread:  # rows from 1e-3 to 1e3: each must use its own scales
        x *= np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (m, 1))).astype(np.float32)
    w = (rng.standard_normal((e, n, k)) * k**-0.5).astype(np.float32)
    a_q, a_s = cg.quantize_rows_fp8(cupy.asarray(x.astype(BF16)))
    wq = cg.quantize_fp8(cupy.asarray(w.astype(BF16)), trans_b=True)
    ref = grouped_fp8_ref(a_q.get(), a_s.get(), wq.values.get(), wq.scales.get(), sizes)
    return a_q, a_s, wq, ref


def _check(out, ref, what):
    import cupy

    host = cupy.asnumpy(out).astype(np.float64)
    assert not np.isnan(host).any(), f"{what}: {int(np.isnan(host).sum())} elements never written"
    err = rel_error(host, ref)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"
    norms = np.linalg.norm(ref, axis=1)
    rows = norms > 0
    if rows.any():
        per_row = np.linalg.norm(host - ref, axis=1)[rows] / norms[rows]
        assert per_row.max() <= ROW_TOL, (
            f"{what}: worst row error {per_row.max():.3g} (row {int(np.argmax(per_row))})"
        )


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 1, 5, 219, 2246], 256, 2048),  # empty, one-row and odd groups
        ([0, 1, 5, 219, 2246], 136, 7168),  # DeepSeek-V3's K; N not a multiple of 128
        ([300], 128, 128),  # all rows in one group, one K block (E = 1)
        ([37, 0, 64, 65, 1], 264, 144),  # K = 128 + 16: a partial last scale block
        ([129, 127, 0, 256], 392, 400),  # K = 3 * 128 + 16, N = 3 * 128 + 8
        ([3, 130, 0, 77], 200, 528),  # K = 4 * 128 + 16: five stages, an odd count above one
        ([8] * 8, 8, 16),  # the smallest sizes the kernel takes
        # a's small boxes (16 rows) around their limits, stale rows beside
        # them: tiles of 1-64 rows load ceil(r / 16) boxes, 65 and more one
        # whole box; 192 and 193 rows end in a second tile of 64 and 65.
        ([16, 17, 33, 2, 48, 63, 64, 65, 0, 15, 192, 193, 129], 256, 512),
    ],
)
def test_matches_float64_of_the_dequantized_operands(sizes, n, k):
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    out = poisoned((a_q.shape[0], n), BF16)
    assert hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes, out=out) is out
    _check(out, ref, f"fp8 {sizes} N={n} K={k}")


@pytest.mark.parametrize("experts", [1, 8, 128, hopper.TABLE_MAX_GROUPS, hopper.TABLE_MAX_GROUPS + 1])
def test_many_groups_with_sizes_on_the_device(experts):
    """Up to hopper.TABLE_MAX_GROUPS groups the load thread searches the schedule
    in shared memory; past it, in global memory: both against float64."""
    import cupy

    rng = np.random.default_rng(experts)
    n, k = (384, 512) if experts <= 128 else (128, 256)  # the many-group cases: smaller experts
    sizes = random_sizes(rng, experts, min(40 * experts, 6000) + 13)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    out = poisoned((a_q.shape[0], n), BF16)
    hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32), out=out)
    _check(out, ref, f"fp8 E={experts} device sizes")


def test_empty_products():
    import cupy

    rng = np.random.default_rng(3)
    a_q, a_s, wq, _ = _case(rng, [0, 0, 0], 128, 256)
    out = hopper_fp8.grouped_fp8(a_q, a_s, wq, [0, 0, 0])
    assert out.shape == (0, 128) and out.dtype == BF16
    out = hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.zeros(3, dtype=cupy.int32))
    assert out.shape == (0, 128)


def test_many_tiles_per_cta_and_every_tile_taken_once(monkeypatch):
    """Three CTAs walk all tiles (the ring flows from tile to tile); after the
    launch the tile counter holds one draw per tile."""
    import cupy

    from cublas_grouped.runtime.device import stream_resources

    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", 3)
    rng = np.random.default_rng(11)
    sizes = [200, 0, 7, 513, 64]
    a_q, a_s, wq, ref = _case(rng, sizes, 264, 400)
    out = poisoned((a_q.shape[0], 264), BF16)
    hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes, out=out)
    _check(out, ref, "fp8, 3 CTAs")
    # One draw per schedule slot (CTA pairs: slots of 256 columns, so 3 here, the last half past N).
    slots = len(hopper.tile_schedule(sizes)) * -(-264 // (hopper_fp8.BLOCK_N * hopper_fp8.CLUSTER))
    counter = hopper.schedule_buffers(stream_resources(cupy.cuda.Device().id, None), len(sizes))[3]
    assert int(counter.get()[0]) == slots


@pytest.mark.parametrize("k", [128, 400, 528, 2048])
def test_overlapped_promotion_gives_the_serial_forms_bits(k, monkeypatch):
    """FP8_OVERLAP=1 (two temporary fragments) changes when each stage is
    promoted, not what is added in which order: the same bits as the serial
    form for one, an even and an odd number of K stages."""
    rng = np.random.default_rng(k)
    sizes = [0, 3, 200, 129]
    a_q, a_s, wq, _ = _case(rng, sizes, 264, k)
    outs = []
    for overlap in (1, 0):
        monkeypatch.setattr(hopper_fp8, "DEFINES", {**hopper_fp8.DEFINES, "FP8_OVERLAP": overlap})
        outs.append(hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes, out=poisoned((a_q.shape[0], 264), BF16)))
    assert bool((outs[0].view(np.uint16) == outs[1].view(np.uint16)).all())


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 1, 5, 219, 2246], 256, 2048),  # one slot of two bands per row tile
        ([37, 0, 64, 65, 1], 264, 144),  # 3 bands: the last pair's second CTA wholly past N
        ([129, 127, 0, 256], 392, 400),  # 4 bands, the last partly past N; an odd stage count
        # a's small boxes split between the pair (rank r loads boxes r, r + 2):
        # 1-64 rows in 1-4 boxes, 65 and more two 64-row halves.
        ([16, 17, 33, 2, 48, 63, 64, 65, 0, 15, 192, 193, 129], 512, 512),
        ([300], 136, 7168),  # N = 128 + 8: the second band 8 columns wide
        ([8] * 8, 8, 16),  # the smallest sizes: the second CTA of every pair past N
    ],
)
@pytest.mark.parametrize("limit", [None, 3])
def test_cta_pairs_give_one_ctas_bits(sizes, n, k, limit, monkeypatch):
    """FP8_CLUSTER 2 (two CTAs of a cluster over neighbouring 128-column bands,
    a's stages multicast into both) against float64 and bit for bit against
    one CTA per tile: each output element sums the same K stages in the same
    order. With every SM's grid and with one pair walking every slot (limit 3:
    the ring, the pair's mailbox and the tile counter over many slots); host
    and device sizes. Pairs with two load threads (each CTA's thread 32
    loading its own b) and with one, against one CTA per tile with two."""
    import cupy

    from cublas_grouped.runtime.device import stream_resources

    rng = np.random.default_rng(sum(sizes) + n + k)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", limit)
    outs = []
    for cluster, loaders in ((2, 2), (2, 1), (1, 2)):
        monkeypatch.setattr(
            hopper_fp8, "DEFINES", {**hopper_fp8.DEFINES, "FP8_CLUSTER": cluster, "FP8_LOADERS": loaders}
        )
        for device in (False, True):
            out = poisoned((a_q.shape[0], n), BF16)
            group_sizes = cupy.asarray(sizes, dtype=cupy.int32) if device else sizes
            hopper_fp8.grouped_fp8(a_q, a_s, wq, group_sizes, out=out)
            what = (
                f"fp8 cluster={cluster} loaders={loaders} device={device} {sizes} N={n} K={k} limit={limit}"
            )
            _check(out, ref, what)
            outs.append(out.view(cupy.uint16))
        if cluster == 2 and limit is not None:
            # One draw per slot of 256 columns: rank 0 drew them all, rank 1 none.
            slots = len(hopper.tile_schedule(sizes)) * -(-n // (2 * hopper_fp8.BLOCK_N))
            res = stream_resources(cupy.cuda.Device().id, None)
            assert int(hopper.schedule_buffers(res, len(sizes))[3].get()[0]) == slots
    assert all(bool(cupy.all(o == outs[0])) for o in outs[1:])


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 1, 5, 219, 2246], 256, 2048),
        ([37, 0, 64, 65, 1], 264, 144),  # a tile's b partly past N
        (
            [16, 17, 33, 2, 48, 63, 64, 65, 0, 15, 192, 193, 129],
            512,
            528,
        ),  # small boxes of a, odd stage count
        ([8] * 8, 8, 16),
    ],
)
@pytest.mark.parametrize("limit", [None, 3])
@pytest.mark.parametrize("thin", [False, True])
def test_two_loaders_give_one_loaders_bits(sizes, n, k, limit, thin, monkeypatch):
    """FP8_LOADERS 2 (a loaded by thread 0, b by thread 32 from the mailboxes)
    against float64 and bit for bit against one load thread, on 128 x 128 and
    thin tiles, every SM's grid and three CTAs walking every tile."""
    import cupy

    rng = np.random.default_rng(sum(sizes) + n + k + 1)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", limit)
    _force_tiles(monkeypatch, thin)
    outs = []
    for loaders in (2, 1):
        monkeypatch.setattr(hopper_fp8, "DEFINES", {**hopper_fp8.DEFINES, "FP8_LOADERS": loaders})
        out = poisoned((a_q.shape[0], n), BF16)
        hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32), out=out)
        _check(out, ref, f"fp8 loaders={loaders} thin={thin} {sizes} N={n} K={k} limit={limit}")
        outs.append(out.view(cupy.uint16))
    assert bool(cupy.all(outs[0] == outs[1]))


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 1, 5, 219, 2246], 1536, 2048),  # Qwen3's N: 8 tiles, starting on and 64 past scale blocks
        ([37, 0, 64, 65, 1], 264, 144),  # the second tile 64 past block 1, 72 columns, past N
        ([129, 127, 0, 256], 392, 400),  # 4 stages; the second tile's second scale row clamped
        ([3, 130, 0, 77], 200, 528),  # 5 stages; the second tile 8 columns wide
        ([16, 17, 33, 2, 48, 63, 64, 65, 0, 15, 192, 193, 129], 512, 512),  # a's small boxes
        ([300], 136, 7168),  # one tile, N < 192: both scale rows in range
        ([300], 128, 128),  # one scale block of N: the second row clamped to it
        ([8] * 8, 8, 16),  # the smallest sizes
    ],
)
@pytest.mark.parametrize("limit", [None, 3])
@pytest.mark.parametrize("loaders", [2, 1])
def test_wide_tiles_give_the_128_column_tiles_bits(sizes, n, k, limit, loaders, monkeypatch):
    """FP8_BLOCK_N 192 (wide tiles: two m64n96 halves per math warpgroup, two
    B scale blocks per tile), its halves' promotion overlapped and serial,
    against float64 and bit for bit against the 128 x 128 tiles: each output
    element sums the same stages' products in the same order with the same
    scales. One stage (K = 16, 128, 144 in one block and a tail), even and odd
    stage counts; every SM's grid and three CTAs walking every tile; one and
    two load threads."""
    import cupy

    rng = np.random.default_rng(sum(sizes) + n + k + 7)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", limit)
    _force_tiles(monkeypatch, False)
    wide_defines, defines = hopper_fp8.WIDE_DEFINES, hopper_fp8.DEFINES
    outs = []
    for wide, overlap in ((True, 1), (True, 0), (False, 1)):
        monkeypatch.setattr(hopper_fp8, "WIDE", wide)
        change = {"FP8_LOADERS": loaders, "FP8_OVERLAP": overlap}
        monkeypatch.setattr(hopper_fp8, "WIDE_DEFINES", {**wide_defines, **change})
        monkeypatch.setattr(hopper_fp8, "DEFINES", {**defines, **change})
        assert hopper_fp8.launch_defines(False)["FP8_BLOCK_N"] == (192 if wide else 128)
        out = poisoned((a_q.shape[0], n), BF16)
        hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32), out=out)
        what = f"fp8 wide={wide} overlap={overlap} loaders={loaders} {sizes} N={n} K={k} limit={limit}"
        _check(out, ref, what)
        outs.append(out.view(cupy.uint16))
    assert all(bool(cupy.all(o == outs[-1])) for o in outs[:-1])


def test_bitwise_repeatable():
    import cupy

    rng = np.random.default_rng(4)
    sizes = [1000, 3, 0, 517]
    a_q, a_s, wq, _ = _case(rng, sizes, 512, 2048)
    first = hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes)
    second = hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32))
    assert bool(cupy.all(first.view(cupy.uint16) == second.view(cupy.uint16)))


def _replay_with_new_sizes(rng, experts, m, n, k, size_sets):
    """The kernel captured in a CUDA graph with device sizes, then replayed
    with each of ``size_sets`` (each summing to m), checked against float64."""
    import cupy

    a_q, a_s, wq, _ = _case(rng, [m // experts] * experts, n, k)
    sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
    out = cupy.empty((m, n), dtype=BF16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out were made on the null stream
    with stream:
        sizes_dev[...] = m // experts
        hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=out, stream=stream)  # compiles, outside
        stream.begin_capture()
        hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=out, stream=stream)
        graph = stream.end_capture()
    a_host, s_host, v_host, ws_host = a_q.get(), a_s.get(), wq.values.get(), wq.scales.get()
    for sizes in size_sets:
        with stream:
            sizes_dev.set(np.asarray(sizes, dtype=np.int32), stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        _check(out, grouped_fp8_ref(a_host, s_host, v_host, ws_host, sizes), f"replay {list(sizes)}")


def test_captured_with_device_sizes_and_replayed_with_new_ones():
    rng = np.random.default_rng(5)
    _replay_with_new_sizes(rng, 16, 2048, 256, 512, [random_sizes(rng, 16, 2048) for _ in range(3)])


@pytest.mark.parametrize("device_sizes", [False, True])
def test_gmm_fp8_path_against_the_dequantizing_fallback(device_sizes, capsys):
    """gmm with FP8 [E, N, K] block128 weights and bf16 activations runs the FP8
    kernel (activations quantized per token per 128 columns); the fallback
    (an explicit cuBLAS algorithm) dequantizes the weights and keeps the bf16
    activations. They differ by the activations' quantization: a few percent."""
    import cupy

    rng = np.random.default_rng(9)
    sizes, n, k = [0, 1, 5, 219, 2246, 64, 0, 300], 512, 1024
    m = int(np.sum(sizes))
    x = cupy.asarray(rng.standard_normal((m, k)).astype(BF16))
    w = cupy.asarray((rng.standard_normal((len(sizes), n, k)) * k**-0.5).astype(BF16))
    wq = cg.quantize_fp8(w, trans_b=True)
    group_sizes = cupy.asarray(sizes, dtype=cupy.int32) if device_sizes else sizes
    out = poisoned((m, n), BF16)
    assert cg.gmm(x, wq, group_sizes, trans_b=True, out=out) is out
    fallback = cg.gmm(x, wq, sizes, trans_b=True, algorithm="cublas_grouped")
    # The FP8 path is exactly the kernel on quantize_rows_fp8's output.
    a_q, a_s = cg.quantize_rows_fp8(x)
    direct = hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes)
    assert bool(cupy.all(out.view(cupy.uint16) == direct.view(cupy.uint16)))
    host, ref = cupy.asnumpy(out).astype(np.float64), cupy.asnumpy(fallback).astype(np.float64)
    diff = np.abs(host - ref)
    err = rel_error(host, ref)
    with capsys.disabled():
        print(f"\ngmm FP8 kernel vs dequantizing fallback: max |diff| {diff.max():.4g} "
              f"(max |ref| {np.abs(ref).max():.4g}), relative Frobenius {err:.4g}")  # fmt: skip
    assert not np.isnan(host).any()
    assert err <= 0.06, err  # e4m3 activations: ~2.6% relative per element, 3 mantissa bits
    _check(out, grouped_fp8_ref(a_q.get(), a_s.get(), wq.values.get(), wq.scales.get(), sizes), "gmm fp8")


def test_gmm_keeps_the_fallback_for_other_fp8_weights():
    """[E, K, N] FP8 weights are not read by the kernel: gmm dequantizes, as before."""
    import cupy

    rng = np.random.default_rng(10)
    sizes, n, k = [30, 0, 70], 256, 256
    x = cupy.asarray(rng.standard_normal((100, k)).astype(BF16))
    w = cupy.asarray((rng.standard_normal((3, k, n)) * k**-0.5).astype(BF16))
    wq = cg.quantize_fp8(w)  # trans_b=False
    out = cg.gmm(x, wq, sizes)
    dense = cg.gmm(x, wq.dequantize("bfloat16"), sizes)
    assert bool(cupy.all(out.view(cupy.uint16) == dense.view(cupy.uint16)))


def test_moe_forward_fp8_kernel_path():
    """moe_forward with [E, N, K] block128 FP8 weights and bf16 tokens runs both
    expert GEMMs on the FP8 kernel: against float64 with the activations
    quantized as the path does, and against the dequantizing fallback (an
    explicit cuBLAS algorithm; the difference is the activations' e4m3 rounding)."""
    import cupy

    rng = np.random.default_rng(21)
    tokens, experts, k, hidden, inter = 300, 16, 4, 512, 256
    w1 = cupy.asarray((rng.standard_normal((experts, 2 * inter, hidden)) * hidden**-0.5).astype(BF16))
    w2 = cupy.asarray((rng.standard_normal((experts, hidden, inter)) * inter**-0.5).astype(BF16))
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    x = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(BF16))
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, k)).astype(np.float32)
    y = cg.moe_forward(x, cupy.asarray(ids), cupy.asarray(weights), q1, q2, trans_b=True)
    d1 = cupy.asnumpy(q1.dequantize(BF16)).astype(np.float64).transpose(0, 2, 1)
    d2 = cupy.asnumpy(q2.dequantize(BF16)).astype(np.float64).transpose(0, 2, 1)
    x64, w64 = cupy.asnumpy(x).astype(np.float64), weights.astype(np.float64)
    host = cupy.asnumpy(y).astype(np.float64)
    err = rel_error(host, fp8_layer_ref(x64, ids, w64, d1, d2))
    fallback = cg.moe_forward(
        x, cupy.asarray(ids), cupy.asarray(weights), q1, q2, trans_b=True, algorithm="cublas_grouped"
    )
    diff = rel_error(host, cupy.asnumpy(fallback).astype(np.float64))
    exact = rel_error(host, moe_forward_ref(x64, ids, w64, d1, d2))
    with_fallback = rel_error(
        cupy.asnumpy(fallback).astype(np.float64), moe_forward_ref(x64, ids, w64, d1, d2)
    )
    print(
        f"\nmoe_forward FP8 kernel path: vs its float64 model {err:.3g}, vs unquantized activations {exact:.3g} "
        f"(fallback: {with_fallback:.3g}), vs the fallback {diff:.3g}"
    )
    # The bound for the FP8 layer against its float64 model is 3e-2 (1e-2
    # for one GEMM); measured 1.45e-2 on an H100 (the bf16 rounding of the
    # first GEMM's output before the second's quantization is not in the model).
    assert err <= 3e-2 and diff <= 0.1
    again = cg.moe_forward(x, cupy.asarray(ids), cupy.asarray(weights), q1, q2, trans_b=True)
    assert bool(cupy.all(again.view(cupy.uint16) == y.view(cupy.uint16)))


def _force_tiles(monkeypatch, thin: bool) -> None:
    """Every launch on thin tiles (64 x 256) or on 128 x 128 tiles, whatever M and E."""
    monkeypatch.setattr(hopper_fp8, "THIN", thin)
    monkeypatch.setattr(hopper_fp8, "THIN_MAX_ROWS_PER_GROUP", 1 << 30)


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 2, 3, 0, 5, 16, 17, 64], 256, 2048),  # decode: one pass per tile
        ([65, 100, 128, 129, 192, 193, 0, 257], 512, 400),  # two passes where a tile has 65-128 rows
        ([3, 70, 0, 9], 136, 7168),  # N = 128 + 8: the second warpgroup's half barely in
        ([3, 70, 0, 9], 128, 528),  # N = 128: the second half wholly past N (its b not loaded)
        ([5, 40, 1], 392, 144),  # N = 3 * 128 + 8: the last thin tile one half partly in
        ([300], 264, 128),  # one group, one K stage
    ],
)
def test_thin_tiles_match_float64_and_the_wide_tiles_bits(sizes, n, k, monkeypatch):
    """Thin tiles (the decode shape) against float64, and bit for bit against
    the 128 x 128 tiles: each output element sums the same K stages in the
    same order whichever tile holds it. Both with host and device sizes."""
    import cupy

    rng = np.random.default_rng(sum(sizes) + n + k)
    a_q, a_s, wq, ref = _case(rng, sizes, n, k)
    outs = {}
    for thin in (True, False):
        _force_tiles(monkeypatch, thin)
        for device in (False, True):
            out = poisoned((a_q.shape[0], n), BF16)
            group_sizes = cupy.asarray(sizes, dtype=cupy.int32) if device else sizes
            hopper_fp8.grouped_fp8(a_q, a_s, wq, group_sizes, out=out)
            _check(out, ref, f"fp8 thin={thin} device={device} {sizes} N={n} K={k}")
            outs[thin, device] = out
    first = outs[True, False].view(cupy.uint16)
    assert all(bool(cupy.all(o.view(cupy.uint16) == first)) for o in outs.values())


@pytest.mark.parametrize(
    "experts", [1, 128, hopper_fp8.THIN_TABLE_MAX_GROUPS, hopper_fp8.THIN_TABLE_MAX_GROUPS + 1]
)
def test_thin_tiles_with_many_groups_and_few_ctas(experts, monkeypatch):
    """Thin tiles keep the schedule in shared memory up to
    THIN_TABLE_MAX_GROUPS groups (less room beside their ring), global memory
    past it; three CTAs walk every tile, first passes and second passes."""
    import cupy

    _force_tiles(monkeypatch, True)
    monkeypatch.setattr(hopper_fp8, "GRID_LIMIT", 3)
    rng = np.random.default_rng(experts + 7)
    sizes = random_sizes(rng, experts, 3 * experts + 150)
    a_q, a_s, wq, ref = _case(rng, sizes, 256, 256)
    out = poisoned((a_q.shape[0], 256), BF16)
    hopper_fp8.grouped_fp8(a_q, a_s, wq, cupy.asarray(sizes, dtype=cupy.int32), out=out)
    _check(out, ref, f"fp8 thin E={experts}")


def test_thin_tiles_captured_and_replayed_with_new_sizes():
    """A decode-sized launch (M <= 16 E: thin tiles by the rule) captured with
    device sizes and replayed with sizes that put 160 rows in two groups
    (second passes) and none in the others."""
    rng = np.random.default_rng(15)
    experts, m = 32, 320
    assert hopper_fp8.thin_tiles(m, experts)
    skewed = np.zeros(experts, dtype=np.int64)
    skewed[[3, 17]] = 160
    sets = [random_sizes(rng, experts, m), skewed, random_sizes(rng, experts, m)]
    _replay_with_new_sizes(rng, experts, m, 256, 1024, sets)
