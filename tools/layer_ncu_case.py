"""One eager fused Qwen3-30B-A3B layer at 4096 tokens (the benchmark's fused
row: w1 packed, uniform routing) for Nsight Compute: three warm-up calls, then
one between cudaProfilerStart and cudaProfilerStop, so that ``ncu
--profile-from-start off`` sees each of the layer's kernels once. For
docs/kernel-notes.md ("The gather, a warp per row").

    ncu --profile-from-start off --clock-control none --cache-control none \\
        --metrics gpu__time_duration.sum python tools/layer_ncu_case.py
"""


def main() -> None:
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.tools.bench import workloads as W
    from cublas_grouped.tools.bench.gpu import packed_w1

    s = W.MODELS["qwen3-30b-a3b"]
    case = W.Case("qwen3-30b-a3b", 4096, s.experts, s.top_k, s.hidden, s.inter, "uniform")
    wts, ids = W.make_routing(case, seed=0)
    ids, wts = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(wts, dtype=cupy.float32)
    bf = "bfloat16"
    x = cupy.random.standard_normal((4096, s.hidden), dtype=cupy.float32).astype(bf)
    w1 = (
        cupy.random.standard_normal((s.experts, s.hidden, 2 * s.inter), dtype=cupy.float32) * s.hidden**-0.5
    ).astype(bf)
    w2 = (
        cupy.random.standard_normal((s.experts, s.inter, s.hidden), dtype=cupy.float32) * s.inter**-0.5
    ).astype(bf)
    w1p = packed_w1(w1)
    for _ in range(3):
        cg.moe_forward(x, ids, wts, w1p, w2, w1_layout="gate_up_blocked")
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStart()
    cg.moe_forward(x, ids, wts, w1p, w2, w1_layout="gate_up_blocked")
    cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStop()
    print("done")


if __name__ == "__main__":
    main()
