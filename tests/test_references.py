"""CPU tests of the float64 NumPy references in cublas_grouped.testing.

Expected values are worked out by hand in the comments, so these tests pin
down the contracts (tie rules, padding, empty experts, k = 1, k = E, T = 1)
that the GPU kernels are later compared against.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

try:
    from cublas_grouped import testing as ref
except Exception:  # the package __init__ may need a GPU stack; load the file alone
    _path = Path(__file__).resolve().parent.parent / "cublas_grouped" / "testing.py"
    _spec = importlib.util.spec_from_file_location("cublas_grouped_testing", _path)
    ref = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = ref
    _spec.loader.exec_module(ref)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# --------------------------------------------------------------------------- routing


def test_route_softmax_ties_go_to_lower_index():
    # softmax(log [1, 2, 1]) = [0.25, 0.5, 0.25]; experts 0 and 2 tie.
    logits = np.log([[1.0, 2.0, 1.0]])
    w, ids = ref.route_ref(logits, 2, renormalize=False)
    assert ids.dtype == np.int32
    assert_array_equal(ids, [[1, 0]])
    assert_allclose(w, [[0.5, 0.25]], rtol=1e-15)
    w, ids = ref.route_ref(logits, 2, renormalize=True)
    assert_array_equal(ids, [[1, 0]])
    assert_allclose(w, [[2.0 / 3.0, 1.0 / 3.0]], rtol=1e-15)


def test_route_k1():
    logits = np.log([[1.0, 2.0, 1.0], [3.0, 1.0, 0.0 + 1e-300]])
    w, ids = ref.route_ref(logits, 1, renormalize=False)
    assert_array_equal(ids, [[1], [0]])
    assert_allclose(w, [[0.5], [0.75]], rtol=1e-12)
    w, _ = ref.route_ref(logits, 1, renormalize=True)
    assert_array_equal(w, [[1.0], [1.0]])


def test_route_k_equals_e_sigmoid_with_ties():
    # Sigmoid scores keep the logit order: 3 = 3 > 1 > 0, tie -> index 1 first.
    logits = np.array([[1.0, 3.0, 3.0, 0.0]])
    w, ids = ref.route_ref(logits, 4, scoring="sigmoid", renormalize=False)
    assert_array_equal(ids, [[1, 2, 0, 3]])
    expected = [sigmoid(3.0), sigmoid(3.0), sigmoid(1.0), 0.5]
    assert_allclose(w, [expected], rtol=1e-15)
    w, _ = ref.route_ref(logits, 4, scoring="sigmoid", renormalize=True)
    assert_allclose(w, [np.array(expected) / sum(expected)], rtol=1e-15)
    assert_allclose(w.sum(), 1.0, rtol=1e-15)


def test_route_all_equal_logits():
    # Every expert ties: ids 0..k-1 in order, each score 1/E.
    w, ids = ref.route_ref(np.full((3, 5), 7.0), 3, renormalize=False)
    assert_array_equal(ids, np.tile([0, 1, 2], (3, 1)))
    assert_allclose(w, np.full((3, 3), 0.2), rtol=1e-15)


def test_route_softmax_is_shift_invariant_and_large_logits_are_safe():
    # Max subtraction: logits 1000 + log [1, 3] behave like log [1, 3].
    w, ids = ref.route_ref(1000.0 + np.log([[1.0, 3.0]]), 2, renormalize=False)
    assert_array_equal(ids, [[1, 0]])
    assert_allclose(w, [[0.75, 0.25]], rtol=1e-12)


def test_route_nan_ranks_last():
    w, ids = ref.route_ref(np.array([[np.nan, 0.0, 1.0]]), 3, "sigmoid", renormalize=False)
    assert_array_equal(ids, [[2, 1, 0]])
    assert w[0, 1] == 0.5 and math.isnan(w[0, 2])


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ref.route_ref(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError):
        ref.route_ref(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError):
        ref.route_ref(np.zeros((2, 3)), 1, scoring="tanh")


# --------------------------------------------------------------------------- plan

# ids (T=3, k=2), E=4 with expert 3 empty. Pairs p = t*k + j:
#   p0:2 p1:0 p2:0 p3:2 p4:2 p5:1  -> counts [2, 1, 3, 0]
IDS = np.array([[2, 0], [0, 2], [2, 1]], dtype=np.int32)


def test_plan_contiguous():
    plan = ref.plan_ref(IDS, 4)
    assert_array_equal(plan["counts"], [2, 1, 3, 0])
    assert_array_equal(plan["row_offsets"], [0, 2, 3, 6, 6])
    # expert 0: p1, p2 -> rows 0, 1; expert 1: p5 -> 2; expert 2: p0, p3, p4 -> 3, 4, 5
    assert_array_equal(plan["pair_to_row"], [3, 0, 1, 4, 5, 2])
    assert_array_equal(plan["row_to_pair"], [1, 2, 5, 0, 3, 4])
    for key in plan:
        assert plan[key].dtype == np.int32


def test_plan_aligned_padding():
    plan = ref.plan_ref(IDS, 4, align=4)
    # padded sizes [4, 4, 4, 0]
    assert_array_equal(plan["counts"], [2, 1, 3, 0])
    assert_array_equal(plan["row_offsets"], [0, 4, 8, 12, 12])
    assert_array_equal(plan["pair_to_row"], [8, 0, 1, 9, 10, 4])
    assert_array_equal(plan["row_to_pair"], [1, 2, -1, -1, 5, -1, -1, -1, 0, 3, 4, -1])


def test_plan_k_equals_e_single_token():
    # T=1, k=E=3: one pair per expert, rows follow expert order.
    plan = ref.plan_ref(np.array([[2, 0, 1]]), 3)
    assert_array_equal(plan["counts"], [1, 1, 1])
    assert_array_equal(plan["row_offsets"], [0, 1, 2, 3])
    assert_array_equal(plan["pair_to_row"], [2, 0, 1])
    assert_array_equal(plan["row_to_pair"], [1, 2, 0])


def test_plan_no_tokens_and_all_to_one_expert():
    plan = ref.plan_ref(np.zeros((0, 2), dtype=np.int32), 3, align=8)
    assert_array_equal(plan["counts"], [0, 0, 0])
    assert_array_equal(plan["row_offsets"], [0, 0, 0, 0])
    assert plan["pair_to_row"].shape == (0,) and plan["row_to_pair"].shape == (0,)
    # k=1, every token on expert 1: stable, so rows in token order.
    plan = ref.plan_ref(np.array([[1], [1], [1]]), 3, align=2)
    assert_array_equal(plan["row_offsets"], [0, 0, 4, 4])
    assert_array_equal(plan["pair_to_row"], [0, 1, 2])
    assert_array_equal(plan["row_to_pair"], [0, 1, 2, -1])


def test_plan_rejects_out_of_range():
    with pytest.raises(ValueError):
        ref.plan_ref(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError):
        ref.plan_ref(np.array([[-1, 0]]), 3)


# --------------------------------------------------------------------------- gather / scatter


def test_gather_with_padding():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    r2p = ref.plan_ref(IDS, 4, align=4)["row_to_pair"]  # [1,2,-1,-1,5,-1,-1,-1,0,3,4,-1]
    out = ref.gather_ref(x, r2p, 2)
    expected = np.zeros((12, 2))
    expected[0] = x[0]  # p1 -> token 0
    expected[1] = x[1]  # p2 -> token 1
    expected[4] = x[2]  # p5 -> token 2
    expected[8] = x[0]  # p0
    expected[9] = x[1]  # p3
    expected[10] = x[2]  # p4
    assert out.dtype == np.float64
    assert_array_equal(out, expected)


def test_scatter_copies_and_zero_fills():
    y = np.arange(10.0).reshape(5, 2)  # row r = [2r, 2r+1]
    out = ref.scatter_ref(y, np.array([4, -1, 0, 0]))
    assert_array_equal(out, [[8, 9], [0, 0], [0, 1], [0, 1]])


def test_gather_then_scatter_roundtrip():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(7, 3))
    x = rng.standard_normal((7, 4))
    plan = ref.plan_ref(ids, 5, align=4)
    rows = ref.gather_ref(x, plan["row_to_pair"], 3)
    back = ref.scatter_ref(rows, plan["pair_to_row"])
    assert_array_equal(back, np.repeat(x, 3, axis=0))


# --------------------------------------------------------------------------- combine


def test_combine_weights_bias_and_dropped_pair():
    y = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    p2r = np.array([0, 2, 1, -1])  # token 1's second pair is dropped
    w = np.array([[0.5, 0.25], [2.0, 3.0]])
    ids = np.array([[0, 1], [1, 0]])
    bias = np.array([[10.0, 0.0], [0.0, 10.0]])
    # t0 = 0.5*([1,0]+[10,0]) + 0.25*([2,2]+[0,10]) = [5.5,0] + [0.5,3] = [6, 3]
    # t1 = 2*([0,1]+[0,10]) = [0, 22]
    assert_array_equal(ref.combine_ref(y, p2r, w, ids, bias), [[6.0, 3.0], [0.0, 22.0]])
    # no bias: t0 = [0.5,0] + [0.5,0.5]; t1 = [0, 2]
    assert_array_equal(ref.combine_ref(y, p2r, w, ids), [[1.0, 0.5], [0.0, 2.0]])
    # no weights (1): t0 = [1,0] + [2,2]; t1 = [0, 1]
    assert_array_equal(ref.combine_ref(y, p2r, None, ids), [[3.0, 2.0], [0.0, 1.0]])


def test_combine_k1_is_weighted_scatter():
    y = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = ref.combine_ref(y, np.array([1, 0]), np.array([[2.0], [0.5]]), np.array([[1], [0]]))
    assert_array_equal(out, [[6.0, 8.0], [0.5, 1.0]])


# --------------------------------------------------------------------------- activation


def test_activation_gated_silu():
    h = np.array([[0.0, 2.0, 3.0, 4.0]])  # gate [0, 2], up [3, 4]
    out = ref.activation_ref(h, 2, True, "silu")
    silu2 = 2.0 / (1.0 + math.exp(-2.0))  # 1.7615941559557649
    assert_allclose(out, [[0.0, silu2 * 4.0]], rtol=1e-15)
    assert_allclose(silu2, 1.7615941559557649, rtol=1e-15)
    assert_array_equal(ref.activation_ref(h, 2, True, 0), out)  # integer code


def test_activation_gelu_exact_and_relu():
    out = ref.activation_ref(np.array([[1.0, -1.0, 0.0]]), 3, False, "gelu")
    # gelu(1) = 0.5 * (1 + erf(1/sqrt 2)) = 0.8413447460685429; gelu(-1) = gelu(1) - 1
    assert_allclose(out, [[0.8413447460685429, -0.15865525393145707, 0.0]], rtol=1e-14)
    out = ref.activation_ref(np.array([[-1.0, 2.0, np.nan]]), 3, False, 2)
    assert_array_equal(out[0, :2], [0.0, 2.0])
    assert math.isnan(out[0, 2])


def test_activation_bias_and_padding_rows():
    h = np.array([[1.0, 1.0], [5.0, 5.0], [-3.0, 0.5]])
    bias = np.array([[-2.0, 0.0], [1.0, 1.0]])
    # row 0 expert 1: relu([2, 2]); row 1 padding: zeros; row 2 expert 0: relu([-5, 0.5])
    out = ref.activation_ref(h, 2, False, "relu", bias=bias, row_expert=np.array([1, -1, 0]))
    assert_array_equal(out, [[2.0, 2.0], [0.0, 0.0], [0.0, 0.5]])
    # gated with bias: z = [1 + b_g, 3 + b_u] = [2, 4] -> relu(2) * 4 = 8
    out = ref.activation_ref(
        np.array([[1.0, 3.0]]), 1, True, "relu", bias=np.array([[1.0, 1.0]]), row_expert=[0]
    )
    assert_array_equal(out, [[8.0]])
    with pytest.raises(ValueError):
        ref.activation_ref(h, 2, False, "relu", bias=bias)
    with pytest.raises(ValueError):
        ref.activation_ref(h, 2, False, "tanh")
    with pytest.raises(ValueError):
        ref.activation_ref(h, 2, True, "relu")  # h must be [R, 4] when gated


# --------------------------------------------------------------------------- gmm

A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
B = np.array([[[1.0], [2.0]], [[9.0], [9.0]], [[3.0], [4.0]]])  # [E=3, K=2, N=1]


def test_gmm_with_empty_group():
    # groups [1, 0, 2]: row 0 @ B0 = 1; rows 1, 2 @ B2 = 4, 7; B1 unused.
    out = ref.gmm_ref(A, B, [1, 0, 2])
    assert_array_equal(out, [[1.0], [4.0], [7.0]])
    out = ref.gmm_ref(A, np.swapaxes(B, 1, 2), [1, 0, 2], trans_b=True)
    assert_array_equal(out, [[1.0], [4.0], [7.0]])
    # Rows past the groups' total are zeros.
    assert_array_equal(ref.gmm_ref(A, B, [1, 0, 1]), [[1.0], [4.0], [0.0]])


def test_gmm_trans_a():
    b = np.array([[1.0], [2.0], [3.0]])  # [M=3, N=1]
    out = ref.gmm_ref(A, b, [1, 0, 2], trans_a=True)
    # group 0: [1,0]^T * 1 = [[1],[0]]; group 1 empty: zeros;
    # group 2: [[0,1],[1,1]]^T @ [[2],[3]] = [[3],[5]]
    assert out.shape == (3, 2, 1)
    assert_array_equal(out, [[[1.0], [0.0]], [[0.0], [0.0]], [[3.0], [5.0]]])


def test_gmm_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ref.gmm_ref(A, B, [2, 2, 0])  # more rows than a has
    with pytest.raises(ValueError):
        ref.gmm_ref(A, B, [1, 2])  # group count != E
    with pytest.raises(ValueError):
        ref.gmm_ref(A, np.zeros((3, 1)), [1, 1, 1], trans_a=True, trans_b=True)


# --------------------------------------------------------------------------- moe forward


def _tiny_moe():
    # T=1, H=2, E=3 (expert 2 never chosen), I=1, gated.
    x = np.array([[1.0, 2.0]])
    w1 = np.zeros((3, 2, 2))
    w1[0] = [[1.0, 0.0], [0.0, 1.0]]  # z = [1, 2]
    w1[1] = [[0.0, 1.0], [1.0, 0.0]]  # z = [2, 1]
    w2 = np.zeros((3, 1, 2))
    w2[0] = [[1.0, -1.0]]
    w2[1] = [[3.0, 0.0]]
    return x, w1, w2


def test_moe_forward_gated_relu_by_hand():
    x, w1, w2 = _tiny_moe()
    ids = np.array([[0, 1]])
    w = np.array([[0.25, 0.75]])
    # e0: relu(1) * 2 = 2 -> [2, -2]; e1: relu(2) * 1 = 2 -> [6, 0]
    # 0.25 * [2, -2] + 0.75 * [6, 0] = [5, -0.5]
    out = ref.moe_forward_ref(x, ids, w, w1, w2, activation="relu")
    assert_array_equal(out, [[5.0, -0.5]])
    # biases: b1[0] = [0, 1] -> z = [1, 3] -> 3 -> [3, -3] + b2[0] = [4, -2]
    b1 = np.array([[0.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    b2 = np.array([[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]])
    out = ref.moe_forward_ref(x, ids, w, w1, w2, b1, b2, activation="relu")
    assert_array_equal(out, [[5.5, -0.5]])  # 0.25 * [4, -2] + 0.75 * [6, 0]
    # k=1, no weights: expert 1 alone -> [6, 0]
    out = ref.moe_forward_ref(x, np.array([[1]]), None, w1, w2, activation="relu")
    assert_array_equal(out, [[6.0, 0.0]])


def test_moe_forward_non_gated_silu():
    x = np.array([[1.0, 2.0], [0.0, 0.0]])
    w1 = np.array([[[1.0], [1.0]]])  # [E=1, H=2, I=1]: z = x0 + x1
    w2 = np.array([[[2.0, 1.0]]])  # [E=1, I=1, H=2]
    out = ref.moe_forward_ref(x, np.array([[0], [0]]), None, w1, w2, gated=False)
    s3 = 3.0 / (1.0 + math.exp(-3.0))  # silu(3); token 1: silu(0) = 0
    assert_allclose(out, [[2 * s3, s3], [0.0, 0.0]], rtol=1e-15)


def test_moe_forward_matches_composed_references():
    # The pipeline the GPU runs, built from the kernel references, must give
    # the token-by-token reference (k = E case included through E = 4, k = 4).
    rng = np.random.default_rng(1)
    for num_experts, top_k, align in [(6, 2, 1), (6, 1, 8), (4, 4, 4)]:
        t, h, inter = 9, 8, 5
        x = rng.standard_normal((t, h))
        logits = rng.standard_normal((t, num_experts))
        w, ids = ref.route_ref(logits, top_k)
        w1 = rng.standard_normal((num_experts, h, 2 * inter))
        w2 = rng.standard_normal((num_experts, inter, h))
        b1 = rng.standard_normal((num_experts, 2 * inter))
        b2 = rng.standard_normal((num_experts, h))
        plan = ref.plan_ref(ids, num_experts, align=align)
        r2p = plan["row_to_pair"]
        rows = ref.gather_ref(x, r2p, top_k)
        padded = np.diff(plan["row_offsets"])
        h1 = ref.gmm_ref(rows, w1, padded)
        row_expert = np.where(r2p >= 0, ids.reshape(-1)[np.maximum(r2p, 0)], -1)
        act = ref.activation_ref(h1, inter, True, "silu", bias=b1, row_expert=row_expert)
        y = ref.gmm_ref(act, w2, padded)
        out = ref.combine_ref(y, plan["pair_to_row"], w, ids, bias=b2)
        expected = ref.moe_forward_ref(x, ids, w, w1, w2, b1, b2)
        assert ref.rel_error(out, expected) < 1e-13


# --------------------------------------------------------------------------- rel_error


def test_rel_error():
    assert ref.rel_error([3.0, 4.0], [3.0, 4.0]) == 0.0
    # ||[0, 1]|| / ||[3, 4]|| = 1 / 5
    assert ref.rel_error([3.0, 5.0], [3.0, 4.0]) == pytest.approx(0.2, rel=1e-15)
    assert ref.rel_error([np.nan, 0.0], [1.0, 0.0]) == math.inf
    assert ref.rel_error([1.0, 0.0], [np.nan, 0.0]) == math.inf
    assert ref.rel_error([np.inf, 0.0], [1.0, 0.0]) == math.inf
    assert ref.rel_error([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert ref.rel_error([1e-30, 0.0], [0.0, 0.0]) == math.inf
    with pytest.raises(ValueError):
        ref.rel_error([1.0], [1.0, 2.0])
