"""Development probe of the FP8 Hopper kernel (kernels/grouped_gemm_fp8_sm90.cu):
the first expert GEMM of Qwen3-30B-A3B and DeepSeek-V3 ([E, N, K] weights,
uniform random routing), timed round-robin with CUDA events (3 warm-up rounds,
median of 20) against our bf16 sm90 kernel on the same (dequantized) weights
and a dense bf16 cupy.matmul of equal FLOPs:

  fp8 kernel   hopper_fp8.grouped_fp8 on activations quantized beforehand
  fp8 gmm      cg.gmm(x, fp8_weights, trans_b=True): quantization of x included
  bf16 sm90    cg.gmm(x, bf16_weights, algorithm="sm90_grouped")
  fp8 dequant  what gmm ran for FP8 weights before the kernel: every expert
               dequantized to bf16, then the bf16 sm90 kernel
  dense bf16   cupy.matmul of [M, K] @ [K, N]

Prefill (4096 and 16384 tokens) prints TFLOP/s and the ratios; decode (16 and 64
tokens) also GB/s of the active experts' FP8 weight bytes (values and scales).
Each case is checked: the FP8 kernel against cuBLAS on the DEQUANTIZED
activations and weights in bf16 (same operands: about 1e-3 relative) and
against the bf16 product with unquantized activations (the activations'
quantization: a few percent). For docs/kernel-notes.md ("FP8 kernel").

    PYTHONPATH=. python tools/fp8_probe.py [--tokens 16 64 4096 16384] [--models qwen3 deepseek]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

MODELS = {  # name: (experts, top_k, hidden = K, 2 * inter = N)
    "qwen3": (128, 8, 2048, 1536),
    "deepseek": (256, 8, 7168, 4096),
}
BF16 = ml_dtypes.bfloat16


def random_weights(experts: int, n: int, k: int):
    """bf16 [E, N, K] normal / sqrt(K), made a few experts at a time (DeepSeek-V3's
    would be 30 GB of float32 at once)."""
    import cupy

    w = cupy.empty((experts, n, k), dtype=BF16)
    for e0 in range(0, experts, 16):
        e1 = min(e0 + 16, experts)
        w[e0:e1] = (cupy.random.standard_normal((e1 - e0, n, k), dtype=cupy.float32) * k**-0.5).astype(BF16)
    return w


def dequantize_rows(a_q, a_s, k: int):
    """bf16 ``e4m3(a_q) * a_s`` with one scale per row per 128 columns."""
    import cupy

    from cublas_grouped.testing_fp8 import e4m3_decode

    table = cupy.asarray(e4m3_decode(np.arange(256, dtype=np.uint8)))
    out = cupy.empty(a_q.shape, dtype=BF16)
    for r0 in range(0, a_q.shape[0], 16384):  # float32 temporaries a slice at a time
        r1 = min(r0 + 16384, a_q.shape[0])
        scales = cupy.repeat(a_s[r0:r1], 128, axis=1)[:, :k]
        out[r0:r1] = (table[a_q[r0:r1]] * scales).astype(BF16)
    return out


def rel(x, y) -> float:
    import cupy

    d = x.astype(cupy.float32) - y.astype(cupy.float32)
    return float(cupy.linalg.norm(d) / cupy.linalg.norm(y.astype(cupy.float32)))


def probe(model: str, tokens: int, wq, w_deq) -> None:
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.gemm.backends import hopper_fp8
    from cublas_grouped.runtime.timing import time_interleaved

    experts, top_k, k, n = MODELS[model]
    rng = np.random.default_rng(tokens)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    sizes = np.bincount(ids.ravel(), minlength=experts)
    m = int(sizes.sum())
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    x = cupy.random.standard_normal((m, k), dtype=cupy.float32).astype(BF16)
    a_q, a_s = cg.quantize_rows_fp8(x)
    flops = 2.0 * m * k * n
    labels = ("fp8 kernel", "fp8 gmm", "bf16 sm90", "fp8 dequant")
    outs = {label: cupy.empty((m, n), dtype=BF16) for label in labels}
    dense_w = w_deq[0]
    methods = {
        "fp8 kernel": lambda i: hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=outs["fp8 kernel"]),
        "fp8 gmm": lambda i: cg.gmm(x, wq, sizes_dev, trans_b=True, out=outs["fp8 gmm"]),
        "bf16 sm90": lambda i: cg.gmm(
            x, w_deq, sizes, trans_b=True, out=outs["bf16 sm90"], algorithm="sm90_grouped"
        ),
        "fp8 dequant": lambda i: cg.gmm(
            x, wq.dequantize(BF16), sizes, trans_b=True, out=outs["fp8 dequant"], algorithm="sm90_grouped"
        ),
        "dense bf16": lambda i: cupy.matmul(x, dense_w.T),
    }
    results = dict(zip(methods, time_interleaved(list(methods.values()), warmup=3, repeat=20)))
    case = f"{model} T={tokens}"
    active = int((sizes > 0).sum())
    fp8_bytes = active * (n * k + -(-n // 128) * -(-k // 128) * 4)
    for label, r in results.items():
        if isinstance(r, Exception):
            print(f"{case:20} {label:11} error {r}")
            continue
        ms = r["median"]
        line = f"{case:20} {label:11} {ms:9.4f} {flops / ms / 1e9:8.1f}"
        if tokens <= 64 and label in ("fp8 kernel", "fp8 gmm"):
            line += f"   {fp8_bytes / ms / 1e6:7.1f} GB/s of {active} experts' FP8 weights"
        if tokens <= 64 and label == "bf16 sm90":
            line += f"   {2 * active * n * k / ms / 1e6:7.1f} GB/s of their bf16 weights"
        print(line)
    t = {label: r["median"] for label, r in results.items() if not isinstance(r, Exception)}
    if {"fp8 kernel", "bf16 sm90", "dense bf16", "fp8 gmm", "fp8 dequant"} <= set(t):
        print(
            f"{'':20} fp8 kernel speed-up over bf16 sm90 {t['bf16 sm90'] / t['fp8 kernel']:.2f}x, "
            f"over dense bf16 {t['dense bf16'] / t['fp8 kernel']:.2f}x; fp8 gmm over the old dequantizing "
            f"path {t['fp8 dequant'] / t['fp8 gmm']:.2f}x; "
            f"quantizing x costs {t['fp8 gmm'] - t['fp8 kernel']:.4f} ms"
        )
    # Correctness: the same operands through cuBLAS in bf16, and the unquantized activations.
    same_ops = cg.gmm(dequantize_rows(a_q, a_s, k), w_deq, sizes, trans_b=True, algorithm="cublas_grouped")
    bf16_x = cg.gmm(x, w_deq, sizes, trans_b=True, algorithm="cublas_grouped")
    out = outs["fp8 kernel"]
    ok = rel(out, same_ops) < 1e-2 and bool(
        cupy.all(out.view(cupy.uint16) == outs["fp8 gmm"].view(cupy.uint16))
    )
    print(
        f"{'':20} check: vs dequantized operands (cuBLAS bf16) {rel(out, same_ops):.2e}, "
        f"vs unquantized activations {rel(out, bf16_x):.2e}, gmm == kernel bit for bit "
        f"{bool(cupy.all(out.view(cupy.uint16) == outs['fp8 gmm'].view(cupy.uint16)))}: {'OK' if ok else 'FAIL'}"
    )


def main() -> None:
    import cupy

    import cublas_grouped as cg

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name}; first expert GEMM, [E, N, K] weights, uniform random routing; ms and TFLOP/s")
    print(f"{'case':20} {'method':11} {'ms':>9} {'TFLOP/s':>8}")
    for model in args.models:
        experts, _, k, n = MODELS[model]
        w = random_weights(experts, n, k)
        wq = cg.quantize_fp8(w, trans_b=True)
        wq.dequantize("bfloat16", out=w)  # the bf16 kernels run the same weights the FP8 one reads
        cupy.get_default_memory_pool().free_all_blocks()
        for tokens in args.tokens:
            probe(model, tokens, wq, w)
            cupy.get_default_memory_pool().free_all_blocks()
        del w, wq
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
