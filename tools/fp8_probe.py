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

``--define NAME=VALUE`` (repeatable): the FP8 kernel under those defines too
("fp8 var", e.g. ``--define FP8_OVERLAP=0`` for the serial promotion), with
the time ratio and whether the two kernels' outputs agree bit for bit.

``--set NAME=VALUE`` (repeatable): the same with module constants of
``hopper_fp8`` set for the variant instead, e.g. ``--set FOLD=0`` for the
kernel without its fold. ``--routing skewed`` takes the benchmark's skewed
routing (``tools.bench.workloads``) instead of uniform random routing.

``--equal ROWS ...``: every group ROWS rows instead (e.g. 256 against 257,
272, 273 and 320 for what a tail tile and a fold cost).

``--layer``: the whole decode layer instead (default tokens 16 and 64):
``FixedCapacityMoE`` with FP8 weights (the FP8 kernel step: rows quantized
on the device, no dequantized copy) against the same layer with the bf16
weights of the same (dequantized) values, both under AUTO, each replayed
from a CUDA graph of one step (``--replays`` launches back to back per
timed round, rounds interleaved, medians), uniform and skewed routing (the
benchmark's). Prints microseconds, the bf16 / FP8 time ratio, GB/s of the
active experts' FP8 weight bytes (values and scales of w1 and w2) and that
as a share of ``--hbm-gbs`` (default 3350, the H100 SXM datasheet), and the
relative difference of the two layers' outputs (e4m3 activations: a few %).

    PYTHONPATH=. python tools/fp8_probe.py --layer [--tokens 16 64] [--models qwen3 deepseek]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

MODELS = {  # name: (experts, top_k, hidden = K, 2 * inter = N)
    "qwen3": (128, 8, 2048, 1536),
    "deepseek": (256, 8, 7168, 4096),
    "mixtral": (8, 2, 4096, 28672),
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


def probe(model: str, tokens: int, wq, w_deq, routing: str = "random") -> None:
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.gemm.backends import hopper_fp8
    from cublas_grouped.runtime.timing import time_interleaved

    experts, top_k, k, n = MODELS[model]
    if routing.startswith("equal"):  # every group the same rows (--equal); tokens is unused
        ids = np.repeat(np.arange(experts), int(routing[5:]))
    elif routing == "random":
        rng = np.random.default_rng(tokens)
        ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    else:  # the benchmark's routing of this model and token count
        from cublas_grouped.tools.bench import workloads as W

        name = {"qwen3": "qwen3-30b-a3b", "deepseek": "deepseek-v3", "mixtral": "mixtral-8x7b"}[model]
        shape = W.MODELS[name]
        case = W.Case(name, tokens, shape.experts, shape.top_k, shape.hidden, shape.inter, routing)
        ids = W.make_routing(case, seed=0)[1]
    sizes = np.bincount(ids.ravel(), minlength=experts)
    m = int(sizes.sum())
    sizes_dev = cupy.asarray(sizes, dtype=cupy.int32)
    x = cupy.random.standard_normal((m, k), dtype=cupy.float32).astype(BF16)
    a_q, a_s = cg.quantize_rows_fp8(x)
    flops = 2.0 * m * k * n
    labels = ("fp8 kernel", "fp8 gmm", "bf16 sm90", "fp8 dequant", "fp8 var")
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
    if VARIANT or VARIANT_ATTRS:

        def variant(i):
            saved = {name: getattr(hopper_fp8, name) for name in VARIANT_ATTRS}
            default, hopper_fp8.DEFINES = hopper_fp8.DEFINES, {**hopper_fp8.DEFINES, **(VARIANT or {})}
            try:
                for name, value in VARIANT_ATTRS.items():
                    setattr(hopper_fp8, name, value)
                hopper_fp8.grouped_fp8(a_q, a_s, wq, sizes_dev, out=outs["fp8 var"])
            finally:
                hopper_fp8.DEFINES = default
                for name, value in saved.items():
                    setattr(hopper_fp8, name, value)

        methods["fp8 var"] = variant
    results = dict(zip(methods, time_interleaved(list(methods.values()), warmup=3, repeat=20)))
    case = f"{model} T={tokens}" + ("" if routing == "random" else f" {routing}")
    active = int((sizes > 0).sum())
    fp8_bytes = active * (n * k + -(-n // 128) * -(-k // 128) * 4)
    for label, r in results.items():
        if isinstance(r, Exception):
            print(f"{case:28} {label:11} error {r}")
            continue
        ms = r["median"]
        line = f"{case:28} {label:11} {ms:9.4f} {flops / ms / 1e9:8.1f}"
        if tokens <= 64 and label in ("fp8 kernel", "fp8 gmm"):
            line += f"   {fp8_bytes / ms / 1e6:7.1f} GB/s of {active} experts' FP8 weights"
        if tokens <= 64 and label == "bf16 sm90":
            line += f"   {2 * active * n * k / ms / 1e6:7.1f} GB/s of their bf16 weights"
        print(line)
    t = {label: r["median"] for label, r in results.items() if not isinstance(r, Exception)}
    if (VARIANT or VARIANT_ATTRS) and {"fp8 kernel", "fp8 var"} <= set(t):
        same = bool(cupy.all(outs["fp8 kernel"].view(cupy.uint16) == outs["fp8 var"].view(cupy.uint16)))
        print(f"{'':20} fp8 kernel / variant time {t['fp8 kernel'] / t['fp8 var']:.3f}; bit for bit: {same}")
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


LAYER_MODELS = {"qwen3": "qwen3-30b-a3b", "deepseek": "deepseek-v3"}  # names in the benchmark's workloads


def _graph_of_step(layer, x, ids, weights, stream):
    """A CUDA graph of one step of ``layer`` (built with graphs=False) and its output."""
    with stream:
        layer.forward(x, ids, weights)  # eager first: compiles, sets up
        stream.begin_capture()
        out = layer.forward(x, ids, weights)
        graph = stream.end_capture()
    stream.synchronize()
    return graph, out


def decode_layer(model: str, tokens_list, rounds: int, replays: int, hbm_gbs: float) -> None:
    """The FP8 decode layer against the bf16 one (see the module's docstring)."""
    import cupy

    import cublas_grouped as cg
    from cublas_grouped.tools.bench import workloads as W

    s = W.MODELS[LAYER_MODELS[model]]
    w1 = random_weights(s.experts, 2 * s.inter, s.hidden)  # [E, 2I, H]: trans_b
    w2 = random_weights(s.experts, s.hidden, s.inter)  # [E, H, I]
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    q1.dequantize("bfloat16", out=w1)  # the bf16 layer runs the values the FP8 one reads
    q2.dequantize("bfloat16", out=w2)
    cupy.get_default_memory_pool().free_all_blocks()
    per_expert = (q1.nbytes + q2.nbytes) // s.experts
    stream = cupy.cuda.Stream(non_blocking=True)
    for tokens in tokens_list:
        for routing in ("uniform", "skewed"):
            case = W.Case(LAYER_MODELS[model], tokens, s.experts, s.top_k, s.hidden, s.inter, routing)
            weights, ids = W.make_routing(case, seed=0)
            x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(BF16)
            ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
            cupy.cuda.Device().synchronize()  # inputs were made on the default stream
            fp8 = cg.FixedCapacityMoE(q1, q2, s.top_k, tokens, trans_b=True, graphs=False)
            bf16 = cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, trans_b=True, graphs=False)
            assert fp8.fp8_kernel, fp8.fp8_unsupported
            graphs = {}
            for name, layer in (("fp8", fp8), ("bf16", bf16)):
                graphs[name] = _graph_of_step(layer, x, ids_d, w_d, stream)
            outs = {k: v[1].astype(cupy.float32) for k, v in graphs.items()}
            diff = float(cupy.linalg.norm(outs["fp8"] - outs["bf16"]) / cupy.linalg.norm(outs["bf16"]))
            times = {k: [] for k in graphs}
            for r in range(rounds + 3):
                for name in graphs if r % 2 == 0 else reversed(list(graphs)):
                    start, end = cupy.cuda.Event(), cupy.cuda.Event()
                    start.record(stream)
                    for _ in range(replays):
                        graphs[name][0].launch(stream)
                    end.record(stream)
                    end.synchronize()
                    if r >= 3:  # warm-up rounds
                        times[name].append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / replays)
            us = {k: float(np.median(v)) for k, v in times.items()}
            active = int((W.expert_counts(ids, s.experts) > 0).sum())
            fp8_bytes = active * per_expert
            gbs = fp8_bytes / us["fp8"] / 1e3
            bf16_gbs = W.layer_weight_bytes(case, active) / us["bf16"] / 1e3
            print(
                f"{case.name:36} fp8 {us['fp8']:9.1f} us  bf16 {us['bf16']:9.1f} us  bf16/fp8 "
                f"{us['bf16'] / us['fp8']:.2f}x  {active:3d} experts: {fp8_bytes / 1e6:8.1f} MB FP8, "
                f"{gbs:7.1f} GB/s = {100 * gbs / hbm_gbs:5.1f}% of {hbm_gbs:.0f} (bf16 layer {bf16_gbs:7.1f} GB/s "
                f"= {100 * bf16_gbs / hbm_gbs:5.1f}%)  rel.diff {diff:.2e}",
                flush=True,
            )
            del fp8, bf16, graphs, outs
    print(
        f"{'':36} weights held: FP8 {(q1.nbytes + q2.nbytes) / 2**30:.2f} GiB (values and scales), "
        f"bf16 {(w1.nbytes + w2.nbytes) / 2**30:.2f} GiB"
    )
    del w1, w2, q1, q2
    cupy.get_default_memory_pool().free_all_blocks()


# Defines of an FP8 kernel variant timed beside the kernel (--define), or None;
# hopper_fp8's constants set for it (--set).
VARIANT = None
VARIANT_ATTRS: dict = {}


def main() -> None:
    import cupy

    global VARIANT

    import cublas_grouped as cg

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=["qwen3", "deepseek"], choices=list(MODELS))
    parser.add_argument("--layer", action="store_true", help="the decode layer (FixedCapacityMoE)")
    parser.add_argument("--rounds", type=int, default=30, help="--layer: timed rounds")
    parser.add_argument("--replays", type=int, default=10, help="--layer: graph launches per round")
    parser.add_argument("--hbm-gbs", type=float, default=3350.0)
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--routing", nargs="+", default=["random"], choices=["random", "uniform", "skewed"])
    parser.add_argument(
        "--equal",
        type=int,
        nargs="+",
        default=[],
        metavar="ROWS",
        help="groups of ROWS rows each, in place of --tokens",
    )
    args = parser.parse_args()
    for item in args.set:
        name, value = item.split("=", 1)
        VARIANT_ATTRS[name] = int(value)
    if VARIANT_ATTRS:
        print(f"variant constants: {VARIANT_ATTRS}")
    if args.define:
        VARIANT = {k: int(v) for k, v in (d.split("=", 1) for d in args.define)}
        print(f"variant: {VARIANT}")
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    if args.layer:
        print(f"{name}; decode layer (FixedCapacityMoE, graph replays), FP8 vs bf16 weights, AUTO")
        for model in args.models:
            decode_layer(model, args.tokens or [16, 64], args.rounds, args.replays, args.hbm_gbs)
        return
    args.tokens = args.tokens or [16, 64, 4096, 16384]
    print(f"{name}; first expert GEMM, [E, N, K] weights, uniform random routing; ms and TFLOP/s")
    print(f"{'case':20} {'method':11} {'ms':>9} {'TFLOP/s':>8}")
    for model in args.models:
        experts, _, k, n = MODELS[model]
        w = random_weights(experts, n, k)
        wq = cg.quantize_fp8(w, trans_b=True)
        wq.dequantize("bfloat16", out=w)  # the bf16 kernels run the same weights the FP8 one reads
        cupy.get_default_memory_pool().free_all_blocks()
        cases = [(rows * experts, f"equal{rows}") for rows in args.equal] or [
            (tokens, routing) for tokens in args.tokens for routing in args.routing
        ]
        for tokens, routing in cases:
            probe(model, tokens, wq, w, routing)
            cupy.get_default_memory_pool().free_all_blocks()
        del w, wq
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
