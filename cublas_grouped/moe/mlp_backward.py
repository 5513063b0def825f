"""Gradients of :class:`cublas_grouped.MoEMLP`: router, routed experts, shared experts.

The block computes ``out = experts(x, route(x @ R)) + shared(x)``. Its
backward runs :func:`moe_backward` for the routed and the shared experts and
takes the routing weights' gradient back through the top-k scores to the
router logits (the choice of experts itself has no gradient), then to ``R``
and ``x``. The router's part runs in float32 with CuPy (softmax or sigmoid,
renormalized or not, as the forward routed); every sum has a fixed order,
so the results are the same bits on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.arrays import as_cupy, view
from ..runtime.device import stream_resources
from .backward import MoEContext, MoEGradients, moe_backward
from .checks import device_of
from .layer import moe_forward
from .routing import route

__all__ = ["MLPContext", "MLPGradients", "mlp_forward_with_context", "mlp_backward", "route_backward"]


@dataclass
class MLPContext:
    """What :meth:`MoEMLP.backward` needs from ``MoEMLP(..., return_context=True)``."""

    x: object
    logits: object  # router logits [T, E] of x's dtype
    topk_ids: object
    experts: MoEContext
    shared: MoEContext | None


@dataclass
class MLPGradients:
    """Gradients of one :class:`MoEMLP` call.

    ``dx`` [T, H] (x's dtype); ``router_weight`` [H, E] (its dtype);
    ``experts``: the routed experts' :class:`MoEGradients` (``d_topk_weights``
    included); ``shared_w1`` / ``shared_w2``: the shared MLP's weight
    gradients in their own shapes, or None without shared experts.
    """

    dx: object
    router_weight: object
    experts: MoEGradients
    shared_w1: object = None
    shared_w2: object = None


def route_backward(logits, topk_ids, d_topk_weights, *, scoring: str = "softmax", renormalize: bool = True):
    """d(router logits) [T, E] float32 from d(topk_weights) [T, k], with the
    chosen experts ``topk_ids`` held fixed (CuPy arrays, on the current stream)."""
    import cupy

    z = logits.astype(cupy.float32)
    if scoring == "softmax":
        e = cupy.exp(z - z.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + cupy.exp(-z))
    ids = topk_ids.astype(cupy.int64)
    chosen = cupy.take_along_axis(scores, ids, axis=1)
    dw = d_topk_weights
    if renormalize:
        total = chosen.sum(axis=1, keepdims=True)
        dw = (dw - (dw * chosen / total).sum(axis=1, keepdims=True)) / total
    d_scores = cupy.zeros_like(z)
    # The ids of one token differ (top-k), so no element is written twice.
    d_scores[cupy.arange(z.shape[0])[:, None], ids] = dw
    if scoring == "softmax":
        return scores * (d_scores - (d_scores * scores).sum(axis=1, keepdims=True))
    return d_scores * scores * (1.0 - scores)


def mlp_forward_with_context(module, x, *, stream, algorithm, recompute: bool):
    """``module(x)`` keeping what :func:`mlp_backward` needs: ``(out, MLPContext)``."""
    import cupy

    device = device_of(view(x, "x"))
    res = stream_resources(device, stream)
    with cupy.cuda.Device(device), res.cupy_stream:
        xc = as_cupy(x, "x")
        logits = cupy.matmul(xc, as_cupy(module.router_weight))
        weights, ids = route(
            logits, module.top_k, scoring=module.scoring, renormalize=module.renormalize, stream=res.stream
        )
        opts = {"activation": module.activation, "gated": module.gated, "stream": res.stream}
        out, experts = moe_forward(
            x, ids, weights, module.w1.weight, module.w2.weight, b1=module.w1.bias, b2=module.w2.bias,
            trans_b=module.w1.trans_b, algorithm=algorithm, return_context=True, recompute=recompute,
            w1_layout=module.w1.w1_layout, **opts,
        )  # fmt: skip
        shared = None
        if module.shared is not None:
            zeros = cupy.zeros((out.shape[0], 1), dtype=cupy.int32)
            extra, shared = moe_forward(
                x, zeros, None, *module.shared, return_context=True, recompute=recompute, **opts
            )
            out += extra
    return out, MLPContext(xc, logits, ids, experts, shared)


def mlp_backward(module, ctx: MLPContext, dy, *, stream=None) -> MLPGradients:
    """Gradients of one ``module(x, return_context=True)`` call for dLoss/dout ``dy``."""
    if not isinstance(ctx, MLPContext):
        raise TypeError(
            f"ctx must be the context of MoEMLP(..., return_context=True); got {type(ctx).__name__}"
        )
    import cupy

    grads = moe_backward(ctx.experts, dy, stream=stream)  # checks dy
    res = stream_resources(ctx.experts.device_id, stream)
    with cupy.cuda.Device(res.device_id), res.cupy_stream:
        dx = grads.dx.astype(cupy.float32)
        shared_w1 = shared_w2 = None
        if ctx.shared is not None:
            shared = moe_backward(ctx.shared, dy, stream=res.stream)
            dx += shared.dx.astype(cupy.float32)
            shared_w1, shared_w2 = shared.dw1[0], shared.dw2[0]
        d_logits = route_backward(
            ctx.logits,
            ctx.topk_ids,
            grads.d_topk_weights,
            scoring=module.scoring,
            renormalize=module.renormalize,
        )
        router = as_cupy(module.router_weight)
        # logits = x @ R: dR = x^T @ d_logits, dx += d_logits @ R^T, in float32.
        d_router = cupy.matmul(ctx.x.astype(cupy.float32).T, d_logits).astype(router.dtype)
        dx += cupy.matmul(d_logits, router.astype(cupy.float32).T)
        return MLPGradients(dx.astype(grads.dx.dtype), d_router, grads, shared_w1, shared_w2)
