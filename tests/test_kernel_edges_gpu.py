"""GPU tests for kernel behaviour the rest of the GPU suite leaves open, found
by mutating the kernels (tools/kernel_mutants.py, docs/testing.md):

- routing ties: exactly equal scores go to the lower expert id, as documented
  (random logits almost never tie);
- the scalar (not 16-byte) paths of the row kernels: rows whose byte width is
  not a multiple of 16 (every other layer test uses vector-friendly widths);
- float -> bfloat16 rounding at exact ties: to even, bit for bit (a
  reference comparison with a tolerance cannot see one ulp).

Expected values come from the float64 references and from ml_dtypes' own
(round-to-nearest-even) conversion, never from the kernels.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import check_close, device_random

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("experts, k", [(8, 3), (64, 8), (200, 16)])
def test_route_ties_go_to_the_lower_expert(scoring, experts, k):
    import cupy

    rng = np.random.default_rng(experts + k)
    # Three distinct values: every row is full of exact ties, in float32 as in
    # float64 (equal logits give bit-equal scores); distinct values are far apart.
    logits = rng.integers(-1, 2, (96, experts)).astype(np.float32)
    weights, ids = cg.route(cupy.asarray(logits), k, scoring=scoring)
    ref_w, ref_ids = ref.route_ref(logits.astype(np.float64), k, scoring=scoring)
    assert (cupy.asnumpy(ids) == ref_ids).all()
    np.testing.assert_allclose(cupy.asnumpy(weights), ref_w, rtol=1e-5, atol=1e-7)


def test_route_nan_logits_rank_last():
    import cupy

    logits = np.zeros((4, 40), dtype=np.float32)
    logits[:, ::3] = np.nan  # a third of the experts score NaN under sigmoid
    logits[1, 5] = 2.0
    logits[2, 39] = 1.0
    _, ids = cg.route(cupy.asarray(logits), 10, scoring="sigmoid", renormalize=False)
    _, ref_ids = ref.route_ref(logits.astype(np.float64), 10, scoring="sigmoid", renormalize=False)
    assert (cupy.asnumpy(ids) == ref_ids).all()


@pytest.mark.parametrize(
    "dtype, hidden, inter, tol",
    [
        (np.float32, 33, 17, 1e-5),  # 132- and 68-byte rows: scalar everywhere
        (np.float32, 40, 13, 1e-5),  # 160-byte rows vectorize, the 52-byte activation rows do not
        (np.float32, 33, 16, 1e-5),  # scalar gather/combine/scatter, vector activation
        (ml_dtypes.bfloat16, 36, 12, 2e-2),  # 72- and 24-byte rows: scalar
    ],
)
@pytest.mark.parametrize("activation, gated", [("silu", True), ("gelu", False), ("relu", True)])
def test_layer_with_row_widths_off_the_vector_path(dtype, hidden, inter, tol, activation, gated):
    import cupy

    rng = np.random.default_rng(hidden * inter)
    tokens, experts, k = 70, 6, 2
    width = 2 * inter if gated else inter
    ids_h = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    w_h = rng.random((tokens, k)).astype(np.float32)
    x, x64 = device_random(rng, (tokens, hidden), dtype)
    w1, w1_64 = device_random(rng, (experts, hidden, width), dtype, scale=hidden**-0.5)
    w2, w2_64 = device_random(rng, (experts, inter, hidden), dtype, scale=inter**-0.5)
    b1, b1_64 = device_random(rng, (experts, width), dtype, scale=0.1)
    b2, b2_64 = device_random(rng, (experts, hidden), dtype, scale=0.1)
    ids, w = cupy.asarray(ids_h), cupy.asarray(w_h)
    expected = ref.moe_forward_ref(
        x64, ids_h, w_h.astype(np.float64), w1_64, w2_64, b1_64, b2_64, activation, gated
    )
    for algorithm in ("cublas_grouped", "chunked_batched"):
        out = cg.moe_forward(
            x, ids, w, w1, w2, b1=b1, b2=b2, activation=activation, gated=gated, algorithm=algorithm
        )
        check_close(out, expected, tol, f"{np.dtype(dtype).name} H={hidden} I={inter} {algorithm}")
    # The step-by-step pieces on the same widths: gather, then scatter back bit for bit.
    inp = cg.prepare_input(x, (w, ids), experts, algorithm="chunked_batched")
    back = cg.scatter_output(inp.rows, inp)
    assert (cupy.asnumpy(back).astype(np.float64) == np.repeat(x64, k, axis=0)).all()


@pytest.mark.parametrize("hidden", [8, 12])  # 16-byte rows (vector path) and 24-byte rows (scalar)
def test_combine_rounds_bfloat16_ties_to_even(hidden):
    import cupy

    one = 1.0
    # bfloat16 keeps 8 significant bits: near 1 its step is 2**-7, so
    # 1 + 2**-8 is exactly halfway between 1 and 1 + 2**-7.
    weights = np.array(
        [
            one + 2.0**-8,  # tie, 1 is even: 1
            one + 3 * 2.0**-8,  # tie between 1 + 2**-7 (odd) and 1 + 2**-6 (even): 1 + 2**-6
            one + 2.0**-8 + 2.0**-20,  # just above the tie: 1 + 2**-7
            -(one + 2.0**-8),  # negative tie: -1
            one + 2.0**-9,  # below the tie: 1
            2.0 + 2.0**-7,  # tie at the next binade (step 2**-6): 2
        ],
        dtype=np.float32,
    )
    expected_values = [1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -1.0, 1.0, 2.0]
    # ml_dtypes rounds to nearest even too: the two must agree.
    assert weights.astype(ml_dtypes.bfloat16).astype(np.float64).tolist() == expected_values
    tokens, experts = len(weights), 4
    x = cupy.asarray(np.ones((tokens, hidden), dtype=ml_dtypes.bfloat16))
    ids = cupy.asarray((np.arange(tokens) % experts).reshape(tokens, 1).astype(np.int32))
    w = cupy.asarray(weights.reshape(tokens, 1))
    inp = cg.prepare_input(x, (w, ids), experts)
    out = cg.combine_output(inp.rows, inp)  # out[t] = w[t] * 1.0, rounded once to bfloat16
    got = cupy.asnumpy(out).astype(np.float64)
    assert got.tolist() == [[v] * hidden for v in expected_values]
