"""A layer's GEMM 2 prefetching its first weights before it waits on the
activation kernel (SM90_PREFETCH_B, with the activation letting it start
early) on an SM 9.0 GPU: the fixed-capacity step with 16-bit weights (and
FP8 ones, whose kernel has no prefetch: the switch must change nothing
there), eager and replayed from its CUDA graphs with new routing at every
step, gives the same bits with the prefetch on and off, and float64 within
tolerance."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random
from test_fixed_capacity_gpu import step_routing

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper_variants

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
TOKENS = [64, 1, 5, 16, 40, 64, 3]


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel step runs on SM 9.0 GPUs only")


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize(
    "experts, k, hidden, inter, fp8",
    [(64, 6, 264, 136, False), (8, 2, 256, 384, False), (128, 8, 256, 256, True), (16, 4, 512, 384, True)],
)
def test_same_bits_with_and_without_the_prefetch(experts, k, hidden, inter, fp8, graphs, monkeypatch):
    import cupy

    rng = np.random.default_rng(experts + hidden + inter + graphs)
    w1, w1_64 = device_random(rng, (experts, 2 * inter, hidden), BF16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, hidden, inter), BF16, scale=inter**-0.5)
    if fp8:
        w1, w2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    layers = {}
    for on in (True, False):  # each layer captures its graphs under its own setting
        layers[on] = cg.FixedCapacityMoE(
            w1, w2, k, max_tokens=max(TOKENS), trans_b=True, graphs=graphs, executor=executor
        )
    for step, tokens in enumerate(TOKENS):
        x, x64 = device_random(rng, (tokens, hidden), BF16)
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        outs = {}
        for on, layer in layers.items():
            monkeypatch.setattr(hopper_variants, "PREFETCH_B", on)
            outs[on] = layer.forward(x, ids_d, w_d).copy()
        what = f"E={experts} fp8={fp8} graphs={graphs} T={tokens} step {step}"
        assert bool((outs[True].view(cupy.uint16) == outs[False].view(cupy.uint16)).all()), what
        if not fp8:  # the FP8 layer's float64 checks live in the FP8 tests
            want = ref.moe_forward_ref(x64, ids, w, np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2))
            check_close(outs[True], want, 2e-2, what)
