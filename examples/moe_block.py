"""A Qwen3-30B-A3B-shaped MoE block (hidden 2048, 128 experts, top-8, expert width 768).

Runs one batch with random weights, checks a slice of tokens against the
float64 NumPy reference, and prints where the time goes.

    python examples/moe_block.py [--tokens 4096] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import random_layer, require_gpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--check-tokens", type=int, default=64, help="tokens compared with the reference")
    args = parser.parse_args()
    require_gpu()

    import cupy
    import ml_dtypes

    import cublas_grouped as cg
    from cublas_grouped import testing

    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    hidden, experts, top_k, inter = 2048, 128, 8, 768
    rng = np.random.default_rng(0)
    w1, w2 = random_layer(rng, experts, hidden, inter, dtype)
    router = cupy.asarray((rng.standard_normal((hidden, experts), dtype=np.float32) / 45).astype(dtype))
    x = cupy.asarray(rng.standard_normal((args.tokens, hidden), dtype=np.float32).astype(dtype))

    logits = cupy.matmul(x, router)
    weights, ids = cg.route(logits, top_k)
    for _ in range(3):  # warm-up: kernel compilation, cuBLAS heuristics
        cg.moe_forward(x, ids, weights, w1, w2)
    timer, start, end = cg.StageTimer(), cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    weights, ids = cg.route(logits, top_k)
    route_end = cupy.cuda.Event()
    route_end.record()
    out = cg.moe_forward(x, ids, weights, w1, w2, timer=timer)
    end.record()
    end.synchronize()

    n = min(args.check_tokens, args.tokens)
    f64 = lambda a: cupy.asnumpy(a).astype(np.float64)  # noqa: E731
    ref = testing.moe_forward_ref(f64(x[:n]), cupy.asnumpy(ids[:n]), f64(weights[:n]), f64(w1), f64(w2))
    err = testing.rel_error(f64(out[:n]), ref)
    print(f"Qwen3-30B-A3B block: {args.tokens} tokens, {experts} experts, top-{top_k}, {args.dtype}")
    print(f"relative error vs float64 reference on {n} tokens: {err:.2e}")
    stages = {"route": cupy.cuda.get_elapsed_time(start, route_end), **timer.times_ms()}
    total = cupy.cuda.get_elapsed_time(start, end)
    for name, ms in stages.items():
        print(f"  {name:<11s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")
    flops = 2 * args.tokens * top_k * hidden * 3 * inter
    print(f"  {'total':<11s} {total:8.3f} ms  ({flops / total / 1e9:.0f} TFLOP/s on the expert GEMMs' FLOPs)")
    sys.exit(0 if err < (1e-5 if args.dtype == "float32" else 2e-2) else 1)


if __name__ == "__main__":
    main()
