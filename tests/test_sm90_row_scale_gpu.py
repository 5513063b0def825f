"""The Hopper kernel's weighting epilogue (SM 9.0, ``SM90_EPILOGUE_ROW_SCALE``):
the second expert GEMM with ``out[r] = scale[r] * (a[r] @ B_g + bias[g])``
from the fp32 accumulators, against float64: both weight layouts, bf16 and
fp16, with and without bias, groups with zeros and odd sizes, N not a
multiple of 64 (the bias read stops at N), thin groups (v12's skip and, with
[E, N, K] weights, the 128-column tiles), rows past the sizes' sum never
written, bitwise repeatable. The MoE step's use of it (row weights from the
placement, the plain-sum combine) is covered by the layer tests against
float64, repeats and dropped ids included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.backends.hopper_variants import RowScaleEpilogue
from cublas_grouped.runtime.device import resolve_stream, resources

pytestmark = pytest.mark.gpu

TOL = 1e-2
GUARD = 7.0


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel runs on SM 9.0 GPUs only")


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 5, 219, 1, 0, 300], 200, 136),  # N = 200: a partial 64-column pass
        ([64, 0, 200], 512, 256),
        ([3, 1, 2, 0, 4, 1, 1, 2], 2048, 128),  # decode-like: thin tiles, narrow tiles with [E, N, K]
    ],
)
def test_row_scale_epilogue_against_float64(sizes, n, k, bias, trans_b, dtype):
    import cupy

    rng = np.random.default_rng(len(sizes) * 1000 + n)
    e, m = len(sizes), int(sum(sizes))
    spare = 3  # rows past the sizes' sum: never written
    a, a64 = device_random(rng, (m + spare, k), dtype)
    shape = (e, n, k) if trans_b else (e, k, n)
    w, w64 = device_random(rng, shape, dtype, scale=k**-0.5)
    b, b64 = device_random(rng, (e, n), dtype, scale=0.5)
    scale64 = rng.uniform(-1.5, 1.5, m + spare)
    scale64[::7] = 0.0  # a zero weight gives exact zeros
    scale = cupy.asarray(scale64.astype(np.float32))
    out = cupy.full((m + spare, n), GUARD, dtype=dtype)
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    epilogue = RowScaleEpilogue(scale.data.ptr, b.data.ptr if bias else 0)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    problem = (e, m + spare, n, k, trans_b, np.dtype(dtype))
    ptrs = (a.data.ptr, w.data.ptr, out.data.ptr)
    hopper.grouped_rows(res, problem, ptrs, sizes_dev, epilogue=epilogue)
    first = out.copy()
    hopper.grouped_rows(res, problem, ptrs, sizes_dev, epilogue=epilogue)
    assert bool((first.view(cupy.uint16) == out.view(cupy.uint16)).all()), "not bitwise repeatable"
    wk = np.swapaxes(w64, 1, 2) if trans_b else w64  # [E, K, N]
    s32 = scale64.astype(np.float32).astype(np.float64)
    expected, start = np.zeros((m, n)), 0
    for g, size in enumerate(sizes):
        z = a64[start : start + size] @ wk[g]
        if bias:
            z = z + b64[g]
        expected[start : start + size] = s32[start : start + size, None] * z
        start += size
    check_close(out[:m], expected, TOL, f"bias={bias} trans_b={trans_b} n={n}")
    got = cupy.asnumpy(out[:m]).astype(np.float64)
    assert (got[s32[:m] == 0.0] == 0.0).all(), "a row of weight 0 is not all zeros"
    assert (cupy.asnumpy(out[m:]).astype(np.float64) == GUARD).all(), "rows past the sizes' sum were written"
