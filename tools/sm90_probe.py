"""Development probe of the sm90 kernel: first-GEMM shapes of the benchmark's
models with [E, N, K] weights, timed round-robin against the cuBLAS
algorithms and a dense GEMM of equal FLOPs. For docs/kernel-notes.md; the
benchmark (python -m cublas_grouped.bench) is the reference for claims.

    PYTHONPATH=. python tools/sm90_probe.py [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

MODELS = {  # name: (experts, top_k, hidden, 2 * inter)
    "mixtral": (8, 2, 4096, 28672),
    "qwen3": (128, 8, 2048, 1536),
    "deepseek": (256, 8, 7168, 4096),
}


def probe(model: str, tokens: int, b, dt) -> None:
    """Time one case: every method round-robin, and print the rows."""
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.runtime.timing import time_interleaved

    experts, top_k, hidden, n1 = MODELS[model]
    rng = np.random.default_rng(tokens)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    sizes = np.bincount(ids.ravel(), minlength=experts)
    m = int(sizes.sum())
    a = cupy.random.standard_normal((m, hidden), dtype=cupy.float32).astype(dt)
    flops = 2.0 * m * hidden * n1  # a dense [m, hidden] @ [hidden, n1] has the same
    algorithms = ("sm90_grouped", "cublas_grouped", "sequential", "chunked_batched")
    outs = {alg: cupy.empty((m, n1), dtype=dt) for alg in algorithms}

    def run(alg):
        return lambda i: cg.gmm(a, b, sizes, trans_b=True, out=outs[alg], algorithm=alg)

    methods = {alg: run(alg) for alg in algorithms}
    dense_w = b[0]
    methods["dense"] = lambda i: cupy.matmul(a, dense_w.T)
    results = time_interleaved(list(methods.values()), warmup=3, repeat=20)
    base = outs["cublas_grouped"].astype(cupy.float32)
    diff = outs["sm90_grouped"].astype(cupy.float32) - base
    err = float(cupy.linalg.norm(diff) / cupy.linalg.norm(base))
    case = f"{model} T={tokens}"
    for label, r in zip(methods, results):
        if isinstance(r, Exception):
            print(f"{case:22} {label:16} error {r}")
        else:
            print(f"{case:22} {label:16} {r['median']:8.3f} {flops / r['median'] / 1e9:8.1f}")
    print(f"{'':22} sm90 vs cublas_grouped: relative difference {err:.2e}")


def main() -> None:
    import cupy

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    dt = ml_dtypes.bfloat16
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name}, bf16, first expert GEMM, [E, N, K] weights, uniform routing; ms and TFLOP/s")
    print(f"{'case':22} {'method':16} {'ms':>8} {'TFLOP/s':>8}")
    for model in args.models:
        experts, _, hidden, n1 = MODELS[model]
        b = (cupy.random.standard_normal((experts, n1, hidden), dtype=cupy.float32) * hidden**-0.5).astype(dt)
        for tokens in args.tokens:
            probe(model, tokens, b, dt)
            cupy.get_default_memory_pool().free_all_blocks()
        del b
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
