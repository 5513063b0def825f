"""The MoE layer's backward pass: gradients of :func:`cublas_grouped.moe_forward`.

``moe_forward(..., return_context=True)`` runs the forward through
:func:`forward_with_context` and returns ``(out, ctx)``; :func:`moe_backward`
turns ``ctx`` and dLoss/dout into every gradient. With ``w`` the routing
weight of pair (t, j), ``e`` its expert and ``r`` its expert-ordered row::

    dY rows:   G[r] = dy[t]                          (gather, unweighted)
    g          = G @ W2[e]^T                         (grouped GEMM)
    dz, w*a, d_w[t, j] = g[r] . a[r] + dy[t] . b2[e]  (one kernel, per row)
    dW2[e]     = (w*a)_e^T @ G_e,  db2[e] = sum_r w G[r]   (K-grouped GEMM, column sums)
    dW1[e]     = X_e^T @ dz_e,     db1[e] = sum_r dz[r]
    dx[t]      = sum_j (dz @ W1[e]^T)[row(t, j)]     (grouped GEMM, then the combine kernel)

Deterministic: every sum has a fixed order and no kernel uses atomics, so two
runs give the same bits; experts without tokens get exact zeros. The context
keeps the first GEMM's output h ([R, W] of x's dtype, R = rows of the layout,
W = 2I gated or I), or, with ``recompute=True``, nothing but the dispatch
indices, and the backward recomputes h (one more grouped GEMM). See
docs/backward.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..runtime.arrays import as_cupy, view
from ..runtime.device import stream_resources
from . import backward_kernels as BK
from . import kernels as K
from .checks import LayerShape, device_of, kernel_arch
from .dispatch import DispatchPlan, mark_stage, plan_dispatch, run_expert_gemm, wait_for_plan
from .weight_grad import weight_grad, weight_grad_path

__all__ = [
    "MoEContext",
    "MoEGradients",
    "check_context_options",
    "forward_with_context",
    "moe_backward",
]


@dataclass
class MoEContext:
    """What :func:`moe_backward` needs from one forward; made by
    ``moe_forward(..., return_context=True)``.

    It holds references to the forward's ``x``, weights and biases (do not
    change them in place before the backward), the dispatch plan's index
    arrays (its gathered rows are dropped: the backward gathers again), and
    ``h``, the first GEMM's output, unless ``recompute`` was set.
    """

    shape: LayerShape
    plan: DispatchPlan
    x: object
    params: tuple  # (w1, w2, b1, b2) as CuPy arrays (biases may be None)
    h: object
    executor: object
    device_id: int

    @property
    def recompute(self) -> bool:
        """Whether the backward recomputes the first GEMM (h was not kept)."""
        return self.h is None

    @property
    def saved_bytes(self) -> int:
        """GPU bytes this context keeps alive beyond the caller's own arrays:
        h (unless recomputed) and the dispatch indices."""
        p = self.plan
        index = (p.pair_to_row, p.row_to_pair, p.tokens_per_expert, p.expert_offsets)
        return (0 if self.h is None else int(self.h.nbytes)) + sum(int(a.nbytes) for a in index)


@dataclass
class MoEGradients:
    """Gradients of one MoE layer call, each with its argument's shape.

    ``dx``, ``dw1``, ``dw2`` (and ``db1``, ``db2``) have the dtype of ``x``;
    ``db1``/``db2`` are None when the forward had no such bias;
    ``d_topk_weights`` is float32 ``[T, k]``, None when the forward had no
    weights.
    """

    dx: object
    dw1: object
    dw2: object
    db1: object = None
    db2: object = None
    d_topk_weights: object = None


def check_context_options(return_context, recompute, fixed_capacity: bool) -> bool:
    """Check ``moe_forward``'s ``return_context`` and ``recompute``; True when the
    forward must keep a context."""
    for name, value in (("return_context", return_context), ("recompute", recompute)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    if recompute and not return_context:
        raise ValueError("recompute applies only with return_context=True")
    if return_context and fixed_capacity:
        raise ValueError(
            "return_context needs fixed_capacity=False: the backward runs on the dispatch plan's row layout"
        )
    return return_context


def _gather(res, arch, x, inp: DispatchPlan):
    """Rows of ``x`` (any [T, N]) in the plan's expert order; zeros on padding rows."""
    import cupy

    rows = cupy.empty((inp.row_to_pair.shape[0], x.shape[1]), dtype=x.dtype)
    if rows.shape[0]:
        K.gather_rows(res.launch_stream, arch, x, inp.pair_to_row, inp.row_to_pair, inp.top_k, rows)
    return rows


def _expert_gemm(executor, res, inp, rows, w, n, trans_b, algorithm=None):
    import cupy

    out = cupy.empty((rows.shape[0], n), dtype=rows.dtype)
    run_expert_gemm(executor, res, inp, rows, w, out, trans_b, algorithm)
    return out


def forward_with_context(
    x_v, shape: LayerShape, topk_ids, topk_weights, params, *, executor, algorithm, stream, timer, recompute
):
    """The layer's forward (the steps of ``moe_forward``), keeping what
    :func:`moe_backward` needs. Arguments are checked already; ``params`` is
    ``(w1, w2, b1, b2)``. Returns ``(out, MoEContext)``."""
    import cupy

    res = stream_resources(device_of(x_v), stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        mark_stage(timer, "start", res.cupy_stream)
        x = as_cupy(x_v)
        ids = as_cupy(topk_ids)
        weights = None if topk_weights is None else as_cupy(topk_weights)
        w1, w2, b1, b2 = (None if p is None else as_cupy(p) for p in params)
        inp = plan_dispatch(
            res, executor, x, ids, weights, shape.num_experts, algorithm, shape.width, timer,
            (shape.hidden, shape.inter),
        )  # fmt: skip
        rows = inp.rows.shape[0]
        h = _expert_gemm(executor, res, inp, inp.rows, w1, shape.width, shape.trans_b)
        mark_stage(timer, "gemm1", res.cupy_stream)
        arch = kernel_arch(res)
        act = cupy.empty((rows, shape.inter), dtype=h.dtype)
        if rows:
            code = K.ACTIVATIONS[shape.activation]
            K.expert_activation(
                res.launch_stream, arch, h, shape.inter, int(shape.gated), code, b1, inp.row_to_pair, ids, act
            )
        mark_stage(timer, "activation", res.cupy_stream)
        y = _expert_gemm(executor, res, inp, act, w2, shape.hidden, shape.trans_b, inp.second_algorithm)
        mark_stage(timer, "gemm2", res.cupy_stream)
        out = cupy.empty((inp.num_tokens, shape.hidden), dtype=h.dtype)
        if inp.num_tokens:
            K.combine_rows(
                res.launch_stream, arch, y, inp.pair_to_row, weights, ids, b2, inp.num_tokens, inp.top_k, out
            )
        mark_stage(timer, "combine", res.cupy_stream)
        plan = dataclasses.replace(inp, rows=None, stream=res.stream)
        plan.ready = cupy.cuda.Event(block=False, disable_timing=True)
        plan.ready.record(res.cupy_stream)
    ctx = MoEContext(shape, plan, x, (w1, w2, b1, b2), None if recompute else h, executor, res.device_id)
    return out, ctx


def _check_dy(ctx: MoEContext, dy):
    if not isinstance(ctx, MoEContext):
        raise TypeError(
            f"ctx must be the MoEContext of moe_forward(..., return_context=True); got {type(ctx).__name__}"
        )
    dy_v = view(dy, "dy")
    want = (ctx.plan.num_tokens, ctx.shape.hidden)
    if dy_v.shape != want:
        raise ValueError(f"dy must have the output's shape {want}; got {dy_v.shape}")
    if dy_v.dtype != ctx.shape.dtype:
        raise TypeError(f"dy must have dtype {ctx.shape.dtype} like the forward's x; got {dy_v.dtype}")
    if not dy_v.is_c_contiguous():
        raise ValueError("dy must be C-contiguous")
    if dy_v.device is not None and dy_v.device != ctx.device_id:
        raise ValueError(f"dy is on device {dy_v.device} but the forward ran on device {ctx.device_id}")
    return dy_v


def moe_backward(ctx: MoEContext, dy, *, stream=None) -> MoEGradients:
    """Gradients of one ``moe_forward`` call, given dLoss/dout ``dy`` [T, H].

    Parameters
    ----------
    ctx : MoEContext
        From ``moe_forward(..., return_context=True)``. It may be used more than once.
    dy : GPU array [T, H] of the forward's dtype, C-contiguous
    stream : optional; work runs there, after the forward's work (a
        device-side wait when the streams differ). ``dy`` must be ready on it.

    Returns
    -------
    MoEGradients
        ``dx``, ``dw1``, ``dw2``, ``db1``, ``db2``, ``d_topk_weights``. Products
        accumulate in fp32 (cuBLAS) and every reduction of the kernels in fp32;
        results are rounded once to x's dtype (float32 for ``d_topk_weights``).
        Deterministic (no atomics); experts without tokens get exact zeros.
        The only host work is launching: nothing synchronizes.
    """
    dy_v = _check_dy(ctx, dy)
    import cupy

    shape, inp, executor = ctx.shape, ctx.plan, ctx.executor
    w1, w2, b1, b2 = ctx.params
    hidden, inter, width, tb = shape.hidden, shape.inter, shape.width, shape.trans_b
    res = stream_resources(ctx.device_id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        wait_for_plan(inp, res)
        arch = kernel_arch(res)
        dy = as_cupy(dy_v)
        ids, weights = inp.topk_ids, inp.topk_weights
        grads = MoEGradients(None, None, None)
        dy_rows = _gather(res, arch, dy, inp)
        # g = G @ W2[e]^T: the forward's down projection, transposed.
        g = _expert_gemm(executor, res, inp, dy_rows, w2, inter, not tb)
        h, x_rows = ctx.h, None
        if h is None:  # recompute: the first GEMM again, on x gathered again
            x_rows = _gather(res, arch, ctx.x, inp)
            h = _expert_gemm(executor, res, inp, x_rows, w1, width, tb)
        rows = dy_rows.shape[0]
        dz = cupy.empty((rows, width), dtype=dy.dtype)
        aw = cupy.empty((rows, inter), dtype=dy.dtype)
        if weights is not None:
            grads.d_topk_weights = cupy.empty(ids.shape, dtype=cupy.float32)
        if rows:
            BK.activation_backward(
                res.launch_stream, arch, g, h, inter, int(shape.gated), K.ACTIVATIONS[shape.activation],
                b1, inp.row_to_pair, ids, weights, dy, b2, dz, aw, grads.d_topk_weights,
            )  # fmt: skip
        del g, h
        # The weight gradients reduce over padding rows too on padded layouts:
        # dy_rows, aw, dz and x_rows are all zero there (see weight_grad).
        second = weight_grad_path(executor, inp, hidden, inter, dy.dtype, res.device_id)
        pair = (dy_rows, aw) if tb else (aw, dy_rows)  # dW2 is [E, H, I] in the nn.Linear layout
        grads.dw2 = weight_grad(executor, res, inp, *pair, second)
        if b2 is not None:
            grads.db2 = cupy.empty(b2.shape, dtype=b2.dtype)
            BK.column_sums(
                res.launch_stream, arch, dy_rows, inp.expert_offsets, inp.tokens_per_expert,
                inp.row_to_pair, weights, grads.db2,
            )  # fmt: skip
        del dy_rows, aw
        if x_rows is None:
            x_rows = _gather(res, arch, ctx.x, inp)
        first = weight_grad_path(executor, inp, width, hidden, dy.dtype, res.device_id)
        grads.dw1 = weight_grad(executor, res, inp, *((dz, x_rows) if tb else (x_rows, dz)), first)
        del x_rows
        if b1 is not None:
            grads.db1 = cupy.empty(b1.shape, dtype=b1.dtype)
            BK.column_sums(
                res.launch_stream, arch, dz, inp.expert_offsets, inp.tokens_per_expert,
                inp.row_to_pair, None, grads.db1,
            )  # fmt: skip
        # dx rows = dz @ W1[e]^T, then each token's k rows summed in choice order.
        dx_rows = _expert_gemm(executor, res, inp, dz, w1, hidden, not tb, inp.second_algorithm)
        del dz
        grads.dx = cupy.empty((inp.num_tokens, hidden), dtype=dy.dtype)
        if inp.num_tokens:
            K.combine_rows(
                res.launch_stream, arch, dx_rows, inp.pair_to_row, None, ids, None,
                inp.num_tokens, inp.top_k, grads.dx,
            )  # fmt: skip
    return grads
