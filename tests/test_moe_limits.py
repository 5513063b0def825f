"""Limits of the MoE layer, each tested from both sides, and the argument checks
of the step-by-step outputs and the fixed-capacity path (CPU, fake arrays)."""

from __future__ import annotations

import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.moe.checks import check_routing
from cublas_grouped.moe.fixed_capacity import MAX_FIXED_CAPACITY_TOKENS, check_fixed_capacity_args

H, E, INTER = 16, 4, 8


def test_pairs_limit_from_both_sides(fake):
    check_routing(fake((2**31 - 1, 1), np.int32), None, None)  # the largest accepted
    check_routing(fake((2**30 - 1, 2), np.int32), None, None)
    for shape in ((2**31, 1), (2**30, 2), (2**28, 8)):
        with pytest.raises(ValueError, match="T\\*k must stay below 2\\*\\*31"):
            check_routing(fake(shape, np.int32), None, None)
    with pytest.raises(ValueError, match=r"topk_ids has 1073741824 x 2 = 2147483648 \(token, expert\) pairs"):
        cg.moe_forward(
            fake((2**30, H)), fake((2**30, 2), np.int32), None, fake((E, H, 2 * INTER)), fake((E, INTER, H))
        )


def test_fixed_capacity_token_limit_from_both_sides(fake):
    check_fixed_capacity_args(MAX_FIXED_CAPACITY_TOKENS, None)
    with pytest.raises(
        ValueError, match=f"fixed_capacity=True takes at most {MAX_FIXED_CAPACITY_TOKENS} tokens"
    ):
        check_fixed_capacity_args(MAX_FIXED_CAPACITY_TOKENS + 1, None)
    tokens = MAX_FIXED_CAPACITY_TOKENS + 1
    with pytest.raises(ValueError, match="takes at most"):
        cg.moe_forward(
            fake((tokens, H)),
            fake((tokens, 2), np.int32),
            None,
            fake((E, H, 2 * INTER)),
            fake((E, INTER, H)),
            fixed_capacity=True,
        )


def test_fixed_capacity_limit_is_checked_before_any_gpu_work(fake):
    w1, w2 = fake((E, H, 2 * INTER)), fake((E, INTER, H))
    with pytest.raises(ValueError, match=f"max_tokens={MAX_FIXED_CAPACITY_TOKENS + 1} is too large"):
        cg.FixedCapacityMoE(w1, w2, 2, max_tokens=MAX_FIXED_CAPACITY_TOKENS + 1)


@pytest.mark.parametrize(
    "counter, match",
    [
        (
            ((2,), np.uint64),
            r"dropped_pairs must be a uint64 or int64 array of shape \(1,\); got uint64 \(2,\)",
        ),
        (
            ((1,), np.int32),
            r"dropped_pairs must be a uint64 or int64 array of shape \(1,\); got int32 \(1,\)",
        ),
    ],
)
def test_dropped_pairs_argument(fake, counter, match):
    with pytest.raises(ValueError, match=match):
        check_fixed_capacity_args(4, fake(*counter))
    check_fixed_capacity_args(4, fake((1,), np.int64))
    check_fixed_capacity_args(4, fake((1,), np.uint64))


def test_dropped_pairs_needs_fixed_capacity(fake):
    with pytest.raises(ValueError, match="dropped_pairs applies only with fixed_capacity=True"):
        cg.moe_forward(
            fake((6, H)),
            fake((6, 2), np.int32),
            None,
            fake((E, H, 2 * INTER)),
            fake((E, INTER, H)),
            dropped_pairs=fake((1,), np.uint64),
        )


@pytest.fixture
def inp(fake):
    """A DispatchPlan over fake arrays: 6 tokens, k = 2, 12 rows."""
    return cg.DispatchPlan(
        rows=fake((12, H)),
        pair_to_row=fake((12,), np.int32),
        row_to_pair=fake((12,), np.int32),
        topk_ids=fake((6, 2), np.int32),
        topk_weights=None,
        tokens_per_expert=fake((E,), np.int32),
        expert_offsets=fake((E + 1,), np.int32),
        counts_host=np.array([3, 3, 3, 3]),
        algorithm=cg.Algorithm.CUBLAS_GROUPED,
        layout=cg.RowLayout(),
        num_tokens=6,
        top_k=2,
        num_experts=E,
        stream=0,
    )


@pytest.mark.parametrize("function", [cg.combine_output, cg.scatter_output])
def test_output_checks(fake, inp, function):
    with pytest.raises(TypeError, match="inp must be a DispatchPlan from prepare_input; got dict"):
        function(fake((12, H)), {})
    with pytest.raises(ValueError, match=r"expert_outputs must be 2-D \[12, N\]"):
        function(fake((11, H)), inp)
    with pytest.raises(ValueError, match=r"expert_outputs must be 2-D \[12, N\]"):
        function(fake((12, H, 1)), inp)
    with pytest.raises(TypeError, match="expert_outputs has dtype float64"):
        function(fake((12, H), np.float64), inp)
    with pytest.raises(ValueError, match="expert_outputs must be C-contiguous"):
        function(fake((12, H), strides=(4, 48)), inp)
    with pytest.raises(ValueError, match="expert_outputs is on device 1 but inp on device 0"):
        function(fake((12, H), device=1), inp)
    with pytest.raises(TypeError, match="expert_outputs is a NumPy array in host memory"):
        function(np.zeros((12, H), np.float32), inp)


def test_combine_bias_and_weighted_checks(fake, inp):
    y = fake((12, H))
    with pytest.raises(ValueError, match=r"bias must be a C-contiguous float32 array of shape \(4, 16\)"):
        cg.combine_output(y, inp, bias=fake((E, H + 1)))
    with pytest.raises(ValueError, match=r"bias must be a C-contiguous float32 array of shape \(4, 16\)"):
        cg.combine_output(y, inp, bias=fake((E, H), np.float16))
    with pytest.raises(ValueError, match=r"bias must be a C-contiguous float32 array of shape \(4, 16\)"):
        cg.combine_output(y, inp, bias=fake((E, H), strides=(4, 16)))
    with pytest.raises(TypeError, match="weighted must be a bool; got int"):
        cg.combine_output(y, inp, weighted=1)


def test_scatter_original_shape_check(fake, inp):
    with pytest.raises(
        ValueError, match=r"original_shape \(6, 2, 17\) holds 204 elements but the output has 12"
    ):
        cg.scatter_output(fake((12, H)), inp, original_shape=(6, 2, H + 1))
