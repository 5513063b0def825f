"""Development probe of the sm90 kernel: first-GEMM shapes of the benchmark's
models, the kernel with [E, N, K] weights (K-major B, "sm90 nt") and with the
same weights as [E, K, N] (N-major B, "sm90 nn"), timed round-robin against
the cuBLAS algorithms ([E, N, K]) and a dense GEMM of equal FLOPs; then the
host cost of a TMA descriptor, built and from the cache. Each sm90 row runs
in both CTA schedules of the same kernel: persistent (one CTA per SM taking
tiles from a device counter, v7; "sm90 nt", "sm90 nn") and one CTA per tile
(v5's grid; "sm90 nt v5", "sm90 nn v5"), with the persistent / per-tile time
ratios printed per case. With --baseline FILE, an earlier version of the
kernel source (same arguments) is timed beside this one too ("sm90 nt base",
"sm90 nn base", persistent grid). For docs/kernel-notes.md; the benchmark
(python -m cublas_grouped.bench) is the reference for claims.

    PYTHONPATH=. python tools/sm90_probe.py [--tokens 4096 16384] [--baseline old.cu]
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


def probe(model: str, tokens: int, b, b_kn, dt) -> None:
    """Time one case: every method round-robin, and print the rows."""
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.gemm.backends import hopper
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
    for label in ("sm90 nn", "sm90 nt v5", "sm90 nn v5"):
        outs[label] = cupy.empty((m, n1), dtype=dt)

    def run(alg):
        return lambda i: cg.gmm(a, b, sizes, trans_b=True, out=outs[alg], algorithm=alg)

    def sm90(label, weights, trans_b, schedule, source=hopper.SOURCE):
        def call(i):
            # Both read at each call: another grid, another version of the kernel.
            default, hopper.SCHEDULE, hopper.SOURCE = (hopper.SCHEDULE, hopper.SOURCE), schedule, source
            try:
                cg.gmm(a, weights, sizes, trans_b=trans_b, out=outs[label], algorithm="sm90_grouped")
            finally:
                hopper.SCHEDULE, hopper.SOURCE = default

        return call

    methods = {"sm90 nt": sm90("sm90_grouped", b, True, "persistent")}  # first, as through v5
    methods.update({alg: run(alg) for alg in algorithms if alg != "sm90_grouped"})
    methods["sm90 nn"] = sm90("sm90 nn", b_kn, False, "persistent")
    methods["sm90 nt v5"] = sm90("sm90 nt v5", b, True, "per_tile")
    methods["sm90 nn v5"] = sm90("sm90 nn v5", b_kn, False, "per_tile")
    if BASELINE:
        for label, weights, trans_b in (("sm90 nt base", b, True), ("sm90 nn base", b_kn, False)):
            outs[label] = cupy.empty((m, n1), dtype=dt)
            methods[label] = sm90(label, weights, trans_b, "persistent", BASELINE)
    dense_w = b[0]
    methods["dense"] = lambda i: cupy.matmul(a, dense_w.T)
    results = time_interleaved(list(methods.values()), warmup=3, repeat=20)
    base = outs["cublas_grouped"].astype(cupy.float32)
    errs = {}
    for label, alg in (
        ("nt", "sm90_grouped"),
        ("nn", "sm90 nn"),
        ("nt v5", "sm90 nt v5"),
        ("nn v5", "sm90 nn v5"),
    ):
        diff = outs[alg].astype(cupy.float32) - base
        errs[label] = float(cupy.linalg.norm(diff) / cupy.linalg.norm(base))
    # The schedules must agree bit for bit (each element: one CTA, a fixed K order).
    same = {
        layout: bool(cupy.all(outs[v6].view(cupy.uint16) == outs[v5].view(cupy.uint16)))
        for layout, v6, v5 in (("nt", "sm90_grouped", "sm90 nt v5"), ("nn", "sm90 nn", "sm90 nn v5"))
    }
    case = f"{model} T={tokens}"
    for label, r in zip(methods, results):
        if isinstance(r, Exception):
            print(f"{case:22} {label:16} error {r}")
        else:
            print(f"{case:22} {label:16} {r['median']:8.3f} {flops / r['median'] / 1e9:8.1f}")
    diffs = ", ".join(f"{label} {err:.2e}" for label, err in errs.items())
    print(f"{'':22} vs cublas_grouped: relative difference sm90 {diffs}")
    print(f"{'':22} persistent == per_tile bit for bit: nt {same['nt']}, nn {same['nn']}")
    timed = dict(zip(methods, results))
    if BASELINE:
        same = all(
            bool(cupy.all(outs[x].view(cupy.uint16) == outs[y].view(cupy.uint16)))
            for x, y in (("sm90_grouped", "sm90 nt base"), ("sm90 nn", "sm90 nn base"))
        )
        print(f"{'':22} this kernel == the baseline bit for bit: {same}")
    pairs = [("sm90 nn / nt time", "sm90 nn", "sm90 nt")]
    if BASELINE:
        pairs += [("this / baseline time, nt", "sm90 nt", "sm90 nt base")]
        pairs += [("this / baseline time, nn", "sm90 nn", "sm90 nn base")]
    for what, top, bottom in (
        *pairs,
        ("sm90 persistent / per_tile time, nt", "sm90 nt", "sm90 nt v5"),
        ("sm90 persistent / per_tile time, nn", "sm90 nn", "sm90 nn v5"),
    ):
        x, y = timed[top], timed[bottom]
        if not isinstance(x, Exception) and not isinstance(y, Exception):
            print(f"{'':22} {what}: {x['median'] / y['median']:.3f}")


def host_cost() -> None:
    """Host microseconds of one TMA descriptor: built through cuda.core, and
    found in the back end's cache (what each sm90 call pays for its two)."""
    import time

    import cupy

    from cublas_grouped.gemm.backends import hopper, tma

    x = cupy.empty((4096, 7168), dtype=ml_dtypes.bfloat16)
    args = (x.data.ptr, (4096, 7168), (hopper.BLOCK_M, hopper.BLOCK_K), ml_dtypes.bfloat16)
    for label, fn in (
        ("built (cuda.core)", lambda: tma.tiled_map(*args)),
        ("cached (hit)", lambda: hopper.tensor_map(*args, 0)),
    ):
        fn()
        start = time.perf_counter()
        for _ in range(2000):
            fn()
        print(f"TMA descriptor, {label:18} {(time.perf_counter() - start) / 2000 * 1e6:8.2f} us")


# The kernel name of an earlier version timed beside this one (--baseline), or None.
BASELINE = None


def main() -> None:
    import cupy

    global BASELINE
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--baseline",
        help="an earlier grouped_gemm_sm90.cu (same arguments) to time beside this one, persistent grid",
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if args.baseline:
        import shutil

        from cublas_grouped.runtime import nvrtc

        BASELINE = "sm90_probe_baseline"
        shutil.copyfile(args.baseline, nvrtc.kernel_dir() / f"{BASELINE}.cu")
    dt = ml_dtypes.bfloat16
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{name}, bf16, first expert GEMM, uniform routing; ms and TFLOP/s")
    print("sm90 nt and the cuBLAS rows: [E, N, K] weights; sm90 nn: the same weights as [E, K, N]")
    print(f"{'case':22} {'method':16} {'ms':>8} {'TFLOP/s':>8}")
    for model in args.models:
        experts, _, hidden, n1 = MODELS[model]
        b = (cupy.random.standard_normal((experts, n1, hidden), dtype=cupy.float32) * hidden**-0.5).astype(dt)
        cupy.get_default_memory_pool().free_all_blocks()  # the fp32 temporaries: DeepSeek-V3's are 60 GB
        b_kn = cupy.ascontiguousarray(b.transpose(0, 2, 1))  # [E, K, N]: the same products
        for tokens in args.tokens:
            probe(model, tokens, b, b_kn, dt)
            cupy.get_default_memory_pool().free_all_blocks()
        del b, b_kn
        cupy.get_default_memory_pool().free_all_blocks()
    host_cost()


if __name__ == "__main__":
    main()
