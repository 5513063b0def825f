"""``ExpertWeights.w1_layout`` on the CPU: every refusal of the blocked gate|up
layout by the weights, the weight manager and ``MoEMLP`` (fake arrays, before
any GPU work), and, with the GPU side stubbed (tests/host_stubs.py), that
``MoEMLP`` hands the layout to the layer. The packed values, and the
module's results, are checked on the GPU (test_expert_weights_layout_gpu.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from host_stubs import H100, fake_array, stub_gpu

import cublas_grouped as cg

BF16 = ml_dtypes.bfloat16
E, H, I, K = 16, 64, 128, 4  # noqa: E741  (I a multiple of 128: the blocked layout fits)
BLOCKED = "gate_up_blocked"


def _fp8(fake, shape=(E, 2 * I, H)):
    return cg.FP8ExpertWeights(fake(shape, np.uint8), fake((E, 2, 1), np.float32), "block128", True)


def test_the_default_layout_and_a_blocked_weight(fake):
    assert cg.ExpertWeights(fake((E, H, 2 * I), BF16)).w1_layout == "gate_up"
    w = cg.ExpertWeights(fake((E, H, 2 * I), BF16), fake((E, 2 * I), BF16), w1_layout=BLOCKED)
    assert (w.w1_layout, w.out_features, w.in_features) == (BLOCKED, 2 * I, H)
    # The width is N: axis 1 with trans_b ([E, N, K]), else axis 2.
    assert cg.ExpertWeights(fake((E, 2 * I, 192), BF16), trans_b=True, w1_layout=BLOCKED).out_features == 256
    assert cg.ExpertWeights(fake((E, H, 2 * I), np.float16), w1_layout=BLOCKED).w1_layout == BLOCKED


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((E, H, 2 * I), {"w1_layout": "blocked"}, r"w1_layout must be one of \('gate_up', 'gate_up_blocked'\); got 'blocked'"),
        ((E, H, 192), {}, r"w1_layout='gate_up_blocked': weight's gate\|up width 2I=192 must be a multiple of 256"),
        ((E, 2 * I, 192), {}, r"weight's gate\|up width 2I=192 must be"),  # N is axis 2 without trans_b
        ((E, 384, H), {"trans_b": True}, r"weight's gate\|up width 2I=384 must be a multiple of 256"),
    ],
)  # fmt: skip
def test_expert_weights_refuse(fake, shape, kwargs, match):
    kwargs = {"w1_layout": BLOCKED, **kwargs}
    with pytest.raises(ValueError, match=match):
        cg.ExpertWeights(fake(shape, BF16), **kwargs)


def test_fp8_weights_cannot_be_blocked(fake):
    with pytest.raises(
        ValueError, match=r"'gate_up_blocked' needs a 16-bit weight; FP8 weights take only 'gate_up'"
    ):
        cg.ExpertWeights(_fp8(fake), trans_b=True, w1_layout=BLOCKED)
    assert cg.ExpertWeights(_fp8(fake), trans_b=True).w1_layout == "gate_up"


def test_load_refuses_before_any_gpu_work(fake):
    mats = [fake((H, 2 * I), BF16) for _ in range(E)]
    load = cg.ExpertWeightManager.load
    with pytest.raises(
        ValueError, match=r"w1_layout must be one of \('gate_up', 'gate_up_blocked'\); got 'up_gate'"
    ):
        load(mats, w1_layout="up_gate")
    with pytest.raises(
        ValueError, match=r"'gate_up_blocked' does not go with quantize='fp8-block128': FP8 weights"
    ):
        load(mats, quantize="fp8-block128", w1_layout=BLOCKED)
    with pytest.raises(
        ValueError, match=r"'gate_up_blocked': weights\[i\]'s gate\|up width 2I=192 must be a multiple of 256"
    ):
        load([fake((H, 192), BF16)] * E, w1_layout=BLOCKED)
    with pytest.raises(ValueError, match=r"weights\[i\]'s gate\|up width 2I=192 must be"):
        load([fake((192, H), BF16)] * E, trans_b=True, w1_layout=BLOCKED)
    # [2I, H] per expert without trans_b is [K=256, N=64]: N is refused.
    with pytest.raises(ValueError, match=r"weights\[i\]'s gate\|up width 2I=64 must be"):
        load([fake((2 * I, H), BF16)] * E, w1_layout=BLOCKED)
    with pytest.raises(
        ValueError, match=r"weights\[1\] is bfloat16 \(64, 384\); expected 2-D bfloat16 \(64, 256\)"
    ):
        load([mats[0], fake((H, 384), BF16)], w1_layout=BLOCKED)
    with pytest.raises(ValueError, match="weights must hold at least one expert"):
        load([], w1_layout=BLOCKED)


def test_manager_conversions_refuse(fake):
    M = cg.ExpertWeightManager
    plain = cg.ExpertWeights(fake((E, H, 2 * I), BF16))
    blocked = cg.ExpertWeights(fake((E, H, 2 * I), BF16), w1_layout=BLOCKED)
    with pytest.raises(ValueError, match=r"weights have w1_layout='gate_up_blocked' already"):
        M.pack_gate_up(blocked)
    with pytest.raises(ValueError, match=r"'gate_up_blocked' needs a 16-bit weight; these weights are FP8"):
        M.pack_gate_up(cg.ExpertWeights(_fp8(fake), trans_b=True))
    with pytest.raises(
        ValueError, match=r"'gate_up_blocked': weights's gate\|up width 2I=192 must be a multiple"
    ):
        M.pack_gate_up(cg.ExpertWeights(fake((E, H, 192), BF16)))
    with pytest.raises(ValueError, match=r"weights have w1_layout='gate_up'; only 'gate_up_blocked' unpacks"):
        M.unpack_gate_up(plain)
    with pytest.raises(ValueError, match=r"w1_layout='gate_up_blocked'; FP8 weights take only 'gate_up': quantize "
                       r"ExpertWeightManager.unpack_gate_up\(weights\)"):  # fmt: skip
        M.quantize(blocked)


def test_moe_mlp_refuses(fake):
    router, w2 = fake((H, E), BF16), fake((E, I, H), BF16)
    blocked = cg.ExpertWeights(fake((E, H, 2 * I), BF16), w1_layout=BLOCKED)
    mlp = cg.MoEMLP(router, blocked, w2, K)
    x = fake((3, H), BF16)
    for recompute in (False, True):
        with pytest.raises(ValueError, match=r"return_context=True needs w1 in the 'gate_up' layout .*"
                           r"w1_layout='gate_up_blocked': train a MoEMLP built with "
                           r"ExpertWeightManager.unpack_gate_up\(w1\)"):  # fmt: skip
            mlp(x, return_context=True, recompute=recompute)
    with pytest.raises(ValueError, match="recompute applies only with return_context=True"):
        mlp(x, recompute=True)
    with pytest.raises(ValueError, match=r"w1_layout='gate_up_blocked' needs gated=True"):
        cg.MoEMLP(router, blocked, fake((E, 2 * I, H), BF16), K, gated=False)
    w2_blocked = cg.ExpertWeights(fake((E, 2 * I, 256), BF16), w1_layout=BLOCKED)
    with pytest.raises(ValueError, match=r"w2 has w1_layout='gate_up_blocked'; only the first GEMM's weight"):
        cg.MoEMLP(router, fake((E, H, 2 * I), BF16), w2_blocked, K)


def test_moe_mlp_passes_the_layout_to_the_layer(monkeypatch):
    """MoEMLP's forward hands moe_forward its w1's layout with the weight and
    the bias as they are (the GPU side stubbed; the layer itself recorded)."""
    import cupy

    from cublas_grouped.moe import modules

    calls = []

    def layer(*args, **kwargs):
        calls.append((args, kwargs))
        return fake_array((args[0].shape[0], H))

    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100):
        monkeypatch.setattr(cupy, "matmul", lambda a, b: fake_array((a.shape[0], b.shape[1])))
        monkeypatch.setattr(
            modules,
            "route",
            lambda logits, k, **kw: (fake_array((3, k), "float32"), fake_array((3, k), "int32")),
        )
        monkeypatch.setattr(modules, "moe_forward", layer)
        for layout in ("gate_up", BLOCKED):
            w1 = cg.ExpertWeights(fake_array((E, H, 2 * I)), fake_array((E, 2 * I)), w1_layout=layout)
            w2 = cg.ExpertWeights(fake_array((E, I, H)))
            calls.clear()
            cg.MoEMLP(fake_array((H, E)), w1, w2, K)(fake_array((3, H)))
            ((args, kwargs),) = calls
            assert kwargs["w1_layout"] == layout
            assert args[3] is w1.weight and kwargs["b1"] is w1.bias and args[4] is w2.weight
