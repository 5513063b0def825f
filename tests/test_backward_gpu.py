"""The MoE layer's backward on the GPU against the float64 references
(``moe_backward_ref``, ``route_backward_ref``), finite differences, exact zeros
for experts without tokens, and bitwise repeatability."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

ALGORITHMS = ["cublas_grouped", "sequential", "chunked_batched", "padded_strided", "auto"]
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
NAMES = ("dx", "dw1", "dw2", "db1", "db2", "d_topk_weights")


def make_case(
    rng, tokens, experts, k, hidden, inter, dtype, *, gated=True, bias=True, unused=0, repeat=False
):
    """Device arrays and their float64 twins: x, ids, weights, w1, w2, b1, b2 and dy.

    Experts ``[0, unused)`` get no token; with ``repeat`` every third token
    names its first expert twice."""
    import cupy

    width = 2 * inter if gated else inter
    allowed = np.arange(unused, experts)
    ids = np.stack([rng.choice(allowed, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if repeat and k > 1:
        ids[::3, 1] = ids[::3, 0]
    w = (rng.random((tokens, k)) + 0.05).astype(np.float32)
    dev, host = {"topk_ids": cupy.asarray(ids), "topk_weights": cupy.asarray(w)}, {"topk_ids": ids}
    host["topk_weights"] = w.astype(np.float64)
    shapes = {
        "x": ((tokens, hidden), 1.0),
        "w1": ((experts, hidden, width), hidden**-0.5),
        "w2": ((experts, inter, hidden), inter**-0.5),
        "b1": ((experts, width), 0.3),
        "b2": ((experts, hidden), 0.3),
        "dy": ((tokens, hidden), 1.0),
    }
    for name, (shape, scale) in shapes.items():
        if name in ("b1", "b2") and not bias:
            dev[name] = host[name] = None
            continue
        dev[name], host[name] = device_random(rng, shape, dtype, scale)
    return dev, host


def layer_args(d):
    return (d["x"], d["topk_ids"], d["topk_weights"], d["w1"], d["w2"])


def forward_backward(dev, *, recompute=False, **opts):
    out, ctx = cg.moe_forward(
        *layer_args(dev), b1=dev["b1"], b2=dev["b2"], return_context=True, recompute=recompute, **opts
    )
    return out, cg.moe_backward(ctx, dev["dy"])


def reference(host, **opts):
    args = {k: host[k] for k in ("x", "topk_ids", "topk_weights", "w1", "w2", "dy", "b1", "b2")}
    return ref.moe_backward_ref(**args, **opts)


def to_host(a) -> np.ndarray:
    import cupy

    return cupy.asnumpy(a).astype(np.float64)


def same_bits(a, b) -> bool:
    import cupy

    return a.shape == b.shape and cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


def check_all(grads, expected, tol, what):
    for name in NAMES:
        got, want = getattr(grads, name), expected[name]
        if want is None:
            assert got is None, f"{what}: {name} should be None"
            continue
        check_close(got, want, tol, f"{what} {name}")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_every_gradient_matches_float64(algorithm, dtype):
    rng = np.random.default_rng(11)
    dev, host = make_case(rng, 300, 32, 4, 128, 96, dtype, unused=5)
    out, grads = forward_backward(dev, algorithm=algorithm)
    name = np.dtype(dtype).name
    check_close(out, ref.moe_forward_ref(*layer_args(host), host["b1"], host["b2"]), TOL[name], "forward")
    check_all(grads, reference(host), TOL[name], f"{algorithm} {name}")


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_activations_gating_and_biases(activation, gated, bias, dtype):
    rng = np.random.default_rng(len(activation) + 2 * gated + bias)
    # inter = 44: rows of 88 bytes in bfloat16, so the kernels take their scalar path too.
    for inter in (48, 44):
        dev, host = make_case(rng, 64, 8, 2, 64, inter, dtype, gated=gated, bias=bias)
        opts = {"activation": activation, "gated": gated}
        _, ctx = cg.moe_forward(*layer_args(dev), b1=dev["b1"], b2=dev["b2"], return_context=True, **opts)
        grads = cg.moe_backward(ctx, dev["dy"])
        expected = reference(host, **opts)
        if activation == "relu" and dtype is not np.float32:
            expected.update(relu_kinks_as_the_gpu_saw_them(ctx, host, gated, inter))
        check_all(grads, expected, TOL[np.dtype(dtype).name], f"{activation} gated={gated} I={inter}")


def relu_kinks_as_the_gpu_saw_them(ctx, host, gated, inter):
    """dx, dw1 and db1 of a ReLU layer in float64, with ReLU's on/off decided by
    the GPU's own bfloat16 first-GEMM output (``ctx.h``).

    Rounding h to bfloat16 moves z by up to 2**-9 |z|, which turns ReLU's
    derivative from 1 to 0 (or back) for the few z that close to 0; each such
    element is wrong by its whole size, and a float64 emulation of the same
    roundings puts dx and dw1 up to 5% off the exact gradient (smooth
    activations: 0.4%). The rest of the maths is exact here."""
    import cupy

    ids = host["topk_ids"]
    tokens, k = ids.shape
    pairs, expert, token = tokens * k, ids.reshape(-1), np.arange(tokens * k) // k
    r2p = cupy.asnumpy(ctx.plan.row_to_pair)
    h = to_host(ctx.h)
    bias = 0.0 if host["b1"] is None else host["b1"][expert]
    z_gpu = np.zeros((pairs, h.shape[1]))
    z_gpu[r2p[r2p >= 0]] = h[r2p >= 0]
    on = (z_gpu + bias)[:, :inter] > 0
    x, w1 = host["x"][token], host["w1"][expert]
    z = np.einsum("ph,phw->pw", x, w1) + bias
    v = np.where(on, z[:, :inter], 0.0)
    da = host["topk_weights"].reshape(-1)[:, None] * np.einsum(
        "ph,pih->pi", host["dy"][token], host["w2"][expert]
    )
    dz = da * (z[:, inter:] if gated else 1.0) * on
    if gated:
        dz = np.concatenate([dz, da * v], axis=1)
    dw1, dx = np.zeros_like(host["w1"]), np.zeros_like(host["x"])
    np.add.at(dw1, expert, np.einsum("ph,pw->phw", x, dz))
    np.add.at(dx, token, np.einsum("pw,phw->ph", dz, w1))
    out = {"dx": dx, "dw1": dw1}
    if host["b1"] is not None:
        out["db1"] = np.zeros_like(host["b1"])
        np.add.at(out["db1"], expert, dz)
    return out


def test_recompute_gives_the_same_bits_and_keeps_less():
    rng = np.random.default_rng(3)
    dev, _ = make_case(rng, 200, 16, 2, 128, 64, ml_dtypes.bfloat16)
    opts = {"b1": dev["b1"], "b2": dev["b2"], "return_context": True, "algorithm": "cublas_grouped"}
    _, saved_ctx = cg.moe_forward(*layer_args(dev), **opts)
    _, lean_ctx = cg.moe_forward(*layer_args(dev), **opts, recompute=True)
    assert lean_ctx.recompute and not saved_ctx.recompute
    assert saved_ctx.saved_bytes - lean_ctx.saved_bytes == 200 * 2 * 128 * 2  # h: [T*k, 2I] bfloat16
    a, b = cg.moe_backward(saved_ctx, dev["dy"]), cg.moe_backward(lean_ctx, dev["dy"])
    for name in NAMES:
        assert same_bits(getattr(a, name), getattr(b, name)), name


def test_finite_differences_in_float32():
    """Directional derivatives of sum(dy * out), by central differences on the
    GPU's own float32 forward, against the gradients' dot with the direction."""
    import cupy

    rng = np.random.default_rng(5)
    dev, _ = make_case(rng, 24, 6, 2, 32, 16, np.float32, unused=1)
    _, grads = forward_backward(dev, activation="gelu")
    dy = cupy.asnumpy(dev["dy"]).astype(np.float64)
    eps = 1e-2
    for name, grad in (("x", "dx"), ("w1", "dw1"), ("w2", "dw2"), ("b1", "db1"), ("b2", "db2")):
        base = dev[name].copy()
        direction = cupy.asarray(rng.standard_normal(base.shape).astype(np.float32))
        losses = []
        for sign in (1.0, -1.0):
            dev[name][...] = base + sign * eps * direction
            out = cg.moe_forward(*layer_args(dev), b1=dev["b1"], b2=dev["b2"], activation="gelu")
            losses.append(float(np.sum(dy * cupy.asnumpy(out))))
        dev[name][...] = base
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(cupy.sum(getattr(grads, grad).astype(cupy.float64) * direction))
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (name, numeric, analytic)
    # The routing weights: one pair at a time.
    w = dev["topk_weights"]
    for t, j in [(0, 0), (7, 1), (23, 0)]:
        keep = float(w[t, j])
        losses = []
        for value in (keep + eps, keep - eps):
            w[t, j] = value
            out = cg.moe_forward(*layer_args(dev), b1=dev["b1"], b2=dev["b2"], activation="gelu")
            losses.append(float(np.sum(dy * cupy.asnumpy(out))))
        w[t, j] = keep
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(grads.d_topk_weights[t, j])
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (t, j, numeric, analytic)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_experts_without_tokens_get_exact_zeros(algorithm):
    rng = np.random.default_rng(6)
    dev, host = make_case(rng, 100, 16, 2, 64, 32, ml_dtypes.bfloat16, unused=6)
    _, grads = forward_backward(dev, algorithm=algorithm)
    for name in ("dw1", "dw2", "db1", "db2"):
        grad = to_host(getattr(grads, name)).reshape(16, -1)
        assert (grad[:6] == 0).all(), name
        assert (grad[6:] != 0).any(axis=1).all(), name
    check_all(grads, reference(host), 2e-2, algorithm)


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 1), (1, 8, 8), (3, 4, 4), (257, 16, 1), (64, 8, 8)])
def test_k_one_and_k_equal_to_experts(tokens, experts, k):
    rng = np.random.default_rng(tokens * 31 + k)
    dev, host = make_case(rng, tokens, experts, k, 64, 32, np.float32)
    _, grads = forward_backward(dev)
    check_all(grads, reference(host), 1e-5, f"T={tokens} E={experts} k={k}")


def test_repeated_expert_ids_within_a_token():
    rng = np.random.default_rng(8)
    dev, host = make_case(rng, 90, 8, 3, 64, 32, np.float32, repeat=True)
    assert (host["topk_ids"][::3, 0] == host["topk_ids"][::3, 1]).all()
    _, grads = forward_backward(dev)
    check_all(grads, reference(host), 1e-5, "repeats")


@pytest.mark.parametrize("tokens", [1, 2, 17, 512, 4096])
def test_token_counts(tokens):
    rng = np.random.default_rng(tokens)
    dev, truth = make_case(rng, tokens, 32, 4, 128, 64, ml_dtypes.bfloat16)
    _, grads = forward_backward(dev)
    assert grads.dx.shape == (tokens, 128) and grads.d_topk_weights.shape == (tokens, 4)
    check_all(grads, reference(truth), 2e-2, f"T={tokens}")


@pytest.mark.parametrize("algorithm", ["auto", "chunked_batched"])
def test_two_runs_give_identical_bits(algorithm):
    rng = np.random.default_rng(12)
    dev, _ = make_case(rng, 2048, 64, 6, 256, 128, ml_dtypes.bfloat16, unused=3)
    first = forward_backward(dev, algorithm=algorithm)[1]
    for _ in range(2):
        again = forward_backward(dev, algorithm=algorithm)[1]
        for name in NAMES:
            assert same_bits(getattr(first, name), getattr(again, name)), name


def test_trans_b_weights_and_no_routing_weights():
    import cupy

    rng = np.random.default_rng(13)
    dev, host = make_case(rng, 77, 8, 2, 64, 32, np.float32)
    lin = {n: cupy.ascontiguousarray(dev[n].transpose(0, 2, 1)) for n in ("w1", "w2")}
    out, ctx = cg.moe_forward(
        dev["x"], dev["topk_ids"], None, lin["w1"], lin["w2"], b1=dev["b1"], b2=dev["b2"],
        trans_b=True, return_context=True,
    )  # fmt: skip
    grads = cg.moe_backward(ctx, dev["dy"])
    expected = reference({**host, "topk_weights": None})
    assert grads.d_topk_weights is None and grads.dw1.shape == lin["w1"].shape
    expected["dw1"] = expected["dw1"].transpose(0, 2, 1)
    expected["dw2"] = expected["dw2"].transpose(0, 2, 1)
    check_all(grads, expected, 1e-5, "trans_b, no weights")


def test_backward_on_another_stream_waits_for_the_forward():
    import cupy

    rng = np.random.default_rng(14)
    dev, host = make_case(rng, 500, 16, 2, 128, 64, np.float32)
    forward_stream, backward_stream = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with forward_stream:
        _, ctx = cg.moe_forward(*layer_args(dev), b1=dev["b1"], b2=dev["b2"], return_context=True)
    grads = cg.moe_backward(ctx, dev["dy"], stream=backward_stream)
    backward_stream.synchronize()
    check_all(grads, reference(host), 1e-5, "two streams")


def chosen_weights(logits, ids, scoring, renormalize):
    """route_ref's weights for the experts ``ids`` (float64)."""
    if scoring == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    chosen = np.take_along_axis(scores, ids.astype(np.int64), axis=1)
    return chosen / chosen.sum(axis=1, keepdims=True) if renormalize else chosen


def test_mlp_gradients_router_experts_and_shared():
    import cupy

    rng = np.random.default_rng(15)
    tokens, experts, k, hidden, inter = 60, 8, 2, 64, 32
    dev, host = make_case(rng, tokens, experts, k, hidden, inter, np.float32)
    router, router64 = device_random(rng, (hidden, experts), np.float32, scale=hidden**-0.5)
    sw1, sw1_64 = device_random(rng, (hidden, 2 * inter), np.float32, scale=hidden**-0.5)
    sw2, sw2_64 = device_random(rng, (inter, hidden), np.float32, scale=inter**-0.5)
    w1 = cg.ExpertWeights(dev["w1"], dev["b1"])
    w2 = cg.ExpertWeights(dev["w2"], dev["b2"])
    for scoring, renormalize in [("softmax", True), ("sigmoid", False)]:
        mlp = cg.MoEMLP(
            router, w1, w2, k, shared_w1=sw1, shared_w2=sw2, scoring=scoring, renormalize=renormalize
        )
        out, ctx = mlp(dev["x"], return_context=True)
        check_close(out, cupy.asnumpy(mlp(dev["x"])).astype(np.float64), 1e-6, "same forward")
        grads = mlp.backward(ctx, dev["dy"])
        ids = cupy.asnumpy(ctx.topk_ids)  # the GPU's choice (float32 ties may differ from float64)
        logits = host["x"] @ router64
        weights = chosen_weights(logits, ids, scoring, renormalize)
        exp = ref.moe_backward_ref(
            host["x"], ids, weights, host["w1"], host["w2"], host["dy"], host["b1"], host["b2"]
        )
        ones = np.zeros((tokens, 1), np.int32)
        shared = ref.moe_backward_ref(host["x"], ones, None, sw1_64[None], sw2_64[None], host["dy"])
        d_logits = ref.route_backward_ref(logits, ids, exp["d_topk_weights"], scoring, renormalize)
        # The router's part is a float32 softmax (or sigmoid) backward, whose
        # centring subtracts nearly equal numbers: a looser bound than 1e-5.
        check_close(grads.router_weight, host["x"].T @ d_logits, 1e-4, f"{scoring} router")
        check_close(grads.dx, exp["dx"] + shared["dx"] + d_logits @ router64.T, 1e-4, f"{scoring} dx")
        check_close(grads.shared_w1, shared["dw1"][0], 1e-5, "shared w1")
        check_close(grads.shared_w2, shared["dw2"][0], 1e-5, "shared w2")
        check_all(grads.experts, exp, 1e-5, f"{scoring} experts")


def test_train_example_loss_falls():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "train_moe.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "OK: the loss fell at least 2.0x" in result.stdout
