"""Every bad argument to the MoE layer is refused before any GPU work (CPU, fake arrays)."""

from __future__ import annotations

import numpy as np
import pytest

import cublas_grouped as cg

T, H, E, K, INTER = 6, 16, 4, 2, 8


@pytest.fixture
def layer(fake):
    """Valid fake arguments of moe_forward: x, ids, weights, w1, w2."""
    return {
        "x": fake((T, H)),
        "topk_ids": fake((T, K), np.int32),
        "topk_weights": fake((T, K), np.float32),
        "w1": fake((E, H, 2 * INTER)),
        "w2": fake((E, INTER, H)),
    }


def call(layer, **changes):
    args = {**layer, **changes}
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("x", "topk_ids", "topk_weights", "w1", "w2")}
    return cg.moe_forward(args["x"], args["topk_ids"], args["topk_weights"], args["w1"], args["w2"], **kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": "host"}, TypeError, "x is a NumPy array in host memory"),
        ({"x": ((T, H, 1), np.float32)}, ValueError, r"x must be 2-D \[T, H\]"),
        ({"x": ((T, H), np.float64)}, TypeError, "x has dtype float64"),
        ({"topk_ids": ((T, K), np.int64)}, TypeError, "topk_ids must be int32; got int64"),
        ({"topk_ids": ((T,), np.int32)}, ValueError, r"topk_ids must be 2-D \[T, k\]"),
        ({"topk_ids": ((T + 1, K), np.int32)}, ValueError, "topk_ids has 7 rows but x has 6 tokens"),
        (
            {"topk_weights": ((T, K + 1), np.float32)},
            ValueError,
            "topk_weights must have the shape of topk_ids",
        ),
        ({"topk_weights": ((T, K), np.float16)}, TypeError, "topk_weights must be float32; got float16"),
        ({"w1": ((E, H + 1, 2 * INTER), np.float32)}, ValueError, "w1 has K=17 but its input has 16 columns"),
        (
            {"w1": ((E, H, 2 * INTER), np.float16)},
            TypeError,
            "w1 must have dtype float32 like x; got float16",
        ),
        ({"w1": ((E, H, 2 * INTER + 1), np.float32)}, ValueError, "w1 must have an even output width"),
        ({"w1": ((H, 2 * INTER), np.float32)}, ValueError, r"w1 must be 3-D \[E, K, N\]"),
        ({"w2": ((E + 1, INTER, H), np.float32)}, ValueError, "w2 has 5 experts; expected 4"),
        ({"w2": ((E, 2 * INTER, H), np.float32)}, ValueError, "w2 has K=16 but its input has 8 columns"),
        ({"w2": ((E, INTER, H + 2), np.float32)}, ValueError, "w2 must map back to hidden=16"),
        (
            {"b1": ((E, INTER), np.float32)},
            ValueError,
            r"b1 must be a C-contiguous float32 array of shape \(4, 16\)",
        ),
        (
            {"b2": ((E, H), np.float16)},
            ValueError,
            r"b2 must be a C-contiguous float32 array of shape \(4, 16\)",
        ),
    ],
)
def test_layer_argument_errors(fake, layer, change, error, match):
    ((name, spec),) = change.items()
    value = np.zeros((T, H), np.float32) if spec == "host" else fake(spec[0], spec[1])
    with pytest.raises(error, match=match):
        call(layer, **{name: value})


def test_layer_option_errors(fake, layer):
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu'\]; got 'tanh'"):
        call(layer, activation="tanh")
    with pytest.raises(ValueError, match="algorithm must be one of AUTO"):
        call(layer, algorithm="fast")
    with pytest.raises(ValueError, match="at most 1024 experts are supported; w1 has 1025"):
        call(layer, w1=fake((1025, H, 2 * INTER)), w2=fake((1025, INTER, H)))
    # Non-gated layers take any width; trans_b takes the nn.Linear layout.
    with pytest.raises(ValueError, match="w2 has K=8 but its input has 9 columns"):
        call(layer, w1=fake((E, H, 9)), gated=False)
    with pytest.raises(ValueError, match="w1 has K=17 but its input has 16 columns"):
        call(layer, w1=fake((E, 2 * INTER, H + 1)), w2=fake((E, H, INTER)), trans_b=True)


def test_route_errors(fake):
    logits = fake((T, E))
    with pytest.raises(ValueError, match=r"router_logits must be 2-D \[T, E\]"):
        cg.route(fake((T,)), 1)
    with pytest.raises(TypeError, match="router_logits has dtype int32"):
        cg.route(fake((T, E), np.int32), 1)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]; got 5"):
        cg.route(logits, 5)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]; got 0"):
        cg.route(logits, 0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]; got True"):
        cg.route(logits, True)
    with pytest.raises(ValueError, match=r"scoring must be one of \['sigmoid', 'softmax'\]; got 'relu'"):
        cg.route(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="router_logits must have 1 to 1024 experts; got 2048"):
        cg.route(fake((T, 2048)), 2)
    with pytest.raises(ValueError, match="router_logits must be C-contiguous"):
        cg.route(fake((T, E), strides=(4, 4 * T)), 2)


def test_prepare_input_errors(fake):
    x, ids, w = fake((T, H)), fake((T, K), np.int32), fake((T, K), np.float32)
    with pytest.raises(ValueError, match=r"num_experts must be an int in \[1, 1024\]; got 0"):
        cg.prepare_input(x, (w, ids), 0)
    with pytest.raises(ValueError, match="topk_ids has 6 rows but x has 7 tokens"):
        cg.prepare_input(fake((T + 1, H)), (w, ids), E)
    with pytest.raises(ValueError, match="algorithm must be one of AUTO"):
        cg.prepare_input(x, (w, ids), E, algorithm="fastest")
    with pytest.raises(TypeError, match="inp must be a DispatchPlan from prepare_input; got tuple"):
        cg.expert_gemm((x, ids), fake((E, H, INTER)))


def test_fixed_capacity_moe_construction_errors(fake):
    w1, w2 = fake((E, H, 2 * INTER)), fake((E, INTER, H))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]; got 5"):
        cg.FixedCapacityMoE(w1, w2, 5, max_tokens=8)
    with pytest.raises(ValueError, match="max_tokens must be a positive int; got 0"):
        cg.FixedCapacityMoE(w1, w2, 2, max_tokens=0)
    with pytest.raises(ValueError, match="w2 has 3 experts; expected 4"):
        cg.FixedCapacityMoE(w1, fake((3, INTER, H)), 2, max_tokens=8)
    with pytest.raises(ValueError, match="activation must be one of"):
        cg.FixedCapacityMoE(w1, w2, 2, max_tokens=8, activation="tanh")


def test_weights_and_mlp_errors(fake):
    with pytest.raises(ValueError, match=r"weight must be a C-contiguous 3-D array \[E, K, N\]"):
        cg.ExpertWeights(fake((H, INTER)))
    with pytest.raises(ValueError, match=r"bias must be float32 \[4, 8\]; got float32 \(4, 9\)"):
        cg.ExpertWeights(fake((E, H, INTER)), fake((E, INTER + 1)))
    with pytest.raises(ValueError, match="weights must hold at least one expert"):
        cg.ExpertWeightManager.load([])
    w1, w2 = fake((E, H, 2 * INTER)), fake((E, INTER, H))
    with pytest.raises(ValueError, match=r"router_weight must be \[H, 4\]; got \(16, 5\)"):
        cg.MoEMLP(fake((H, E + 1)), w1, w2, 2)
    with pytest.raises(ValueError, match="shared_w1 and shared_w2 go together"):
        cg.MoEMLP(fake((H, E)), w1, w2, 2, shared_w1=fake((H, 2 * INTER)))
    with pytest.raises(ValueError, match=r"w1 and w2 must use the same layout \(trans_b\)"):
        cg.MoEMLP(fake((H, E)), cg.ExpertWeights(w1, trans_b=True), w2, 2)


def test_one_layer_shape_for_both_layers(fake):
    """The dynamic layer's checks (from the arrays of a call) and the fixed-capacity
    layer's (from its weights, before any tokens) build the same LayerShape."""
    from cublas_grouped.moe.checks import LayerShape, check_layer_args, check_tokens, layer_shape

    w1, w2, b1, b2 = fake((E, H, 2 * INTER)), fake((E, INTER, H)), fake((E, 2 * INTER)), fake((E, H))
    x_v = check_tokens(fake((T, H)))
    dynamic = check_layer_args(x_v, fake((T, K), np.int32), None, w1, w2, b1, b2, "gelu", True, False)
    fixed = layer_shape(w1, w2, K, b1=b1, b2=b2, activation="gelu")
    assert (
        dynamic == fixed == LayerShape(E, H, INTER, 2 * INTER, K, True, "gelu", False, np.dtype(np.float32))
    )
    # A w1 that is not 3-D is refused by name before its H is read (no tokens to take H from).
    with pytest.raises(ValueError, match=r"^w1 must be 3-D \[E, K, N\]"):
        layer_shape(fake((H, 2 * INTER)), w2, K)
