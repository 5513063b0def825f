"""The caches of repeated eager calls on the GPU: a cached call computes what the checked one did.

Each case runs a call, then repeats it (hits), with new data and with the
output at another address (the prepared grouped call re-uploads its pointer
table only then), interleaved with other keys, and compares every result
with the float64 reference and the hits with the first call bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close, device_random, poisoned

import cublas_grouped as cg
from cublas_grouped.gemm import call_cache
from cublas_grouped.moe import layer_cache
from cublas_grouped.testing import gmm_ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_caches():
    call_cache.clear()
    layer_cache.clear()
    yield
    call_cache.clear()
    layer_cache.clear()


@pytest.mark.parametrize("algorithm", ["auto", "cublas_grouped", "sequential", "chunked_batched"])
@pytest.mark.parametrize("device_sizes", [False, True])
def test_gmm_hits_equal_the_checked_call(algorithm, device_sizes):
    import cupy

    rng = np.random.default_rng(7)
    patterns = [np.array([5, 0, 40, 3, 16], np.int64), np.array([0, 64, 0, 0, 0], np.int64)]
    b, b_ref = device_random(rng, (5, 64, 96), "bfloat16")
    for step in range(6):
        sizes = patterns[step % 2]  # two keys, interleaved
        a, a_ref = device_random(rng, (64, 64), "bfloat16")
        group_sizes = cupy.asarray(sizes.astype(np.int32)) if device_sizes else sizes
        out = poisoned((64, 96), "bfloat16") if step >= 4 else None  # another output address
        got = cg.gmm(a, b, group_sizes, algorithm=algorithm, out=out)
        check_close(got, gmm_ref(a_ref, b_ref, sizes), TOLERANCE["bfloat16"], f"step {step}")
        again = cg.gmm(a, b, group_sizes, algorithm=algorithm)  # a hit on the same data
        assert cupy.array_equal(again, got), f"step {step}: a hit differs from the call before"
    assert call_cache.cached_count() >= 2


def test_gmm_hit_still_checks_device_sizes_values():
    import cupy

    rng = np.random.default_rng(3)
    a, _ = device_random(rng, (16, 32), "float16")
    b, _ = device_random(rng, (4, 32, 32), "float16")
    good = cupy.asarray(np.array([4, 4, 4, 4], np.int32))
    cg.gmm(a, b, good, algorithm="cublas_grouped")
    cg.gmm(a, b, good, algorithm="cublas_grouped")
    bad = cupy.asarray(np.array([4, 4, 4, 3], np.int32))  # same key until the values are read
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15 but a has 16 rows"):
        cg.gmm(a, b, bad, algorithm="cublas_grouped")


@pytest.mark.parametrize("fixed", [False, True])
def test_moe_forward_hits_equal_the_checked_call(fixed):
    import cupy

    from cublas_grouped.testing import moe_forward_ref

    rng = np.random.default_rng(11)
    e, k, h, inter = 16, 4, 64, 32
    w1, w1_ref = device_random(rng, (e, h, 2 * inter), "bfloat16", 0.1)
    w2, w2_ref = device_random(rng, (e, inter, h), "bfloat16", 0.1)
    for step in range(4):
        tokens = 1 + step % 2  # two keys, interleaved
        x, x_ref = device_random(rng, (tokens, h), "bfloat16")
        logits = cupy.asarray(rng.standard_normal((tokens, e)).astype(np.float32))
        weights, ids = cg.route(logits, k)
        got = cg.moe_forward(x, ids, weights, w1, w2, fixed_capacity=fixed)
        ref = moe_forward_ref(x_ref, cupy.asnumpy(ids), cupy.asnumpy(weights), w1_ref, w2_ref)
        check_close(got, ref, 2e-2, f"step {step}")  # two bf16 GEMMs, as in test_moe_gpu.py
        again = cg.moe_forward(x, ids, weights, w1, w2, fixed_capacity=fixed)
        assert cupy.array_equal(again, got), f"step {step}: a hit differs (the layer is deterministic)"
        w_again, ids_again = cg.route(logits, k)
        assert cupy.array_equal(w_again, weights) and cupy.array_equal(ids_again, ids)
