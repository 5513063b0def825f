"""GEMM 1 gathering its rows inside the Hopper kernel (SM90_GATHER_A, v11) on
an SM 9.0 GPU: bit for bit what gather_rows' copy and the plain kernel give,
for every T from 1 to 70 rising and falling and at 4096, empty experts, ids
out of range, missing rows, K tails, both dtypes, both weight layouts and the
gated epilogue, every output poisoned with NaN first; then the kernel step
with ``GATHER_IN_GEMM1`` on against off, eager and from CUDA graphs."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random
from test_fixed_capacity_gpu import poison, step_routing

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import kernel_step as S
from cublas_grouped.moe import kernels as K
from cublas_grouped.moe.checks import kernel_arch
from cublas_grouped.runtime.device import resolve_stream, resources

pytestmark = pytest.mark.gpu

MAX_T = 70
# Every T, largest first, rising and falling again, then a prefill size.
STEPS = [MAX_T, *range(1, MAX_T), *range(MAX_T - 1, 0, -1), 4096]
NAN16 = 0x7FFF  # a NaN in bf16 and in fp16


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the kernel runs on SM 9.0 GPUs only")


def _placement(ids, experts):
    """(row_to_pair [T*k], counts [E]) as the step's placement makes them:
    expert by expert, pairs in token order; ids outside [0, E) and repeats of
    a token's expert take no row; rows past the counts' sum hold -1."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    rows = [[] for _ in range(experts)]
    for p, e in enumerate(flat):
        j = p % k
        if 0 <= e < experts and e not in flat[p - j : p]:
            rows[e].append(p)
    r2p = np.full(tokens * k, -1, np.int32)
    placed = [p for group in rows for p in group]
    r2p[: len(placed)] = placed
    return r2p, np.array([len(g) for g in rows], np.int32)


def _routing(rng, step, tokens, experts, k):
    ids, _ = step_routing(rng, step, tokens, experts, k)
    if step % 4 == 3:  # ids out of range: those pairs take no row
        bad = rng.random(ids.shape) < 0.2
        ids[bad] = rng.choice([-1, experts, experts + 7], int(bad.sum()))
    return ids


def _gemm1_both_ways(res, x, r2p, counts, w, k, problem, out_cols, epilogue=None):
    """GEMM 1 over the copy gather_rows makes (plain loads) and over x itself
    (gathered loads), into NaN-poisoned outputs: (copy's out, gathered out)."""
    import cupy

    tokens = x.shape[0]
    m = problem[1]
    r2p_d = cupy.asarray(r2p)
    rows = cupy.full((m, x.shape[1]), np.nan, dtype=x.dtype)
    p2r_d = cupy.asarray(ref.pair_to_row_of(r2p, tokens * k))
    K.gather_rows(res.launch_stream, kernel_arch(res), x, p2r_d, r2p_d, k, rows)
    counts_d = cupy.asarray(counts)
    outs = []
    for a, gather in ((rows, None), (x, hopper.RowGather(r2p_d.data.ptr, k, tokens))):
        out = cupy.empty((m, out_cols), dtype=x.dtype)
        out.view(cupy.uint16).fill(NAN16)
        ptrs = (a.data.ptr, w.data.ptr, out.data.ptr)
        hopper.grouped_rows(res, problem, ptrs, counts_d, epilogue=epilogue, gather=gather)
        outs.append(out)
    cupy.cuda.get_current_stream().synchronize()
    return outs


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("experts, k", [(16, 4), (1, 1)])
def test_gathered_gemm1_equals_copy_then_gemm(experts, k, fused, trans_b, dtype):
    """Every T of STEPS: bitwise equal outputs (the same products, a's rows
    only loaded differently), rows past the counts' sum still NaN in both,
    and the placed rows close to float64. Hidden 136: a K tail of 8."""
    import cupy

    rng = np.random.default_rng(experts * 10 + k + 2 * fused + trans_b)
    hidden, inter = 136, 128
    n = 2 * inter
    shape = (experts, n, hidden) if trans_b else (experts, hidden, n)
    w1, w1_64 = device_random(rng, shape, dtype, scale=hidden**-0.5)
    w64 = np.swapaxes(w1_64, 1, 2) if trans_b else w1_64  # [E, H, N]
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    epilogue, w, out_cols = None, w1, n
    if fused:
        codes = tuple((f"ACT_{name.upper()}", c) for name, c in K.ACTIVATIONS.items())
        epilogue = hopper.GatedEpilogue(K.ACTIVATIONS["silu"], codes, 0)
        w, out_cols = cg.pack_gate_up(w1, trans_b=trans_b), inter
    for step, tokens in enumerate(STEPS):
        x, x64 = device_random(rng, (tokens, hidden), dtype)
        ids = _routing(rng, step, tokens, experts, k)
        r2p, counts = _placement(ids, experts)
        if step % 5 == 4 and counts.sum() > 2:  # a missing row inside a group: zeros
            r2p[rng.integers(counts.sum())] = -1
        problem = (experts, tokens * k, n, hidden, trans_b, np.dtype(dtype))
        copy, gathered = _gemm1_both_ways(res, x, r2p, counts, w, k, problem, out_cols, epilogue)
        what = f"T={tokens} step {step}"
        assert bool((copy.view(cupy.uint16) == gathered.view(cupy.uint16)).all()), f"{what}: not bitwise"
        placed = int(counts.sum())
        assert bool((gathered[placed:].view(cupy.uint16) == NAN16).all()), (
            f"{what}: rows past the sum written"
        )
        a64 = np.where((r2p[:placed] >= 0)[:, None], x64[np.maximum(r2p[:placed], 0) // k], 0.0)
        z, start = np.zeros((placed, n)), 0
        for g, c in enumerate(counts):
            z[start : start + c] = a64[start : start + c] @ w64[g]
            start += c
        if fused:
            z = z[:, :inter] / (1.0 + np.exp(-z[:, :inter])) * z[:, inter:]
        check_close(gathered[:placed], z, 2e-2, what)


def test_gathered_gemm1_persistent_grid_of_one_cta(monkeypatch):
    """One CTA walks every tile: the 127 load threads follow thread 0's tiles
    through the mailboxes, across many tiles and ring phases."""
    import cupy

    monkeypatch.setattr(hopper, "GRID_LIMIT", 1)
    rng = np.random.default_rng(5)
    experts, k, hidden, n, tokens = 8, 2, 456, 512, 300  # 8 K stages (a tail of 8), 2 column tiles
    w, _ = device_random(rng, (experts, hidden, n), ml_dtypes.bfloat16, scale=hidden**-0.5)
    res = resources(cupy.cuda.Device().id, resolve_stream(None))
    x, _ = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
    ids = _routing(rng, 0, tokens, experts, k)
    r2p, counts = _placement(ids, experts)
    problem = (experts, tokens * k, n, hidden, False, np.dtype(ml_dtypes.bfloat16))
    copy, gathered = _gemm1_both_ways(res, x, r2p, counts, w, k, problem, n)
    assert bool((copy.view(cupy.uint16) == gathered.view(cupy.uint16)).all())


# (name, experts, top_k, hidden, inter, biases, dtype, trans_b, w1_layout)
LAYERS = [
    ("plain", 16, 4, 136, 128, True, ml_dtypes.bfloat16, False, "gate_up"),
    ("fused-nt", 16, 4, 136, 128, False, ml_dtypes.bfloat16, True, "gate_up_blocked"),
    ("fp16", 8, 2, 128, 128, False, np.float16, False, "gate_up"),
]


def _layer_weights(rng, experts, hidden, inter, biases, dtype, trans_b, layout):
    s1 = (experts, 2 * inter, hidden) if trans_b else (experts, hidden, 2 * inter)
    s2 = (experts, hidden, inter) if trans_b else (experts, inter, hidden)
    w1, w1_64 = device_random(rng, s1, dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, s2, dtype, scale=inter**-0.5)
    ref_w = (np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2)) if trans_b else (w1_64, w2_64)
    b1 = b2 = b1_64 = b2_64 = None
    if biases:
        b1, b1_64 = device_random(rng, (experts, 2 * inter), dtype, scale=0.1)
        b2, b2_64 = device_random(rng, (experts, hidden), dtype, scale=0.1)
    if layout == "gate_up_blocked":
        w1 = cg.pack_gate_up(w1, trans_b=trans_b)
    return (w1, w2, b1, b2), (*ref_w, b1_64, b2_64)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, dtype, trans_b, layout", LAYERS)
def test_step_gathering_in_gemm1_equals_the_copying_step(
    monkeypatch, name, experts, k, hidden, inter, biases, dtype, trans_b, layout, graphs
):
    """FixedCapacityMoE on the kernel, GATHER_IN_GEMM1 on and off (two layers,
    each called with the constant it is tested with, its own graphs too):
    bitwise equal outputs and dropped-pair counts at every T, close to float64;
    every buffer NaN-poisoned before each step."""
    import cupy

    rng = np.random.default_rng(experts + hidden)
    weights, weights64 = _layer_weights(rng, experts, hidden, inter, biases, dtype, trans_b, layout)
    w1, w2, b1, b2 = weights
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    opts = dict(b1=b1, b2=b2, trans_b=trans_b, w1_layout=layout, graphs=graphs, executor=executor)
    layers = {on: cg.FixedCapacityMoE(w1, w2, k, max_tokens=4096, **opts) for on in (False, True)}
    for step, tokens in enumerate(STEPS):
        x, x64 = device_random(rng, (tokens, hidden), dtype)
        ids = _routing(rng, step, tokens, experts, k)
        wts = (rng.random((tokens, k)) + 0.05).astype(np.float32)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(wts)
        outs = {}
        for on, layer in layers.items():
            monkeypatch.setattr(S, "GATHER_IN_GEMM1", on)
            poison(layer)
            layer._buffers.schedule.fill(0x3FFFFFFF)
            outs[on] = layer.forward(x, ids_d, w_d).copy()
        what = f"{name} T={tokens} step {step}"
        assert bool((outs[True].view(cupy.uint16) == outs[False].view(cupy.uint16)).all()), what
        assert layers[True].dropped_pairs(reset=True) == layers[False].dropped_pairs(reset=True), what
        if tokens <= MAX_T and step % 4 != 3:  # (ids out of range: the counts are checked above)
            safe = np.where((ids >= 0) & (ids < experts), ids, 0)
            w_ref = np.where((ids >= 0) & (ids < experts), wts, 0.0)
            act = "silu"
            expected = ref.moe_forward_ref(x64, safe, w_ref, *weights64, activation=act)
            check_close(outs[True], expected, 2e-2, what)


def test_misaligned_x_keeps_the_copy(monkeypatch):
    """An x 2 bytes past a 16-byte boundary: the step copies (gather_rows) even
    with GATHER_IN_GEMM1 on, and gives the aligned x's bits."""
    import cupy

    monkeypatch.setattr(S, "GATHER_IN_GEMM1", True)
    rng = np.random.default_rng(9)
    weights, _ = _layer_weights(rng, 16, 128, 128, False, ml_dtypes.bfloat16, False, "gate_up")
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    layer = cg.FixedCapacityMoE(weights[0], weights[1], 4, max_tokens=64, graphs=False, executor=executor)
    x, _ = device_random(rng, (33, 128), ml_dtypes.bfloat16)
    buf = cupy.zeros(33 * 128 + 1, dtype=x.dtype)
    shifted = buf[1:].reshape(33, 128)
    shifted[...] = x
    assert shifted.data.ptr % 16 == 2 and not S.gather_in_gemm1(shifted) and S.gather_in_gemm1(x)
    ids = cupy.asarray(_routing(rng, 0, 33, 16, 4))
    wts = cupy.ones((33, 4), dtype=cupy.float32)
    want = layer.forward(x, ids, wts).copy()
    got = layer.forward(shifted, ids, wts)
    assert bool((got.view(cupy.uint16) == want.view(cupy.uint16)).all())
