"""``ExpertWeights`` in the blocked gate|up layout on the GPU: the weight
manager packs at load exactly what ``pack_gate_up`` makes of the plain load
(the bias kept in the plain order), converts both ways, and ``MoEMLP`` with
blocked weights gives the plain module's result (on SM 9.0 with the
activation in GEMM 1's epilogue), both against float64; training refuses
blocked weights and takes the unpacked ones."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.moe.gate_up import GATE_UP_BLOCK

pytestmark = pytest.mark.gpu

BF16 = ml_dtypes.bfloat16
BLOCKED = "gate_up_blocked"
TOL = 2e-2  # 16-bit inputs and intermediates against float64


def _bits(a):
    import cupy

    return cupy.asnumpy(a).view(np.uint16)


def _blocked_columns(inter: int) -> np.ndarray:
    """The plain column each packed column holds, by index arithmetic (not by
    pack_gate_up): block j of 256 is gate 128j.. then up 128j.. (up at I + c)."""
    b, cols = GATE_UP_BLOCK, []
    for j in range(inter // b):
        cols += list(range(b * j, b * (j + 1))) + list(range(inter + b * j, inter + b * (j + 1)))
    return np.array(cols)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype, inter", [(BF16, 256), (np.float16, 384)])
def test_load_packs_what_pack_gate_up_makes_of_the_plain_load(trans_b, dtype, inter):
    import cupy

    rng = np.random.default_rng(inter + trans_b)
    experts, hidden = 5, 72
    shape = (2 * inter, hidden) if trans_b else (hidden, 2 * inter)
    mats = [device_random(rng, shape, dtype)[0] for _ in range(experts)]
    # One expert given as a non-contiguous view: load copies it into place.
    mats[2] = cupy.asfortranarray(mats[2])
    biases = [device_random(rng, (2 * inter,), dtype)[0] for _ in range(experts)]
    load = cg.ExpertWeightManager.load
    plain = load(mats, biases, trans_b=trans_b)
    blocked = load(mats, biases, trans_b=trans_b, w1_layout=BLOCKED)
    assert (plain.w1_layout, blocked.w1_layout) == ("gate_up", BLOCKED)
    assert blocked.shape == plain.shape and blocked.trans_b == trans_b
    assert (_bits(blocked.weight) == _bits(cg.pack_gate_up(plain.weight, trans_b=trans_b))).all()
    # Against index arithmetic too, and the bias keeps the plain order (the kernels read it so).
    host, packed = _bits(plain.weight), _bits(blocked.weight)
    cols = _blocked_columns(inter)
    expected = host[:, cols, :] if trans_b else host[:, :, cols]
    assert (packed == expected).all() and not (packed == host).all()
    assert (_bits(blocked.bias) == _bits(plain.bias)).all()
    assert (_bits(blocked.bias) == _bits(cupy.stack(biases))).all()

    converted = cg.ExpertWeightManager.pack_gate_up(plain)
    assert converted.w1_layout == BLOCKED and converted.bias is plain.bias
    assert (_bits(converted.weight) == packed).all()
    assert (_bits(plain.weight) == host).all(), "the input is left as it was"
    back = cg.ExpertWeightManager.unpack_gate_up(blocked)
    assert back.w1_layout == "gate_up" and back.bias is blocked.bias
    assert (_bits(back.weight) == host).all()


def _module_case(rng, experts, hidden, inter, dtype, trans_b, bias):
    s1 = (experts, 2 * inter, hidden) if trans_b else (experts, hidden, 2 * inter)
    s2 = (experts, hidden, inter) if trans_b else (experts, inter, hidden)
    w1, w1_64 = device_random(rng, s1, dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, s2, dtype, scale=inter**-0.5)
    b1 = b2 = b1_64 = b2_64 = None
    if bias:
        b1, b1_64 = device_random(rng, (experts, 2 * inter), dtype, scale=0.1)
        b2, b2_64 = device_random(rng, (experts, hidden), dtype, scale=0.1)
    ref_w = (np.swapaxes(w1_64, 1, 2), np.swapaxes(w2_64, 1, 2)) if trans_b else (w1_64, w2_64)
    return (w1, w2, b1, b2), (*ref_w, b1_64, b2_64)


@pytest.mark.parametrize(
    "bias, trans_b, activation, dtype",
    [
        (False, False, "silu", BF16),
        (True, False, "silu", BF16),
        (True, True, "gelu", BF16),
        (False, True, "relu", np.float16),
    ],
)
def test_moe_mlp_with_blocked_weights_equals_the_plain_module(bias, trans_b, activation, dtype):
    """The same experts loaded both ways: each module against float64 of the
    plain weights with the routing the GPU chose (ties in 16-bit logits may
    differ from float64's), and the two against each other."""
    import cupy

    rng = np.random.default_rng(31 + 2 * bias + trans_b)
    experts, k, hidden, inter = 16, 4, 128, 256
    (w1, w2, b1, b2), weights64 = _module_case(rng, experts, hidden, inter, dtype, trans_b, bias)
    plain_w1 = cg.ExpertWeights(w1, b1, trans_b)
    blocked_w1 = cg.ExpertWeightManager.pack_gate_up(plain_w1)
    lin2 = cg.ExpertWeights(w2, b2, trans_b)
    router, _ = device_random(rng, (hidden, experts), dtype)
    opts = {"activation": activation}
    plain = cg.MoEMLP(router, plain_w1, lin2, k, **opts)
    blocked = cg.MoEMLP(router, blocked_w1, lin2, k, **opts)
    for tokens in (1, 40, 600):
        x, x64 = device_random(rng, (tokens, hidden), dtype)
        weights, ids = cg.route(cupy.matmul(x, router), k)
        w64 = cupy.asnumpy(weights).astype(np.float64)
        expected = ref.moe_forward_ref(x64, cupy.asnumpy(ids), w64, *weights64, activation=activation)
        what = f"T={tokens} bias={bias} trans_b={trans_b} {activation}"
        out_plain, out_blocked = plain(x), blocked(x)
        err_plain = check_close(out_plain, expected, TOL, f"plain {what}")
        # quack's rule: the fast path within about twice the plain path's error.
        err_blocked = check_close(out_blocked, expected, 2 * err_plain + 1e-3, f"blocked {what}")
        print(f"{what}: error plain {err_plain:.2e}, blocked {err_blocked:.2e}")
        check_close(out_blocked, cupy.asnumpy(out_plain).astype(np.float64), TOL, f"blocked vs plain {what}")


def test_training_refuses_blocked_weights_and_takes_the_unpacked_ones():
    import cupy

    rng = np.random.default_rng(5)
    experts, k, hidden, inter = 16, 2, 128, 256
    (w1, w2, b1, b2), _ = _module_case(rng, experts, hidden, inter, BF16, False, True)
    blocked_w1 = cg.ExpertWeightManager.pack_gate_up(cg.ExpertWeights(w1, b1))
    router, _ = device_random(rng, (hidden, experts), BF16)
    lin2 = cg.ExpertWeights(w2, b2)
    x, _ = device_random(rng, (24, hidden), BF16)
    blocked = cg.MoEMLP(router, blocked_w1, lin2, k)
    with pytest.raises(ValueError, match=r"return_context=True needs w1 in the 'gate_up' layout"):
        blocked(x, return_context=True)
    trainable = cg.MoEMLP(router, cg.ExpertWeightManager.unpack_gate_up(blocked_w1), lin2, k)
    assert (_bits(trainable.w1.weight) == _bits(w1)).all()
    out, ctx = trainable(x, return_context=True)
    check_close(out, cupy.asnumpy(blocked(x)).astype(np.float64), TOL, "training forward vs blocked")
    grads = trainable.backward(ctx, cupy.ones_like(out))
    assert grads.dx.shape == x.shape and grads.experts.dw1.shape == w1.shape
