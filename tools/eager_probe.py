"""Development probe (GPU machine): what an eager prefill layer loses to the host.

For each case, the fused layer (w1 packed, the activation in GEMM 1's
epilogue) four ways, round-robin, CUDA events, medians:

- ``default``: ``moe_forward`` as a user calls it (one synchronizing copy of
  the dropped-pairs count per call), one call between two events;
- ``default x10``: ten such calls between two events (per call);
- ``nosync x10``: ten ``fixed_capacity=True`` calls back to back between two
  events (per call): the same GPU work with nothing copied to the host, so
  the host queues ahead;
- ``graph``: the ``fixed_capacity=True`` step replayed from a CUDA graph.

And the host's microseconds per ``nosync`` call (``time.perf_counter``,
the GPU idle before each: no call waits for the GPU), the host's own cost of
one call, which every synchronized call leaves the GPU idle for in part.

``--fp8``: FP8 weights ([E, N, K], 128 x 128 block scales) instead, the
default path (counts copied to the host, the FP8 ``gmm``) against
``fixed_capacity=True`` (the FP8 kernel step, nothing copied back).

    PYTHONPATH=. python3 tools/eager_probe.py [--models qwen3-30b-a3b,deepseek-v3] [--tokens 4096,16384]
"""

from __future__ import annotations

import argparse
import time

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.runtime.timing import time_each_alone
from cublas_grouped.tools.bench import workloads as W
from cublas_grouped.tools.bench.gpu import random_normal

WARMUP = 3
BACK_TO_BACK = 10


def _host_us(call, n: int = 50) -> float:
    """Median host microseconds of ``call`` (which must not wait for the GPU)."""
    out = []
    for _ in range(n):
        cupy.cuda.Device().synchronize()
        s = time.perf_counter()
        call()
        out.append((time.perf_counter() - s) * 1e6)
    cupy.cuda.Device().synchronize()
    return float(np.median(out))


def _many(call):
    def run():
        for _ in range(BACK_TO_BACK):
            call()

    return run


def _case(case, x, ids_d, w_d, packed, w2, stream, rounds: int, fp8: bool = False) -> None:
    """Time one case's four ways and print them (``fp8``: FP8 weights, [E, N, K])."""
    kw = {"stream": stream, "trans_b": True} if fp8 else {"stream": stream, "w1_layout": "gate_up_blocked"}

    def default():
        return cg.moe_forward(x, ids_d, w_d, packed, w2, **kw)

    def nosync():
        return cg.moe_forward(x, ids_d, w_d, packed, w2, fixed_capacity=True, **kw)

    with stream:
        a = default()
        b = nosync()
        nosync()
        stream.begin_capture()
        nosync()
        graph = stream.end_capture()
    stream.synchronize()
    same = bool(cupy.array_equal(a, b))
    if not same:  # the relative difference, float64
        a64, b64 = a.astype(cupy.float64), b.astype(cupy.float64)
        same = f"rel.diff {float(cupy.linalg.norm(a64 - b64) / cupy.linalg.norm(b64)):.2e}"
    methods = {
        "default": (default, 1),
        "default x10": (_many(default), BACK_TO_BACK),
        "nosync x10": (_many(nosync), BACK_TO_BACK),
        "graph": (lambda: graph.launch(stream), 1),
    }
    samples = time_each_alone(
        [run for run, _ in methods.values()], rounds=rounds, warmup=WARMUP, stream=stream
    )
    med = {k: float(np.median(v)) / per for (k, (_, per)), v in zip(methods.items(), samples)}
    with stream:
        host = _host_us(nosync)
    flops = W.layer_flops(case)
    cells = " ".join(f"{med[n]:14.4f}" for n in NAMES)
    print(f"{case.model} T={case.tokens} {case.routing:8s} {cells}  {host:8.1f}  (default == nosync: {same})")
    rates = " ".join(f"{n} {flops / med[n] / 1e9:.1f}" for n in NAMES)
    print(f"    TFLOP/s: {rates}", flush=True)


NAMES = ("default", "default x10", "nosync x10", "graph")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen3-30b-a3b,deepseek-v3")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 weights ([E, N, K], block scales): the default path against fixed_capacity=True",
    )
    args = p.parse_args()
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    stream = cupy.cuda.Stream(non_blocking=True)
    bf16 = ml_dtypes.bfloat16
    print(f"{'case':34s} " + " ".join(f"{n + ' ms':>14s}" for n in NAMES) + "  host us: nosync call")
    for model in args.models.split(","):
        s = W.MODELS[model]
        # [E, N, K] with --fp8 (quantized by blocks of 128 x 128), else [E, K, N] (w1 packed)
        e, h, i = s.experts, s.hidden, s.inter
        w1_shape, w2_shape = ((e, 2 * i, h), (e, h, i)) if args.fp8 else ((e, h, 2 * i), (e, i, h))
        w1 = random_normal(w1_shape, "bfloat16", h**-0.5, seed=1)
        w2 = random_normal(w2_shape, "bfloat16", i**-0.5, seed=2)
        if args.fp8:
            packed, w2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
        else:
            packed = cg.pack_gate_up(w1)
        del w1
        cupy.get_default_memory_pool().free_all_blocks()
        for tokens in map(int, args.tokens.split(",")):
            for routing in ("uniform", "skewed"):
                case = W.Case(model, tokens, s.experts, s.top_k, s.hidden, s.inter, routing)
                weights, ids = W.make_routing(case, seed=0)
                x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(bf16)
                ids_d = cupy.asarray(ids, dtype=cupy.int32)
                w_d = cupy.asarray(weights, dtype=cupy.float32)
                cupy.cuda.Device().synchronize()
                _case(case, x, ids_d, w_d, packed, w2, stream, args.rounds, args.fp8)
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
