"""The torch and Hugging Face front ends without a GPU: imports stay lazy, bad
input is refused by name, and the wiring (autograd formulas, weight layouts,
routing flags, shared experts) is right when the GPU calls are replaced by
torch references of their documented semantics. Skipped without torch
(and without transformers for the Hugging Face part)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["cublas_grouped", "cublas_grouped.torch", "cublas_grouped.hf"])
def test_importing_never_imports_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- torch references of the GPU calls


def ref_gmm(a, b, sizes, *, trans_a=False, trans_b=False, out=None, stream=None):
    """cublas_grouped.gmm's documented semantics, on CPU tensors."""
    import torch

    sizes = [int(s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]
    start, parts = 0, []
    for e, m in enumerate(sizes):
        rows = slice(start, start + m)
        if trans_a:
            parts.append(a[rows].T @ b[rows])
        else:
            parts.append(a[rows] @ (b[e].T if trans_b else b[e]))
        start += m
    result = torch.stack(parts) if trans_a else torch.cat(parts)
    out.copy_(result)
    return out


def ref_moe(
    x, ids, weights, w1, w2, *, b1=None, b2=None, trans_b=False, activation="silu", gated=True, stream=None
):
    """cublas_grouped.moe_forward's documented semantics, on CPU tensors (float64 inside)."""
    import torch

    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[activation]
    x64, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x64[t] @ (w1[e].double().T if trans_b else w1[e].double())
            if b1 is not None:
                h = h + b1[e].double()
            if gated:
                half = h.shape[0] // 2
                h = act(h[:half]) * h[half:]
            else:
                h = act(h)
            y = h @ (w2[e].double().T if trans_b else w2[e].double())
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += (1.0 if weights is None else float(weights[t, j])) * y
    return out.to(x.dtype)


def ref_route(logits, top_k, *, scoring="softmax", renormalize=True, stream=None):
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    w, i = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, i.to(torch.int32)


def _ref_moe_or_pair(*args, return_context=False, **kw):
    out = ref_moe(*args, **kw)
    return (out, None) if return_context else out


@pytest.fixture
def cpu_torch(monkeypatch):
    """cublas_grouped.torch with its GPU calls replaced by the references above."""
    torch = pytest.importorskip("torch")
    import cublas_grouped.torch as cgt

    monkeypatch.setattr(cgt, "_gmm", ref_gmm)
    # A context is asked for when an input requires grad (nn.Parameters do); none is kept here.
    monkeypatch.setattr(cgt, "_moe_forward", _ref_moe_or_pair)
    monkeypatch.setattr(cgt, "_route", ref_route)
    monkeypatch.setattr(cgt, "_check_gpu", lambda t, name: None)
    monkeypatch.setattr(cgt, "_stream", lambda torch, t: 0)
    monkeypatch.setattr(cgt, "_as_torch", lambda torch, arr: arr)
    return torch, cgt


# --------------------------------------------------------------------------- torch.gmm


def test_torch_functions_refuse_cpu_tensors_by_name():
    torch = pytest.importorskip("torch")
    import cublas_grouped.torch as cgt

    with pytest.raises(TypeError, match=r"^a must be a CUDA tensor; got a tensor on cpu$"):
        cgt.gmm(torch.zeros(4, 8), torch.zeros(2, 8, 16), torch.tensor([1, 3]))
    with pytest.raises(TypeError, match=r"^x must be a CUDA tensor"):
        cgt.moe_forward(torch.zeros(4, 8), torch.zeros(4, 1, dtype=torch.int32), None, None, None)
    with pytest.raises(TypeError, match=r"^router_logits must be a CUDA tensor"):
        cgt.route(torch.zeros(4, 8), 2)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0, 10, 0], [1]])
def test_gmm_gradients_pass_gradcheck(cpu_torch, trans_b, sizes):
    # The backward formulas (grad_a through trans_b flipped, grad_b through the
    # K-grouped product) against finite differences, in float64.
    torch, cgt = cpu_torch
    gen = torch.Generator().manual_seed(1)
    m, k, n = sum(sizes), 6, 4
    a = torch.randn(m, k, dtype=torch.float64, generator=gen, requires_grad=True)
    shape = (len(sizes), n, k) if trans_b else (len(sizes), k, n)
    b = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    batch = torch.tensor(sizes)
    assert torch.autograd.gradcheck(lambda a, b: cgt.gmm(a, b, batch, trans_b), (a, b))


def test_gmm_bad_ranks_are_named(cpu_torch):
    torch, cgt = cpu_torch
    with pytest.raises(ValueError, match=r"^a must be 2-D; got shape \(2, 3, 4\)$"):
        cgt.gmm(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), [1, 1])
    with pytest.raises(ValueError, match=r"^b must be 3-D; got shape \(4, 5\)$"):
        cgt.gmm(torch.zeros(2, 4), torch.zeros(4, 5), [1, 1])


def test_moe_forward_backward_is_the_librarys(cpu_torch, monkeypatch):
    # The autograd wiring: the forward keeps a context only when an input
    # requires grad, the backward hands it and dy to moe_backward, and each
    # gradient reaches its own input (the routing weights through torch's cast).
    from types import SimpleNamespace

    torch, cgt = cpu_torch
    kept, calls = [], []

    def forward(*args, return_context=False, **kw):
        kept.append(return_context)
        out = ref_moe(*args, **kw)
        return (out, "CTX") if return_context else out

    def backward(ctx, dy, stream=None):
        calls.append(ctx)
        n = lambda v: torch.full_like(v, float(len(calls)))  # noqa: E731
        return SimpleNamespace(
            dx=n(x) + dy.sum(), dw1=n(w1) * 2, dw2=n(w2) * 3, db1=None, db2=None, d_topk_weights=n(wts) * 4
        )

    monkeypatch.setattr(cgt, "_moe_forward", forward)
    monkeypatch.setattr(cgt, "_moe_backward", backward)
    x = torch.randn(3, 4, requires_grad=True)
    w1 = torch.randn(2, 8, 4, requires_grad=True)
    w2 = torch.randn(2, 4, 4, requires_grad=True)
    wts = torch.ones(3, 1, dtype=torch.float32)
    gates = torch.ones(3, 1, dtype=torch.bfloat16, requires_grad=True)  # cast to float32 inside
    ids = torch.tensor([[0], [1], [1]])  # int64, as torch.topk gives: converted
    out = cgt.moe_forward(x, ids, gates, w1, w2, trans_b=True)
    torch.testing.assert_close(
        out.detach(), ref_moe(x.detach(), ids, wts, w1.detach(), w2.detach(), trans_b=True)
    )
    out.backward(torch.ones_like(out))
    assert kept == [True] and calls == ["CTX"]
    assert (x.grad == 1 + 12).all() and (w1.grad == 2).all() and (w2.grad == 3).all()
    assert gates.grad.dtype == torch.bfloat16 and (gates.grad == 4).all()
    with torch.no_grad():
        assert not cgt.moe_forward(x, ids, None, w1, w2, trans_b=True).requires_grad
    assert kept[-1] is False, "no context kept where no gradient can be asked"
    with pytest.raises(ValueError, match=r"^fixed_capacity=True has no backward, but x, w1, w2 require grad"):
        cgt.moe_forward(x, ids, None, w1, w2, trans_b=True, fixed_capacity=True)


# --------------------------------------------------------------------------- Hugging Face blocks


def _hf_block(kind, torch):
    tf = pytest.importorskip("transformers")
    common = dict(hidden_size=32, num_experts_per_tok=2, hidden_act="silu")
    if kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=6, moe_intermediate_size=16, norm_topk_prob=True, **common)
        block = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    elif kind == "mixtral":
        config = tf.MixtralConfig(num_local_experts=6, intermediate_size=16, **common)
        block = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    else:
        config = tf.Qwen2MoeConfig(
            num_experts=6,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            **common,
        )
        block = tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(config)
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return block.eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_hf_blocks_agree_through_both_entry_points(cpu_torch, kind):
    torch, _ = cpu_torch
    import cublas_grouped.hf as cghf

    block = _hf_block(kind, torch)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = block(x)
        block.experts.config._experts_implementation = cghf.register()
        swapped = block(x)
        block.experts.config._experts_implementation = "eager"
        ours = cghf.moe_block_forward(block, x)
    torch.testing.assert_close(swapped, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_hf_routing_flag_matters(cpu_torch):
    # The check above must be able to fail: Qwen2-MoE without renormalization
    # differs from the same block routed with it.
    torch, _ = cpu_torch
    import cublas_grouped.hf as cghf

    block = _hf_block("qwen2_moe", torch)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = block(x)
        block.gate.norm_topk_prob = True
        assert not torch.allclose(cghf.moe_block_forward(block, x), ref, rtol=1e-3)


def test_hf_unsupported_experts_are_named(cpu_torch):
    torch, _ = cpu_torch
    import cublas_grouped.hf as cghf

    block = _hf_block("qwen3_moe", torch)
    block.experts.config.hidden_act = "gelu_pytorch_tanh"
    with pytest.raises(NotImplementedError, match=r"^hidden_act 'gelu_pytorch_tanh' is not supported"):
        cghf.experts_forward(block.experts, torch.zeros(2, 32), torch.zeros(2, 2, dtype=torch.long), None)
    block.experts.is_concatenated = False
    with pytest.raises(NotImplementedError, match=r"interleaves gate and up rows"):
        cghf.experts_forward(block.experts, torch.zeros(2, 32), torch.zeros(2, 2, dtype=torch.long), None)
