"""cublas_grouped.torch on the GPU: the cases of tgale96/grouped_gemm's own suite
(fixed and variable sizes, trans_b, sizes on host and device, zero-size groups,
K = 0 of the weight gradient), forward and gradients against torch float64
math; the MoE layer's forward and its gradients; the Hugging Face example. Skipped
without torch (and the example without transformers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

import cublas_grouped as cg  # noqa: E402
import cublas_grouped.torch as cgt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# grouped_gemm's problems: (experts, rows per expert, k, n).
PROBLEMS = [
    (1, 128, 128, 128),
    (8, 128, 128, 128),
    (16, 128, 128, 128),
    (1, 128, 256, 512),
    (8, 128, 256, 512),
    (16, 128, 256, 512),
]


def rel(x, y) -> float:
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def ref_gmm(a, b, sizes, trans_b=False):
    """The plain loop, in float64."""
    out, start = [], 0
    for i, size in enumerate(sizes.tolist()):
        rhs = b[i].t() if trans_b else b[i]
        out.append(a[start : start + size] @ rhs)
        start += size
    return torch.cat(out)


def randn(*shape, dtype, gen):
    return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).cuda().to(dtype)


def check_forward_and_grads(a, b, batch_sizes, trans_b, dtype):
    a.requires_grad_(True)
    b.requires_grad_(True)
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    out = cgt.gmm(a, b, batch_sizes, trans_b)
    expected = ref_gmm(
        a64, b64, batch_sizes.cpu() if torch.is_tensor(batch_sizes) else torch.tensor(batch_sizes), trans_b
    )
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel(out, expected) <= TOL[dtype]
    # A random upstream gradient (not only out.sum()'s expanded ones).
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).cuda()
    (out * g.to(dtype)).sum().backward()
    (expected * g.to(dtype).double()).sum().backward()
    assert a.grad.dtype == dtype and b.grad.shape == b.shape
    assert rel(a.grad, a64.grad) <= TOL[dtype], "grad a"
    assert rel(b.grad, b64.grad) <= TOL[dtype], "grad b"


@pytest.mark.parametrize("z, m, k, n", PROBLEMS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes_on_device", [False, True])
def test_fixed_sizes(z, m, k, n, trans_b, sizes_on_device):
    gen = torch.Generator().manual_seed(0)
    a = randn(z * m, k, dtype=torch.bfloat16, gen=gen)
    b = (
        randn(z, n, k, dtype=torch.bfloat16, gen=gen)
        if trans_b
        else randn(z, k, n, dtype=torch.bfloat16, gen=gen)
    )
    sizes = torch.tensor([m] * z)
    check_forward_and_grads(a, b, sizes.cuda() if sizes_on_device else sizes, trans_b, torch.bfloat16)


@pytest.mark.parametrize("z, m, k, n", PROBLEMS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("sizes_on_device", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_variable_sizes(z, m, k, n, trans_b, sizes_on_device, dtype):
    gen = torch.Generator().manual_seed(z + k)
    a = randn(z * m, k, dtype=dtype, gen=gen)
    b = randn(z, n, k, dtype=dtype, gen=gen) if trans_b else randn(z, k, n, dtype=dtype, gen=gen)
    dist = torch.rand(z, generator=gen)
    sizes = (dist / dist.sum() * m * z).to(torch.long)
    sizes[-1] += m * z - sizes.sum()
    check_forward_and_grads(a, b, sizes.cuda() if sizes_on_device else sizes, trans_b, dtype)


@pytest.mark.parametrize("sizes_on_device", [False, True])
def test_zero_size_groups(sizes_on_device):
    # grouped_gemm's Mixtral-sized edge case: 16384 rows over 8 experts, one empty.
    # It needs about 10 GB with its float64 reference: hand back what CuPy's pool
    # and torch's cache hold from earlier tests of the session first.
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(0)
    a = randn(16384, 4096, dtype=torch.bfloat16, gen=gen)
    b = randn(8, 4096, 14336, dtype=torch.bfloat16, gen=gen)
    sizes = torch.tensor([219, 2246, 5, 8103, 1, 1117, 4693, 0])
    check_forward_and_grads(a, b, sizes.cuda() if sizes_on_device else sizes, False, torch.bfloat16)


@pytest.mark.parametrize("sizes_on_device", [False, True])
def test_weight_gradient_of_empty_groups_is_zero(sizes_on_device):
    # grouped_gemm's ZeroK case: the K-grouped product into a torch tensor.
    a = torch.ones(192, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.ones(192, 128, device="cuda", dtype=torch.bfloat16)
    c = torch.full((4, 128, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    sizes = torch.tensor([0, 128, 0, 64])
    cg.gmm(a, b, sizes.cuda() if sizes_on_device else sizes, trans_a=True, out=c)
    torch.cuda.synchronize()
    for e, want in enumerate([0, 128, 0, 64]):
        assert (c[e] == want).all()


def test_all_groups_empty_give_zero_gradients():
    a = torch.zeros(0, 32, device="cuda", requires_grad=True)
    b = torch.randn(3, 32, 16, device="cuda", requires_grad=True)
    out = cgt.gmm(a, b, torch.tensor([0, 0, 0]))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert b.grad.shape == b.shape and (b.grad == 0).all()


def test_runs_on_torchs_current_stream():
    s = torch.cuda.Stream()
    gen = torch.Generator().manual_seed(3)
    a, b = randn(512, 256, dtype=torch.float32, gen=gen), randn(4, 256, 128, dtype=torch.float32, gen=gen)
    sizes = torch.tensor([100, 200, 12, 200])
    with torch.cuda.stream(s):
        a2 = a * 2  # queued on s; our product must come after it
        out = cgt.gmm(a2, b, sizes)
    s.synchronize()
    assert rel(out, ref_gmm(2 * a.double(), b.double(), sizes)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_moe_forward_and_route_on_torch_tensors(dtype):
    from cublas_grouped import testing

    gen = torch.Generator().manual_seed(5)
    x = randn(40, 64, dtype=dtype, gen=gen)
    w1 = torch.nn.Parameter(randn(6, 96, 64, dtype=dtype, gen=gen))  # nn.Linear layout, requires grad
    w2 = torch.nn.Parameter(randn(6, 64, 48, dtype=dtype, gen=gen))
    logits = randn(40, 6, dtype=dtype, gen=gen)
    weights, ids = cgt.route(logits, 2)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.device.type == "cuda"
    out = cgt.moe_forward(x, ids.long(), weights, w1, w2, trans_b=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == x.shape
    want = testing.moe_forward_ref(
        x.double().cpu().numpy(),
        ids.cpu().numpy(),
        weights.cpu().numpy(),
        w1.detach().double().transpose(1, 2).cpu().numpy(),
        w2.detach().double().transpose(1, 2).cpu().numpy(),
    )
    assert rel(out, torch.from_numpy(want).cuda()) <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_forward_gradients_on_torch_tensors(dtype):
    """Autograd through the library's backward, against its float64 reference."""
    from cublas_grouped import testing

    gen = torch.Generator().manual_seed(6)
    x = randn(40, 64, dtype=dtype, gen=gen).requires_grad_()
    w1 = torch.nn.Parameter(randn(6, 96, 64, dtype=dtype, gen=gen))  # nn.Linear layout
    w2 = torch.nn.Parameter(randn(6, 64, 48, dtype=dtype, gen=gen))
    weights, ids = cgt.route(randn(40, 6, dtype=torch.float32, gen=gen), 2)
    weights = weights.clone().requires_grad_()
    out = cgt.moe_forward(x, ids, weights, w1, w2, trans_b=True)
    dy = randn(40, 64, dtype=dtype, gen=gen)
    out.backward(dy)
    to64 = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    want = testing.moe_backward_ref(
        to64(x),
        ids.cpu().numpy(),
        to64(weights),
        to64(w1).transpose(0, 2, 1),
        to64(w2).transpose(0, 2, 1),
        to64(dy),
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    cuda = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    assert rel(x.grad, cuda(want["dx"])) <= tol
    assert rel(w1.grad.transpose(1, 2), cuda(want["dw1"])) <= tol
    assert rel(w2.grad.transpose(1, 2), cuda(want["dw2"])) <= tol
    assert rel(weights.grad, cuda(want["d_topk_weights"])) <= tol


def test_hf_example_agrees_with_the_blocks():
    pytest.importorskip("transformers")
    # Keep the caller's PYTHONPATH (transformers may come from a --target folder there).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_moe_block.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "all blocks agree" in result.stdout and result.stdout.count(" ok") == 6
