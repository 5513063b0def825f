"""The float64 references in ``cublas_grouped.testing``, each checked against a
plain loop written differently (CPU).

The references are what every GPU result is compared with, so a bug in one
hides the same bug in a kernel. tests/test_references.py pins their contracts
on small hand-worked cases; here each one meets an independent twin, written
token by token (or element by element) in plain Python: ``math.exp`` and
``math.erf`` instead of NumPy, ``sorted`` with explicit keys instead of
``argsort``, explicit sums instead of matrix products. Sizes are chosen so
that the bugs that matter show: logits of +-800 (``exp`` overflows unless the
maximum is subtracted), hundreds of pairs per expert (an unstable sort
reorders tokens within an expert), many exact ties (ties must go to the lower
index), more than 16 experts (NumPy's sort is only stable by luck on short
rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from cublas_grouped import testing as ref

# --------------------------------------------------------------------------- twins


def softmax_row(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = math.fsum(e)
    return [v / total for v in e]


def sigmoid(v: float) -> float:
    # 1 / (1 + e^-v); below v = -709 e^-v overflows and the score is 0, as in
    # float64 arithmetic (such scores tie and go by expert index).
    try:
        return 1.0 / (1.0 + math.exp(-v))
    except OverflowError:
        return 0.0


def route_loop(logits: np.ndarray, top_k: int, scoring: str, renormalize: bool):
    weights, ids = [], []
    for row in logits.tolist():
        scores = softmax_row(row) if scoring == "softmax" else [sigmoid(v) for v in row]
        # Best score first, ties to the lower expert, NaN last.
        order = sorted(
            range(len(row)),
            key=lambda e: (math.isnan(scores[e]), -scores[e] if scores[e] == scores[e] else 0, e),
        )[:top_k]
        w = [scores[e] for e in order]
        if renormalize:
            total = sum(w)
            w = [v / total for v in w]
        weights.append(w)
        ids.append(order)
    return np.array(weights, dtype=np.float64), np.array(ids, dtype=np.int64)


def plan_loop(ids: np.ndarray, num_experts: int, align: int) -> dict:
    """Expert by expert, pair by pair: the obvious stable bucket sort."""
    flat = [int(v) for v in ids.reshape(-1)]
    counts = [flat.count(e) for e in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + math.ceil(c / align) * align)
    pair_to_row = [None] * len(flat)
    row_to_pair = [-1] * offsets[-1]
    for e in range(num_experts):
        row = offsets[e]
        for p, expert in enumerate(flat):
            if expert == e:
                pair_to_row[p] = row
                row_to_pair[row] = p
                row += 1
    return {"counts": counts, "row_offsets": offsets, "pair_to_row": pair_to_row, "row_to_pair": row_to_pair}


def act_scalar(v: float, name: str) -> float:
    if name == "silu":
        return v * sigmoid(v)
    if name == "gelu":
        return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    return v if (v != v or v >= 0.0) else 0.0  # relu keeps NaN


def dot(xs, ys) -> float:
    return math.fsum(a * b for a, b in zip(xs, ys))


def matmul_loop(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    cols = list(zip(*b))
    return [[dot(row, col) for col in cols] for row in a]


# --------------------------------------------------------------------------- routing


def _logit_cases(rng) -> dict[str, np.ndarray]:
    t, e = 64, 40
    return {
        # Moderate logits.
        "normal": rng.normal(0.0, 3.0, (t, e)),
        # All near 800: exp(800) overflows unless the maximum is subtracted.
        "large": 800.0 + rng.normal(0.0, 2.0, (t, e)),
        # Spread of 1600: subtracting anything but the maximum overflows.
        "wide": rng.uniform(-800.0, 800.0, (t, e)),
        # Few distinct values: many exact ties, more than 16 experts per row.
        "ties": rng.integers(-2, 3, (t, e)).astype(np.float64),
        # Ties at large magnitude.
        "large-ties": 800.0 + rng.integers(0, 3, (t, e)).astype(np.float64),
    }


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 6, 40])
def test_route_ref_against_loop(scoring, renormalize, top_k):
    rng = np.random.default_rng(7)
    for name, logits in _logit_cases(rng).items():
        w, ids = ref.route_ref(logits, top_k, scoring=scoring, renormalize=renormalize)
        w_loop, ids_loop = route_loop(logits, top_k, scoring, renormalize)
        assert np.isfinite(w).all(), name
        assert_array_equal(ids, ids_loop, err_msg=f"{name}: ids")
        assert_allclose(w, w_loop, rtol=1e-12, atol=1e-300, err_msg=f"{name}: weights")


def test_route_ref_large_logits_values():
    # The top score of logits [800, 800 - ln 3] is 3/4 whatever the offset.
    logits = np.array([[800.0, 800.0 - math.log(3.0)], [-800.0, 800.0]])
    w, ids = ref.route_ref(logits, 2, renormalize=False)
    assert_array_equal(ids, [[0, 1], [1, 0]])
    assert_allclose(w[0], [0.75, 0.25], rtol=1e-12)
    assert w[1, 0] == 1.0 and w[1, 1] == 0.0  # exp(-1600) underflows to 0


def test_route_ref_ties_keep_expert_order_beyond_16_experts():
    # 64 experts with 3 distinct logits: each tie group must list its experts
    # in increasing order (an unstable sort of 64 entries shuffles them).
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 3, (32, 64)).astype(np.float64)
    _, ids = ref.route_ref(logits, 64, renormalize=False)
    for row, order in zip(logits, ids):
        values = row[order]
        assert (np.diff(values) <= 0).all()
        for v in np.unique(values):
            group = order[values == v]
            assert group.tolist() == sorted(group.tolist())


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("align", [1, 8, 64])
def test_plan_ref_against_loop_many_pairs_per_expert(align):
    rng = np.random.default_rng(11)
    num_experts, tokens, top_k = 8, 600, 4
    # Skewed: expert 0 gets about half the pairs (hundreds of rows each).
    p = np.array([0.5] + [0.5 / 7] * 7)
    ids = rng.choice(num_experts, size=(tokens, top_k), p=p)
    plan = ref.plan_ref(ids, num_experts, align=align)
    loop = plan_loop(ids, num_experts, align)
    assert min(loop["counts"]) >= 100
    for key in ("counts", "row_offsets", "pair_to_row", "row_to_pair"):
        assert_array_equal(plan[key], loop[key], err_msg=key)


def test_plan_ref_rows_keep_pair_order_within_each_expert():
    # Two experts, 2000 pairs alternating in runs: stable order means each
    # expert's rows list its pairs in increasing pair index.
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 2, (1000, 2))
    plan = ref.plan_ref(ids, 2)
    r2p = plan["row_to_pair"]
    off = plan["row_offsets"]
    for e in range(2):
        block = r2p[off[e] : off[e + 1]]
        assert (np.diff(block) > 0).all()
        assert (ids.reshape(-1)[block] == e).all()


def test_plan_ref_against_loop_many_experts_and_empty_ones():
    rng = np.random.default_rng(2)
    num_experts = 300
    ids = rng.integers(0, 200, (256, 6))  # experts 200..299 stay empty
    plan = ref.plan_ref(ids, num_experts, align=16)
    loop = plan_loop(ids, num_experts, 16)
    for key in ("counts", "row_offsets", "pair_to_row", "row_to_pair"):
        assert_array_equal(plan[key], loop[key], err_msg=key)


# --------------------------------------------------------------------------- gather / scatter


def test_gather_and_scatter_ref_against_loops():
    rng = np.random.default_rng(4)
    tokens, top_k, num_experts, hidden = 300, 3, 5, 7
    ids = rng.integers(0, num_experts, (tokens, top_k))
    x = rng.normal(size=(tokens, hidden))
    loop = plan_loop(ids, num_experts, 8)
    r2p = loop["row_to_pair"]
    out = ref.gather_ref(x, np.array(r2p), top_k)
    expected = [[0.0] * hidden if p < 0 else [float(v) for v in x[p // top_k]] for p in r2p]
    assert_array_equal(out, expected)
    # Scatter back: pair p gets row pair_to_row[p], i.e. its own token.
    back = ref.scatter_ref(out, np.array(loop["pair_to_row"]))
    expected_back = [[float(v) for v in x[p // top_k]] for p in range(tokens * top_k)]
    assert_array_equal(back, expected_back)
    # Dropped pairs (negative rows) come back as zeros.
    p2r = np.array(loop["pair_to_row"])
    p2r[::5] = -1
    dropped = ref.scatter_ref(out, p2r)
    for p in range(tokens * top_k):
        want = [0.0] * hidden if p % 5 == 0 else expected_back[p]
        assert dropped[p].tolist() == want


# --------------------------------------------------------------------------- combine


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_combine_ref_against_loop(weighted, with_bias):
    rng = np.random.default_rng(9)
    tokens, top_k, num_experts, hidden = 120, 4, 6, 5
    ids = rng.integers(0, num_experts, (tokens, top_k))
    loop = plan_loop(ids, num_experts, 4)
    rows = loop["row_offsets"][-1]
    y = rng.normal(size=(rows, hidden))
    w = rng.uniform(0.0, 1.0, (tokens, top_k)) if weighted else None
    bias = rng.normal(size=(num_experts, hidden)) if with_bias else None
    p2r = np.array(loop["pair_to_row"])
    p2r[7::11] = -1  # some dropped pairs
    out = ref.combine_ref(y, p2r, w, ids, bias)
    for t in range(tokens):
        acc = [0.0] * hidden
        for j in range(top_k):
            row = p2r[t * top_k + j]
            if row < 0:
                continue
            scale = 1.0 if w is None else float(w[t, j])
            for h in range(hidden):
                v = float(y[row, h]) + (0.0 if bias is None else float(bias[ids[t, j], h]))
                acc[h] += scale * v
        assert_allclose(out[t], acc, rtol=1e-13, atol=1e-13, err_msg=f"token {t}")


# --------------------------------------------------------------------------- activation


@pytest.mark.parametrize("name", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_activation_ref_against_loop(name, gated):
    rng = np.random.default_rng(12)
    rows, inter, num_experts = 40, 6, 3
    width = 2 * inter if gated else inter
    h = rng.normal(0.0, 4.0, (rows, width))
    h[0, :] = 800.0  # silu(800) = 800: exp must not overflow
    h[1, :] = -800.0  # silu(-800) = -0
    h[2, :] = 0.0
    bias = rng.normal(size=(num_experts, width))
    row_expert = rng.integers(-1, num_experts, rows)  # -1: padding rows
    row_expert[:3] = 0
    for use_bias in (False, True):
        out = ref.activation_ref(
            h, inter, gated, name, bias=bias if use_bias else None, row_expert=row_expert
        )
        for r in range(rows):
            for c in range(inter):
                if row_expert[r] < 0:
                    want = 0.0
                else:
                    shift = bias[row_expert[r]] if use_bias else np.zeros(width)
                    gate = float(h[r, c]) + float(shift[c])
                    want = act_scalar(gate, name)
                    if gated:
                        want *= float(h[r, inter + c]) + float(shift[inter + c])
                assert out[r, c] == pytest.approx(want, rel=1e-13, abs=1e-300), (r, c, use_bias)


def test_activation_ref_known_values():
    # gelu(x) - gelu(-x) = x; silu(x) - silu(-x) = x; relu(-0.5) = 0.
    z = np.array([[0.3, -0.3, 2.5, -2.5]])
    for name in ("gelu", "silu"):
        out = ref.activation_ref(z, 4, False, name)[0]
        assert out[0] - out[1] == pytest.approx(0.3, rel=1e-14)
        assert out[2] - out[3] == pytest.approx(2.5, rel=1e-14)
    assert ref.activation_ref(np.array([[-0.5, 0.5]]), 2, False, "relu").tolist() == [[0.0, 0.5]]


# --------------------------------------------------------------------------- gmm


def _groups(a, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(a[start : start + s])
        start += s
    return out


@pytest.mark.parametrize("trans_b", [False, True])
def test_gmm_ref_against_loop(trans_b):
    rng = np.random.default_rng(13)
    sizes = [3, 0, 5, 1, 0, 4]
    m, k, n = sum(sizes) + 2, 4, 3  # two rows past the groups stay zero
    a = rng.normal(size=(m, k))
    w = rng.normal(size=(len(sizes), k, n))
    b = np.swapaxes(w, 1, 2).copy() if trans_b else w
    out = ref.gmm_ref(a, b, sizes, trans_b=trans_b)
    expected = []
    for e, rows in enumerate(_groups(a.tolist(), sizes)):
        expected += matmul_loop(rows, w[e].tolist())
    expected += [[0.0] * n] * (m - sum(sizes))
    assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


def test_gmm_ref_trans_a_against_loop():
    rng = np.random.default_rng(14)
    sizes = [2, 0, 6, 3]
    m, k, n = sum(sizes), 5, 3
    a = rng.normal(size=(m, k))
    b = rng.normal(size=(m, n))
    out = ref.gmm_ref(a, b, sizes, trans_a=True)
    assert out.shape == (len(sizes), k, n)
    a_groups, b_groups = _groups(a.tolist(), sizes), _groups(b.tolist(), sizes)
    for e in range(len(sizes)):
        for i in range(k):
            for j in range(n):
                want = math.fsum(ra[i] * rb[j] for ra, rb in zip(a_groups[e], b_groups[e]))
                assert out[e, i, j] == pytest.approx(want, rel=1e-13, abs=1e-13)


# --------------------------------------------------------------------------- moe forward


def moe_loop(x, ids, w, w1, w2, b1, b2, name, gated):
    """Token by token, choice by choice, in plain Python."""
    tokens, top_k = ids.shape
    inter = w2.shape[1]
    out = []
    for t in range(tokens):
        acc = [0.0] * x.shape[1]
        for j in range(top_k):
            e = int(ids[t, j])
            z = [dot(x[t].tolist(), w1[e, :, c].tolist()) for c in range(w1.shape[2])]
            if b1 is not None:
                z = [v + float(b) for v, b in zip(z, b1[e])]
            if gated:
                hid = [act_scalar(z[c], name) * z[inter + c] for c in range(inter)]
            else:
                hid = [act_scalar(v, name) for v in z]
            y = [dot(hid, w2[e, :, c].tolist()) for c in range(w2.shape[2])]
            if b2 is not None:
                y = [v + float(b) for v, b in zip(y, b2[e])]
            scale = 1.0 if w is None else float(w[t, j])
            acc = [a + scale * v for a, v in zip(acc, y)]
        out.append(acc)
    return out


@pytest.mark.parametrize(
    "name, gated, biases, weighted",
    [
        ("silu", True, True, True),
        ("gelu", True, False, True),
        ("relu", False, True, False),
        ("silu", False, False, True),
    ],
)
def test_moe_forward_ref_against_loop(name, gated, biases, weighted):
    rng = np.random.default_rng(15)
    tokens, hidden, inter, num_experts, top_k = 24, 6, 4, 5, 3
    x = rng.normal(size=(tokens, hidden))
    # Distinct experts per token, plus one token that names an expert twice.
    ids = np.array([rng.permutation(num_experts)[:top_k] for _ in range(tokens)])
    ids[0] = [2, 2, 4]
    w = rng.uniform(0.1, 1.0, (tokens, top_k)) if weighted else None
    w1 = rng.normal(size=(num_experts, hidden, (2 if gated else 1) * inter)) / 2
    w2 = rng.normal(size=(num_experts, inter, hidden)) / 2
    b1 = rng.normal(size=(num_experts, w1.shape[2])) if biases else None
    b2 = rng.normal(size=(num_experts, hidden)) if biases else None
    out = ref.moe_forward_ref(x, ids, w, w1, w2, b1, b2, activation=name, gated=gated)
    expected = moe_loop(x, ids, w, w1, w2, b1, b2, name, gated)
    assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_moe_forward_ref_hundreds_of_pairs_per_expert():
    # 400 tokens over 4 experts (k = 2): each expert handles about 200 pairs,
    # and every token's two choices must land back on that token.
    rng = np.random.default_rng(16)
    tokens, hidden, inter, num_experts = 400, 8, 4, 4
    x = rng.normal(size=(tokens, hidden))
    ids = np.array([rng.permutation(num_experts)[:2] for _ in range(tokens)])
    w = rng.uniform(0.1, 1.0, (tokens, 2))
    w1 = rng.normal(size=(num_experts, hidden, 2 * inter)) / 3
    w2 = rng.normal(size=(num_experts, inter, hidden)) / 3
    out = ref.moe_forward_ref(x, ids, w, w1, w2)
    for t in range(tokens):
        acc = np.zeros(hidden)
        for j in range(2):
            e = ids[t, j]
            z = x[t] @ w1[e]  # one token at a time, not the reference's batched form
            hid = np.array([act_scalar(v, "silu") for v in z[:inter]]) * z[inter:]
            acc += w[t, j] * (hid @ w2[e])
        assert_allclose(out[t], acc, rtol=1e-12, atol=1e-12, err_msg=f"token {t}")


# --------------------------------------------------------------------------- rel_error


def test_rel_error_against_loop():
    rng = np.random.default_rng(17)
    a = rng.normal(size=(20, 3))
    b = a + rng.normal(scale=1e-3, size=a.shape)
    num = math.sqrt(math.fsum((u - v) ** 2 for u, v in zip(b.ravel().tolist(), a.ravel().tolist())))
    den = math.sqrt(math.fsum(v * v for v in a.ravel().tolist()))
    assert ref.rel_error(b, a) == pytest.approx(num / den, rel=1e-12)
