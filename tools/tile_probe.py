"""Development probe of the Hopper kernels' tile and load choices, as CUDA graphs.

GEMMs (default): the first and second expert GEMMs of the benchmark's models
at decode (16, 64 tokens) or larger sizes, each a graph of 10 calls (3 from
257 tokens on) with the group sizes on the device, methods timed round-robin
(3 warm-up rounds, median of 25): the bf16 kernel with [E, N, K] ("nt") and
[E, K, N] ("nn") weights, the FP8 kernel by its rule ("fp8": thin tiles at
decode), with thin tiles off ("fp8-wide"), and with one 128-row box of a per
stage ("fp8-box128"); each under every TMA L2 promotion asked for
(``--promos 0,256``: ``tma.L2_PROMOTION``). Prints microseconds, GB/s of
the active experts' weights and their share of 4.8 TB/s (the H200's
datasheet), or TFLOP/s, and whether the variants' outputs agree bit for bit.

``nt-off`` and ``nn-off``: the bf16 kernel with its thin tiles off (the
tiles chosen before them). ``--bf16-define NAME=VALUE``: the bf16 kinds
compiled with that define too, beside the plain ones (``nt-def``, ``nn-def``:
the K-rotation probe of docs/kernel-notes.md ran so, from a patched kernel).

``--layers``: the decode layer (``FixedCapacityMoE``, one step captured in a
graph, 10 replays per round, median of 30) with bf16 weights (and their thin
tiles off, "bf16-off"), FP8 weights
("fp8") and FP8 with thin tiles off ("fp8-wide"), Qwen3-30B-A3B and
DeepSeek-V3, uniform and skewed routing. The thin / wide bitwise line
compares outputs allocated inside the capture, which layers of one shape on
one stream may share: tools/fp8_determinism.py is the determinism check.
For docs/kernel-notes.md ("TMA L2 promotion, a's small boxes and thin tiles").

    PYTHONPATH=. python3 tools/tile_probe.py --cases qwen3-g1,deepseek-g1 --tokens 16,64 --kinds nn,fp8,fp8-wide
    PYTHONPATH=. python3 tools/tile_probe.py --layers --tokens 16,64
"""

import sys

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper, hopper_fp8, hopper_variants, tma
from cublas_grouped.runtime.timing import time_interleaved

BF16 = ml_dtypes.bfloat16
HBM = 4.8e12
SHAPES = {  # (E, k, K, N)
    "qwen3-g1": (128, 8, 2048, 1536),
    "qwen3-g2": (128, 8, 768, 2048),
    "deepseek-g1": (256, 8, 7168, 4096),
    "deepseek-g2": (256, 8, 2048, 7168),
    "mixtral-g1": (8, 2, 4096, 28672),
}
PROMOS = [
    int(p) for p in (sys.argv[sys.argv.index("--promos") + 1].split(",") if "--promos" in sys.argv else ["0"])
]
TOKENS = [
    int(t)
    for t in (
        sys.argv[sys.argv.index("--tokens") + 1].split(",")
        if "--tokens" in sys.argv
        else ["16", "64", "4096"]
    )
]
BF16_DEFINE = (
    {name: int(value) for name, value in [sys.argv[sys.argv.index("--bf16-define") + 1].split("=")]}
    if "--bf16-define" in sys.argv
    else {}
)
CASES = sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv else list(SHAPES)
KINDS = (
    sys.argv[sys.argv.index("--kinds") + 1].split(",")
    if "--kinds" in sys.argv
    else ["nt", "nn", "fp8", "fp8-box128"]
)


def graphed(
    fn, calls, stream, promo, defines=None, thin=True, bf16_thin=True, bf16_defines=None, prefetch=True
):
    old_p, old_d, old_t = tma.L2_PROMOTION, hopper_fp8.DEFINES, hopper_fp8.THIN
    old_b, old_bd = hopper_variants.THIN_MAX_ROWS_PER_GROUP, hopper.DEFINES
    old_pf, hopper_variants.PREFETCH_B = hopper_variants.PREFETCH_B, prefetch
    if bf16_defines:
        hopper.DEFINES = {**hopper.DEFINES, **bf16_defines}
    tma.L2_PROMOTION = promo
    hopper_fp8.THIN = thin
    hopper_variants.THIN_MAX_ROWS_PER_GROUP = old_b if bf16_thin else 0
    if defines:
        hopper_fp8.DEFINES = {**hopper_fp8.DEFINES, **defines}
    try:
        with stream:
            fn()
            stream.begin_capture()
            for _ in range(calls):
                fn()
            g = stream.end_capture()
        stream.synchronize()
    finally:
        tma.L2_PROMOTION, hopper_fp8.DEFINES, hopper_fp8.THIN = old_p, old_d, old_t
        hopper_variants.THIN_MAX_ROWS_PER_GROUP, hopper.DEFINES = old_b, old_bd
        hopper_variants.PREFETCH_B = old_pf
    return lambda i: g.launch(stream)


def gemms(case, tokens):
    E, k, K, N = SHAPES[case]
    rng = np.random.default_rng(tokens)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)])
    sizes = np.bincount(ids.ravel(), minlength=E)
    m = int(sizes.sum())
    active = int((sizes > 0).sum())
    sizes_dev = cupy.asarray(sizes.astype(np.int32))
    a = cupy.random.standard_normal((m, K), dtype=cupy.float32).astype(BF16)
    w = (
        (cupy.random.standard_normal((E, N, K), dtype=cupy.float32) * K**-0.5).astype(BF16)
        if E * N * K < 4e9
        else None
    )
    if w is None:  # DeepSeek: build in slices
        w = cupy.empty((E, N, K), dtype=BF16)
        for e0 in range(0, E, 16):
            w[e0 : e0 + 16] = (
                cupy.random.standard_normal((min(16, E - e0), N, K), dtype=cupy.float32) * K**-0.5
            ).astype(BF16)
    methods, outs, nbytes = {}, {}, {}
    stream = cupy.cuda.Stream(non_blocking=True)
    calls = 10 if tokens <= 256 else 3
    if any(kind.startswith("nn") for kind in KINDS):
        w_kn = cupy.ascontiguousarray(w.transpose(0, 2, 1))
    if any(kind.startswith("fp8") for kind in KINDS):
        wq = cg.quantize_fp8(w, trans_b=True)
        a_q, a_s = cg.quantize_rows_fp8(a)
    for kind in KINDS:
        for promo in PROMOS:
            label = f"{kind} p{promo}"
            out = cupy.empty((m, N), dtype=BF16)
            outs[label] = out
            if kind in ("nt", "nt-off", "nt-def"):
                fn = lambda out=out: cg.gmm(a, w, sizes_dev, trans_b=True, out=out, algorithm="sm90_grouped")
                nbytes[label] = active * N * K * 2
                defs = None
            elif kind in ("nn", "nn-off", "nn-def"):
                fn = lambda out=out: cg.gmm(
                    a, w_kn, sizes_dev, trans_b=False, out=out, algorithm="sm90_grouped"
                )
                nbytes[label] = active * N * K * 2
                defs = None
            else:
                fn = lambda out=out: hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=out)
                nbytes[label] = active * (N * K + -(-N // 128) * -(-K // 128) * 4)
                defs = {"FP8_A_BOX_ROWS": 128} if kind == "fp8-box128" else None
            extra = BF16_DEFINE if kind.endswith("-def") else None
            methods[label] = graphed(
                fn,
                calls,
                stream,
                promo,
                defs,
                thin=kind == "fp8",
                bf16_thin="off" not in kind,
                bf16_defines=extra,
            )
    cupy.cuda.Device().synchronize()
    res = time_interleaved(list(methods.values()), warmup=3, repeat=25, stream=stream)
    t = {}
    for label, r in zip(methods, res):
        if isinstance(r, Exception):
            print(f"{case:12} T={tokens:5} {label:16} error {r}", flush=True)
            continue
        us = r["median"] * 1e3 / calls
        t[label] = us
        extra = ""
        if tokens <= 256:
            gbs = nbytes[label] / us / 1e3
            extra = f"{gbs:7.0f} GB/s {100 * gbs * 1e9 / HBM:5.1f}% of 4.8"
        else:
            extra = f"{2.0 * m * K * N / us / 1e6:7.0f} TFLOP/s"
        print(f"{case:12} T={tokens:5} {label:16} {us:9.1f} us {extra}", flush=True)
    for kind in KINDS:
        base = f"{kind} p{PROMOS[0]}"
        for promo in PROMOS[1:]:
            label = f"{kind} p{promo}"
            if base in t and label in t:
                same = bool(cupy.all(outs[base].view(cupy.uint16) == outs[label].view(cupy.uint16)))
                print(
                    f"{'':12} {'':7} {label} / {base}: {t[label] / t[base]:.3f}  bitwise {same}", flush=True
                )
    pairs = [("fp8", "fp8-box128"), ("fp8", "fp8-wide"), ("nt", "nt-off"), ("nn", "nn-off")]
    for first, other in [*pairs, ("nt-def", "nt"), ("nn-def", "nn")]:
        for promo in PROMOS:
            a_, b_ = f"{first} p{promo}", f"{other} p{promo}"
            if a_ in t and b_ in t:
                same = bool(cupy.all(outs[a_].view(cupy.uint16) == outs[b_].view(cupy.uint16)))
                print(
                    f"{'':12} {'':7} {first} / {other} (p{promo}): {t[a_] / t[b_]:.3f}  bitwise {same}",
                    flush=True,
                )
    cupy.get_default_memory_pool().free_all_blocks()


def layers(model, tokens_list):
    from cublas_grouped.tools.bench import workloads as W

    name = {"qwen3": "qwen3-30b-a3b", "deepseek": "deepseek-v3"}[model]
    s = W.MODELS[name]
    w1 = cupy.empty((s.experts, 2 * s.inter, s.hidden), dtype=BF16)
    w2 = cupy.empty((s.experts, s.hidden, s.inter), dtype=BF16)
    for e0 in range(0, s.experts, 16):
        e1 = min(e0 + 16, s.experts)
        w1[e0:e1] = (
            cupy.random.standard_normal((e1 - e0, 2 * s.inter, s.hidden), dtype=cupy.float32) * s.hidden**-0.5
        ).astype(BF16)
        w2[e0:e1] = (
            cupy.random.standard_normal((e1 - e0, s.hidden, s.inter), dtype=cupy.float32) * s.inter**-0.5
        ).astype(BF16)
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    per_expert_fp8 = (q1.nbytes + q2.nbytes) // s.experts
    per_expert_bf16 = (w1.nbytes + w2.nbytes) // s.experts
    stream = cupy.cuda.Stream(non_blocking=True)
    for tokens in tokens_list:
        for routing in ("uniform", "skewed"):
            case = W.Case(name, tokens, s.experts, s.top_k, s.hidden, s.inter, routing)
            weights, ids = W.make_routing(case, seed=0)
            x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(BF16)
            ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
            cupy.cuda.Device().synchronize()
            active = int((W.expert_counts(ids, s.experts) > 0).sum())
            methods, outs = {}, {}
            for kind, (a1, a2), _per in (
                ("bf16", (w1, w2), per_expert_bf16),
                ("bf16-off", (w1, w2), per_expert_bf16),
                ("bf16-nopf", (w1, w2), per_expert_bf16),
                ("fp8", (q1, q2), per_expert_fp8),
                ("fp8-nopf", (q1, q2), per_expert_fp8),
                ("fp8-wide", (q1, q2), per_expert_fp8),
            ):
                for promo in PROMOS:
                    layer = cg.FixedCapacityMoE(a1, a2, s.top_k, tokens, trans_b=True, graphs=False)
                    label = f"{kind} p{promo}"
                    holder = {}

                    def fn(layer=layer, holder=holder, x=x, ids_d=ids_d, w_d=w_d):
                        holder["out"] = layer.forward(x, ids_d, w_d)

                    methods[label] = graphed(
                        fn,
                        1,
                        stream,
                        promo,
                        thin=kind in ("fp8", "fp8-nopf"),
                        bf16_thin=kind != "bf16-off",
                        prefetch=not kind.endswith("-nopf"),
                    )
                    outs[label] = holder
            res = time_interleaved(
                [lambda i, f=f: [f(i) for _ in range(10)] for f in methods.values()],
                warmup=3,
                repeat=30,
                stream=stream,
            )
            t = {}
            for label, r in zip(methods, res):
                if isinstance(r, Exception):
                    print(f"{case.name:36} {label} error {r}", flush=True)
                    continue
                us = r["median"] * 1e3 / 10
                t[label] = us
                per = per_expert_fp8 if label.startswith("fp8") else per_expert_bf16
                gbs = active * per / us / 1e3
                print(
                    f"{case.name:36} {label:10} {us:9.1f} us  {gbs:7.0f} GB/s {100 * gbs * 1e9 / HBM:5.1f}% of 4.8",
                    flush=True,
                )
            p0 = PROMOS[0]
            if f"fp8 p{p0}" in t and f"fp8-wide p{p0}" in t:
                same = bool(
                    cupy.all(
                        outs[f"fp8 p{p0}"]["out"].view(cupy.uint16)
                        == outs[f"fp8-wide p{p0}"]["out"].view(cupy.uint16)
                    )
                )
                print(
                    f"{'':36} fp8 thin / wide: {t[f'fp8 p{p0}'] / t[f'fp8-wide p{p0}']:.3f}  bitwise {same}",
                    flush=True,
                )
            for kind in ("bf16", "fp8"):
                base = f"{kind} p{PROMOS[0]}"
                for promo in PROMOS[1:]:
                    label = f"{kind} p{promo}"
                    same = bool(
                        cupy.all(outs[base]["out"].view(cupy.uint16) == outs[label]["out"].view(cupy.uint16))
                    )
                    print(f"{'':36} {label} / {base}: {t[label] / t[base]:.3f}  bitwise {same}", flush=True)
            for kind in ("bf16", "fp8"):
                if f"{kind} p0" in t and f"{kind}-nopf p0" in t:
                    ratio = t[f"{kind} p0"] / t[f"{kind}-nopf p0"]
                    print(f"{'':36} {kind} prefetch / none (p0): {ratio:.3f}", flush=True)
            if "bf16 p0" in t and "bf16-off p0" in t:
                print(f"{'':36} bf16 thin / off (p0): {t['bf16 p0'] / t['bf16-off p0']:.3f}", flush=True)
            if "fp8 p0" in t and "bf16 p0" in t:
                print(f"{'':36} bf16 / fp8 (p0) {t['bf16 p0'] / t['fp8 p0']:.2f}x", flush=True)
    del w1, w2, q1, q2
    cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "promotions", PROMOS, flush=True)
    if "--layers" in sys.argv:
        for model in ("qwen3", "deepseek"):
            layers(model, [t for t in TOKENS if t <= 256])
    else:
        for case in CASES:
            for tokens in TOKENS:
                gemms(case, tokens)
