"""The 2-CTA cluster variant of our Hopper kernel (``SM90_CLUSTER_B`` 2, v13:
B shared by TMA multicast) on an SM 9.0 GPU: every product equals the
default kernel's BIT FOR BIT (each element computed by one CTA in the same K
order) and float64 within the bf16/fp16 tolerance, outputs NaN-poisoned;
odd and even m-tile counts, empty groups, one group, E = 1, 7, 64, 257, every
M around the tile edges, both weight layouts, bf16 and fp16, N and K tails,
the masked fixed-capacity layout, the gated epilogue in the MoE kernel step,
a CUDA graph replayed with new device sizes, small grids (many pairs per
cluster) and one cluster per tile slot, and the tile counter's final count.
Each case is small: a hang shows as the runner's timeout."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
TOL = 1e-2
CLUSTER = {**hopper.DEFINES, "SM90_CLUSTER_B": 2}
# (SM90_CLUSTER_B, grid) of every GEMM launch prepared in the running test.
PREPARED: list = []


@pytest.fixture(autouse=True)
def _hopper_only_and_no_fallback(monkeypatch):
    """SM 9.0 only; every call must run our kernel (a cuBLAS run or the fallback
    warning is an error); every GEMM launch prepared is recorded with the
    defines it was prepared under, so a test can see the variant ran."""
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")
    from cublas_grouped.gemm.backends import cublas as cublas_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the cuBLAS back end ran: SM90_GROUPED fell back")

    monkeypatch.setattr(cublas_backend, "run", refuse)
    PREPARED.clear()
    real = hopper._prepare_gemm

    def spy(*args, **kwargs):
        launch = real(*args, **kwargs)
        PREPARED.append((hopper.DEFINES["SM90_CLUSTER_B"], launch.grid))
        return launch

    monkeypatch.setattr(hopper, "_prepare_gemm", spy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SM90_GROUPED.*")
        yield


def both(monkeypatch, call):
    """``call()`` (which returns a CuPy array or a list of them) with the
    default defines, then with SM90_CLUSTER_B 2; both results, the second
    checked to come from a launch prepared under the variant with an even grid."""
    import cupy

    default = call()
    start = len(PREPARED)
    with monkeypatch.context() as m:
        m.setattr(hopper, "DEFINES", CLUSTER)
        variant = call()
    cupy.cuda.Device().synchronize()
    ran = [grid for cluster, grid in PREPARED[start:] if cluster == 2]
    assert ran, "no launch was prepared under SM90_CLUSTER_B 2 (a stale prepared launch ran)"
    assert all(grid[0] % 2 == 0 for grid in ran), ran
    return default, variant


def same_bits(x, y, what):
    import cupy

    if isinstance(x, list):
        for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
            same_bits(xi, yi, f"{what} [{i}]")
        return
    bits = x.view(cupy.uint16) == y.view(cupy.uint16)
    assert bool(cupy.all(bits)), f"{what}: {int((~bits).sum())} elements differ from the default kernel"


def _case(rng, sizes, n, k, dtype, trans_b):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b, b64 = device_random(rng, shape, dtype, scale=k**-0.5)
    return a, a64, b, (np.swapaxes(b64, 1, 2) if trans_b else b64)


CASES = {
    "odd and even m-tiles, long groups": ([1, 5, 219, 2246, 1031], 256, 512),
    "empty groups around one of 3 m-tiles": ([0, 0, 300, 0], 128, 64),
    "E=1, 32 m-tiles": ([4096], 384, 256),
    "K tail 72, N 136": ([37, 0, 64, 65, 1], 136, 72),
    "N 264: a half past N": ([129, 3, 0, 250], 264, 200),
    "N 392, K 1032": ([300, 17], 392, 1032),
    "smallest": ([8] * 8, 8, 8),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_default_kernel_bit_for_bit(monkeypatch, case, trans_b, dtype):
    sizes, n, k = CASES[case]
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype, trans_b)

    def call():
        out = poisoned((a.shape[0], n), dtype)
        return cg.gmm(a, b, sizes, trans_b=trans_b, out=out, algorithm="sm90_grouped")

    default, variant = both(monkeypatch, call)
    check_close(variant, ref.gmm_ref(a64, b64, sizes), TOL, f"{case} trans_b={trans_b}")
    same_bits(default, variant, case)


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("experts", [1, 7, 64, 257])
def test_many_groups_with_sizes_on_the_device(monkeypatch, experts, trans_b):
    import cupy

    rng = np.random.default_rng(experts + 70)
    sizes = random_sizes(rng, experts, 150 * experts + 13)
    a, a64, b, b64 = _case(rng, sizes, 264, 136, ml_dtypes.bfloat16, trans_b)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)

    def call():
        out = poisoned((a.shape[0], 264), ml_dtypes.bfloat16)
        return cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")

    default, variant = both(monkeypatch, call)
    check_close(variant, ref.gmm_ref(a64, b64, sizes), TOL, f"E={experts}")
    same_bits(default, variant, f"E={experts}")


@pytest.mark.parametrize("trans_b", [True, False])
def test_every_m_around_the_tile_edges(monkeypatch, trans_b):
    """M = 1 and around one and two tiles (a pair), in one group and split
    over two around an empty one."""
    rng = np.random.default_rng(11)
    n, k = 136, 72
    a_all, a_all64 = device_random(rng, (520, k), ml_dtypes.bfloat16)
    shape = (3, n, k) if trans_b else (3, k, n)
    b, b64 = device_random(rng, shape, ml_dtypes.bfloat16, scale=k**-0.5)
    b64 = np.swapaxes(b64, 1, 2) if trans_b else b64
    for t in (1, 2, 127, 128, 129, 255, 256, 257, 383, 384, 385, 511, 512, 513):
        for sizes in ([t, 0, 0], [t // 2, 0, t - t // 2]):

            def call(t=t, sizes=sizes):
                out = poisoned((t, n), ml_dtypes.bfloat16)
                return cg.gmm(a_all[:t], b, sizes, trans_b=trans_b, out=out, algorithm="sm90_grouped")

            default, variant = both(monkeypatch, call)
            check_close(variant, ref.gmm_ref(a_all64[:t], b64, sizes), TOL, f"T={t} {sizes}")
            same_bits(default, variant, f"T={t} {sizes}")


@pytest.mark.parametrize("grid", ["limit 4", "limit 2", "per_tile"])
def test_small_grids_and_one_cluster_per_slot_and_the_counter(monkeypatch, grid):
    """Two CTAs (one cluster) and four (two) walk every pair through one ring,
    drawing past holes; one cluster per tile slot runs each loop once. The
    tile counter ends at the plain schedule's tile count (one draw per slot)."""
    import cupy

    from cublas_grouped.runtime.device import resolve_stream, resources

    if grid == "per_tile":
        monkeypatch.setattr(hopper, "SCHEDULE", "per_tile")
    else:
        monkeypatch.setattr(hopper, "GRID_LIMIT", int(grid.split()[1]))
    rng = np.random.default_rng(21)
    e, n, k = 64, 520, 200
    sizes = random_sizes(rng, e, 5000)
    a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16, True)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    counts = []

    def call():
        out = poisoned((a.shape[0], n), ml_dtypes.bfloat16)
        cg.gmm(a, b, sizes_dev, trans_b=True, out=out, algorithm="sm90_grouped")
        counts.append(int(hopper.schedule_buffers(res, e)[3][0].get()))
        return out

    default, variant = both(monkeypatch, call)
    check_close(variant, ref.gmm_ref(a64, b64, sizes), TOL, grid)
    same_bits(default, variant, grid)
    tiles = len(hopper.tile_schedule(sizes)) * -(-n // hopper.BLOCK_N)
    assert counts == [tiles, tiles], f"tile counter after default, variant: {counts}; tiles {tiles}"


@pytest.mark.parametrize("trans_b", [False, True])
def test_masked_fixed_capacity(monkeypatch, trans_b):
    """[E, C, K] rows, counts on the device: rows past each count keep what
    they held (NaN here), the rows below equal the default kernel's bits."""
    import cupy

    rng = np.random.default_rng(31)
    e, c, n, k = 6, 300, 264, 136
    counts = np.array([0, 1, 129, 300, 400, 256])  # 400: cut to the capacity
    a, a64 = device_random(rng, (e, c, k), ml_dtypes.bfloat16)
    shape = (e, n, k) if trans_b else (e, k, n)
    b, b64 = device_random(rng, shape, ml_dtypes.bfloat16, scale=k**-0.5)
    b64 = np.swapaxes(b64, 1, 2) if trans_b else b64
    counts_dev = cupy.asarray(counts, dtype=cupy.int32)

    def call():
        out = poisoned((e, c, n), ml_dtypes.bfloat16)
        return cg.gmm_masked(a, b, counts_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")

    default, variant = both(monkeypatch, call)
    host = cupy.asnumpy(variant).astype(np.float64)
    for g in range(e):
        rows = min(int(counts[g]), c)
        if rows:
            check_close(variant[g, :rows], a64[g, :rows] @ b64[g], TOL, f"group {g}")
        assert np.isnan(host[g, rows:]).all(), f"group {g}: rows past its count were written"
    same_bits(default, variant, "masked (the NaN poison has the same bits in both)")


@pytest.mark.parametrize("fixed", [False, True])
def test_gated_epilogue_in_the_moe_kernel_step(monkeypatch, fixed):
    """moe_forward with w1 packed in gate/up blocks (the activation in GEMM 1's
    epilogue), both GEMMs on the kernel: the variant's output equals the
    default's bit for bit and float64 within tolerance. The variant runs on
    copies of the weights (new addresses: the step's prepared launches are
    keyed by them)."""
    import cupy

    rng = np.random.default_rng(41)
    tokens, experts, k, hidden, inter = 300, 16, 4, 256, 128
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), ml_dtypes.bfloat16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), ml_dtypes.bfloat16, scale=inter**-0.5)
    packed = cg.pack_gate_up(w1)
    ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
    weights = [(packed, w2)]

    def call():
        p, q = weights[-1]
        # AUTO: the kernel step on SM 9.0 (fixed capacity or not; a cuBLAS run is an error here).
        out = cg.moe_forward(x, ids_d, w_d, p, q, w1_layout="gate_up_blocked", fixed_capacity=fixed)
        weights.append((p.copy(), q.copy()))
        return out

    default, variant = both(monkeypatch, call)
    check_close(variant, ref.moe_forward_ref(x64, ids, w, w1_64, w2_64), 2e-2, f"moe fixed={fixed}")
    same_bits(default, variant, f"moe fixed={fixed}")


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_epilogue_direct(monkeypatch, bias, trans_b):
    """hopper.grouped_rows with the gated epilogue (silu), groups with odd and
    even m-tile counts and empty ones: bits equal to the default kernel's,
    float64 within tolerance, rows past the sizes' sum never written."""
    import cupy

    from cublas_grouped.moe import kernels as K
    from cublas_grouped.moe.gate_up import pack_gate_up
    from cublas_grouped.runtime.device import resolve_stream, resources

    rng = np.random.default_rng(61 + bias + 2 * trans_b)
    sizes, hidden, inter = [0, 5, 219, 1, 0, 300, 256], 136, 256
    e, m, spare = len(sizes), int(sum(sizes)), 3
    x, x64 = device_random(rng, (m + spare, hidden), ml_dtypes.bfloat16)
    shape = (e, 2 * inter, hidden) if trans_b else (e, hidden, 2 * inter)
    w1, w1_64 = device_random(rng, shape, ml_dtypes.bfloat16, scale=hidden**-0.5)
    b1, b1_64 = device_random(rng, (e, 2 * inter), ml_dtypes.bfloat16, scale=0.5)
    packed = pack_gate_up(w1, trans_b=trans_b)
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    codes = tuple((f"ACT_{n.upper()}", c) for n, c in K.ACTIVATIONS.items())
    epilogue = hopper.GatedEpilogue(K.ACTIVATIONS["silu"], codes, b1.data.ptr if bias else 0)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    problem = (e, m + spare, 2 * inter, hidden, trans_b, np.dtype(ml_dtypes.bfloat16))

    def call():
        out = poisoned((m + spare, inter), ml_dtypes.bfloat16)
        ptrs = (x.data.ptr, packed.data.ptr, out.data.ptr)
        hopper.grouped_rows(res, problem, ptrs, sizes_dev, epilogue=epilogue)
        return out

    default, variant = both(monkeypatch, call)
    w64 = np.swapaxes(w1_64, 1, 2) if trans_b else w1_64  # [E, H, 2I]
    expected, start = np.zeros((m, inter)), 0
    for g, size in enumerate(sizes):
        z = x64[start : start + size] @ w64[g] + (b1_64[g] if bias else 0.0)
        expected[start : start + size] = z[:, :inter] / (1.0 + np.exp(-z[:, :inter])) * z[:, inter:]
        start += size
    check_close(variant[:m], expected, TOL, f"gated epilogue bias={bias} trans_b={trans_b}")
    assert np.isnan(cupy.asnumpy(variant[m:]).astype(np.float64)).all(), (
        "rows past the sizes' sum were written"
    )
    same_bits(default, variant, "gated epilogue")


@pytest.mark.parametrize("trans_b", [True, False])
def test_graph_replayed_with_new_device_sizes(monkeypatch, trans_b):
    import cupy

    rng = np.random.default_rng(51)
    experts, m, n, k = 16, 2048, 264, 200
    a, a64, b, b64 = _case(rng, [m // experts] * experts, n, k, ml_dtypes.bfloat16, trans_b)
    draws = [random_sizes(rng, experts, m) for _ in range(3)]
    draws.append(np.array([m] + [0] * (experts - 1)))  # all rows in one group: 16 m-tiles

    def call():
        sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
        out = cupy.empty((m, n), dtype=ml_dtypes.bfloat16)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            sizes_dev[...] = m // experts
            cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")  # outside
            stream.begin_capture()
            cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out, algorithm="sm90_grouped")
            graph = stream.end_capture()
        outs = []
        for sizes in draws:
            with stream:
                sizes_dev.set(sizes.astype(np.int32), stream=stream)
                out.fill(np.nan)
                graph.launch(stream)
            stream.synchronize()
            check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, f"replay {sizes.tolist()}")
            outs.append(out.copy())
        return outs

    default, variant = both(monkeypatch, call)
    same_bits(default, variant, "graph replays")
