"""Float64 NumPy references for the kernels and for the whole MoE layer.

Each function here is the plain, obviously-correct twin of one GPU kernel (or
of the full forward pass) and follows the same contract, so tests can compare
a GPU result against it. Everything is pure NumPy and imports without a GPU.

Inputs may be any array-likes NumPy understands (including ``ml_dtypes``
bfloat16 arrays); values are taken as numbers and computed in float64. Index
arrays are returned as int32, value arrays as float64.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "activation_ref",
    "combine_ref",
    "gather_ref",
    "gmm_ref",
    "moe_backward_ref",
    "moe_forward_ref",
    "pair_to_row_of",
    "plan_ref",
    "rel_error",
    "route_backward_ref",
    "route_ref",
    "scatter_ref",
]

#: Activation names in the order of the kernels' integer codes (0, 1, 2).
ACTIVATIONS = ("silu", "gelu", "relu")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _act_name(act) -> str:
    if isinstance(act, (int, np.integer)) and not isinstance(act, bool):
        if not 0 <= int(act) < len(ACTIVATIONS):
            raise ValueError(f"unknown activation code {act!r}")
        return ACTIVATIONS[int(act)]
    if isinstance(act, str) and act.lower() in ACTIVATIONS:
        return act.lower()
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS} or 0/1/2")


def _erf(z: np.ndarray) -> np.ndarray:
    # SciPy's vectorized erf when it is installed (it is optional), else the
    # standard library's, element by element.
    try:
        from scipy.special import erf
    except ImportError:
        return np.vectorize(math.erf, otypes=[np.float64])(z)
    return erf(z)


def _apply_act(z: np.ndarray, name: str) -> np.ndarray:
    if name == "silu":
        with np.errstate(over="ignore"):
            return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    # ReLU that keeps NaN a NaN, like the kernel.
    return np.where(z < 0.0, 0.0, z)


def _act_grad(z: np.ndarray, name: str) -> np.ndarray:
    """d act(z) / dz; ReLU's is 0 at 0, and NaN stays NaN."""
    if name == "silu":
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return np.where(z > 0.0, 1.0, np.where(z <= 0.0, 0.0, z))


def route_ref(logits, top_k: int, scoring: str = "softmax", renormalize: bool = True):
    """Reference of ``route_topk``: top-k experts per token and their weights.

    Args:
        logits: ``[T, E]`` router logits.
        top_k: experts per token, ``1 <= top_k <= E``.
        scoring: ``"softmax"`` (over all E logits, max-subtracted) or
            ``"sigmoid"`` (per logit).
        renormalize: divide the k selected scores by their sum.

    Returns:
        ``(weights, ids)``: float64 ``[T, k]`` and int32 ``[T, k]``, in
        descending score order. Ties go to the lower expert index (a stable
        argsort of ``-scores``); NaN scores rank last.
    """
    z = _f64(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D [T, E], got shape {z.shape}")
    num_experts = z.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if scoring == "softmax":
        with np.errstate(invalid="ignore"):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            scores = e / e.sum(axis=1, keepdims=True)
    elif scoring == "sigmoid":
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-z))
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return weights, ids.astype(np.int32)


def plan_ref(topk_ids, num_experts: int, align: int = 1) -> dict:
    """Reference of the dispatch plan (dispatch.cu + build_pointers, contiguous mode).

    Pairs ``p = t * k + j`` are sorted by expert, stably (token order is kept
    within an expert). Expert e owns rows ``[row_offsets[e],
    row_offsets[e] + counts[e])``; each expert's block is padded up to a
    multiple of ``align`` rows, and padding rows map to pair -1.

    Returns:
        dict of int32 arrays: ``counts`` [E], ``row_offsets`` [E + 1],
        ``pair_to_row`` [T * k], ``row_to_pair`` [row_offsets[E]].
    """
    ids = np.asarray(topk_ids).reshape(-1).astype(np.int64)
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts})")
    counts = np.bincount(ids, minlength=num_experts).astype(np.int64)
    padded = -(-counts // align) * align
    row_offsets = np.zeros(num_experts + 1, dtype=np.int64)
    np.cumsum(padded, out=row_offsets[1:])
    order = np.argsort(ids, kind="stable")  # pairs in (expert, pair) order
    sorted_ids = ids[order]
    # Rank of each pair among the pairs of its expert.
    first_of_expert = np.zeros(num_experts, dtype=np.int64)
    np.cumsum(counts[:-1], out=first_of_expert[1:])
    rank = np.arange(ids.size, dtype=np.int64) - first_of_expert[sorted_ids]
    pair_to_row = np.empty(ids.size, dtype=np.int64)
    pair_to_row[order] = row_offsets[sorted_ids] + rank
    row_to_pair = np.full(int(row_offsets[-1]), -1, dtype=np.int64)
    row_to_pair[pair_to_row] = np.arange(ids.size)
    return {
        "counts": counts.astype(np.int32),
        "row_offsets": row_offsets.astype(np.int32),
        "pair_to_row": pair_to_row.astype(np.int32),
        "row_to_pair": row_to_pair.astype(np.int32),
    }


def gather_ref(x, row_to_pair, top_k: int) -> np.ndarray:
    """Reference of ``gather_rows``: ``out[r] = x[row_to_pair[r] // top_k]``.

    Rows with ``row_to_pair[r] < 0`` (padding) are zeros. Returns float64
    ``[num_rows, H]``.
    """
    x = _f64(x)
    r2p = np.asarray(row_to_pair).astype(np.int64).reshape(-1)
    out = np.zeros((r2p.size, x.shape[1]), dtype=np.float64)
    valid = r2p >= 0
    out[valid] = x[r2p[valid] // top_k]
    return out


def pair_to_row_of(row_to_pair, num_pairs: int) -> np.ndarray:
    """The inverse of ``row_to_pair``, as assign_rows writes both: ``[num_pairs]``
    int32, the row of each pair, -1 for a pair no row names (what the
    by-token gather, ``gather_rows_by_token``, reads beside ``row_to_pair``)."""
    r2p = np.asarray(row_to_pair).astype(np.int64).reshape(-1)
    out = np.full(num_pairs, -1, dtype=np.int32)
    rows = np.flatnonzero(r2p >= 0)
    out[r2p[rows]] = rows
    return out


def scatter_ref(y, pair_to_row) -> np.ndarray:
    """Reference of ``scatter_rows``: ``out[p] = y[pair_to_row[p]]``.

    Pairs with ``pair_to_row[p] < 0`` get zeros. Returns float64
    ``[num_pairs, H]``.
    """
    y = _f64(y)
    p2r = np.asarray(pair_to_row).astype(np.int64).reshape(-1)
    out = np.zeros((p2r.size, y.shape[1]), dtype=np.float64)
    valid = p2r >= 0
    out[valid] = y[p2r[valid]]
    return out


def combine_ref(y, pair_to_row, topk_weights, topk_ids, bias=None) -> np.ndarray:
    """Reference of ``combine_rows``: weighted sum of each token's k expert rows.

    ``out[t] = sum_j w[t, j] * (y[pair_to_row[t*k + j]] + bias[ids[t, j]])``,
    j in order, with ``w = 1`` when ``topk_weights`` is None, no bias when
    ``bias`` is None, and pairs with ``pair_to_row < 0`` skipped.

    Args:
        y: ``[num_rows, H]`` expert-ordered rows.
        pair_to_row: ``[T * k]``.
        topk_weights: ``[T, k]`` or None.
        topk_ids: ``[T, k]`` (gives T and k; ids used only with a bias).
        bias: ``[E, H]`` or None.

    Returns:
        float64 ``[T, H]``.
    """
    y = _f64(y)
    ids = np.asarray(topk_ids).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {ids.shape}")
    num_tokens, top_k = ids.shape
    p2r = np.asarray(pair_to_row).astype(np.int64).reshape(num_tokens, top_k)
    w = np.ones((num_tokens, top_k)) if topk_weights is None else _f64(topk_weights)
    w = w.reshape(num_tokens, top_k)
    out = np.zeros((num_tokens, y.shape[1]), dtype=np.float64)
    b = None if bias is None else _f64(bias)
    for j in range(top_k):
        valid = p2r[:, j] >= 0
        rows = y[p2r[valid, j]]
        if b is not None:
            rows = rows + b[ids[valid, j]]
        out[valid] += w[valid, j, None] * rows
    return out


def activation_ref(h, inter: int, gated: bool, act, bias=None, row_expert=None) -> np.ndarray:
    """Reference of ``expert_activation``.

    Args:
        h: ``[R, 2*inter]`` if gated (gate columns first, then up) else
            ``[R, inter]``.
        inter: expert width I.
        gated: ``act(z[:, :I]) * z[:, I:]`` if true, else ``act(z)``.
        act: ``"silu"``, ``"gelu"`` (exact, erf), ``"relu"``, or the kernel
            codes 0 / 1 / 2.
        bias: ``[E, W]`` per-expert bias added before the activation, or None.
        row_expert: ``[R]`` expert of each row (``topk_ids[row_to_pair[r]]``),
            with a negative value marking a padding row, which becomes zeros.
            Required with a bias; None means every row is a real row.

    Returns:
        float64 ``[R, inter]``.
    """
    name = _act_name(act)
    z = _f64(h)
    width = 2 * inter if gated else inter
    if z.ndim != 2 or z.shape[1] != width:
        raise ValueError(f"h must be [R, {width}], got shape {z.shape}")
    valid = np.ones(z.shape[0], dtype=bool)
    if row_expert is not None:
        re = np.asarray(row_expert).astype(np.int64).reshape(-1)
        valid = re >= 0
    if bias is not None:
        if row_expert is None:
            raise ValueError("a bias needs row_expert (the expert of each row)")
        z = z.copy()
        z[valid] += _f64(bias)[re[valid]]
    if gated:
        out = _apply_act(z[:, :inter], name) * z[:, inter:]
    else:
        out = _apply_act(z, name)
    out[~valid] = 0.0
    return out


def gmm_ref(a, b, group_sizes, trans_a: bool = False, trans_b: bool = False) -> np.ndarray:
    """Reference grouped matrix product, in float64.

    Without ``trans_a``: ``a`` is ``[M, K]`` with rows grouped by
    ``group_sizes`` (``sum <= M``); ``b`` is ``[E, K, N]`` (``[E, N, K]`` with
    ``trans_b``, the ``nn.Linear`` layout). Returns ``[M, N]`` where rows of
    group e are ``a_e @ b[e]``; rows past ``sum(group_sizes)`` are zeros.

    With ``trans_a`` (the weight-gradient form): ``a`` is ``[M, K]`` and ``b``
    is ``[M, N]``, both grouped along M; returns ``[E, K, N]`` with
    ``out[e] = a_e.T @ b_e``, zeros for empty groups. ``trans_b`` cannot be
    combined with ``trans_a``.
    """
    a = _f64(a)
    b = _f64(b)
    sizes = np.asarray(group_sizes).astype(np.int64).reshape(-1)
    if (sizes < 0).any():
        raise ValueError("group sizes must be non-negative")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if a.ndim != 2:
        raise ValueError(f"a must be 2-D, got shape {a.shape}")
    if offsets[-1] > a.shape[0]:
        raise ValueError(f"group sizes sum to {offsets[-1]} > {a.shape[0]} rows")
    num_groups = sizes.size
    if trans_a:
        if trans_b:
            raise ValueError("trans_a and trans_b together are not supported")
        if b.ndim != 2 or b.shape[0] != a.shape[0]:
            raise ValueError(f"with trans_a, b must be [M, N] with M = {a.shape[0]}")
        out = np.zeros((num_groups, a.shape[1], b.shape[1]), dtype=np.float64)
        for e in range(num_groups):
            s, t = offsets[e], offsets[e + 1]
            out[e] = a[s:t].T @ b[s:t]
        return out
    if b.ndim != 3 or b.shape[0] != num_groups:
        raise ValueError(f"b must be [E, K, N] with E = {num_groups}, got shape {b.shape}")
    w = np.swapaxes(b, 1, 2) if trans_b else b
    if w.shape[1] != a.shape[1]:
        raise ValueError(f"inner dimensions differ: a has K = {a.shape[1]}, b has {w.shape[1]}")
    out = np.zeros((a.shape[0], w.shape[2]), dtype=np.float64)
    for e in range(num_groups):
        s, t = offsets[e], offsets[e + 1]
        out[s:t] = a[s:t] @ w[e]
    return out


def moe_forward_ref(
    x,
    topk_ids,
    topk_weights,
    w1,
    w2,
    b1=None,
    b2=None,
    activation: str = "silu",
    gated: bool = True,
) -> np.ndarray:
    """Reference of one MoE expert layer, token by token in float64.

    ``out[t] = sum_j w[t, j] * (act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e])``
    with ``e = topk_ids[t, j]``; gated: ``act(g) * u`` where the first I
    columns of ``x[t] @ w1[e] + b1[e]`` are ``g`` and the next I are ``u``.

    Args:
        x: ``[T, H]``.
        topk_ids: ``[T, k]``.
        topk_weights: ``[T, k]``, or None for weight 1.
        w1: ``[E, H, 2I]`` if gated else ``[E, H, I]``.
        w2: ``[E, I, H]``.
        b1: ``[E, 2I]`` / ``[E, I]`` or None.
        b2: ``[E, H]`` or None.
        activation: ``"silu"``, ``"gelu"`` or ``"relu"``.
        gated: see above.

    Returns:
        float64 ``[T, H]``.
    """
    name = _act_name(activation)
    x = _f64(x)
    ids = np.asarray(topk_ids).astype(np.int64)
    num_tokens, top_k = ids.shape
    w = np.ones(ids.shape) if topk_weights is None else _f64(topk_weights).reshape(ids.shape)
    w1 = _f64(w1)
    w2 = _f64(w2)
    num_experts, _, inter = w2.shape[0], w2.shape[2], w2.shape[1]
    if w1.shape[2] != (2 * inter if gated else inter):
        raise ValueError(f"w1 has {w1.shape[2]} columns, expected {(2 if gated else 1) * inter}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts})")
    b1 = None if b1 is None else _f64(b1)
    b2 = None if b2 is None else _f64(b2)
    out = np.zeros((num_tokens, x.shape[1]), dtype=np.float64)
    # Expert by expert (each token row done once per choice): same maths as
    # a per-token loop, far fewer NumPy calls.
    for e in range(num_experts):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        z = x[tok] @ w1[e]
        if b1 is not None:
            z = z + b1[e]
        hid = _apply_act(z[:, :inter], name) * z[:, inter:] if gated else _apply_act(z, name)
        y = hid @ w2[e]
        if b2 is not None:
            y = y + b2[e]
        np.add.at(out, tok, w[tok, slot, None] * y)
    return out


def moe_backward_ref(
    x,
    topk_ids,
    topk_weights,
    w1,
    w2,
    dy,
    b1=None,
    b2=None,
    activation: str = "silu",
    gated: bool = True,
) -> dict:
    """Reference gradients of :func:`moe_forward_ref` for an upstream gradient ``dy`` [T, H].

    Same arguments as :func:`moe_forward_ref`, plus ``dy``. Returns a dict of
    float64 arrays: ``dx`` [T, H], ``dw1`` (w1's shape), ``dw2``, ``db1``,
    ``db2`` (None without that bias) and ``d_topk_weights`` [T, k] (None when
    ``topk_weights`` is None): ``d_w[t, j] = dy[t] . (expert output of pair
    (t, j), bias included)``. Experts nobody chose get zero gradients.
    """
    name = _act_name(activation)
    x, dy, w1, w2 = _f64(x), _f64(dy), _f64(w1), _f64(w2)
    ids = np.asarray(topk_ids).astype(np.int64)
    w = np.ones(ids.shape) if topk_weights is None else _f64(topk_weights).reshape(ids.shape)
    inter = w2.shape[1]
    if w1.shape[2] != (2 * inter if gated else inter):
        raise ValueError(f"w1 has {w1.shape[2]} columns, expected {(2 if gated else 1) * inter}")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {x.shape}; got {dy.shape}")
    b1 = None if b1 is None else _f64(b1)
    b2 = None if b2 is None else _f64(b2)
    dx, dw1, dw2 = np.zeros_like(x), np.zeros_like(w1), np.zeros_like(w2)
    db1 = None if b1 is None else np.zeros_like(b1)
    db2 = None if b2 is None else np.zeros_like(b2)
    d_w = np.zeros(ids.shape)
    for e in range(w2.shape[0]):
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        z = x[tok] @ w1[e] + (0.0 if b1 is None else b1[e])
        v = _apply_act(z[:, :inter], name)
        a = v * z[:, inter:] if gated else v
        y = a @ w2[e] + (0.0 if b2 is None else b2[e])
        d_w[tok, slot] = np.sum(dy[tok] * y, axis=1)
        dyw = w[tok, slot, None] * dy[tok]
        dw2[e] = a.T @ dyw
        da = dyw @ w2[e].T
        dz = da * _act_grad(z[:, :inter], name)
        if gated:
            dz = np.concatenate([dz * z[:, inter:], da * v], axis=1)
        dw1[e] = x[tok].T @ dz
        np.add.at(dx, tok, dz @ w1[e].T)
        if db1 is not None:
            db1[e] = dz.sum(axis=0)
        if db2 is not None:
            db2[e] = dyw.sum(axis=0)
    return {
        "dx": dx,
        "dw1": dw1,
        "dw2": dw2,
        "db1": db1,
        "db2": db2,
        "d_topk_weights": None if topk_weights is None else d_w,
    }


def route_backward_ref(
    logits, topk_ids, d_topk_weights, scoring: str = "softmax", renormalize: bool = True
) -> np.ndarray:
    """Gradient of :func:`route_ref`'s weights with respect to the logits (float64 [T, E]).

    The choice of experts (``topk_ids`` [T, k]) is held fixed: only the scores
    the chosen weights are made of carry a gradient.
    """
    z = _f64(logits)
    ids = np.asarray(topk_ids).astype(np.int64)
    dw = _f64(d_topk_weights).reshape(ids.shape)
    if scoring == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    elif scoring == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-z))
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    chosen = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        total = chosen.sum(axis=1, keepdims=True)
        dw = (dw - np.sum(dw * chosen / total, axis=1, keepdims=True)) / total
    d_scores = np.zeros_like(z)
    np.put_along_axis(d_scores, ids, dw, axis=1)
    if scoring == "softmax":
        return scores * (d_scores - np.sum(d_scores * scores, axis=1, keepdims=True))
    return d_scores * scores * (1.0 - scores)


def rel_error(out, ref) -> float:
    """Relative Frobenius error ``||out - ref|| / ||ref||`` in float64.

    Returns ``inf`` when either array holds a NaN (or the difference is not
    finite), and, for an all-zero ``ref``, 0.0 if ``out`` is all zeros too,
    else ``inf``.
    """
    o = _f64(out)
    r = _f64(ref)
    if o.shape != r.shape:
        raise ValueError(f"shapes differ: {o.shape} vs {r.shape}")
    if np.isnan(o).any() or np.isnan(r).any():
        return math.inf
    with np.errstate(invalid="ignore", over="ignore"):
        diff = o - r
    if not np.isfinite(diff).all():
        return math.inf
    dn = float(np.linalg.norm(diff.ravel()))
    rn = float(np.linalg.norm(r.ravel()))
    if rn == 0.0:
        return 0.0 if dn == 0.0 else math.inf
    return dn / rn
