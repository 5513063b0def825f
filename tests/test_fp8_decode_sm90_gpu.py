"""FP8 experts in the fixed-capacity layer on the FP8 Hopper kernel (SM 9.0):
``FixedCapacityMoE`` and ``moe_forward(fixed_capacity=True)`` with checkpoint-
layout FP8 weights, against float64 computed from the DEQUANTIZED weights and
the activations quantized as the step quantizes them; every T from 1 to 70
rising and falling, eager and in the layer's own graphs; empty experts, one
expert, ids outside [0, E); every buffer NaN-poisoned before each step; bitwise
repeatable; no weight ever dequantized; and the difference to the bf16 layer
on the same (dequantized) weights, printed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close
from test_fixed_capacity_gpu import poison, step_routing

import cublas_grouped as cg
from cublas_grouped.testing import rel_error
from cublas_grouped.testing_fp8 import dequantize_ref, quantize_ref

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
TOL = 3e-2  # the bound for the FP8 layer against its float64 model
BF16_DIFF = 0.1  # against the bf16 layer: e4m3 activations, ~2-4% (printed)
MAX_TOKENS = 70
STEPS = [MAX_TOKENS, *range(1, MAX_TOKENS), *range(MAX_TOKENS - 1, 0, -1)]
# (name, experts, top_k, hidden, inter, biases): H and I of the third are not
# multiples of 128 (a partial last scale block per row).
LAYERS = [
    ("many-small", 64, 6, 256, 128, True),
    ("few-large", 8, 2, 384, 256, False),
    ("k-tails", 16, 4, 272, 144, False),
]


@pytest.fixture(autouse=True)
def _hopper_only(monkeypatch):
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the FP8 kernel runs on SM 9.0 GPUs only")

    def refuse(self, *args, **kwargs):
        raise AssertionError("an FP8 weight was dequantized on the FP8 kernel step")

    monkeypatch.setattr(cg.FP8ExpertWeights, "dequantize", refuse)


def _q(v64):
    """float64 of rows after quantize_rows_fp8 (one e4m3 scale per row per 128 columns)."""
    return dequantize_ref(*quantize_ref(v64.astype(np.float32), 1, 128), 1, 128).astype(np.float64)


def _bf16(v):
    return v.astype(BF16).astype(np.float64)


def fp8_step_ref(x64, ids, w, d1, d2, b1=None, b2=None):
    """float64 of the silu-gated layer as the FP8 step computes it: the rows and
    the activation quantized per row, the first GEMM's output and the
    activation rounded to bf16 before that; ``d1`` [E, H, 2I], ``d2`` [E, I, H]
    the dequantized weights. Pairs with an id outside [0, E) add nothing."""
    tokens, k = ids.shape
    inter = d2.shape[1]
    xq = _q(x64)
    w = np.ones((tokens, k)) if w is None else w.astype(np.float64)
    out = np.zeros((tokens, d2.shape[2]))
    for e in np.unique(ids):
        if not 0 <= e < d1.shape[0]:
            continue
        t, j = np.nonzero(ids == e)
        h = _bf16(xq[t] @ d1[e])
        if b1 is not None:
            h = h + b1[e]
        g, u = h[:, :inter], h[:, inter:]
        act = _q(_bf16(g / (1.0 + np.exp(-g)) * u))
        y = act @ d2[e]
        if b2 is not None:
            y = y + b2[e]
        np.add.at(out, t, w[t, j][:, None] * y)
    return out


def _layer(rng, experts, hidden, inter, biases):
    """FP8 (w1, w2) in the checkpoint layout, the bf16 arrays of their dequantized
    values ([E, N, K]), the float64 reference operands ([E, K, N]) and biases."""
    import cupy

    w1 = cupy.asarray((rng.standard_normal((experts, 2 * inter, hidden)) * hidden**-0.5).astype(BF16))
    w2 = cupy.asarray((rng.standard_normal((experts, hidden, inter)) * inter**-0.5).astype(BF16))
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    dense = []
    for q in (q1, q2):  # the bf16 dequantization by the NumPy twin (dequantize is refused here)
        d = dequantize_ref(q.values.get(), q.scales.get(), 128, 128).astype(BF16)
        dense.append(cupy.asarray(d))
    d64 = tuple(np.swapaxes(d.get().astype(np.float64), 1, 2) for d in dense)
    b = (None, None)
    if biases:
        b1 = (rng.standard_normal((experts, 2 * inter)) * 0.1).astype(BF16)
        b2 = (rng.standard_normal((experts, hidden)) * 0.1).astype(BF16)
        b = (cupy.asarray(b1), cupy.asarray(b2))
        d64 = (*d64, b1.astype(np.float64), b2.astype(np.float64))
    else:
        d64 = (*d64, None, None)
    return (q1, q2), dense, d64, b


def _poison(layer):
    poison(layer)
    layer._buffers.schedule.fill(0x3FFFFFFF)  # offsets far out of range, a counter far past every tile
    rows8 = layer._fp8_rows
    rows8.x_q.fill(0x7F)  # e4m3 NaN
    rows8.act_q.fill(0x7F)
    rows8.x_s.fill(np.nan)
    rows8.act_s.fill(np.nan)


def _kernel_executor():
    return cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))


def _bits_equal(a, b) -> bool:
    import cupy

    return bool((a.view(cupy.uint16) == b.view(cupy.uint16)).all())


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases", LAYERS)
@pytest.mark.parametrize("graphs", [False, True])
def test_every_step_size_against_float64_and_the_bf16_layer(name, experts, k, hidden, inter, biases, graphs):
    import cupy

    rng = np.random.default_rng(experts + hidden + graphs)
    (q1, q2), dense, ref_ops, (b1, b2) = _layer(rng, experts, hidden, inter, biases)
    opts = {"b1": b1, "b2": b2, "trans_b": True, "graphs": graphs}
    layer = cg.FixedCapacityMoE(q1, q2, k, max_tokens=MAX_TOKENS, **opts)  # AUTO: few experts too
    bf16 = cg.FixedCapacityMoE(*dense, k, max_tokens=MAX_TOKENS, executor=_kernel_executor(), **opts)
    assert layer.fp8_kernel and layer.fp8_unsupported is None
    assert layer.weight_nbytes == q1.nbytes + q2.nbytes  # no dense copy
    assert bf16.weight_nbytes == 2 * (q1.values.nbytes + q2.values.nbytes)
    assert layer.weight_nbytes < 0.51 * bf16.weight_nbytes  # e4m3 bytes and one float per 128 x 128
    worst = worst_bf16 = 0.0
    for step, tokens in enumerate(STEPS):
        x = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(BF16))
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids.astype(np.int32)), cupy.asarray(w)
        _poison(layer)
        out = layer.forward(x, ids_d, w_d).copy()
        expected = fp8_step_ref(x.get().astype(np.float64), ids, w, *ref_ops)
        worst = max(worst, check_close(out, expected, TOL, f"{name} graphs={graphs} T={tokens} step {step}"))
        again = layer.forward(x, ids_d, w_d)
        assert _bits_equal(again, out), f"{name} T={tokens}: not bitwise repeatable"
        other = cupy.asnumpy(bf16.forward(x, ids_d, w_d)).astype(np.float64)
        diff = rel_error(cupy.asnumpy(out).astype(np.float64), other)
        assert diff <= BF16_DIFF, f"{name} T={tokens}: {diff:.3g} from the bf16 layer"
        worst_bf16 = max(worst_bf16, diff)
    assert layer.dropped_pairs() == 0
    print(
        f"\nFP8 fixed-capacity {name} graphs={graphs}: worst vs float64 model {worst:.3g}, "
        f"worst vs the bf16 layer {worst_bf16:.3g}; weights {layer.weight_nbytes / 2**20:.2f} MiB "
        f"(bf16 layer {bf16.weight_nbytes / 2**20:.2f} MiB), buffers {layer.nbytes / 2**20:.2f} MiB"
    )


@pytest.mark.parametrize("case", ["one expert", "two of 64", "ids outside", "k=1 one token"])
def test_empty_experts_one_expert_and_dropped_pairs(case):
    import cupy

    rng = np.random.default_rng(len(case))
    experts, k, hidden, inter, tokens = 64, 4, 256, 128, 33
    (q1, q2), _, ref_ops, _ = _layer(rng, experts, hidden, inter, False)
    if case == "k=1 one token":
        k, tokens = 1, 1
    layer = cg.FixedCapacityMoE(q1, q2, k, max_tokens=40, trans_b=True, graphs=False)
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if case == "one expert":
        ids[:] = 5  # every pair on one expert (repeats within a token share its row)
    elif case == "two of 64":
        ids = np.where(rng.random(ids.shape) < 0.5, 7, 40).astype(np.int32)
    elif case == "ids outside":
        ids[::3, 0] = experts + 2
        ids[1::5, 1] = -1
    w = (rng.random((tokens, k)) + 0.05).astype(np.float32)
    x = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(BF16))
    _poison(layer)
    out = layer.forward(x, cupy.asarray(ids), cupy.asarray(w))
    check_close(out, fp8_step_ref(x.get().astype(np.float64), ids, w, *ref_ops), TOL, case)
    dropped = int(((ids < 0) | (ids >= experts)).sum())
    assert layer.dropped_pairs() == dropped


def test_moe_forward_fixed_capacity_matches_the_layer_and_is_captured():
    """moe_forward(fixed_capacity=True) with FP8 weights runs the same step (bit
    for bit the layer's), and a caller's CUDA graph of it replays with new
    tokens and routing (the dequantizing path refused capture)."""
    import cupy

    rng = np.random.default_rng(77)
    experts, k, hidden, inter = 32, 4, 256, 256
    (q1, q2), _, ref_ops, _ = _layer(rng, experts, hidden, inter, False)
    layer = cg.FixedCapacityMoE(q1, q2, k, max_tokens=64, trans_b=True, graphs=False)
    stream = cupy.cuda.Stream(non_blocking=True)
    for step, tokens in enumerate((1, 16, 64, 7, 33, 2)):
        x = cupy.asarray(rng.standard_normal((tokens, hidden)).astype(BF16))
        ids, w = step_routing(rng, step, tokens, experts, k)  # random, worst case, crowded
        ids_d, w_d = cupy.asarray(ids.astype(np.int32)), cupy.asarray(w)
        counter = cupy.zeros(1, dtype=cupy.uint64)
        got = cg.moe_forward(x, ids_d, w_d, q1, q2, trans_b=True, fixed_capacity=True, dropped_pairs=counter)
        check_close(got, fp8_step_ref(x.get().astype(np.float64), ids, w, *ref_ops), TOL, f"T={tokens}")
        assert _bits_equal(got, layer.forward(x, ids_d, w_d)), f"T={tokens}: not the layer's bits"
        assert int(counter.get()[0]) == 0
    tokens = 16
    # The graph's inputs made on its stream: a fill on the null stream could land after a refill.
    with stream:
        x = cupy.zeros((tokens, hidden), dtype=BF16)
        ids_d = cupy.zeros((tokens, k), dtype=cupy.int32)
        w_d = cupy.ones((tokens, k), dtype=cupy.float32)
        cg.moe_forward(x, ids_d, w_d, q1, q2, trans_b=True, fixed_capacity=True)  # eager first
        stream.begin_capture()
        out = cg.moe_forward(x, ids_d, w_d, q1, q2, trans_b=True, fixed_capacity=True)
        graph = stream.end_capture()
    for step in range(3):
        ids, w = step_routing(rng, step, tokens, experts, k)
        host_x = rng.standard_normal((tokens, hidden)).astype(BF16)
        with stream:
            x.set(host_x, stream=stream)
            ids_d.set(ids.astype(np.int32), stream=stream)
            w_d.set(w, stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
        stream.synchronize()
        expected = fp8_step_ref(host_x.astype(np.float64), ids, w, *ref_ops)
        check_close(out, expected, TOL, f"replay {step}")


def test_float16_tokens_keep_the_dequantizing_fallback(monkeypatch):
    """The FP8 kernel takes bfloat16 tokens: a float16 layer keeps a dense copy
    (refilled per step) and says why."""
    import cupy

    monkeypatch.undo()  # this path dequantizes
    rng = np.random.default_rng(5)
    (q1, q2), _, ref_ops, _ = _layer(rng, 8, 128, 128, False)
    layer = cg.FixedCapacityMoE(q1, q2, 2, max_tokens=8, trans_b=True, dtype=np.float16, graphs=False)
    assert not layer.fp8_kernel and "bfloat16 tokens" in layer.fp8_unsupported
    assert layer.weight_nbytes == 2 * (q1.values.nbytes + q2.values.nbytes)  # the float16 copy
    x = cupy.asarray(rng.standard_normal((8, 128)).astype(np.float16))
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(8)]).astype(np.int32)
    out = layer.forward(x, cupy.asarray(ids), None)
    from cublas_grouped.testing import moe_forward_ref

    check_close(out, moe_forward_ref(x.get().astype(np.float64), ids, None, *ref_ops[:2]), 2e-2, "fp16")
