"""torch front end: a differentiable ``gmm`` and the MoE layer as torch functions.

``gmm(a, b, batch_sizes, trans_b=False)`` keeps the contract of
tgale96/grouped_gemm's ``ops.gmm`` (an autograd function whose backward runs
the two grouped products of the gradients, the weight gradient through the
K-grouped product ``trans_a=True``), for float32, float16 and bfloat16.
:func:`moe_forward` is differentiable through the library's own backward
(:func:`cublas_grouped.moe_backward`); :func:`route` is forward-only (its
backward raises).

torch is imported inside the functions, so ``import cublas_grouped`` never
imports it (install it with the ``torch`` extra). Every call runs on torch's
current stream of the tensors' device and returns torch tensors: ``gmm``
writes into tensors from torch's allocator; the MoE functions hand back the
library's CuPy results through DLPack (no copy).
"""

from __future__ import annotations

from .gemm.gmm import gmm as _gmm
from .moe.backward import moe_backward as _moe_backward
from .moe.layer import moe_forward as _moe_forward
from .moe.routing import route as _route

__all__ = ["gmm", "moe_forward", "route"]

_FUNCTIONS: dict[str, type] = {}

_NO_BACKWARD = (
    "cublas_grouped.torch.{name} has no backward yet; run it under torch.no_grad() "
    "or detach its inputs (cublas_grouped.torch.gmm is differentiable)"
)


def _torch():
    try:
        import torch
    except ImportError:  # the message names the fix
        raise ImportError("cublas_grouped.torch needs torch: pip install 'cublas_grouped[torch]'") from None
    return torch


def _stream(torch, t) -> int:
    """torch's current stream of ``t``'s device, so our kernels queue after torch's own work."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_gpu(t, name: str) -> None:
    if t.device.type != "cuda":
        raise TypeError(f"{name} must be a CUDA tensor; got a tensor on {t.device}")


def _host_sizes(torch, batch_sizes):
    """Sizes on the host as NumPy (no sync), a CUDA tensor as it is (gmm copies it when it must)."""
    if isinstance(batch_sizes, torch.Tensor):
        sizes = batch_sizes.detach()
        return sizes.numpy() if sizes.device.type == "cpu" else sizes
    return batch_sizes


def _gmm_into(torch, a, b, sizes, trans_a: bool, trans_b: bool):
    """One grouped product into a new tensor from torch's allocator."""
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D; got shape {tuple(a.shape)}")
    if b.dim() != (2 if trans_a else 3):
        raise ValueError(f"b must be {2 if trans_a else 3}-D; got shape {tuple(b.shape)}")
    if trans_a:
        shape = (len(sizes), a.shape[1], b.shape[1])
    else:
        shape = (a.shape[0], b.shape[1] if trans_b else b.shape[2])
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    _gmm(a.detach(), b.detach(), sizes, trans_a=trans_a, trans_b=trans_b, out=out, stream=_stream(torch, a))
    return out


def _gmm_function():
    fn = _FUNCTIONS.get("gmm")
    if fn is not None:
        return fn
    torch = _torch()

    class GroupedGemm(torch.autograd.Function):
        """out[rows of e] = a[rows of e] @ b[e] (b[e].T with trans_b); backward through two grouped products."""

        @staticmethod
        def forward(ctx, a, b, batch_sizes, trans_b):
            _check_gpu(a, "a")
            _check_gpu(b, "b")
            sizes = _host_sizes(torch, batch_sizes)
            ctx.save_for_backward(a, b)
            ctx.sizes, ctx.trans_b = sizes, trans_b
            return _gmm_into(torch, a, b, sizes, False, trans_b)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()  # e.g. the expanded ones of out.sum()
            a, b = ctx.saved_tensors
            sizes = ctx.sizes
            if isinstance(sizes, torch.Tensor):
                sizes = ctx.sizes = sizes.cpu().numpy()  # one copy serves both products
            agrad = bgrad = None
            if ctx.needs_input_grad[0]:
                agrad = _gmm_into(torch, grad, b, sizes, False, not ctx.trans_b)
            if ctx.needs_input_grad[1]:
                lhs, rhs = (grad, a) if ctx.trans_b else (a, grad)
                bgrad = _gmm_into(torch, lhs, rhs, sizes, True, False)
            return agrad, bgrad, None, None

    return _FUNCTIONS.setdefault("gmm", GroupedGemm)


def gmm(a, b, batch_sizes, trans_b: bool = False):
    """Differentiable grouped GEMM, tgale96/grouped_gemm's ``ops.gmm`` contract.

    Parameters
    ----------
    a : CUDA tensor [M, K], float32/float16/bfloat16, rows grouped contiguously.
    b : CUDA tensor [E, K, N] ([E, N, K] with ``trans_b``), same dtype.
    batch_sizes : tensor (CPU or CUDA), NumPy array or sequence of E ints summing to M.
        Sizes on the host avoid a synchronization; CUDA sizes are copied to
        the host where cuBLAS needs them (and once for the backward).
    trans_b : bool

    Returns
    -------
    CUDA tensor [M, N]. Gradients flow to ``a`` and ``b``:
    ``grad_a = gmm(grad, b, trans_b=not trans_b)`` and ``grad_b`` the
    K-grouped product of ``a`` and ``grad`` (empty groups give zero gradients).
    """
    return _gmm_function().apply(a, b, batch_sizes, trans_b)


def _forward_only_function():
    fn = _FUNCTIONS.get("forward_only")
    if fn is not None:
        return fn
    torch = _torch()

    class ForwardOnly(torch.autograd.Function):
        """Runs ``fn`` on detached tensors; a backward through it raises instead of
        silently giving no gradient."""

        @staticmethod
        def forward(ctx, name, fn, *tensors):
            ctx.name = name
            outs = fn(*tensors)
            ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
            return outs if len(outs) > 1 else outs[0]

        @staticmethod
        def backward(ctx, *grads):
            raise NotImplementedError(_NO_BACKWARD.format(name=ctx.name))

    return _FUNCTIONS.setdefault("forward_only", ForwardOnly)


def _as_torch(torch, arr):
    """A CuPy result as a torch tensor over the same memory (DLPack)."""
    return torch.from_dlpack(arr)


def _moe_function():
    fn = _FUNCTIONS.get("moe_forward")
    if fn is not None:
        return fn
    torch = _torch()

    class MoEForward(torch.autograd.Function):
        """The layer; its backward is :func:`cublas_grouped.moe_backward` on the
        context the forward kept (one call's gradients of x, the weights, the
        biases and the routing weights)."""

        @staticmethod
        def forward(ctx, options, stream, keep, x, ids, weights, w1, w2, b1, b2):
            detach = lambda t: None if t is None else t.detach()  # noqa: E731
            args = [detach(t) for t in (x, ids, weights, w1, w2)]
            if keep:  # an input requires grad: keep what the backward needs
                options = {**options, "return_context": True}
            out = _moe_forward(*args, b1=detach(b1), b2=detach(b2), stream=stream, **options)
            if keep:
                out, ctx.layer = out
            ctx.stream, ctx.has_weights, ctx.biases = (
                stream,
                weights is not None,
                (b1 is not None, b2 is not None),
            )
            return _as_torch(torch, out)

        @staticmethod
        def backward(ctx, dy):
            # Reached only when an input required grad, so the forward kept ctx.layer.
            g = _moe_backward(ctx.layer, dy.detach().contiguous(), stream=ctx.stream)
            t = lambda a: None if a is None else _as_torch(torch, a)  # noqa: E731
            db1 = t(g.db1) if ctx.biases[0] else None
            db2 = t(g.db2) if ctx.biases[1] else None
            dw = t(g.d_topk_weights) if ctx.has_weights else None
            return None, None, None, t(g.dx), None, dw, t(g.dw1), t(g.dw2), db1, db2

    return _FUNCTIONS.setdefault("moe_forward", MoEForward)


def moe_forward(x, topk_ids, topk_weights, w1, w2, *, b1=None, b2=None, **options):
    """:func:`cublas_grouped.moe_forward` on torch tensors, returning a torch tensor.

    ``topk_ids`` of any integer dtype (``torch.topk`` gives int64) and
    ``topk_weights`` of any float dtype are converted to the int32 and float32
    the layer takes (small [T, k] copies); everything else is read in place.
    ``options`` are those of :func:`cublas_grouped.moe_forward` (``trans_b``,
    ``activation``, ``gated``, ``algorithm``, ``recompute``...); the call runs on
    torch's current stream.

    Differentiable: when an input requires grad, the forward keeps a context
    (``return_context=True``, see docs/backward.md for its memory) and the
    backward runs :func:`cublas_grouped.moe_backward`, giving the gradients of
    ``x``, ``w1``, ``w2``, the biases and ``topk_weights`` (the routing
    weights' gradient flows on to the router through torch). With
    ``fixed_capacity=True`` there is no backward: inputs must not require grad.
    """
    torch = _torch()
    _check_gpu(x, "x")
    stream = options.pop("stream", None)
    if stream is None:
        stream = _stream(torch, x)
    if options.get("fixed_capacity") and torch.is_grad_enabled():
        needs = [
            n
            for n, t in (("x", x), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights))
            if t is not None and t.requires_grad
        ]
        if needs:
            raise ValueError(f"fixed_capacity=True has no backward, but {', '.join(needs)} require grad")
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    weights = None
    if topk_weights is not None:
        weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.to(torch.float32)
    # Decided here: inside an autograd Function's forward, grad mode is off.
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weights, w1, w2, b1, b2)
    )
    return _moe_function().apply(options, stream, keep, x, ids, weights, w1, w2, b1, b2)


def route(router_logits, top_k: int, *, scoring: str = "softmax", renormalize: bool = True):
    """:func:`cublas_grouped.route` on a torch tensor: ``(topk_weights float32, topk_ids int32)``
    torch tensors, best first, on torch's current stream. Forward only."""
    torch = _torch()
    _check_gpu(router_logits, "router_logits")
    stream = _stream(torch, router_logits)

    def run(logits):
        w, i = _route(logits.detach(), top_k, scoring=scoring, renormalize=renormalize, stream=stream)
        return _as_torch(torch, w), _as_torch(torch, i)

    return _forward_only_function().apply("route", run, router_logits)
