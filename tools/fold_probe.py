"""Development probe (GPU machine): v15's fold (``SM90_FOLD_ROWS=16``) against
the kernel without it, on the benchmark's shapes and routings.

For each model's first and second expert GEMM (``gmm`` on our kernel, group
sizes on the device, ``[E, K, N]`` weights as the benchmark's ``gemm1`` rows
use, or ``[E, N, K]`` with ``--nt``) at each token count and routing: the
kernel without the fold, with it, and a dense ``cupy.matmul`` of the same
rows, round-robin, ten calls between two events, median of ``--rounds``.
Printed: ms of each, fold / plain time, each against dense, the share of
groups whose last rows fold, and the largest difference between the two
outputs relative to the largest output (they differ only in the folded rows'
rounding: another MMA shape sums them). With ``--layer``, the fused layer
(``moe_forward``'s default path, ten calls back to back) with and without
the fold too.

    PYTHONPATH=. python3 tools/fold_probe.py [--models qwen3-30b-a3b deepseek-v3] [--tokens 4096] [--layer]

``--equal ROWS ...``: groups of ROWS rows each instead of the benchmark's
routings. ``--define NAME=VALUE``: the "fold" column is the kernel as the
library runs it under those defines (``hopper.DEFINES``), "plain" as it runs.

``--seeds N``: N routings per case (seed 0 is the benchmark's), for the spread
of fold / plain over routings of the same shape.
"""

from __future__ import annotations

import argparse

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.backends import hopper_variants as V
from cublas_grouped.runtime.timing import time_each_alone
from cublas_grouped.tools.bench import workloads as W

CALLS = 10


def _timed(methods: dict, rounds: int) -> dict:
    """Median ms per call of each method (CALLS calls between two events), round-robin."""
    stream = cupy.cuda.get_current_stream()
    times = time_each_alone(list(methods.values()), rounds=rounds, warmup=2, stream=stream)
    return {k: float(np.median(v)) / CALLS for k, v in zip(methods, times)}


def _with_fold(rows: int, fn):
    """``fn`` run with the kernel's fold set to ``rows`` (0: off), at any
    rows per group (the launcher's rule lifted)."""

    def call():
        saved = V.FOLD_ROWS, V.FOLD_MAX_ROWS_PER_GROUP, V.FOLD_MIN_ROWS_PER_GROUP
        V.FOLD_ROWS, V.FOLD_MAX_ROWS_PER_GROUP, V.FOLD_MIN_ROWS_PER_GROUP = rows, (1 << 40) if rows else 0, 0
        try:
            fn()
        finally:
            V.FOLD_ROWS, V.FOLD_MAX_ROWS_PER_GROUP, V.FOLD_MIN_ROWS_PER_GROUP = saved

    return call


# --define NAME=VALUE: the kernel's defines for the "fold" column instead of the fold.
VARIANT: dict = {}


def _with_defines(extra: dict, fn):
    """``fn`` run with the bf16 kernel's defines updated by ``extra``."""

    def call():
        saved = hopper.DEFINES
        hopper.DEFINES = {**saved, **extra}
        try:
            fn()
        finally:
            hopper.DEFINES = saved

    return call


def gemm_case(
    model: str, tokens: int, routing: str, second: bool, trans_b: bool, rounds: int, seed: int = 0
) -> None:
    shape = W.MODELS[model]
    if routing.startswith("equal"):  # --equal: every group the same rows
        sizes = np.full(shape.experts, int(routing[5:]), dtype=np.int64)
    else:
        case = W.Case(model, tokens, shape.experts, shape.top_k, shape.hidden, shape.inter, routing)
        _, ids = W.make_routing(case, seed=seed)
        sizes = W.expert_counts(ids, shape.experts)
    k, n = (shape.inter, shape.hidden) if second else (shape.hidden, 2 * shape.inter)
    m, e = int(sizes.sum()), shape.experts
    bf16 = ml_dtypes.bfloat16
    b = (cupy.random.standard_normal((e, n, k) if trans_b else (e, k, n), cupy.float32) * k**-0.5).astype(
        bf16
    )
    a = cupy.random.standard_normal((m, k), cupy.float32).astype(bf16)
    outs = {key: cupy.empty((m, n), bf16) for key in ("plain", "fold")}
    dense_out = cupy.empty((m, n), bf16)
    dense_b = b[0].T if trans_b else b[0]
    sizes_d = cupy.asarray(sizes)

    def ours(key):
        def run():
            for _ in range(CALLS):
                cg.gmm(a, b, sizes_d, trans_b=trans_b, out=outs[key], algorithm="sm90_grouped")

        return run

    def dense():
        for _ in range(CALLS):
            cupy.matmul(a, dense_b, out=dense_out)

    if VARIANT:  # the library's choice ("plain") against it under --define ("fold")
        methods = {"plain": ours("plain"), "fold": _with_defines(VARIANT, ours("fold")), "dense": dense}
    else:
        methods = {
            "plain": _with_fold(0, ours("plain")),
            "fold": _with_fold(16, ours("fold")),
            "dense": dense,
        }
    t = _timed(methods, rounds)
    diff = float(cupy.abs(outs["fold"].astype(cupy.float32) - outs["plain"].astype(cupy.float32)).max())
    scale = float(cupy.abs(outs["plain"].astype(cupy.float32)).max())
    tails = sizes % hopper.BLOCK_M
    folded = float(((sizes > hopper.BLOCK_M) & (tails > 0) & (tails <= 16)).mean())
    flops = 2.0 * m * k * n
    name = f"{model} {'g2' if second else 'g1'} {'nt' if trans_b else 'nn'} T={tokens} {routing}"
    name += f" seed {seed}" if seed else ""
    print(
        f"{name:44s} plain {t['plain']:8.4f} fold {t['fold']:8.4f} dense {t['dense']:8.4f} ms | "
        f"fold/plain {t['fold'] / t['plain']:.3f} | of dense {100 * t['dense'] / t['plain']:5.1f}% -> "
        f"{100 * t['dense'] / t['fold']:5.1f}% | fold TFLOP/s {flops / t['fold'] / 1e9:6.1f} | "
        f"groups folded {100 * folded:4.1f}% | max diff {diff / scale:.2e}",
        flush=True,
    )


def layer_case(model: str, tokens: int, routing: str, rounds: int) -> None:
    shape = W.MODELS[model]
    case = W.Case(model, tokens, shape.experts, shape.top_k, shape.hidden, shape.inter, routing)
    weights, ids = W.make_routing(case, seed=0)
    bf16 = ml_dtypes.bfloat16
    h, i, e = shape.hidden, shape.inter, shape.experts
    x = cupy.random.standard_normal((tokens, h), cupy.float32).astype(bf16)
    w1 = (cupy.random.standard_normal((e, h, 2 * i), cupy.float32) * h**-0.5).astype(bf16)
    w2 = (cupy.random.standard_normal((e, i, h), cupy.float32) * i**-0.5).astype(bf16)
    ids_d, w_d = cupy.asarray(ids.astype(np.int32)), cupy.asarray(weights.astype(np.float32))
    outs = {}

    def layer(key):
        def run():
            for _ in range(CALLS):
                outs[key] = cg.moe_forward(x, ids_d, w_d, w1, w2)

        return run

    t = _timed({"plain": _with_fold(0, layer("plain")), "fold": _with_fold(16, layer("fold"))}, rounds)
    for key, rows in (("plain", 0), ("fold", 16)):  # the layer may hand back one buffer: copies to compare
        _with_fold(rows, layer(key))()
        outs[key] = outs[key].copy()
    diff = float(cupy.abs(outs["fold"].astype(cupy.float32) - outs["plain"].astype(cupy.float32)).max())
    scale = float(cupy.abs(outs["plain"].astype(cupy.float32)).max())
    flops = 2.0 * tokens * shape.top_k * h * 3 * i
    print(
        f"{model + ' layer T=' + str(tokens) + ' ' + routing:44s} plain {t['plain']:8.4f} fold {t['fold']:8.4f} ms | "
        f"fold/plain {t['fold'] / t['plain']:.3f} | TFLOP/s {flops / t['plain'] / 1e9:6.1f} -> "
        f"{flops / t['fold'] / 1e9:6.1f} | max diff {diff / scale:.2e}",
        flush=True,
    )


def case_arguments(doc: str) -> argparse.ArgumentParser:
    """The prefill probes' parser: the benchmark's models, token counts and
    routings to walk, and the timed rounds (tools/gather_probe.py shares it)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--routings", nargs="+", default=["uniform", "skewed"])
    p.add_argument("--rounds", type=int, default=9)
    return p


def print_gpu() -> None:
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}", flush=True)


def main() -> None:
    p = case_arguments(__doc__)
    p.add_argument("--nt", action="store_true", help="[E, N, K] weights too")
    p.add_argument("--second", action="store_true", help="the second GEMM too")
    p.add_argument("--layer", action="store_true", help="the fused layer too")
    p.add_argument("--seeds", type=int, default=1, help="routings drawn per case (the benchmark's is seed 0)")
    p.add_argument(
        "--equal", type=int, nargs="+", default=[], help="groups of these rows each, for --routings"
    )
    p.add_argument(
        "--define", action="append", default=[], metavar="NAME=VALUE", help="the fold column's defines"
    )
    args = p.parse_args()
    VARIANT.update({k: int(v) for k, v in (d.split("=", 1) for d in args.define)})
    if VARIANT:
        print(f"'fold' below: the library's kernel under {VARIANT}; 'plain': as the library runs it")
    if args.equal:
        args.routings = [f"equal{rows}" for rows in args.equal]
    print_gpu()
    for model in args.models:
        for tokens in args.tokens:
            for routing in args.routings:
                for second in (False, True) if args.second else (False,):
                    for trans_b in (False, True) if args.nt else (False,):
                        for seed in range(args.seeds):
                            gemm_case(model, tokens, routing, second, trans_b, args.rounds, seed)
                if args.layer:
                    layer_case(model, tokens, routing, args.rounds)


if __name__ == "__main__":
    main()
