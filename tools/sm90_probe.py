"""Development probe of the sm90 kernel: first-GEMM shapes of the benchmark's
models (second-GEMM shapes with ``--models qwen3-g2 ...``), the kernel with
[E, N, K] weights (K-major B, "sm90 nt") and with the same weights as
[E, K, N] (N-major B, "sm90 nn"), timed round-robin against the cuBLAS
algorithms ([E, N, K]) and a dense GEMM of equal FLOPs; then the
host cost of a TMA descriptor, built and from the cache. Each sm90 row runs
in both CTA schedules of the same kernel: persistent (one CTA per SM taking
tiles from a device counter, v7; "sm90 nt", "sm90 nn") and one CTA per tile
(v5's grid; "sm90 nt v5", "sm90 nn v5"), with the persistent / per-tile time
ratios printed per case. With --baseline FILE, an earlier version of the
kernel source (same arguments) is timed beside this one too ("sm90 nt base",
"sm90 nn base", persistent grid). With --define NAME=VALUE (repeatable), the
same source under those defines is timed beside it ("sm90 nt var", "sm90 nn
var": a define the launcher also reads, such as SM90_A_BOX_ROWS, changes its
launch too). Decode sizes (at most 256 tokens) also print the GB/s of the
active experts' weights; with --graph R they time only the sm90 rows (and
dense), each as the replay of a CUDA graph of R calls with the group sizes on
the device, divided by R (no host time inside the timed span: a decode GEMM
is shorter than an eager call's host work). For docs/kernel-notes.md; the benchmark
(python -m cublas_grouped.bench) is the reference for claims.

    PYTHONPATH=. python tools/sm90_probe.py [--tokens 4096 16384] [--baseline old.cu] [--define SM90_A_BOX_ROWS=128]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

MODELS = {  # name: (experts, top_k, K, N): the first GEMM (K = hidden, N = 2 * inter) ...
    "mixtral": (8, 2, 4096, 28672),
    "qwen3": (128, 8, 2048, 1536),
    "deepseek": (256, 8, 7168, 4096),
    # ... and the second (K = inter, N = hidden), with --models
    "mixtral-g2": (8, 2, 14336, 4096),
    "qwen3-g2": (128, 8, 768, 2048),
    "deepseek-g2": (256, 8, 2048, 7168),
}
FIRST_GEMMS = ("mixtral", "qwen3", "deepseek")


def graphed(fn, calls: int, timing_stream):
    """``fn`` captured ``calls`` times into a CUDA graph on a fresh stream (so
    each graph owns its stream's schedule buffer); a callable that replays it
    on ``timing_stream``."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()  # inputs made on the default stream are ready
    with stream:
        fn(0)  # compile, tensor maps, schedule buffers: outside the capture
        stream.begin_capture()
        for _ in range(calls):
            fn(0)
        graph = stream.end_capture()
    stream.synchronize()
    return lambda i: graph.launch(timing_stream)


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

    def sm90(label, weights, trans_b, schedule, source=hopper.SOURCE, defines=None):
        defines = {**hopper.DEFINES, **(defines or {})}

        def call(i):
            # All read at each call: another grid, another version of the kernel.
            default = (hopper.SCHEDULE, hopper.SOURCE, hopper.DEFINES)
            hopper.SCHEDULE, hopper.SOURCE, hopper.DEFINES = schedule, source, defines
            try:
                cg.gmm(a, weights, sizes, trans_b=trans_b, out=outs[label], algorithm="sm90_grouped")
            finally:
                hopper.SCHEDULE, hopper.SOURCE, hopper.DEFINES = default

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
    if VARIANT:
        for label, weights, trans_b in (("sm90 nt var", b, True), ("sm90 nn var", b_kn, False)):
            outs[label] = cupy.empty((m, n1), dtype=dt)
            methods[label] = sm90(label, weights, trans_b, "persistent", defines=VARIANT)
    dense_w = b[0]
    methods["dense"] = lambda i: cupy.matmul(a, dense_w.T)
    stream = None
    if GRAPH and tokens <= 256:
        # Only the sm90 rows and dense, each one graph of GRAPH calls, sizes on the device.
        sizes_dev = cupy.asarray(sizes.astype(np.int32))

        def on_device(fn_label, weights, trans_b, defines=None, source=hopper.SOURCE):
            defines = {**hopper.DEFINES, **(defines or {})}

            def call(i):
                default = (hopper.DEFINES, hopper.SOURCE)
                hopper.DEFINES, hopper.SOURCE = defines, source
                try:
                    cg.gmm(
                        a, weights, sizes_dev, trans_b=trans_b, out=outs[fn_label], algorithm="sm90_grouped"
                    )
                finally:
                    hopper.DEFINES, hopper.SOURCE = default

            return call

        plain = {"sm90 nt": ("sm90_grouped", b, True), "sm90 nn": ("sm90 nn", b_kn, False)}
        if VARIANT:
            plain["sm90 nt var"] = ("sm90 nt var", b, True, VARIANT)
            plain["sm90 nn var"] = ("sm90 nn var", b_kn, False, VARIANT)
        if BASELINE:
            plain["sm90 nt base"] = ("sm90 nt base", b, True, None, BASELINE)
            plain["sm90 nn base"] = ("sm90 nn base", b_kn, False, None, BASELINE)
        methods = {}
        stream = cupy.cuda.Stream(non_blocking=True)
        for label, spec in plain.items():
            methods[label] = graphed(on_device(*spec), GRAPH, stream)

        def dense_eager(i):  # cuBLAS through CuPy cannot be captured: one eager call
            with stream:
                cupy.matmul(a, b[0].T)

        methods["dense"] = dense_eager
        # cuBLAS rows are not timed here: fill them for the checks below.
        for alg in algorithms[1:]:
            run(alg)(0)
        run("sm90_grouped")(0)
        for label in ("sm90 nt v5", "sm90 nn v5"):
            sm90(label, b if "nt" in label else b_kn, "nt" in label, "per_tile")(0)
        stream.synchronize()
        cupy.cuda.Device().synchronize()
    results = time_interleaved(list(methods.values()), warmup=3, repeat=20, stream=stream)
    if GRAPH and tokens <= 256:
        results = [
            r if isinstance(r, Exception) or label == "dense" else {**r, "median": r["median"] / GRAPH}
            for label, r in zip(methods, results)
        ]
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
    active_bytes = int(np.count_nonzero(sizes)) * n1 * hidden * b.dtype.itemsize
    for label, r in zip(methods, results):
        if isinstance(r, Exception):
            print(f"{case:22} {label:16} error {r}")
        else:
            gbs = f" {active_bytes / r['median'] / 1e6:8.1f} GB/s of active weights" if tokens <= 256 else ""
            print(f"{case:22} {label:16} {r['median']:8.3f} {flops / r['median'] / 1e9:8.1f}{gbs}")
    diffs = ", ".join(f"{label} {err:.2e}" for label, err in errs.items())
    print(f"{'':22} vs cublas_grouped: relative difference sm90 {diffs}")
    print(f"{'':22} persistent == per_tile bit for bit: nt {same['nt']}, nn {same['nn']}")
    timed = dict(zip(methods, results))
    if VARIANT:
        same = all(
            bool(cupy.all(outs[x].view(cupy.uint16) == outs[y].view(cupy.uint16)))
            for x, y in (("sm90_grouped", "sm90 nt var"), ("sm90 nn", "sm90 nn var"))
        )
        print(f"{'':22} this kernel == the variant bit for bit: {same}")
    if BASELINE:
        same = all(
            bool(cupy.all(outs[x].view(cupy.uint16) == outs[y].view(cupy.uint16)))
            for x, y in (("sm90_grouped", "sm90 nt base"), ("sm90 nn", "sm90 nn base"))
        )
        print(f"{'':22} this kernel == the baseline bit for bit: {same}")
    pairs = [("sm90 nn / nt time", "sm90 nn", "sm90 nt")]
    per_tile = (
        [] if GRAPH and tokens <= 256 else [("nt", "sm90 nt", "sm90 nt v5"), ("nn", "sm90 nn", "sm90 nn v5")]
    )
    if VARIANT:
        pairs += [("this / variant time, nt", "sm90 nt", "sm90 nt var")]
        pairs += [("this / variant time, nn", "sm90 nn", "sm90 nn var")]
    if BASELINE:
        pairs += [("this / baseline time, nt", "sm90 nt", "sm90 nt base")]
        pairs += [("this / baseline time, nn", "sm90 nn", "sm90 nn base")]
    for what, top, bottom in (
        *pairs,
        *((f"sm90 persistent / per_tile time, {x}", y, z) for x, y, z in per_tile),
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
# Defines of a variant timed beside this one (--define), or None.
VARIANT = None
# Calls per CUDA graph for the decode sizes' sm90 rows (--graph), or 0: eager.
GRAPH = 0


def main() -> None:
    import cupy

    global BASELINE, VARIANT, GRAPH
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--baseline",
        help="an earlier grouped_gemm_sm90.cu (same arguments) to time beside this one, persistent grid",
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--models", nargs="+", default=list(FIRST_GEMMS), choices=list(MODELS))
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--graph", type=int, default=0, metavar="R", help="decode sizes: graphs of R calls")
    args = parser.parse_args()
    GRAPH = args.graph
    if args.define:
        VARIANT = {k: int(v) for k, v in (d.split("=", 1) for d in args.define)}
        print(f"variant: {VARIANT}")
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
