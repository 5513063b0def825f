"""Our Hopper kernel (SM90_GROUPED) against float64 on an SM 9.0 GPU: sizes with
zeros and odd counts, 1 to 1024 groups, K and N tails, group sizes on the
device (no host copy, graph-captured and replayed with new sizes), bitwise
repeatability, the fallback where it cannot run, and the MoE layer on it."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
from gpu_util import (
    check_close,
    device_random,
    guard_intact,
    one_element_in,
    poisoned,
    random_sizes,
    wait_for_current_stream,
)

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

DTYPES = [(ml_dtypes.bfloat16, 1e-2), (np.float16, 1e-2)]


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("SM90_GROUPED runs on SM 9.0 GPUs only")


def _case(rng, sizes, n, k, dtype):
    m = int(np.sum(sizes))
    a, a64 = device_random(rng, (m, k), dtype)
    b, b64 = device_random(rng, (len(sizes), n, k), dtype, scale=k**-0.5)  # [E, N, K]
    return a, a64, b, b64


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 5, 219, 2246, 8103], 256, 512),
        ([0, 0, 300, 0], 128, 64),  # one group with rows, empty ones around it
        ([4096], 384, 1024),  # all rows in one group
        ([37, 0, 64, 65, 1], 136, 72),  # N and K tails: not multiples of the tile
        ([8] * 8, 8, 8),  # the smallest shape the kernel takes
    ],
)
def test_matches_float64(sizes, n, k, dtype, tol):
    rng = np.random.default_rng(len(sizes) * 31 + n + k)
    a, a64, b, b64 = _case(rng, sizes, n, k, dtype)
    out = poisoned((a.shape[0], n), dtype)
    cg.gmm(a, b, sizes, trans_b=True, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=True), tol, f"sm90 {sizes} N={n} K={k}")


@pytest.mark.parametrize("experts", [1, 8, 128, 1024])
def test_many_groups_with_sizes_on_the_device(experts):
    import cupy

    rng = np.random.default_rng(experts)
    sizes = random_sizes(rng, experts, 40 * experts + 13)
    a, a64, b, b64 = _case(rng, sizes, 256, 256, ml_dtypes.bfloat16)
    out = poisoned((a.shape[0], 256), ml_dtypes.bfloat16)
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    cg.gmm(a, b, sizes_dev, trans_b=True, out=out, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=True), 1e-2, f"sm90 E={experts}")


def test_empty_inputs():
    rng = np.random.default_rng(3)
    a, _, b, _ = _case(rng, [0, 0, 0], 128, 64, ml_dtypes.bfloat16)
    out = cg.gmm(a, b, [0, 0, 0], trans_b=True, algorithm="sm90_grouped")
    assert out.shape == (0, 128)


def test_bitwise_repeatable():
    import cupy

    rng = np.random.default_rng(4)
    sizes = [300, 0, 1000, 77]
    a, _, b, _ = _case(rng, sizes, 512, 768, ml_dtypes.bfloat16)
    first = cg.gmm(a, b, sizes, trans_b=True, algorithm="sm90_grouped")
    second = cg.gmm(a, b, sizes, trans_b=True, algorithm="sm90_grouped")
    assert bool(cupy.all(first.view(cupy.uint16) == second.view(cupy.uint16)))


def test_captured_with_device_sizes_and_replayed_with_new_ones():
    import cupy

    rng = np.random.default_rng(5)
    experts, m, n, k = 16, 2048, 256, 256
    a, a64, b, b64 = _case(rng, [m // experts] * experts, n, k, ml_dtypes.bfloat16)
    sizes_dev = cupy.zeros(experts, dtype=cupy.int32)
    out = cupy.empty((m, n), dtype=ml_dtypes.bfloat16)
    stream = cupy.cuda.Stream(non_blocking=True)
    wait_for_current_stream(stream)  # a, b, the sizes and out were made on the null stream
    with stream:
        sizes_dev[...] = m // experts
        cg.gmm(a, b, sizes_dev, trans_b=True, out=out, algorithm="sm90_grouped")  # compiles, outside
        stream.begin_capture()
        cg.gmm(a, b, sizes_dev, trans_b=True, out=out, algorithm="sm90_grouped")
        graph = stream.end_capture()
    for _ in range(3):
        sizes = random_sizes(rng, experts, m)
        with stream:
            sizes_dev.set(sizes.astype(np.int32), stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=True), 1e-2, f"replay {sizes.tolist()}")


def test_where_it_cannot_run_cublas_grouped_runs_instead():
    rng = np.random.default_rng(6)
    sizes = [10, 0, 30]
    a, a64 = device_random(rng, (40, 64), np.float32)
    b, b64 = device_random(rng, (3, 64, 96), np.float32)  # float32 and [E, K, N]: not for the kernel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cg.gmm(a, b, sizes, algorithm="sm90_grouped")
    assert any("SM90_GROUPED takes bfloat16 or float16" in str(w.message) for w in caught)
    check_close(out, ref.gmm_ref(a64, b64, sizes), 1e-5, "fallback")


@pytest.mark.parametrize("which", ["a", "b", "out"])
@pytest.mark.parametrize("device_sizes", [False, True])
def test_misaligned_addresses_run_on_cublas(which, device_sizes):
    """An operand that starts 2 bytes past a 16-byte boundary (a view one
    element into a buffer): TMA cannot read it, nor the epilogue store to it,
    and cuBLAS's pointer-array calls fault on it, so SEQUENTIAL runs, with
    warnings that name the operand; the result is right and the rows around
    out are left as they were."""
    import cupy

    from cublas_grouped.gemm import executor as executor_module

    rng = np.random.default_rng(7)
    sizes, n, k = [40, 0, 90, 3], 264, 136
    m = sum(sizes)

    a, a64 = device_random(rng, (m, k), ml_dtypes.bfloat16)
    b, b64 = device_random(rng, (len(sizes), k, n), ml_dtypes.bfloat16, scale=k**-0.5)
    a, b, out, out_buf = one_element_in(which, a, b, poisoned((m, n), ml_dtypes.bfloat16))
    group_sizes = cupy.asarray(sizes, dtype=cupy.int32) if device_sizes else sizes
    executor_module._warned.clear()  # each warning is given once per process and message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cg.gmm(a, b, group_sizes, out=out, algorithm="sm90_grouped")
    messages = [str(w.message) for w in caught]
    assert (
        f"algorithm SM90_GROUPED needs {which} at a 16-byte aligned address: running CUBLAS_GROUPED instead"
        in messages
    ), messages
    assert (
        f"algorithm CUBLAS_GROUPED needs {which} at a 16-byte aligned address: running SEQUENTIAL instead"
        in messages
    ), messages
    check_close(out, ref.gmm_ref(a64, b64, sizes), 1e-2, f"misaligned {which}")
    if out_buf is not None:
        assert guard_intact(out_buf, m * n), "out's neighbours were written"


def test_moe_layer_on_the_kernel():
    import cupy

    rng = np.random.default_rng(7)
    tokens, experts, k, hidden, inter = 300, 16, 4, 256, 128
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
    w1, w1_64 = device_random(rng, (experts, 2 * inter, hidden), ml_dtypes.bfloat16, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, hidden, inter), ml_dtypes.bfloat16, scale=inter**-0.5)
    out = cg.moe_forward(
        x, cupy.asarray(ids), cupy.asarray(w), w1, w2, trans_b=True, algorithm="sm90_grouped"
    )
    expected = ref.moe_forward_ref(x64, ids, w, np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2))
    check_close(out, expected, 2e-2, "moe_forward on sm90")


def test_the_kernel_runs_not_cublas(monkeypatch):
    """SM90_GROUPED on a shape it takes never reaches the cuBLAS back end."""
    from cublas_grouped.gemm.backends import cublas as cublas_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the cuBLAS back end ran")

    monkeypatch.setattr(cublas_backend, "run", refuse)
    rng = np.random.default_rng(8)
    sizes = [100, 0, 28]
    a, a64, b, b64 = _case(rng, sizes, 128, 128, ml_dtypes.bfloat16)
    out = cg.gmm(a, b, sizes, trans_b=True, algorithm="sm90_grouped")
    check_close(out, ref.gmm_ref(a64, b64, sizes, trans_b=True), 1e-2, "sm90 alone")
