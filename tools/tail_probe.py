"""Development probe (GPU machine): what a group's last, partial tile costs the Hopper kernel.

Qwen3-30B-A3B's first expert GEMM at 4096 tokens (E = 128, K = 2048, N =
1536, [E, K, N] weights, bf16) has about 256 rows per expert, so about half
the experts end in a tile of a few rows. This times ``gmm`` on our kernel
(``algorithm="sm90_grouped"``, group sizes on the device) for the
benchmark's uniform routing and for equal groups of 192, 256, 320 and 384
rows, with a dense ``cupy.matmul`` of each case's rows beside it, ten calls
between two events, round-robin, median of 15 rounds. Printed per case:
milliseconds, useful TFLOP/s, the share of dense, and the TFLOP/s of the
rows the kernel computes (each group rounded up to 64 rows: what one math
warpgroup's wgmma covers).

    PYTHONPATH=. python3 tools/tail_probe.py
"""

from __future__ import annotations

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.runtime.timing import time_each_alone
from cublas_grouped.tools.bench import workloads as W

E, K, N, TOP_K, TOKENS = 128, 2048, 1536, 8, 4096
CALLS = 10
ROUNDS = 15


def _sizes() -> dict[str, np.ndarray]:
    case = W.Case("qwen3-30b-a3b", TOKENS, E, TOP_K, K, N // 2, "uniform")
    _, ids = W.make_routing(case, seed=0)
    cases = {"uniform routing": W.expert_counts(ids, E).astype(np.int64)}
    for rows in (192, 256, 320, 384):
        cases[f"all {rows}"] = np.full(E, rows, np.int64)
    return cases


def main() -> None:
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    bf16 = ml_dtypes.bfloat16
    b = (cupy.random.standard_normal((E, K, N), cupy.float32) * K**-0.5).astype(bf16)
    print(
        f"{'case':16s} {'rows':>6s} {'ours ms':>8s} {'dense ms':>8s} {'TFLOP/s':>8s} {'of dense':>8s} {'computed TFLOP/s':>16s}"
    )
    for name, sizes in _sizes().items():
        m = int(sizes.sum())
        a = cupy.random.standard_normal((m, K), cupy.float32).astype(bf16)
        out = cupy.empty((m, N), bf16)
        dense_b = b[0]
        dense_out = cupy.empty((m, N), bf16)
        sizes_d = cupy.asarray(sizes)

        def ours(a=a, sizes_d=sizes_d, out=out):
            for _ in range(CALLS):
                cg.gmm(a, b, sizes_d, out=out, algorithm="sm90_grouped")

        def dense(a=a, dense_b=dense_b, dense_out=dense_out):
            for _ in range(CALLS):
                cupy.matmul(a, dense_b, out=dense_out)

        stream = cupy.cuda.get_current_stream()
        runs = time_each_alone([ours, dense], rounds=ROUNDS, warmup=3, stream=stream)
        t = {k: float(np.median(v)) / CALLS for k, v in zip(("ours", "dense"), runs)}
        flops = 2.0 * m * K * N
        computed = 2.0 * float((-(-sizes // 64) * 64).sum()) * K * N
        print(
            f"{name:16s} {m:6d} {t['ours']:8.4f} {t['dense']:8.4f} {flops / t['ours'] / 1e9:8.1f} "
            f"{100 * t['dense'] / t['ours']:7.1f}% {computed / t['ours'] / 1e9:16.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
