"""cublas_grouped's MoE layer against a padded batched-matmul MoE on the same weights.

The padded version is what one writes with plain array ops: every expert gets
a [capacity, H] block (capacity = the busiest expert's token count), one
batched matmul per projection, then a weighted scatter-add back to tokens.
Prints agreement, median time and peak GPU memory of each.

    python examples/compare_padded.py --batch-size 4 --seq-len 1024 --embed-dim 2048 \
        --hidden-dim 768 --num-experts 128 --top-k 8 --num-shared 0 --dtype bfloat16 --gated
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import random_layer, require_gpu  # noqa: E402


def bmm(a, b):
    """[E, C, K] @ [E, K, N] as one cuBLAS strided batched GEMM (what torch.bmm does).

    CuPy's matmul has no batched bfloat16 path, so the baseline calls cuBLAS
    directly through this package's binding, row-major mapped as in cublas_grouped/gemm/plan.py.
    """
    import cupy

    from cublas_grouped.runtime import cublas as _cublas
    from cublas_grouped.runtime.arrays import cuda_dtype
    from cublas_grouped.runtime.device import resolve_stream, resources

    e, c, k = a.shape
    n = b.shape[2]
    out = cupy.empty((e, c, n), dtype=a.dtype)
    res = resources(a.device.id, resolve_stream(None))
    handle = res.bind(32 << 20)
    t = cuda_dtype(a.dtype, "a")
    _cublas.gemm_strided_batched_ex(
        handle,
        _cublas.Op.N,
        _cublas.Op.N,
        n,
        c,
        k,
        1.0,
        b.data.ptr,
        t,
        n,
        k * n,
        a.data.ptr,
        t,
        k,
        c * k,
        0.0,
        out.data.ptr,
        t,
        n,
        c * n,
        e,
        _cublas.ComputeType.C32F,
    )
    return out


def padded_moe(x, ids, weights, w1, w2, gated):
    """MoE with per-expert padding to the largest expert's load (plain CuPy)."""
    import cupy

    tokens, k = ids.shape
    experts = w1.shape[0]
    flat = ids.reshape(-1)
    order = cupy.argsort(flat, kind="stable")
    counts = cupy.bincount(flat, minlength=experts)
    starts = cupy.cumsum(counts) - counts
    sorted_ids = flat[order]
    slot = cupy.arange(flat.size) - starts[sorted_ids]
    capacity = int(counts.max())  # host sync, as any padded implementation needs
    blocks = cupy.zeros((experts, capacity, x.shape[1]), dtype=x.dtype)
    blocks[sorted_ids, slot] = x[order // k]
    h = bmm(blocks, w1).astype(cupy.float32)
    if gated:
        inter = h.shape[-1] // 2
        act = (h[..., :inter] / (1 + cupy.exp(-h[..., :inter]))) * h[..., inter:]
    else:
        act = h / (1 + cupy.exp(-h))
    y = bmm(cupy.ascontiguousarray(act.astype(x.dtype)), w2)
    contrib = y[sorted_ids, slot].astype(cupy.float32) * weights.reshape(-1)[order][:, None]
    out = cupy.zeros((tokens, x.shape[1]), dtype=cupy.float32)
    cupy.add.at(out, order // k, contrib)
    return out.astype(x.dtype)


def timed(fn, repeat=10):
    """Median ms over ``repeat`` runs after a warm-up, and the pool's peak bytes."""
    import cupy

    pool = cupy.get_default_memory_pool()
    fn()
    cupy.cuda.runtime.deviceSynchronize()
    pool.free_all_blocks()
    base = pool.total_bytes()
    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    # The pool keeps what it allocated: its size is the peak of the run.
    return float(np.median(times)), pool.total_bytes() - base, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--embed-dim", type=int, default=2048)
    p.add_argument("--hidden-dim", type=int, default=768)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument(
        "--num-shared", type=int, default=0, help="shared experts (a dense MLP of that many widths)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gated", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    require_gpu()

    import cupy
    import ml_dtypes

    import cublas_grouped as cg
    from cublas_grouped import testing

    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    tokens, hidden, inter = args.batch_size * args.seq_len, args.embed_dim, args.hidden_dim
    rng = np.random.default_rng(0)
    w1, w2 = random_layer(rng, args.num_experts, hidden, inter, dtype, args.gated)
    x = cupy.asarray(rng.standard_normal((tokens, hidden), dtype=np.float32).astype(dtype))
    logits = cupy.asarray(rng.standard_normal((tokens, args.num_experts), dtype=np.float32))
    weights, ids = cg.route(logits, args.top_k)
    shared = None
    if args.num_shared:
        sw1, sw2 = random_layer(rng, 1, hidden, inter * args.num_shared, dtype, args.gated)
        shared = (sw1, sw2)
        ones = cupy.zeros((tokens, 1), dtype=cupy.int32)

    def ours():
        out = cg.moe_forward(x, ids, weights, w1, w2, gated=args.gated)
        if shared is not None:
            out += cg.moe_forward(x, ones, None, shared[0], shared[1], gated=args.gated)
        return out

    def padded():
        out = padded_moe(x, ids, weights, w1, w2, args.gated)
        if shared is not None:
            out += padded_moe(x, ones, cupy.ones((tokens, 1), cupy.float32), shared[0], shared[1], args.gated)
        return out

    t_ours, m_ours, out_ours = timed(ours)
    t_pad, m_pad, out_pad = timed(padded)
    n = min(tokens, 32)
    f64 = lambda a: cupy.asnumpy(a).astype(np.float64)  # noqa: E731
    ref = testing.moe_forward_ref(
        f64(x[:n]), cupy.asnumpy(ids[:n]), f64(weights[:n]), f64(w1), f64(w2), gated=args.gated
    )
    if shared is not None:
        ref += testing.moe_forward_ref(
            f64(x[:n]),
            np.zeros((n, 1), np.int32),
            np.ones((n, 1)),
            f64(shared[0]),
            f64(shared[1]),
            gated=args.gated,
        )
    print(
        f"{tokens} tokens, H={hidden}, I={inter}, E={args.num_experts}, top-{args.top_k}, "
        f"shared={args.num_shared}, {args.dtype}, gated={args.gated}"
    )
    print(f"{'method':<16s} {'median ms':>10s} {'peak MiB':>10s} {'rel err (32 tok)':>18s}")
    for name, t, m, out in (
        ("cublas_grouped", t_ours, m_ours, out_ours),
        ("padded bmm", t_pad, m_pad, out_pad),
    ):
        print(f"{name:<16s} {t:10.3f} {m / 2**20:10.1f} {testing.rel_error(f64(out[:n]), ref):18.2e}")
    print(f"agreement between the two (all tokens): {testing.rel_error(f64(out_ours), f64(out_pad)):.2e}")
    print(f"speed-up {t_pad / t_ours:.2f}x, memory {m_pad / max(m_ours, 1):.2f}x less")


if __name__ == "__main__":
    main()
