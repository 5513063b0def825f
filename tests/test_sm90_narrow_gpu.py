"""The Hopper kernel's 128-column tiles (SM90_BLOCK_N=128, 6 stages: wgmma
n128), selected through the kernel's defines, against float64 and against
the 256-column tiles on an SM 9.0 GPU: both weight layouts, both 16-bit
types, N and K tails, empty groups, sizes on the host and on the device, few
CTAs walking many tiles, and nothing written past the output."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, guard_rows_intact, guarded_rows, poisoned, random_sizes

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper

pytestmark = pytest.mark.gpu

DTYPES = [ml_dtypes.bfloat16, np.float16]
TOL = 1e-2
NARROW = {"SM90_BLOCK_N": 128, "SM90_STAGES": 6}


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")


@pytest.fixture
def narrow(monkeypatch):
    """The kernel compiled and launched with 128-column tiles."""
    monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, **NARROW})


def _case(rng, sizes, n, k, dtype, trans_b):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b, b64 = device_random(rng, shape, dtype, scale=k**-0.5)
    return a, a64, b, b64


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 5, 219, 2246, 8103], 256, 512),
        ([0, 0, 300, 0], 128, 64),  # one group with rows, empty ones around it
        ([37, 0, 64, 65, 1], 136, 72),  # N and K tails: a second tile of 8 columns
        ([3, 130, 0, 77], 392, 200),  # N = 3 * 128 + 8
        ([8] * 8, 8, 8),  # the smallest shape the kernel takes
    ],
)
def test_matches_float64_and_the_wide_tiles(sizes, n, k, dtype, trans_b, monkeypatch):
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype, trans_b)
    m = a.shape[0]
    wide = poisoned((m, n), dtype)
    cg.gmm(a, b, sizes, trans_b=trans_b, out=wide, algorithm="sm90_grouped")
    monkeypatch.setattr(hopper, "DEFINES", {**hopper.DEFINES, **NARROW})
    buf, out = guarded_rows((m, n), dtype)
    cg.gmm(a, b, sizes, trans_b=trans_b, out=out, algorithm="sm90_grouped")
    what = f"sm90 n128 {'nt' if trans_b else 'nn'} {sizes} N={n} K={k}"
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=trans_b), TOL, what)
    assert guard_rows_intact(buf, n), f"{what}: a guard row was written"
    # Each output element sums the same 16-deep K steps in the same order.
    assert bool((out.view(np.uint16) == wide.view(np.uint16)).all()), what


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("experts", [1, 8, 128])
def test_many_groups_with_sizes_on_the_device(experts, trans_b, narrow):
    import cupy

    rng = np.random.default_rng(experts + 3)
    sizes = random_sizes(rng, experts, 40 * experts + 13)
    a, a64, b, b64 = _case(rng, sizes, 264, 136, ml_dtypes.bfloat16, trans_b)
    out = poisoned((a.shape[0], 264), ml_dtypes.bfloat16)
    cg.gmm(a, b, cupy.asarray(sizes, dtype=cupy.int32), trans_b=trans_b, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=trans_b), TOL, f"sm90 n128 E={experts}")


def test_three_ctas_walk_every_tile(narrow, monkeypatch):
    """Persistent CTAs, three of them: the ring flows from tile to tile over
    twice as many (narrower) tiles."""
    monkeypatch.setattr(hopper, "GRID_LIMIT", 3)
    rng = np.random.default_rng(11)
    sizes = [200, 0, 7, 513, 64]
    a, a64, b, b64 = _case(rng, sizes, 520, 1032, ml_dtypes.bfloat16, False)
    out = poisoned((a.shape[0], 520), ml_dtypes.bfloat16)
    cg.gmm(a, b, sizes, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes), TOL, "sm90 n128, 3 CTAs")
