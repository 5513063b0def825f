"""One first-GEMM case for Nsight Compute: every call is made three times to
warm it up (compilation, tensor maps, cuBLAS heuristics), then once more
between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that ``ncu
--profile-from-start off`` profiles exactly those calls. For
docs/kernel-notes.md ("Profiles with ncu").

The case is the probe's (``tools/sm90_probe.py``): a model's first expert
GEMM at T tokens, uniform random routing, bf16, ``[E, K, N]`` weights. The
calls, by name:

- ``ours``: ``gmm`` on our Hopper kernel, group sizes on the device;
- ``torch``: ``torch._grouped_mm`` on the same data (needs torch);
- ``fp8``: the FP8 kernel on the same weights, quantized (``[E, N, K]``,
  block scales) and the rows quantized per token beforehand;
- ``dense``: a dense ``cupy.matmul`` of equal FLOPs.

    ncu --profile-from-start off --clock-control none --set full \\
        python tools/ncu_case.py qwen3 4096 ours torch dense
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np
from sm90_probe import MODELS  # name: (experts, top_k, K, N); this script's folder is on the path

CALLS = ("ours", "torch", "fp8", "dense")


def main() -> None:
    import cupy

    import cublas_grouped as cg

    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("tokens", type=int)
    parser.add_argument("calls", nargs="*", choices=CALLS, default=["ours", "torch", "dense"])
    args = parser.parse_args()
    experts, top_k, k, n = MODELS[args.model]
    rng = np.random.default_rng(args.tokens)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(args.tokens)])
    sizes = np.bincount(ids.ravel(), minlength=experts)
    m = int(sizes.sum())
    dt = ml_dtypes.bfloat16
    a = cupy.random.standard_normal((m, k), dtype=cupy.float32).astype(dt)
    b = (cupy.random.standard_normal((experts, k, n), dtype=cupy.float32) * k**-0.5).astype(dt)
    out = cupy.empty((m, n), dtype=dt)
    sizes_dev = cupy.asarray(sizes.astype(np.int32))
    calls = {"ours": lambda: cg.gmm(a, b, sizes_dev, out=out, algorithm="sm90_grouped")}
    if "torch" in args.calls:
        import torch

        ta = torch.from_dlpack(a.view(cupy.uint16)).view(torch.bfloat16)
        tb = torch.from_dlpack(b.view(cupy.uint16)).view(torch.bfloat16)
        offs = torch.from_dlpack(cupy.cumsum(sizes_dev).astype(cupy.int32))
        calls["torch"] = lambda: torch._grouped_mm(ta, tb, offs=offs)
    if "fp8" in args.calls:
        from cublas_grouped.gemm.backends import hopper_fp8

        wq = cg.quantize_fp8(cupy.ascontiguousarray(b.transpose(0, 2, 1)), trans_b=True)
        a_q, a_s = cg.quantize_rows_fp8(a)
        out8 = cupy.empty((m, n), dtype=dt)
        calls["fp8"] = lambda: hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=out8)
    dense_w = b[0]
    calls["dense"] = lambda: cupy.matmul(a, dense_w)
    for name in args.calls:
        for _ in range(3):
            calls[name]()
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStart()
    for name in args.calls:
        calls[name]()
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStop()
    print(f"{args.model} T={args.tokens}: {m} rows, {int(np.count_nonzero(sizes))} experts with rows")


if __name__ == "__main__":
    main()
