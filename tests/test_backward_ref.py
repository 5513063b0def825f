"""The float64 backward references (CPU): every gradient against central finite
differences of the forward references, so the GPU tests compare with a truth
that is itself checked."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cublas_grouped import testing as ref

STEP = 1e-6


def _layer(rng, tokens=5, hidden=6, inter=4, experts=4, k=2, gated=True, biases=True, repeat=False):
    width = 2 * inter if gated else inter
    ids = np.stack([rng.choice(experts - 1, size=k, replace=False) for _ in range(tokens)])  # expert 3 unused
    if repeat:
        ids[0, :] = ids[0, 0]  # a token that names one expert twice
    return {
        "x": rng.standard_normal((tokens, hidden)),
        "topk_ids": ids.astype(np.int32),
        "topk_weights": rng.random((tokens, k)) + 0.1,
        "w1": rng.standard_normal((experts, hidden, width)) * 0.5,
        "w2": rng.standard_normal((experts, inter, hidden)) * 0.5,
        "b1": rng.standard_normal((experts, width)) * 0.5 if biases else None,
        "b2": rng.standard_normal((experts, hidden)) * 0.5 if biases else None,
    }


def _numeric_grad(loss, array):
    """Central differences of ``loss()`` with respect to every element of ``array`` (changed in place)."""
    grad = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        keep = array[i]
        array[i] = keep + STEP
        up = loss()
        array[i] = keep - STEP
        down = loss()
        array[i] = keep
        grad[i] = (up - down) / (2 * STEP)
    return grad


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("biases", [True, False])
def test_moe_backward_ref_matches_finite_differences(activation, gated, biases):
    rng = np.random.default_rng(len(activation) * 4 + 2 * gated + biases)
    args = _layer(rng, gated=gated, biases=biases, repeat=True)
    dy = rng.standard_normal(args["x"].shape)
    opts = {"activation": activation, "gated": gated}

    def loss():
        return float(np.sum(dy * ref.moe_forward_ref(**args, **opts)))

    got = ref.moe_backward_ref(**args, dy=dy, **opts)
    names = {"x": "dx", "w1": "dw1", "w2": "dw2", "b1": "db1", "b2": "db2", "topk_weights": "d_topk_weights"}
    for arg, grad in names.items():
        if args[arg] is None:
            assert got[grad] is None
            continue
        numeric = _numeric_grad(loss, args[arg])
        # ReLU's kink: a z within STEP of 0 would make the difference quotient
        # meaningless; random data keeps |z| far above 1e-6.
        assert ref.rel_error(got[grad], numeric) < 1e-6, grad
    # The unused expert (3) gets exact zeros.
    assert not got["dw1"][3].any() and not got["dw2"][3].any()


def test_moe_backward_ref_without_weights_and_checks():
    rng = np.random.default_rng(1)
    args = _layer(rng)
    args["topk_weights"] = None
    dy = rng.standard_normal(args["x"].shape)
    got = ref.moe_backward_ref(**args, dy=dy)
    assert got["d_topk_weights"] is None
    weighted = ref.moe_backward_ref(**{**args, "topk_weights": np.ones(args["topk_ids"].shape)}, dy=dy)
    for name in ("dx", "dw1", "dw2", "db1", "db2"):
        assert np.array_equal(got[name], weighted[name]), name
    with pytest.raises(ValueError, match="dy must have x's shape"):
        ref.moe_backward_ref(**args, dy=dy[:1])
    with pytest.raises(ValueError, match="w1 has 8 columns, expected 4"):
        ref.moe_backward_ref(**args, dy=dy, gated=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_backward_ref_matches_finite_differences(scoring, renormalize):
    rng = np.random.default_rng(7 + renormalize)
    logits = rng.standard_normal((6, 5)) * 2
    k = 3
    _, ids = ref.route_ref(logits, k, scoring=scoring, renormalize=renormalize)
    d_w = rng.standard_normal((6, k))

    def loss():
        weights, now = ref.route_ref(logits, k, scoring=scoring, renormalize=renormalize)
        assert (now == ids).all()  # the steps are too small to change the choice
        return float(np.sum(d_w * weights))

    got = ref.route_backward_ref(logits, ids, d_w, scoring=scoring, renormalize=renormalize)
    assert ref.rel_error(got, _numeric_grad(loss, logits)) < 1e-6
    with pytest.raises(ValueError, match="scoring must be"):
        ref.route_backward_ref(logits, ids, d_w, scoring="tanh")


def test_route_backward_ref_defaults_flat_gradients_and_large_logits():
    # Pins route_backward_ref's defaults (those of route_ref: softmax,
    # renormalized), a flat [T*k] gradient read as [T, k], and the softmax
    # shift by each row's own maximum: adding a constant to a row changes
    # neither its scores nor the gradient, even at +-700 (where exp overflows
    # unless each row is shifted by its own maximum).
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((4, 6))
    k = 2
    _, ids = ref.route_ref(logits, k)
    d_w = rng.standard_normal((4, k))
    want = ref.route_backward_ref(logits, ids, d_w, scoring="softmax", renormalize=True)
    assert not np.allclose(
        want, ref.route_backward_ref(logits, ids, d_w, scoring="softmax", renormalize=False)
    )
    assert np.array_equal(ref.route_backward_ref(logits, ids, d_w), want)
    assert np.array_equal(ref.route_backward_ref(logits, ids, d_w.reshape(-1)), want)
    shifted = logits + np.array([[700.0], [-700.0], [0.0], [350.0]])
    got = ref.route_backward_ref(shifted, ids, d_w)
    assert np.isfinite(got).all() and np.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_moe_backward_ref_idle_expert_between_busy_ones_and_flat_weights():
    # Pins the expert loop: over all E experts (here E = 5 is not the inter
    # size 3), past an idle expert (1) to busy ones after it; flat [T*k]
    # routing weights read as [T, k]; the gated width in the shape error.
    rng = np.random.default_rng(21)
    args = _layer(rng, tokens=4, hidden=5, inter=3, experts=5, biases=False)
    args["topk_ids"] = np.array([[0, 2], [3, 4], [2, 0], [4, 3]], np.int32)
    dy = rng.standard_normal(args["x"].shape)
    got = ref.moe_backward_ref(**args, dy=dy)

    def loss():
        return float(np.sum(dy * ref.moe_forward_ref(**args)))

    for arg in ("w1", "w2"):
        want = _numeric_grad(loss, args[arg])
        assert ref.rel_error(got["d" + arg], want) < 1e-6, arg
        assert not got["d" + arg][1].any() and got["d" + arg][4].any(), arg
    flat = dict(args, topk_weights=args["topk_weights"].reshape(-1))
    for name, grad in ref.moe_backward_ref(**flat, dy=dy).items():
        assert grad is None or np.array_equal(grad, got[name]), name
    with pytest.raises(ValueError, match="w1 has 5 columns, expected 6"):
        ref.moe_backward_ref(**dict(args, w1=args["w1"][:, :, :5]), dy=dy)


def test_silu_derivative_far_out_raises_no_warning():
    # Pins the overflow guard: exp(800) overflows to inf, which gives the
    # right limit (a derivative of -0.0), silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ref._act_grad(np.array([-800.0, 800.0]), "silu")
    assert got.tolist() == [0.0, 1.0]


def test_activation_derivatives_at_special_points():
    z = np.array([0.0, -0.0, np.nan, 3.0, -3.0])
    relu = ref._act_grad(z, "relu")
    assert relu[0] == 0.0 and relu[1] == 0.0 and np.isnan(relu[2]) and relu[3] == 1.0 and relu[4] == 0.0
    assert ref._act_grad(np.array([0.0]), "silu")[0] == 0.5
    assert ref._act_grad(np.array([0.0]), "gelu")[0] == 0.5
