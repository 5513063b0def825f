"""The backward section of the benchmark: ``python -m cublas_grouped.bench --backward``.

For each model's expert shapes (uniform routing, 4096 tokens unless
``--tokens``), it times with CUDA events after warm-up (medians):

- ``forward``: ``moe_forward`` as inference runs it;
- ``forward+ctx``: ``moe_forward(..., return_context=True)``;
- ``backward``: ``moe_backward`` (every gradient: dx, dW1, dW2, d topk_weights);
- ``backward (recompute)``: the same from a context that kept no activation;
- the same math in torch autograd (``torch._grouped_mm``, else a loop of
  matmuls), forward with the graph and ``torch.autograd.grad``, where torch
  imports.

TFLOP/s count the expert GEMMs only: forward ``2*T*k*H*(W + I)`` (W = 2I),
backward twice that (recompute: plus the first GEMM again). The target:
backward at most 2.3 times the forward's time.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ...moe.weight_grad import weight_grad_path
from ...runtime.timing import time_ms
from .gpu import describe_error, free_pool, random_normal
from .workloads import MODELS, ModelShape, case_seed, routing_weights, uniform_routing

__all__ = ["TARGET_RATIO", "backward_flops", "forward_flops", "run_backward", "select_models"]

#: backward time / forward time the library aims at.
TARGET_RATIO = 2.3


def forward_flops(tokens: int, m: ModelShape) -> float:
    """FLOPs of the forward's two expert GEMMs (gated: W = 2I)."""
    return 2.0 * tokens * m.top_k * m.hidden * 3 * m.inter


def backward_flops(tokens: int, m: ModelShape, recompute: bool = False) -> float:
    """FLOPs of the backward's four expert GEMMs (plus the first GEMM again with ``recompute``)."""
    return 2 * forward_flops(tokens, m) + (
        2.0 * tokens * m.top_k * m.hidden * 2 * m.inter if recompute else 0
    )


def select_models(cases: str | None) -> dict[str, ModelShape]:
    """The models whose name contains one of the comma-separated ``cases`` (all when None)."""
    wanted = [s.strip() for s in cases.split(",") if s.strip()] if cases else []
    return {name: m for name, m in MODELS.items() if not wanted or any(w in name for w in wanted)}


def needed_gb(tokens: int, m: ModelShape, itemsize: int) -> float:
    """GPU memory one case needs: weights and their gradients, and the larger
    row buffers the backward holds at once (rows of H, 2I and I columns)."""
    weights = m.experts * m.hidden * 3 * m.inter * itemsize
    rows = tokens * m.top_k * (3 * m.hidden + 6 * m.inter) * itemsize
    return (2 * weights + rows) / 1e9


def _ours(api, m: ModelShape, tokens: int, args) -> dict:
    import cupy

    rng = np.random.default_rng(case_seed(f"backward-{tokens}", args.seed))
    ids = cupy.asarray(uniform_routing(tokens, m.experts, m.top_k, rng))
    wts = cupy.asarray(routing_weights(tokens, m.top_k, rng))
    seed = args.seed
    x = random_normal((tokens, m.hidden), args.dtype, 1.0, seed)
    dy = random_normal((tokens, m.hidden), args.dtype, 1.0, seed + 1)
    w1 = random_normal((m.experts, m.hidden, 2 * m.inter), args.dtype, m.hidden**-0.5, seed + 2)
    w2 = random_normal((m.experts, m.inter, m.hidden), args.dtype, m.inter**-0.5, seed + 3)
    timing = {"warmup": args.warmup, "repeat": args.repeat}
    out = {"forward": time_ms(lambda i: api.moe_forward(x, ids, wts, w1, w2), **timing)["median"]}
    out["forward+ctx"] = time_ms(
        lambda i: api.moe_forward(x, ids, wts, w1, w2, return_context=True), **timing
    )["median"]
    for name, recompute in (("backward", False), ("backward (recompute)", True)):
        _, ctx = api.moe_forward(x, ids, wts, w1, w2, return_context=True, recompute=recompute)
        out[name] = time_ms(lambda i, c=ctx: api.moe_backward(c, dy), **timing)["median"]
        if not recompute:  # what the backward ran: the layout and the dW1/dW2 paths
            paths = [
                weight_grad_path(ctx.executor, ctx.plan, n, k, ctx.shape.dtype, ctx.device_id).value
                for n, k in ((2 * m.inter, m.hidden), (m.hidden, m.inter))
            ]
            out["weight grads"] = f"{ctx.plan.layout.kind}: {'/'.join(paths)}"
        del ctx
    return out


def _torch(m: ModelShape, tokens: int, args) -> dict:
    """The same math with torch autograd: gather, two grouped GEMMs, SiLU(gate)*up, weighted sum."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    dev = torch.device("cuda")
    rng = np.random.default_rng(case_seed(f"backward-{tokens}", args.seed))
    ids = torch.from_numpy(uniform_routing(tokens, m.experts, m.top_k, rng).astype(np.int64)).to(dev)
    wts = torch.from_numpy(routing_weights(tokens, m.top_k, rng)).to(dev).requires_grad_()
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.randn(tokens, m.hidden, device=dev, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(tokens, m.hidden, device=dev, dtype=dtype, generator=gen)
    w1 = (
        torch.randn(m.experts, m.hidden, 2 * m.inter, device=dev, dtype=dtype, generator=gen) * m.hidden**-0.5
    )
    w2 = torch.randn(m.experts, m.inter, m.hidden, device=dev, dtype=dtype, generator=gen) * m.inter**-0.5
    order = torch.argsort(ids.flatten(), stable=True)
    token = order // m.top_k
    counts = torch.bincount(ids.flatten(), minlength=m.experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    bounds = [0, *np.cumsum(counts.cpu().numpy()).tolist()]
    inter = m.inter

    def matmul(rows, w, grouped):
        if grouped:
            return torch._grouped_mm(rows, w, offs=offs)
        return torch.cat([rows[bounds[e] : bounds[e + 1]] @ w[e] for e in range(m.experts)])

    def forward(grouped, w1v, w2v):
        xs = x.index_select(0, token)
        h = matmul(xs, w1v, grouped)
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = matmul(a, w2v, grouped) * wts.flatten()[order][:, None].to(dtype)
        return torch.zeros_like(x).index_add(0, token, y)

    # torch._grouped_mm as the weights are stored, else (some builds want it)
    # on column-major weights, else a loop of matmuls.
    leaves = [w1.requires_grad_(), w2.requires_grad_()]
    how, views, notes = "loop", (w1, w2), []
    if hasattr(torch, "_grouped_mm"):
        for name in ("grouped_mm", "grouped_mm, column-major weights"):
            if name != "grouped_mm":
                leaves = [w.detach().transpose(-2, -1).contiguous().requires_grad_() for w in (w1, w2)]
                del w1, w2
                views = tuple(w.transpose(-2, -1) for w in leaves)
            try:
                torch.autograd.grad(forward(True, *views), [x, *leaves, wts], dy)
                how = name
                break
            except Exception as exc:
                notes.append(describe_error(exc)[:60])
    params = [x, *leaves, wts]
    grouped = how != "loop"

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(args.repeat):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return float(np.median(samples))

    path = how + (f" ({'; '.join(notes)})" if notes and how == "loop" else "")
    result = {"torch path": path, "torch forward": timed(lambda: forward(grouped, *views))}
    graph = [forward(grouped, *views)]
    result["torch backward"] = timed(lambda: torch.autograd.grad(graph[0], params, dy, retain_graph=True))
    graph.clear()  # frees the saved activations before the cache is emptied
    torch.cuda.empty_cache()
    return result


def run_backward(args: argparse.Namespace) -> int:
    """Time forward and backward per model; print a table and the target lines; 0 when it ran."""
    import cublas_grouped as api

    tokens_list = args.tokens or [4096]
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    rows, lines = [], []
    for name, m in select_models(args.cases).items():
        for tokens in tokens_list:
            row = {"model": name, "tokens": tokens, "dtype": args.dtype}
            need = needed_gb(tokens, m, itemsize)
            if need > args.mem_gb:
                row["skipped"] = f"needs about {need:.0f} GB, more than --mem-gb {args.mem_gb:g}"
                rows.append(row)
                continue
            try:
                row.update(_ours(api, m, tokens, args))
            except Exception as exc:
                row["error"] = describe_error(exc)
            free_pool()
            if not args.no_torch:
                try:
                    row.update(_torch(m, tokens, args))
                except Exception as exc:
                    row["torch error"] = describe_error(exc)
            rows.append(row)
    header = f"{'model':<15}{'T':>6}{'fwd ms':>9}{'TF/s':>7}{'bwd ms':>9}{'TF/s':>7}{'bwd/fwd':>8}"
    header += f"{'recomp ms':>10}{'torch fwd':>10}{'torch bwd':>10}{'bwd/fwd':>8}"
    print(header)
    for row in rows:
        m = MODELS[row["model"]]
        start = f"{row['model']:<15}{row['tokens']:>6}"
        if "forward" not in row:
            print(f"{start}  {row.get('skipped') or row.get('error')}")
            continue
        fwd, bwd = row["forward"], row["backward"]
        row["ratio"] = bwd / fwd
        tf = lambda flops, ms: flops / ms / 1e9  # noqa: E731
        text = f"{start}{fwd:9.3f}{tf(forward_flops(row['tokens'], m), fwd):7.0f}{bwd:9.3f}"
        text += f"{tf(backward_flops(row['tokens'], m), bwd):7.0f}{row['ratio']:8.2f}"
        text += f"{row['backward (recompute)']:10.3f}"
        if "torch backward" in row:
            row["torch ratio"] = row["torch backward"] / row["torch forward"]
            text += f"{row['torch forward']:10.3f}{row['torch backward']:10.3f}{row['torch ratio']:8.2f}"
            text += f"  torch: {row['torch path']}"
        elif "torch error" in row:
            text += f"  torch n/a: {row['torch error'][:60]}"
        print(text)
        verdict = "PASS" if row["ratio"] <= TARGET_RATIO else "MISS"
        lines.append(
            f"  {verdict} {row['model']} T={row['tokens']}: backward {bwd:.3f} ms = {row['ratio']:.2f}x "
            f"forward {fwd:.3f} ms (target <= {TARGET_RATIO}x); dW1/dW2 on {row.get('weight grads')}"
        )
    print()
    print(f"Targets (backward <= {TARGET_RATIO}x forward):")
    print("\n".join(lines) or "  none measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backward": rows}, f, indent=1)
    return 0
