"""Fixed-capacity steps on our Hopper kernel (SM 9.0, bfloat16/float16): every
token count rising and falling, eager, graph-captured and through
``moe_forward(fixed_capacity=True)``, against float64 and against the chunked
cuBLAS step, with every buffer poisoned before each step (the kernel's own
schedule buffer too)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random, wait_for_current_stream
from test_fixed_capacity_gpu import MAX_TOKENS, STEPS, poison, step_routing

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.moe.fixed_capacity import fixed_capacity_backend

pytestmark = pytest.mark.gpu

TOL = 2e-2  # 16-bit inputs and intermediates against float64
# (name, experts, top_k, hidden, inter, biases, dtype, trans_b)
LAYERS = [
    ("few-large", 8, 2, 256, 128, False, ml_dtypes.bfloat16, False),
    ("many-small", 64, 6, 136, 72, True, ml_dtypes.bfloat16, True),
    ("many-small-fp16", 32, 4, 128, 64, False, np.float16, False),
]


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy

    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the fixed-capacity kernel path runs on SM 9.0 GPUs only")


def _layer(rng, experts, hidden, inter, biases, dtype, trans_b):
    s1 = (experts, 2 * inter, hidden) if trans_b else (experts, hidden, 2 * inter)
    s2 = (experts, hidden, inter) if trans_b else (experts, inter, hidden)
    w1, w1_64 = device_random(rng, s1, dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, s2, dtype, scale=inter**-0.5)
    ref_w = (np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2)) if trans_b else (w1_64, w2_64)
    if not biases:
        return (w1, w2, None, None), (*ref_w, None, None)
    b1, b1_64 = device_random(rng, (experts, 2 * inter), dtype, scale=0.1)
    b2, b2_64 = device_random(rng, (experts, hidden), dtype, scale=0.1)
    return (w1, w2, b1, b2), (*ref_w, b1_64, b2_64)


def _poison_all(layer):
    poison(layer)
    layer._buffers.schedule.fill(0x3FFFFFFF)  # offsets far out of range, a counter far past every tile


def _kernel_executor():
    """SM90_GROUPED: the kernel path for every layer (AUTO keeps few-expert decode chunked)."""
    return cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))


def _chunked(w1, w2, k, b1, b2, trans_b):
    executor = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="cublas_grouped"))
    return cg.FixedCapacityMoE(
        w1, w2, k, max_tokens=MAX_TOKENS, b1=b1, b2=b2, trans_b=trans_b, executor=executor
    )


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, dtype, trans_b", LAYERS)
def test_eager_every_step_size(name, experts, k, hidden, inter, biases, dtype, trans_b):
    import cupy

    rng = np.random.default_rng(experts + 40)
    weights, weights64 = _layer(rng, experts, hidden, inter, biases, dtype, trans_b)
    w1, w2, b1, b2 = weights
    layer = cg.FixedCapacityMoE(
        w1,
        w2,
        k,
        max_tokens=MAX_TOKENS,
        b1=b1,
        b2=b2,
        trans_b=trans_b,
        graphs=False,
        executor=_kernel_executor(),
    )
    chunked = _chunked(w1, w2, k, b1, b2, trans_b)
    sm = cg.device_info().sm
    assert fixed_capacity_backend(sm, layer.executor, layer.shape, layer.w1, layer.w2, 1) == "sm90_grouped"
    assert fixed_capacity_backend(sm, chunked.executor, chunked.shape, w1, w2, 1) == "chunked_batched"
    for step, tokens in enumerate(STEPS):
        x, x64 = device_random(rng, (tokens, hidden), dtype)
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        _poison_all(layer)
        out = layer.forward(x, ids_d, w_d).copy()
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        check_close(out, expected, TOL, f"{name} eager T={tokens} step {step}")
        other = chunked.forward(x, ids_d, w_d)
        check_close(out, cupy.asnumpy(other).astype(np.float64), TOL, f"{name} vs chunked T={tokens}")
        again = layer.forward(x, ids_d, w_d)
        assert bool((again.view(cupy.uint16) == out.view(cupy.uint16)).all()), (
            f"{name} T={tokens}: not bitwise"
        )
    assert layer.dropped_pairs() == 0


@pytest.mark.parametrize("name, experts, k, hidden, inter, biases, dtype, trans_b", LAYERS[:2])
def test_graphs_every_step_size(name, experts, k, hidden, inter, biases, dtype, trans_b):
    """The layer's own graphs (one per T, replayed with new tokens and routing)."""
    import cupy

    rng = np.random.default_rng(experts + 41)
    weights, weights64 = _layer(rng, experts, hidden, inter, biases, dtype, trans_b)
    w1, w2, b1, b2 = weights
    layer = cg.FixedCapacityMoE(
        w1, w2, k, max_tokens=MAX_TOKENS, b1=b1, b2=b2, trans_b=trans_b, executor=_kernel_executor()
    )
    for step, tokens in enumerate(STEPS):
        x, x64 = device_random(rng, (tokens, hidden), dtype)
        ids, w = step_routing(rng, step, tokens, experts, k)
        _poison_all(layer)
        out = layer.forward(x, cupy.asarray(ids), cupy.asarray(w))
        expected = ref.moe_forward_ref(x64, ids, w, *weights64)
        check_close(out, expected, TOL, f"{name} graph T={tokens} step {step}")


def test_user_capture_of_two_layers_with_different_expert_counts():
    """Two layers (E = 8 and E = 64) captured in one graph of the caller's, then
    replayed with new routing: each step keeps its own schedule buffer."""
    import cupy

    rng = np.random.default_rng(43)
    stream = cupy.cuda.Stream(non_blocking=True)
    layers, refs = [], []
    for experts in (8, 64):
        weights, weights64 = _layer(rng, experts, 128, 64, False, ml_dtypes.bfloat16, False)
        wait_for_current_stream(stream)  # the weights were made on the null stream
        layers.append(
            cg.FixedCapacityMoE(
                weights[0], weights[1], 2, max_tokens=16, graphs=False, executor=_kernel_executor()
            )
        )
        refs.append(weights64)
    tokens = 16
    with stream:
        x = cupy.zeros((tokens, 128), dtype=ml_dtypes.bfloat16)
        ids = [cupy.zeros((tokens, 2), dtype=cupy.int32) for _ in layers]
        wts = cupy.ones((tokens, 2), dtype=cupy.float32)
        for layer, i in zip(layers, ids):
            i[:, 1] = 1
            layer.forward(x, i, wts)  # eager first
        stream.begin_capture()
        outs = [layer.forward(x, i, wts) for layer, i in zip(layers, ids)]
        graph = stream.end_capture()
    for trial in range(3):
        with stream:  # x_new copied in on the stream that reads it (not the null stream)
            x_new, x64 = device_random(rng, (tokens, 128), ml_dtypes.bfloat16)
            routings = [step_routing(rng, trial, tokens, e, 2) for e in (8, 64)]
            x[...] = x_new
            for i, (r, _) in zip(ids, routings):
                i[...] = cupy.asarray(r)
            wts[...] = cupy.asarray(routings[0][1])
            graph.launch(stream)
        stream.synchronize()
        for out, (r, _), weights64 in zip(outs, routings, refs):
            expected = ref.moe_forward_ref(x64, r, routings[0][1], *weights64)
            check_close(out, expected, TOL, f"captured pair, trial {trial}")


@pytest.mark.parametrize("trans_b", [False, True])
def test_repeated_ids_on_the_kernel_step(trans_b):
    """A token naming one expert more than once, on the kernel step: its
    weights are added into the first choice's row (the GEMM 2 epilogue weighs
    it once) and the plain-sum combine must not add that row again for the
    repeats. Eager, graph replay and moe_forward's default path, against
    float64 (which sums every choice on its own)."""
    import cupy

    rng = np.random.default_rng(51 + trans_b)
    experts, k, hidden, inter, tokens = 16, 4, 136, 64, 48
    weights, weights64 = _layer(rng, experts, hidden, inter, True, ml_dtypes.bfloat16, trans_b)
    w1, w2, b1, b2 = weights
    kw = dict(b1=b1, b2=b2, trans_b=trans_b, executor=_kernel_executor())
    eager = cg.FixedCapacityMoE(w1, w2, k, max_tokens=tokens, graphs=False, **kw)
    graphed = cg.FixedCapacityMoE(w1, w2, k, max_tokens=tokens, **kw)
    crowded = np.zeros((tokens, k), dtype=np.int32)  # one expert named k times by every token
    mixed = np.stack([rng.choice(experts, k) for _ in range(tokens)]).astype(np.int32)
    pairs = np.stack([rng.choice(experts, 2, replace=False)[[0, 1, 0, 1]] for _ in range(tokens)])
    for name, ids in (("crowded", crowded), ("mixed", mixed), ("pairs", pairs.astype(np.int32))):
        assert any(len(set(row)) < k for row in ids.tolist())
        for t in (1, 7, tokens):
            x, x64 = device_random(rng, (t, hidden), ml_dtypes.bfloat16)
            w = rng.random((t, k)).astype(np.float32) + 0.05
            expected = ref.moe_forward_ref(x64, ids[:t], w, *weights64)
            args = (x, cupy.asarray(ids[:t]), cupy.asarray(w))
            for layer in (eager, graphed):
                _poison_all(layer)
                check_close(layer.forward(*args), expected, TOL, f"{name} T={t} repeats")
            check_close(
                cg.moe_forward(*args, w1, w2, b1=b1, b2=b2, trans_b=trans_b),
                expected,
                TOL,
                f"{name} T={t} moe_forward repeats",
            )
    assert eager.dropped_pairs() == 0 and graphed.dropped_pairs() == 0


def test_moe_forward_fixed_capacity_runs_the_kernel_path():
    import cupy

    rng = np.random.default_rng(44)
    weights, weights64 = _layer(rng, 64, 128, 64, True, ml_dtypes.bfloat16, False)
    stream = cupy.cuda.Stream(non_blocking=True)
    for step, tokens in enumerate([1, 2, 17, 64, 3, 33]):
        x, x64 = device_random(rng, (tokens, 128), ml_dtypes.bfloat16)
        ids, w = step_routing(rng, step, tokens, 64, 6)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        cupy.cuda.Device().synchronize()
        w1, w2, b1, b2 = weights
        out = cg.moe_forward(x, ids_d, w_d, w1, w2, b1=b1, b2=b2, fixed_capacity=True, stream=stream)
        stream.synchronize()
        check_close(out, ref.moe_forward_ref(x64, ids, w, *weights64), TOL, f"moe_forward T={tokens}")


@pytest.mark.parametrize(
    "act, biases, trans_b", [("silu", True, False), ("gelu", False, True), ("relu", True, True)]
)
@pytest.mark.parametrize("epilogue", ["at every size", "past 16 rows per expert"])
def test_gate_up_blocked_every_path(monkeypatch, act, biases, trans_b, epilogue):
    """w1 packed by pack_gate_up (w1_layout="gate_up_blocked"): the kernel step
    with the activation in GEMM 1's epilogue (the default rule, at every
    size), or, with the rule set to 16 rows per expert, GEMM 1 then the
    activation kernel reading the packed columns at these decode sizes; the
    chunked step, moe_forward's fixed-capacity and synchronizing paths, all
    against float64 of the plain weights. Without the epilogue the kernel step
    equals, bit for bit, the same step on the plain weights (the same
    products, columns moved)."""
    import cupy

    from cublas_grouped.moe import kernel_step

    forced = epilogue == "at every size"
    assert kernel_step.GATED_EPILOGUE_MIN_ROWS_PER_GROUP == 0
    if not forced:
        monkeypatch.setattr(kernel_step, "GATED_EPILOGUE_MIN_ROWS_PER_GROUP", 16)
    rng = np.random.default_rng(50)
    experts, k, hidden, inter = 32, 4, 136, 128
    weights, weights64 = _layer(rng, experts, hidden, inter, biases, ml_dtypes.bfloat16, trans_b)
    w1, w2, b1, b2 = weights
    packed = cg.pack_gate_up(w1, trans_b=trans_b)
    opts = {"b1": b1, "b2": b2, "trans_b": trans_b, "activation": act, "w1_layout": "gate_up_blocked"}
    kernel = cg.FixedCapacityMoE(packed, w2, k, max_tokens=MAX_TOKENS, executor=_kernel_executor(), **opts)
    chunked = cg.FixedCapacityMoE(
        packed, w2, k, max_tokens=MAX_TOKENS, executor=_chunked(w1, w2, k, b1, b2, trans_b).executor, **opts
    )
    plain = cg.FixedCapacityMoE(
        w1, w2, k, max_tokens=MAX_TOKENS, executor=_kernel_executor(), **{**opts, "w1_layout": "gate_up"}
    )
    for step, tokens in enumerate([1, 7, 16, 64, 33]):
        assert kernel_step.gated_epilogue(kernel.shape, tokens * k) == forced
        x, x64 = device_random(rng, (tokens, hidden), ml_dtypes.bfloat16)
        ids, w = step_routing(rng, step, tokens, experts, k)
        ids_d, w_d = cupy.asarray(ids), cupy.asarray(w)
        expected = ref.moe_forward_ref(x64, ids, w, *weights64, activation=act)
        _poison_all(kernel)
        got = kernel.forward(x, ids_d, w_d).copy()
        check_close(got, expected, TOL, f"kernel step T={tokens}")
        if not forced:
            same = plain.forward(x, ids_d, w_d)
            assert bool((same.view(cupy.uint16) == got.view(cupy.uint16)).all()), f"T={tokens}: not bitwise"
        check_close(chunked.forward(x, ids_d, w_d), expected, TOL, f"chunked step T={tokens}")
        got = cg.moe_forward(x, ids_d, w_d, packed, w2, fixed_capacity=True, **opts)
        check_close(got, expected, TOL, f"moe_forward fixed_capacity T={tokens}")
        got = cg.moe_forward(x, ids_d, w_d, packed, w2, **opts)
        check_close(got, expected, TOL, f"moe_forward synchronizing T={tokens}")
