"""Development probe (GPU machine): a fixed-capacity decode layer replayed from
its CUDA graph, chunked cuBLAS step against the Hopper kernel step, in one run.

For each model shape and T in (16, 64), uniform and skewed routing (the
benchmark's), both steps are timed by CUDA events over graph replays
(interleaved rounds, median), and reported as microseconds and as the share of
the decode floor: the active experts' w1 + w2 bytes at the HBM bandwidth the
benchmark uses (``--hbm-gbs``, default 3350, the H100 SXM datasheet figure).
The two outputs are compared (relative error) before timing.

    PYTHONPATH=. python3 tools/decode_probe.py [--models qwen3-30b-a3b,...] [--rounds 50]
"""

from __future__ import annotations

import argparse

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.moe.fixed_capacity import fixed_capacity_backend
from cublas_grouped.testing import rel_error
from cublas_grouped.tools.bench import workloads as W

REPLAYS = 10  # graph launches back to back per timed round: the GPU never waits for the host


def _captured(layer, x, ids, weights, stream):
    """A graph of one step of ``layer`` (built with graphs=False), captured on ``stream``."""
    with stream:
        layer.forward(x, ids, weights)  # eager first: compiles, sets up
        stream.begin_capture()
        out = layer.forward(x, ids, weights)
        graph = stream.end_capture()
    return graph, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(W.MODELS))
    p.add_argument("--tokens", default="16,64")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--hbm-gbs", type=float, default=3350.0)
    args = p.parse_args()
    print(
        f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; floor at {args.hbm_gbs:.0f} GB/s"
    )
    chunked_exec = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="cublas_grouped"))
    kernel_exec = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    print(
        f"{'case':38s} {'chunked us':>10s} {'sm90 us':>9s} {'floor us':>9s} {'chunked %':>9s} {'sm90 %':>7s} {'rel.diff':>9s}"
    )
    for model in args.models.split(","):
        s = W.MODELS[model]
        rng = np.random.default_rng(0)
        bf16 = ml_dtypes.bfloat16
        # Random weights made on the GPU (DeepSeek-V3's are 22.5 GB in bf16).
        w1 = (
            cupy.random.standard_normal((s.experts, s.hidden, 2 * s.inter), cupy.float32) * s.hidden**-0.5
        ).astype(bf16)
        w2 = (
            cupy.random.standard_normal((s.experts, s.inter, s.hidden), cupy.float32) * s.inter**-0.5
        ).astype(bf16)
        cupy.get_default_memory_pool().free_all_blocks()
        for tokens in map(int, args.tokens.split(",")):
            for routing in ("uniform", "skewed"):
                case = W.Case(model, tokens, s.experts, s.top_k, s.hidden, s.inter, routing)
                weights, ids = W.make_routing(case, seed=0)
                active = int((W.expert_counts(ids, s.experts) > 0).sum())
                floor_us = W.layer_weight_bytes(case, active) / (args.hbm_gbs * 1e9) * 1e6
                x = cupy.asarray(rng.standard_normal((tokens, s.hidden), np.float32).astype(bf16))
                ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
                layers = {
                    "chunked": cg.FixedCapacityMoE(
                        w1, w2, s.top_k, tokens, executor=chunked_exec, graphs=False
                    ),
                    "sm90": cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=kernel_exec, graphs=False),
                }
                sm = cg.device_info().sm
                paths = {
                    k: fixed_capacity_backend(sm, v.executor, v.shape, v.w1, v.w2, tokens)
                    for k, v in layers.items()
                }
                stream = cupy.cuda.Stream(non_blocking=True)
                graphs = {k: _captured(v, x, ids_d, w_d, stream) for k, v in layers.items()}
                for g, _ in graphs.values():
                    g.launch(stream)
                stream.synchronize()
                diff = rel_error(
                    *(cupy.asnumpy(graphs[k][1]).astype(np.float64) for k in ("sm90", "chunked"))
                )
                times = {k: [] for k in layers}
                for r in range(args.rounds + 3):
                    order = list(layers) if r % 2 == 0 else list(reversed(layers))
                    for k in order:
                        start, end = cupy.cuda.Event(), cupy.cuda.Event()
                        start.record(stream)
                        for _ in range(REPLAYS):
                            graphs[k][0].launch(stream)
                        end.record(stream)
                        end.synchronize()
                        if r >= 3:  # warm-up rounds
                            times[k].append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / REPLAYS)
                med = {k: float(np.median(v)) for k, v in times.items()}
                name = f"{model}/T{tokens}/{routing} ({paths['chunked'][:7]}/{paths['sm90'][:4]})"
                print(
                    f"{name:38s} {med['chunked']:10.1f} {med['sm90']:9.1f} {floor_us:9.1f} "
                    f"{100 * floor_us / med['chunked']:8.1f}% {100 * floor_us / med['sm90']:6.1f}% {diff:9.2e}"
                )
        del w1, w2
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
