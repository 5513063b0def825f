"""Development probe (GPU machine): the 16-bit gather walked by token
(``kernels.GATHER_BY_TOKEN``, dispatch.cu ``gather_rows_by_token``) against
the row-order ``gather_rows``, on the benchmark's models and routings.

Per case: the two gather kernels on the same rows (the placement's row map,
``testing.plan_ref``), ten calls between two events, round-robin, median of
``--rounds``; their outputs compared byte for byte. Printed: ms, the bytes
written per second, by-token / row-order time. With ``--layer``: the default
eager ``moe_forward`` under each setting (ten calls back to back, round-robin),
its time ratio and TFLOP/s, the two outputs compared byte for byte. With
``--fp8``: the FP8 gathers (``gather_rows_fp8_by_token`` against
``gather_rows_fp8``) the same way.

    PYTHONPATH=. python3 tools/gather_probe.py [--models deepseek-v3] [--tokens 4096 16384] [--layer]
"""

from __future__ import annotations

import cupy
import ml_dtypes
import numpy as np
from fold_probe import CALLS, _timed, case_arguments, print_gpu  # this script's folder is on the path

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.moe import kernels as K
from cublas_grouped.tools.bench import workloads as W

BF16 = ml_dtypes.bfloat16


def _setting(by_token: bool, fn):
    def call():
        saved = K.GATHER_BY_TOKEN
        K.GATHER_BY_TOKEN = by_token
        try:
            fn()
        finally:
            K.GATHER_BY_TOKEN = saved

    return call


def _weights(shape) -> cupy.ndarray:
    """Random bf16 weights [E, K, N] scaled by K^-1/2, an expert at a time (a
    float32 copy of DeepSeek-V3's w1 would not fit beside the rest)."""
    w = cupy.empty(shape, BF16)
    for e in range(shape[0]):
        w[e] = (cupy.random.standard_normal(shape[1:], cupy.float32) * shape[1] ** -0.5).astype(BF16)
    return w


def case(model: str, tokens: int, routing: str, rounds: int, layer: bool, fp8: bool = False) -> None:
    shape = W.MODELS[model]
    c = W.Case(model, tokens, shape.experts, shape.top_k, shape.hidden, shape.inter, routing)
    weights, ids = W.make_routing(c, seed=0)
    ids = ids.astype(np.int32)
    k, h, e = shape.top_k, shape.hidden, shape.experts
    plan = ref.plan_ref(ids, e)
    p2r, r2p = cupy.asarray(plan["pair_to_row"]), cupy.asarray(plan["row_to_pair"])
    rows = int(plan["row_to_pair"].size)
    x = cupy.random.standard_normal((tokens, h), cupy.float32).astype(BF16)
    outs = {key: cupy.empty((rows, h), BF16) for key in ("row", "token")}
    stream = cupy.cuda.get_current_stream().ptr
    arch = "sm_" + cupy.cuda.Device().compute_capability

    def gather(key):
        def run():
            for _ in range(CALLS):
                K.gather_rows(stream, arch, x, p2r, r2p, k, outs[key])

        return run

    t = _timed({"row": _setting(False, gather("row")), "token": _setting(True, gather("token"))}, rounds)
    same = bool((outs["row"].view(cupy.uint16) == outs["token"].view(cupy.uint16)).all())
    written = rows * h * 2
    name = f"{model} gather T={tokens} {routing}"
    print(
        f"{name:40s} row {t['row']:8.4f} token {t['token']:8.4f} ms | token/row {t['token'] / t['row']:.3f} | "
        f"writes TB/s {written / t['row'] / 1e9:5.2f} -> {written / t['token'] / 1e9:5.2f} | same bits {same}",
        flush=True,
    )
    if fp8:
        tiles = -(-h // 128)
        quant = {
            key: (cupy.empty((rows, h), cupy.uint8), cupy.empty((rows, tiles), cupy.float32)) for key in outs
        }

        def gather_fp8(key):
            def run():
                for _ in range(CALLS):
                    K.gather_rows(stream, arch, x, p2r, r2p, k, None, quant[key])

            return run

        t = _timed(
            {"row": _setting(False, gather_fp8("row")), "token": _setting(True, gather_fp8("token"))}, rounds
        )
        same = all(bool((a == b).all()) for a, b in zip(quant["row"], quant["token"]))
        name = f"{model} fp8 gather T={tokens} {routing}"
        print(
            f"{name:40s} row {t['row']:8.4f} token {t['token']:8.4f} ms | token/row {t['token'] / t['row']:.3f} | "
            f"same bits {same}",
            flush=True,
        )
        del quant
    if not layer:
        return
    outs.clear()
    cupy.get_default_memory_pool().free_all_blocks()
    w1, w2 = _weights((e, h, 2 * shape.inter)), _weights((e, shape.inter, h))
    ids_d, w_d = cupy.asarray(ids), cupy.asarray(weights.astype(np.float32))
    results = {}

    def run_layer(key):
        def run():
            for _ in range(CALLS):
                results[key] = cg.moe_forward(x, ids_d, w_d, w1, w2)

        return run

    t = _timed(
        {"row": _setting(False, run_layer("row")), "token": _setting(True, run_layer("token"))}, rounds
    )
    for key, by_token in (("row", False), ("token", True)):
        _setting(by_token, run_layer(key))()
        results[key] = results[key].copy()
    same = bool((results["row"].view(cupy.uint16) == results["token"].view(cupy.uint16)).all())
    flops = 2.0 * tokens * k * h * 3 * shape.inter
    name = f"{model} layer T={tokens} {routing}"
    print(
        f"{name:40s} row {t['row']:8.4f} token {t['token']:8.4f} ms | token/row {t['token'] / t['row']:.3f} | "
        f"TFLOP/s {flops / t['row'] / 1e9:6.1f} -> {flops / t['token'] / 1e9:6.1f} | same bits {same}",
        flush=True,
    )


def main() -> None:
    p = case_arguments(__doc__)
    p.add_argument("--layer", action="store_true", help="the default layer under each setting too")
    p.add_argument("--fp8", action="store_true", help="the FP8 gathers (e4m3 codes and scales) too")
    args = p.parse_args()
    print_gpu()
    for model in args.models:
        for tokens in args.tokens:
            for routing in args.routings:
                case(model, tokens, routing, args.rounds, args.layer, args.fp8)
                cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
