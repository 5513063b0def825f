"""Work on streams other than CuPy's current one is ordered: MoEMLP runs a whole
call on its stream, and the step-by-step API's later steps wait for
prepare_input on another stream. A spin kernel holds one stream back, so a
missing wait reads data that is not written yet and the result goes wrong."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_util import check_close, device_random, poisoned, wait_for_current_stream

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.moe import kernels as _moe_kernels

pytestmark = pytest.mark.gpu

_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
"""


def spin(cycles: int = 200_000_000) -> None:
    """Keep CuPy's current stream busy (about 0.1 s at 2 GHz)."""
    import cupy

    cupy.RawKernel(_SPIN, "spin")((1,), (1,), (np.int64(cycles),))


def _routing(rng, tokens, experts, k):
    import cupy

    ids = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return cupy.asarray(ids), cupy.asarray(w), ids, w.astype(np.float64)


def test_moe_mlp_runs_the_whole_call_on_its_stream():
    import cupy

    rng = np.random.default_rng(21)
    tokens, experts, k, hidden, inter = 64, 8, 2, 64, 32
    router, router64 = device_random(rng, (hidden, experts), np.float32)
    w1, w1_64 = device_random(rng, (experts, hidden, 2 * inter), np.float32, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), np.float32, scale=inter**-0.5)
    sw1, sw1_64 = device_random(rng, (hidden, 2 * inter), np.float32, scale=hidden**-0.5)
    sw2, sw2_64 = device_random(rng, (inter, hidden), np.float32, scale=inter**-0.5)
    mlp = cg.MoEMLP(router, w1, w2, k, shared_w1=sw1, shared_w2=sw2)
    x_new, x64 = device_random(rng, (tokens, hidden), np.float32)
    mlp(x_new)  # compile every kernel first: the timed part below holds only the race
    spin(1)
    cupy.cuda.runtime.deviceSynchronize()

    x = cupy.zeros_like(x_new)
    work = cupy.cuda.Stream(non_blocking=True)
    other = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.runtime.deviceSynchronize()  # x is all zeros before either stream starts
    with work:
        spin()
        x[...] = x_new  # written on `work` only after the spin
    with other:
        out = mlp(x, stream=work)
        assert cupy.cuda.get_current_stream().ptr == other.ptr  # the caller's current stream is kept
    work.synchronize()  # the result is ready in `work`'s order
    w_ref, ids_ref = ref.route_ref(x64 @ router64, k)
    expected = ref.moe_forward_ref(x64, ids_ref, w_ref, w1_64, w2_64)
    expected += ref.moe_forward_ref(
        x64, np.zeros((tokens, 1), np.int32), np.ones((tokens, 1)), sw1_64[None], sw2_64[None]
    )
    check_close(out, expected, 1e-5, "MoEMLP on a stream that is not current")


@pytest.mark.parametrize("algorithm", ["cublas_grouped", "chunked_batched", "padded_strided", "sequential"])
def test_later_steps_on_another_stream_wait_for_prepare_input(monkeypatch, algorithm):
    import cupy

    rng = np.random.default_rng(23)
    tokens, experts, k, hidden, n = 256, 16, 2, 64, 48
    ids, w, ids_h, w64 = _routing(rng, tokens, experts, k)
    x, x64 = device_random(rng, (tokens, hidden), np.float32)
    w1, w1_64 = device_random(rng, (experts, hidden, n), np.float32, scale=hidden**-0.5)
    prep = cupy.cuda.Stream(non_blocking=True)
    side = cupy.cuda.Stream(non_blocking=True)
    # Compile every kernel on other data first (stale buffers must not hold the answer).
    warm, _ = device_random(rng, (tokens, hidden), np.float32)
    # The test's own setup: what the null stream copied in is ready on `prep`
    # (the ordering under test is prep -> side, below).
    wait_for_current_stream(prep)
    inp = cg.prepare_input(warm, (w, ids), experts, algorithm=algorithm, stream=prep)
    h = cg.expert_gemm(inp, w1, stream=prep)
    cg.scatter_output(h, inp, stream=prep)
    cg.combine_output(h, inp, stream=prep)
    spin(1)
    cupy.cuda.runtime.deviceSynchronize()

    # prepare_input copies the counts to the host before it assigns rows, so
    # a spin placed ahead of the row assignment holds back every array it returns.
    assign_rows = _moe_kernels.assign_rows

    def slow_assign_rows(*args, **kwargs):
        spin()  # on CuPy's current stream: prepare_input's
        return assign_rows(*args, **kwargs)

    monkeypatch.setattr(_moe_kernels, "assign_rows", slow_assign_rows)
    inp = cg.prepare_input(x, (w, ids), experts, algorithm=algorithm, stream=prep)
    assert inp.ready is not None and inp.stream == prep.ptr
    rows = inp.rows.shape[0]
    with side:  # both ready on `side`
        y = cupy.asarray(rng.standard_normal((rows, n)).astype(np.float32))
        h = poisoned((rows, n), np.float32)
    assert cg.expert_gemm(inp, w1, out=h, stream=side) is h
    pairs = cg.scatter_output(h, inp, stream=side)
    combined = cg.combine_output(y, inp, stream=side)
    side.synchronize()  # waited for `prep` on the device, so everything is done

    flat = ids_h.reshape(-1)
    expected = np.einsum("pk,pkn->pn", np.repeat(x64, k, axis=0), w1_64[flat])
    check_close(pairs, expected, 1e-5, f"expert_gemm + scatter_output on another stream ({algorithm})")
    p2r = cupy.asnumpy(inp.pair_to_row)
    y64 = cupy.asnumpy(y).astype(np.float64)
    check_close(combined, ref.combine_ref(y64, p2r, w64, ids_h), 1e-6, "combine_output on another stream")
