"""The Hopper kernel's gated epilogue (SM 9.0): the first expert GEMM with
act(gate + b) * (up + b) applied to the fp32 accumulators, on weights packed
by pack_gate_up, against float64; every activation, with and without bias,
both weight layouts, bf16 and fp16, groups with zeros and odd sizes, rows past
the sizes' sum never written, bitwise repeatable; and pack/unpack round trip."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import kernels as K
from cublas_grouped.moe.gate_up import pack_gate_up, unpack_gate_up
from cublas_grouped.runtime.device import resolve_stream, resources

pytestmark = pytest.mark.gpu

TOL = 1e-2
GUARD = 7.0


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel runs on SM 9.0 GPUs only")


def _act(z, name):
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        from math import erf

        return 0.5 * z * (1.0 + np.vectorize(erf, otypes=[np.float64])(z / np.sqrt(2.0)))
    return np.maximum(z, 0.0)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "sizes, hidden, inter", [([0, 5, 219, 1, 0, 300], 136, 128), ([64, 0, 200], 256, 384)]
)
def test_gated_epilogue_against_float64(sizes, hidden, inter, bias, act, trans_b, dtype):
    import cupy

    rng = np.random.default_rng(len(sizes) * 100 + inter)
    e, m = len(sizes), int(sum(sizes))
    spare = 3  # rows past the sizes' sum: never written
    x, x64 = device_random(rng, (m + spare, hidden), dtype)
    shape = (e, 2 * inter, hidden) if trans_b else (e, hidden, 2 * inter)
    w1, w1_64 = device_random(rng, shape, dtype, scale=hidden**-0.5)
    b1, b1_64 = device_random(rng, (e, 2 * inter), dtype, scale=0.5)
    packed = pack_gate_up(w1, trans_b=trans_b)
    back = unpack_gate_up(packed, trans_b=trans_b)
    assert bool((back.view(cupy.uint16) == w1.view(cupy.uint16)).all()), "pack/unpack is not a round trip"
    out = cupy.full((m + spare, inter), GUARD, dtype=dtype)
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    codes = tuple((f"ACT_{n.upper()}", c) for n, c in K.ACTIVATIONS.items())
    epilogue = hopper.GatedEpilogue(K.ACTIVATIONS[act], codes, b1.data.ptr if bias else 0)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    problem = (e, m + spare, 2 * inter, hidden, trans_b, np.dtype(dtype))
    hopper.grouped_rows(
        res, problem, (x.data.ptr, packed.data.ptr, out.data.ptr), sizes_dev, epilogue=epilogue
    )
    first = out.copy()
    hopper.grouped_rows(
        res, problem, (x.data.ptr, packed.data.ptr, out.data.ptr), sizes_dev, epilogue=epilogue
    )
    assert bool((first.view(cupy.uint16) == out.view(cupy.uint16)).all()), "not bitwise repeatable"
    w64 = np.swapaxes(w1_64, 1, 2) if trans_b else w1_64  # [E, H, 2I]
    expected, start = np.zeros((m, inter)), 0
    for g, size in enumerate(sizes):
        z = x64[start : start + size] @ w64[g]
        if bias:
            z = z + b1_64[g]
        expected[start : start + size] = _act(z[:, :inter], act) * z[:, inter:]
        start += size
    check_close(out[:m], expected, TOL, f"{act} bias={bias} trans_b={trans_b}")
    assert (cupy.asnumpy(out[m:]).astype(np.float64) == GUARD).all(), "rows past the sizes' sum were written"


def test_pack_refuses_widths_not_in_blocks():
    import cupy

    with pytest.raises(ValueError, match=r"2I=192 must be a multiple of 256"):
        pack_gate_up(cupy.zeros((2, 16, 192), dtype=ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"2I=192 must be a multiple of 256"):
        pack_gate_up(cupy.zeros((2, 192, 16), dtype=ml_dtypes.bfloat16), trans_b=True)
