"""Device-resident group sizes on SM 9.0 (GPU): gmm under AUTO with sizes
on the device (no copy) against float64 with NaN-poisoned outputs, sizes that
are not valid (what the documented guarantee says happens), the opt-in check,
and the prepared layer step replayed with new inputs. The offsets kernel
that makes device sizes safe is checked against its reference in
test_step_launches_gpu.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, random_sizes

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper_sizes

pytestmark = pytest.mark.gpu
BF16 = ml_dtypes.bfloat16


@pytest.fixture(autouse=True)
def _hopper_only(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the no-copy path of device sizes runs on SM 9.0 GPUs only")
    monkeypatch.delenv(hopper_sizes.CHECK_ENV, raising=False)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 5, 219, 0, 803], 256, 512),
        ([0, 0, 300, 0], 128, 64),  # one group with rows
        ([64], 96, 64),  # one group
        (None, 256, 128),  # 128 groups, some empty
    ],
)
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_auto_with_device_sizes_matches_float64_without_a_copy(monkeypatch, sizes, n, k, trans_b, dtype):
    import cupy

    rng = np.random.default_rng(n + k + int(trans_b))
    sizes = random_sizes(rng, 128, 4000) if sizes is None else np.array(sizes)
    m, e = int(sizes.sum()), len(sizes)
    a, a64 = device_random(rng, (m, k), BF16)
    b, b64 = device_random(rng, (e, n, k) if trans_b else (e, k, n), BF16, scale=k**-0.5)
    sizes_dev = cupy.asarray(sizes.astype(dtype))
    want = ref.gmm_ref(a64, b64, sizes, trans_b=trans_b)
    real = cupy.asnumpy

    def no_copy(*args, **kwargs):
        raise AssertionError("the sizes were copied to the host")

    for step in range(3):  # the checked call, then hits (prepared launches)
        out = poisoned((m, n), BF16)
        monkeypatch.setattr(cupy, "asnumpy", no_copy)
        cg.gmm(a, b, sizes_dev, trans_b=trans_b, out=out)
        monkeypatch.setattr(cupy, "asnumpy", real)
        check_close(out, want, 1e-2, f"step {step} E={e} N={n} K={k}")
    fresh = cg.gmm(a, b, sizes_dev, trans_b=trans_b)
    check_close(fresh, want, 1e-2, "a fresh output")


def test_sizes_past_the_rows_and_negative_ones_are_clamped():
    """[5, -3, 20, 4] over 16 rows: the kernel runs [5, 0, 11, 0]; every row
    is written, none past 16 (the guard rows after out stay NaN)."""
    import cupy

    rng = np.random.default_rng(1)
    a, a64 = device_random(rng, (16, 64), BF16)
    b, b64 = device_random(rng, (4, 64, 128), BF16, scale=0.125)
    buf = poisoned((16 + 8, 128), BF16)
    out = buf[:16]
    for step in range(2):
        cg.gmm(a, b, cupy.asarray(np.array([5, -3, 20, 4], np.int64)), out=out)
        check_close(out, ref.gmm_ref(a64, b64, [5, 0, 11, 0]), 1e-2, f"clamped, step {step}")
        assert np.isnan(cupy.asnumpy(buf[16:]).astype(np.float64)).all(), "a row past M was written"


def test_sizes_short_of_the_rows_leave_the_rest_unwritten():
    import cupy

    rng = np.random.default_rng(2)
    a, a64 = device_random(rng, (16, 64), BF16)
    b, b64 = device_random(rng, (2, 64, 128), BF16, scale=0.125)
    out = poisoned((16, 128), BF16)
    cg.gmm(a, b, cupy.asarray(np.array([3, 3], np.int32)), out=out)
    host = cupy.asnumpy(out).astype(np.float64)
    check_close(out[:6], ref.gmm_ref(a64[:6], b64, [3, 3]), 1e-2, "the rows of the sizes")
    assert np.isnan(host[6:]).all(), "rows past the sizes' sum were written"


def test_the_check_variable_copies_and_raises(monkeypatch):
    import cupy

    rng = np.random.default_rng(3)
    a, a64 = device_random(rng, (16, 64), BF16)
    b, b64 = device_random(rng, (4, 64, 128), BF16, scale=0.125)
    good = cupy.asarray(np.array([4, 4, 4, 4], np.int32))
    cg.gmm(a, b, good)
    monkeypatch.setenv(hopper_sizes.CHECK_ENV, "1")
    out = cupy.full((16, 128), 7.0, dtype=BF16)
    with pytest.raises(ValueError, match=r"sum\(group_sizes\) = 15 but a has 16 rows"):
        cg.gmm(a, b, cupy.asarray(np.array([4, 4, 4, 3], np.int32)), out=out)
    with pytest.raises(ValueError, match="non-negative"):
        cg.gmm(a, b, cupy.asarray(np.array([4, -4, 12, 4], np.int32)), out=out)
    assert (cupy.asnumpy(out).astype(np.float64) == 7.0).all(), "out written before the raise"
    check_close(cg.gmm(a, b, good), ref.gmm_ref(a64, b64, [4, 4, 4, 4]), 1e-2, "checked, on cuBLAS")


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_prepared_layer_step_with_new_inputs_each_call(fixed, tokens):
    """moe_forward on the kernel step replays prepared launches: each call's
    new x, ids, weights and output must be the ones read and written."""
    import cupy

    rng = np.random.default_rng(tokens + int(fixed))
    experts, k, hidden, inter = 16, 4, 256, 128
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), BF16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), BF16, scale=inter**-0.5)
    for step in range(3):
        ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        w = rng.random((tokens, k)).astype(np.float32)
        x, x64 = device_random(rng, (tokens, hidden), BF16)
        out = cg.moe_forward(x, cupy.asarray(ids), cupy.asarray(w), w1, w2, fixed_capacity=fixed)
        check_close(out, ref.moe_forward_ref(x64, ids, w, w1_64, w2_64), 2e-2, f"step {step}")
