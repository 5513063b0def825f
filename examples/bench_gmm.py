"""gmm on packed rows: each algorithm against AUTO on Qwen3 and DeepSeek-V3 first-GEMM shapes.

    PYTHONPATH=. python3 examples/bench_gmm.py

Median of 20 timed calls (CUDA events, 3 warm-up calls) per row; bf16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_gpu  # noqa: E402


def main() -> None:
    require_gpu()
    import cupy
    import ml_dtypes

    import cublas_grouped as cg
    from cublas_grouped.runtime.timing import time_ms
    from cublas_grouped.tools.bench import skewed_routing, uniform_routing

    bf = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    print(f"{'case':34s} {'algorithm':16s} {'ms':>8s} {'TFLOP/s':>8s}")
    cases = (
        ("qwen3 gemm1", 128, 8, 2048, 1536, 4096),
        ("qwen3 gemm1", 128, 8, 2048, 1536, 16384),
        ("deepseek-v3 gemm1", 256, 8, 7168, 4096, 4096),
    )
    for name, experts, top_k, hidden, n, tokens in cases:
        w = cupy.asarray((rng.standard_normal((experts, hidden, n), dtype=np.float32) / 45).astype(bf))
        for route in (uniform_routing, skewed_routing):
            sizes = np.bincount(route(tokens, experts, top_k, rng).ravel(), minlength=experts)
            a = cupy.asarray(rng.standard_normal((int(sizes.sum()), hidden), dtype=np.float32).astype(bf))
            label = f"{name} T={tokens} {route.__name__.split('_')[0]}"
            time_algorithms(cg, time_ms, label, a, w, sizes)


def time_algorithms(cg, time_ms, label, a, w, sizes) -> None:
    """One row per algorithm: median ms and TFLOP/s of ``gmm(a, w, sizes)``."""
    import cupy

    out = cupy.empty((a.shape[0], w.shape[2]), dtype=a.dtype)
    flops = 2 * a.shape[0] * a.shape[1] * w.shape[2]
    for alg in ("cublas_grouped", "sequential", "chunked_batched", "auto"):
        t = time_ms(lambda i, alg=alg: cg.gmm(a, w, sizes, out=out, algorithm=alg), warmup=3, repeat=20)
        print(f"{label:34s} {alg:16s} {t['median']:8.3f} {flops / t['median'] / 1e9:8.1f}")


if __name__ == "__main__":
    main()
