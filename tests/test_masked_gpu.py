"""gmm_masked on the GPU: the Hopper kernel's masked fixed-capacity layout
(SM 9.0) against float64, rows past each count left exactly as they were,
counts past the capacity and negative ones, host and device counts, both
weight layouts, bf16 and fp16, the schedule the offsets kernel writes, a
graph replayed with new counts, bitwise repeatability; and the all-rows
fallback (any GPU) on the counted rows."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper

pytestmark = pytest.mark.gpu

TOL = 1e-2
GUARD = 7.0  # exact in bf16 and fp16: rows the kernel must not write keep it


def _on_hopper():
    import cupy

    return cupy.cuda.Device().compute_capability == "90"


def _case(rng, e, c, k, n, dtype, trans_b):
    a, a64 = device_random(rng, (e, c, k), dtype)
    b, b64 = device_random(rng, (e, n, k) if trans_b else (e, k, n), dtype, scale=k**-0.5)
    return a, a64, b, (np.swapaxes(b64, 1, 2) if trans_b else b64)


def _guarded(e, c, n, dtype):
    import cupy

    out = cupy.empty((e, c, n), dtype=dtype)
    out.fill(GUARD)
    return out


def _check(out, a64, b64, counts, what, untouched=True):
    import cupy

    host = cupy.asnumpy(out).astype(np.float64)
    c = host.shape[1]
    for g, count in enumerate(counts):
        m = min(max(int(count), 0), c)
        if m:
            check_close(out[g, :m], a64[g, :m] @ b64[g], TOL, f"{what} group {g}")
        if untouched:
            assert (host[g, m:] == GUARD).all(), f"{what}: group {g} rows {m}.. were written"


CASES = [
    # (E, C, K, N, counts)
    (1, 5, 64, 64, [3]),
    (4, 128, 136, 520, [0, 128, 1, 300]),  # a count past C is cut to C
    (8, 200, 256, 256, [200, 0, 5, 129, -3, 199, 1, 64]),
    (64, 16, 128, 136, None),  # random, many zeros
    (3, 300, 2048, 128, [300, 257, 0]),
]


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("e, c, k, n, counts", CASES)
def test_kernel_against_float64(e, c, k, n, counts, trans_b, dtype):
    if not _on_hopper():
        pytest.skip("the masked kernel runs on SM 9.0 GPUs only")
    import cupy

    rng = np.random.default_rng(e * 7 + c)
    if counts is None:
        counts = rng.integers(0, c + 1, e)
        counts[rng.random(e) < 0.4] = 0
    a, a64, b, b64 = _case(rng, e, c, k, n, dtype, trans_b)
    out = _guarded(e, c, n, dtype)
    cg.gmm_masked(a, b, cupy.asarray(np.asarray(counts), dtype=cupy.int32), trans_b=trans_b, out=out)
    _check(out, a64, b64, counts, f"E={e} C={c} device counts")
    out2 = _guarded(e, c, n, dtype)
    cg.gmm_masked(a, b, list(map(int, counts)), trans_b=trans_b, out=out2, algorithm="sm90_grouped")
    assert bool((out2.view(cupy.uint16) == out.view(cupy.uint16)).all()), "host counts: not bitwise equal"


def test_schedule_and_tile_counter():
    if not _on_hopper():
        pytest.skip("SM 9.0 only")
    import cupy

    from cublas_grouped.runtime.device import resolve_stream, resources

    rng = np.random.default_rng(5)
    e, c, k, n = 6, 300, 64, 520
    counts = np.array([300, 0, 1000, 129, -4, 7])
    a, a64, b, b64 = _case(rng, e, c, k, n, ml_dtypes.bfloat16, False)
    out = _guarded(e, c, n, ml_dtypes.bfloat16)
    cg.gmm_masked(a, b, cupy.asarray(counts, dtype=cupy.int32), out=out)
    cupy.cuda.get_current_stream().synchronize()
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    row_offsets, row_ends, tile_offsets, counter = (x.get() for x in hopper.schedule_buffers(res, e))
    used = np.clip(counts, 0, c)
    np.testing.assert_array_equal(row_offsets, np.arange(e + 1) * c)
    np.testing.assert_array_equal(row_ends, np.arange(e) * c + used)
    tiles = -(-used // hopper.BLOCK_M)
    np.testing.assert_array_equal(tile_offsets, np.concatenate(([0], np.cumsum(tiles))))
    assert int(counter[0]) == int(tiles.sum()) * -(-n // hopper.BLOCK_N)
    assert len(hopper.tile_schedule(counts, capacity=c)) == int(tiles.sum())
    _check(out, a64, b64, counts, "schedule case")


def test_graph_replays_with_new_counts():
    if not _on_hopper():
        pytest.skip("SM 9.0 only")
    import cupy

    rng = np.random.default_rng(6)
    e, c, k, n = 16, 64, 256, 384
    a, a64, b, b64 = _case(rng, e, c, k, n, ml_dtypes.bfloat16, True)
    counts = cupy.zeros(e, dtype=cupy.int32)
    out = _guarded(e, c, n, ml_dtypes.bfloat16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, counts and out were made on the null stream
    with stream:
        cg.gmm_masked(a, b, counts, trans_b=True, out=out)  # eager first: compile, maps
        stream.begin_capture()
        cg.gmm_masked(a, b, counts, trans_b=True, out=out)
        graph = stream.end_capture()
    for trial in range(4):
        new = rng.integers(0, c + 1, e)
        new[rng.random(e) < 0.3] = 0
        with stream:
            out.fill(GUARD)
            counts[...] = cupy.asarray(new, dtype=cupy.int32)
            graph.launch(stream)
        stream.synchronize()
        _check(out, a64, b64, new, f"replay {trial}")


@pytest.mark.parametrize("algorithm", ["cublas_grouped", "sequential"])
def test_all_rows_fallback(algorithm):
    """Any GPU: a cuBLAS algorithm computes every row; the counted ones must match."""
    import cupy

    rng = np.random.default_rng(8)
    e, c, k, n = 5, 40, 64, 48
    counts = [40, 0, 3, 17, 99]
    for dtype in (np.float32, ml_dtypes.bfloat16):
        a, a64, b, b64 = _case(rng, e, c, k, n, dtype, False)
        out = cg.gmm_masked(a, b, cupy.asarray(counts, dtype=cupy.int32), algorithm=algorithm)
        tol = 1e-5 if dtype == np.float32 else TOL
        for g, count in enumerate(counts):
            m = min(count, c)
            if m:
                check_close(out[g, :m], a64[g, :m] @ b64[g], tol, f"{algorithm} {dtype} group {g}")


def test_empty_and_zero_k():
    import cupy

    a = cupy.zeros((3, 0, 16), dtype=ml_dtypes.bfloat16)
    b = cupy.zeros((3, 16, 8), dtype=ml_dtypes.bfloat16)
    assert cg.gmm_masked(a, b, [0, 0, 0]).shape == (3, 0, 8)
    a = cupy.ones((2, 4, 0), dtype=ml_dtypes.bfloat16)
    b = cupy.ones((2, 0, 8), dtype=ml_dtypes.bfloat16)
    out = cupy.full((2, 4, 8), np.nan, dtype=ml_dtypes.bfloat16)
    cg.gmm_masked(a, b, [4, 2], out=out)
    host = cupy.asnumpy(out).astype(np.float64)
    assert (host[0] == 0).all() and (host[1, :2] == 0).all()
