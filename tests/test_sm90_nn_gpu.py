"""Our Hopper kernel (SM90_GROUPED) on weights in the [E, K, N] layout (gmm's
and the layer's default; the kernel reads them as an N-major wgmma operand)
against float64 on an SM 9.0 GPU: 1 to 1024 groups, empty groups, K and N
tails, every row count from 1 to 300 across tile boundaries, group sizes on
the device (graph-captured and replayed), the MoE layer with default layouts,
fp16 and bf16, NaN-poisoned outputs, guard rows around the output, and the
descriptor cache under changed pointers and shapes."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
TOL = 1e-2
GUARD = 7.0  # exact in bf16 and fp16; the rows around an output keep it


@pytest.fixture(autouse=True)
def _hopper_only_and_no_fallback(monkeypatch):
    """SM 9.0 only; every call here must run the kernel: the cuBLAS back end and
    the fallback warning are errors."""
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")
    from cublas_grouped.gemm.backends import cublas as cublas_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the cuBLAS back end ran: SM90_GROUPED fell back")

    monkeypatch.setattr(cublas_backend, "run", refuse)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SM90_GROUPED.*")
        yield


def _case(rng, sizes, n, k, dtype):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    b, b64 = device_random(rng, (len(sizes), k, n), dtype, scale=k**-0.5)  # [E, K, N]
    return a, a64, b, b64


def _guarded(rows, n, dtype):
    """(buffer, out): out is rows x n in the middle of buffer, NaN-poisoned, with
    one guard row of GUARD before it and one after."""
    import cupy

    buf = cupy.full(((rows + 2) * n,), GUARD, dtype=dtype)
    out = buf[n : (rows + 1) * n].reshape(rows, n)
    out.fill(np.nan)
    return buf, out


def _check_guards(buf, rows, n, what):
    import cupy

    host = cupy.asnumpy(buf).astype(np.float64)
    before, after = host[:n], host[(rows + 1) * n :]
    assert (before == GUARD).all() and (after == GUARD).all(), f"{what}: a guard row was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 5, 219, 2246, 8103], 256, 512),
        ([0, 0, 300, 0], 128, 64),  # one group with rows, empty ones around it
        ([4096], 384, 1024),  # all rows in one group
        ([37, 0, 64, 65, 1], 136, 72),  # N and K tails: multiples of 8, not of 64 or 256
        ([129, 3, 0, 250], 264, 200),  # N: one column box past 256; K: a tail of 8
        ([300, 17], 520, 1032),  # three column tiles, the last of 8 columns
        ([8] * 8, 8, 8),  # the smallest shape the kernel takes
        ([40, 0, 90], 64, 4096),  # long K: 64 stages around a 4-stage ring
    ],
)
def test_matches_float64(sizes, n, k, dtype):
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype)
    buf, out = _guarded(a.shape[0], n, dtype)
    cg.gmm(a, b, sizes, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, f"sm90 nn {sizes} N={n} K={k}")
    _check_guards(buf, a.shape[0], n, f"sm90 nn {sizes} N={n} K={k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts", [1, 2, 8, 128, 1024])
def test_many_groups_with_sizes_on_the_device(experts, dtype):
    import cupy

    rng = np.random.default_rng(experts + 7)
    sizes = random_sizes(rng, experts, 40 * experts + 13)
    a, a64, b, b64 = _case(rng, sizes, 264, 136, dtype)
    out = poisoned((a.shape[0], 264), dtype)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, f"sm90 nn E={experts}")


def test_every_row_count_from_1_to_300():
    """Row counts across the 128-row tile boundaries, split over two groups around
    an empty one; the same pointer with a new shape each time (new descriptors)."""
    import cupy

    rng = np.random.default_rng(11)
    n, k = 136, 72
    a_all, a_all64 = device_random(rng, (300, k), ml_dtypes.bfloat16)
    b, b64 = device_random(rng, (3, k, n), ml_dtypes.bfloat16, scale=k**-0.5)
    for t in range(1, 301):
        sizes = [t // 2, 0, t - t // 2]
        buf, out = _guarded(t, n, ml_dtypes.bfloat16)
        cg.gmm(a_all[:t], b, sizes, out=out, algorithm="sm90_grouped")
        check_close(out, ref.gmm_ref(a_all64[:t], b64, sizes), TOL, f"T={t}")
        _check_guards(buf, t, n, f"T={t}")
    cupy.cuda.Device().synchronize()


def test_a_k_tail_reads_zeros_not_the_next_groups_weights():
    """K = 72: the second K stage covers rows 64..127 of each group's [K, N]
    matrix, past K. The next group's first rows hold inf (that group is empty,
    so no output uses them): a map that read them would give 0 * inf = NaN."""
    import cupy

    rng = np.random.default_rng(12)
    sizes, n, k = [200, 0, 0], 256, 72
    a, a64, b, b64 = _case(rng, sizes, n, k, ml_dtypes.bfloat16)
    host = cupy.asnumpy(b)
    host[1:, :56] = np.inf
    b = cupy.asarray(host)
    out = poisoned((200, n), ml_dtypes.bfloat16)
    cg.gmm(a, b, sizes, out=out, algorithm="sm90_grouped")
    b64[1:] = 0.0  # unused by the reference: group 0 alone has rows
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, "K tail beside inf weights")
    assert bool(cupy.isfinite(out.astype(cupy.float32)).all())


def test_empty_inputs():
    rng = np.random.default_rng(3)
    a, _, b, _ = _case(rng, [0, 0, 0], 128, 64, ml_dtypes.bfloat16)
    out = cg.gmm(a, b, [0, 0, 0], algorithm="sm90_grouped")
    assert out.shape == (0, 128)


def test_new_pointers_and_shapes_get_their_own_descriptors():
    """Alternating inputs of one shape (the cache must key on the pointer), then
    a weight tensor of another shape at a reused address."""
    import cupy

    rng = np.random.default_rng(13)
    sizes = [100, 0, 156]
    cases = [_case(rng, sizes, 256, 128, ml_dtypes.bfloat16) for _ in range(2)]
    for _ in range(2):
        for a, a64, b, b64 in cases:
            out = poisoned((256, 256), ml_dtypes.bfloat16)
            cg.gmm(a, b, sizes, out=out, algorithm="sm90_grouped")
            check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, "alternating pointers")
    a, a64, b, b64 = cases[0]
    # The same bytes seen as [E, K', N'] = [3, 64, 512]: another map at the same address.
    b2 = b.reshape(3, 64, 512)
    out = poisoned((256, 512), ml_dtypes.bfloat16)
    a2 = cupy.ascontiguousarray(a[:, :64])
    cg.gmm(a2, b2, sizes, out=out, algorithm="sm90_grouped")
    b2_64 = b64.reshape(3, 64, 512)
    check_close(out, ref.gmm_ref(a64[:, :64], b2_64, sizes), TOL, "new shape at a reused address")


def test_bitwise_repeatable():
    import cupy

    rng = np.random.default_rng(4)
    sizes = [300, 0, 1000, 77]
    a, _, b, _ = _case(rng, sizes, 512, 768, ml_dtypes.bfloat16)
    first = cg.gmm(a, b, sizes, algorithm="sm90_grouped")
    second = cg.gmm(a, b, sizes, algorithm="sm90_grouped")
    assert bool(cupy.all(first.view(cupy.uint16) == second.view(cupy.uint16)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_captured_with_device_sizes_and_replayed_with_new_ones(dtype):
    import cupy

    rng = np.random.default_rng(5)
    experts, m, n, k = 16, 2048, 264, 200
    a, a64, b, b64 = _case(rng, [m // experts] * experts, n, k, dtype)
    sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
    out = cupy.empty((m, n), dtype=dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out were made on the null stream
    with stream:
        sizes_dev[...] = m // experts
        cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")  # compiles, outside
        stream.begin_capture()
        cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")
        graph = stream.end_capture()
    for _ in range(3):
        sizes = random_sizes(rng, experts, m)
        with stream:
            sizes_dev.set(sizes.astype(np.int32), stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, f"replay {sizes.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_layer_with_default_layouts(dtype):
    """moe_forward with [E, H, 2I] and [E, I, H] weights (no trans_b): both expert
    GEMMs on the kernel (the fixture makes a cuBLAS fallback an error)."""
    import cupy

    rng = np.random.default_rng(7)
    tokens, experts, k, hidden, inter = 300, 16, 4, 256, 136
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), dtype)
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), dtype, scale=inter**-0.5)
    out = cg.moe_forward(x, cupy.asarray(ids), cupy.asarray(w), w1, w2, algorithm="sm90_grouped")
    expected = ref.moe_forward_ref(x64, ids, w, w1_64, w2_64)
    check_close(out, expected, 2e-2, "moe_forward on sm90, [E, K, N] weights")


def test_both_layouts_agree():
    """The same products through [E, N, K] (K-major B) and [E, K, N] (N-major B)."""
    import cupy

    rng = np.random.default_rng(9)
    sizes = [500, 0, 3, 260]
    a, a64, b, b64 = _case(rng, sizes, 520, 200, ml_dtypes.bfloat16)
    b_nk = cupy.ascontiguousarray(b.transpose(0, 2, 1))
    nn = cg.gmm(a, b, sizes, algorithm="sm90_grouped").astype(cupy.float32)
    nt = cg.gmm(a, b_nk, sizes, trans_b=True, algorithm="sm90_grouped").astype(cupy.float32)
    diff = float(cupy.linalg.norm(nn - nt) / cupy.linalg.norm(nt))
    assert diff <= 1e-2, f"[E, K, N] and [E, N, K] differ: {diff:.3g}"
    check_close(nn, ref.gmm_ref(a64, b64, sizes), TOL, "nn")
