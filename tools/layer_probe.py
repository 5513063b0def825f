"""Development probe (GPU machine): whole MoE layers, two ways side by side in one run.

``--mode decode`` (default tokens 16,64): a fixed-capacity layer replayed from
a CUDA graph, the chunked cuBLAS step against the Hopper kernel step, as
microseconds and as shares of the decode floor (the active experts' w1 + w2
bytes at ``--hbm-gbs``, default 3350 GB/s, the H100 SXM datasheet figure).

``--mode prefill`` (default tokens 4096,16384): eager ``moe_forward`` under
AUTO (the per-expert counts copied to the host, the tables' algorithms)
against ``moe_forward(fixed_capacity=True)`` (on SM 9.0: the kernel over the
counts on the device, no host copy), as milliseconds and TFLOP/s.

Both: the benchmark's models and routings (uniform, skewed), CUDA events,
interleaved rounds after warm-up, medians; the two outputs compared first.

    PYTHONPATH=. python3 tools/layer_probe.py --mode prefill [--models a,b] [--rounds 20]

``--gather`` (prefill): also the sync-free steps with GEMM 1 reading the
tokens itself (``kernel_step.GATHER_IN_GEMM1`` on during their calls and
captures; columns "fixed+g" and "fused+g"), in the same rounds.

``--apart`` (prefill): also the fused layer with the histogram, column scan
and offsets kernel as three launches (``placement_launches.HISTOGRAM_SCHEDULE``
off; column "fused-apart"), against their one launch.

``--define NAME=VALUE`` (decode, repeatable): also the kernel step with the
Hopper kernel compiled under those defines (``hopper.DEFINES`` updated
while the layer is prepared and captured; column "sm90-var"), and whether
its output agrees bit for bit.

``--plain`` (both modes): also the Hopper kernel steps with plain launches
(``kernel_step.OVERLAP_LAUNCHES`` off while they are prepared and captured;
columns "sm90-plain", "fixed-plain", "fused-plain"), against the default
programmatic dependent launches, and whether their outputs agree bit for bit.
"""

from __future__ import annotations

import argparse

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.moe import kernel_step, placement_launches
from cublas_grouped.moe.fixed_capacity import fixed_capacity_backend
from cublas_grouped.runtime.timing import time_each_alone
from cublas_grouped.testing import rel_error
from cublas_grouped.tools.bench import workloads as W

REPLAYS = 10  # decode: graph launches back to back per timed round (the GPU never waits for the host)
WARMUP = 3


def _captured(layer, x, ids, weights, stream):
    """A graph of one step of ``layer`` (built with graphs=False), captured on ``stream``."""
    with stream:
        layer.forward(x, ids, weights)  # eager first: compiles, sets up
        stream.begin_capture()
        out = layer.forward(x, ids, weights)
        graph = stream.end_capture()
    return graph, out


def _with_step_setting(name: str, value, call, module=kernel_step):
    """``call`` with the kernel step's module constant ``name`` (of ``module``) set to ``value`` meanwhile."""

    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return call()
        finally:
            setattr(module, name, saved)

    return run


def _plain(call):
    """``call`` with the kernel step's launches plain (not overlapped)."""
    return _with_step_setting("OVERLAP_LAUNCHES", False, call)


def _four_launches(call):
    """``call`` with the decode placement in four launches (not place_one_block)."""
    return _with_step_setting("PLACE_IN_ONE_LAUNCH", False, call)


def _epilogue_always(call):
    """``call`` with GEMM 1's gated epilogue at every size (w1 packed)."""
    return _with_step_setting("GATED_EPILOGUE_MIN_ROWS_PER_GROUP", 0, call)


def _apart(call):
    """``call`` with the histogram, column scan and offsets kernel as three
    launches (placement_launches.HISTOGRAM_SCHEDULE off)."""
    return _with_step_setting("HISTOGRAM_SCHEDULE", False, call, placement_launches)


_VARIANT: dict = {}  # --define's: the Hopper kernel's defines of the "sm90-var" layer


def _variant(call):
    """``call`` with the Hopper kernel's defines updated by :data:`_VARIANT`."""
    return _with_step_setting("DEFINES", {**hopper.DEFINES, **_VARIANT}, call, hopper)


# Layers captured under a setting, by the suffix of their name.
_SETTINGS = {
    "-plain": _plain,
    "-four": _four_launches,
    "-epi": _epilogue_always,
    "-apart": _apart,
    "-var": _variant,
}


def _setting(name: str):
    return next((f for suffix, f in _SETTINGS.items() if name.endswith(suffix)), None)


def _gathering(call):
    """``call`` with GEMM 1 gathering the tokens."""
    return _with_step_setting("GATHER_IN_GEMM1", True, call)


def _decode_methods(s, w1, w2, tokens, x, ids, w, stream, plain=False, four=False, packed=None, epi=False):
    """(name -> (one timed round, output)), and the GEMM paths, for decode mode.
    ``packed``: w1 packed by pack_gate_up, for a kernel step with the
    activation in GEMM 1's epilogue ("sm90-packed")."""
    chunked = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="cublas_grouped"))
    kernel = cg.GroupedGemmExecutor(config=cg.GroupedGemmConfig(algorithm="sm90_grouped"))
    layers = {
        "chunked": cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=chunked, graphs=False),
        "sm90": cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=kernel, graphs=False),
    }
    if plain:
        layers["sm90-plain"] = cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=kernel, graphs=False)
    if four:
        layers["sm90-four"] = cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=kernel, graphs=False)
    if _VARIANT:
        layers["sm90-var"] = cg.FixedCapacityMoE(w1, w2, s.top_k, tokens, executor=kernel, graphs=False)
    if packed is not None:
        layers["sm90-packed"] = cg.FixedCapacityMoE(
            packed, w2, s.top_k, tokens, executor=kernel, graphs=False, w1_layout="gate_up_blocked"
        )
        if epi:
            layers["sm90-packed-epi"] = cg.FixedCapacityMoE(
                packed, w2, s.top_k, tokens, executor=kernel, graphs=False, w1_layout="gate_up_blocked"
            )
    sm = cg.device_info().sm
    paths = {
        k: fixed_capacity_backend(sm, v.executor, v.shape, v.w1, v.w2, tokens) for k, v in layers.items()
    }
    methods = {}
    for name, layer in layers.items():
        capture = lambda layer=layer: _captured(layer, x, ids, w, stream)
        setting = _setting(name)
        graph, out = setting(capture)() if setting else capture()

        def run(graph=graph):
            for _ in range(REPLAYS):
                graph.launch(stream)

        methods[name] = (run, out, REPLAYS)
    return methods, paths


def _prefill_methods(
    s,
    w1,
    w2,
    tokens,
    x,
    ids,
    w,
    stream,
    packed=None,
    graphs=False,
    gather=False,
    plain=False,
    epi=False,
    apart=False,
):
    def auto():
        return cg.moe_forward(x, ids, w, w1, w2, stream=stream)

    def fixed():
        return cg.moe_forward(x, ids, w, w1, w2, fixed_capacity=True, stream=stream)

    def fused():  # w1 packed: the activation in GEMM 1's epilogue
        return cg.moe_forward(
            x, ids, w, packed, w2, fixed_capacity=True, stream=stream, w1_layout="gate_up_blocked"
        )

    methods = {"auto": (auto, None, 1), "fixed": (fixed, None, 1)}
    if packed is not None:
        methods["fused"] = (fused, None, 1)
    if gather:
        for name in [n for n in ("fixed", "fused") if n in methods]:
            methods[name + "+g"] = (_gathering(methods[name][0]), None, 1)
    if plain:
        for name in [n for n in ("fixed", "fused") if n in methods]:
            methods[name + "-plain"] = (_plain(methods[name][0]), None, 1)
    if epi and "fused" in methods:
        methods["fused-epi"] = (_epilogue_always(fused), None, 1)
    if apart and "fused" in methods:
        methods["fused-apart"] = (_apart(fused), None, 1)
    if graphs:  # GPU time only: the sync-free calls replayed from graphs (AUTO copies to the host: eager)
        for name in (
            "fixed",
            "fused",
            "fixed+g",
            "fused+g",
            "fixed-plain",
            "fused-plain",
            "fused-epi",
            "fused-apart",
        ):
            if name in methods:
                call = methods[name][0]

                def capture(call=call):
                    with stream:
                        call()  # eager first: compiles, sizes the buffers
                        stream.begin_capture()
                        out = call()
                        return stream.end_capture(), out

                setting = _setting(name)
                graph, out = setting(capture)() if setting else capture()
                methods[name] = (lambda graph=graph: graph.launch(stream), out, 1)
    return methods, {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("decode", "prefill"), default="decode")
    p.add_argument("--models", default=",".join(W.MODELS))
    p.add_argument("--tokens", default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default decode 50, prefill 20)")
    p.add_argument("--hbm-gbs", type=float, default=3350.0)
    p.add_argument(
        "--graphs", action="store_true", help="prefill: replay the sync-free calls from CUDA graphs"
    )
    p.add_argument(
        "--gather", action="store_true", help="prefill: also the sync-free steps gathering inside GEMM 1"
    )
    p.add_argument("--plain", action="store_true", help="also the kernel steps with plain launches")
    p.add_argument("--four", action="store_true", help="decode: also the placement in four launches")
    p.add_argument(
        "--apart",
        action="store_true",
        help="prefill: also the fused layer with its schedule in three launches",
    )
    p.add_argument("--packed", action="store_true", help="decode: also the step with w1 packed")
    p.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="decode: also the kernel under these",
    )
    p.add_argument(
        "--epi", action="store_true", help="also w1 packed with GEMM 1's gated epilogue at every size"
    )
    args = p.parse_args()
    decode = args.mode == "decode"
    tokens_list = args.tokens or ("16,64" if decode else "4096,16384")
    rounds = args.rounds or (50 if decode else 20)
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; mode {args.mode}")
    names = ("chunked", "sm90") if decode else ("auto", "fixed", "fused")
    if args.gather and not decode:
        names += ("fixed+g", "fused+g")
    if args.plain:
        names += ("sm90-plain",) if decode else ("fixed-plain", "fused-plain")
    if decode and args.four:
        names += ("sm90-four",)
    _VARIANT.update((k, int(v)) for k, v in (d.split("=", 1) for d in args.define))
    if decode and _VARIANT:
        names += ("sm90-var",)
    if decode and args.packed:
        names += ("sm90-packed", "sm90-packed-epi") if args.epi else ("sm90-packed",)
    if args.epi and not decode:
        names += ("fused-epi",)
    if args.apart and not decode:
        names += ("fused-apart",)
    unit = "us" if decode else "ms"
    heads = " ".join(f"{n + ' ' + unit:>12s}" for n in names)
    print(f"{'case':40s} {heads} ratios (first / each) extra  rel.diff (last vs first) |out|")
    stream = cupy.cuda.Stream(non_blocking=True)
    bf16 = ml_dtypes.bfloat16
    for model in args.models.split(","):
        s = W.MODELS[model]
        # Random weights made on the GPU (DeepSeek-V3's are 22.5 GB in bf16).
        w1 = (
            cupy.random.standard_normal((s.experts, s.hidden, 2 * s.inter), cupy.float32) * s.hidden**-0.5
        ).astype(bf16)
        w2 = (
            cupy.random.standard_normal((s.experts, s.inter, s.hidden), cupy.float32) * s.inter**-0.5
        ).astype(bf16)
        packed = cg.pack_gate_up(w1) if not decode or args.packed else None
        cupy.get_default_memory_pool().free_all_blocks()
        for tokens in map(int, tokens_list.split(",")):
            for routing in ("uniform", "skewed"):
                case = W.Case(model, tokens, s.experts, s.top_k, s.hidden, s.inter, routing)
                weights, ids = W.make_routing(case, seed=0)
                x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(bf16)
                ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
                cupy.cuda.Device().synchronize()  # inputs were made on the default stream
                if decode:
                    methods, paths = _decode_methods(
                        s, w1, w2, tokens, x, ids_d, w_d, stream, args.plain, args.four, packed, args.epi
                    )
                else:
                    methods, paths = _prefill_methods(
                        s,
                        w1,
                        w2,
                        tokens,
                        x,
                        ids_d,
                        w_d,
                        stream,
                        packed,
                        args.graphs,
                        args.gather,
                        args.plain,
                        args.epi,
                        args.apart,
                    )
                outs = {}
                for name, (run, out, _) in methods.items():
                    with stream:
                        got = run()
                    stream.synchronize()
                    outs[name] = cupy.asnumpy(out if out is not None else got).astype(np.float64)
                diff = rel_error(outs[list(methods)[-1]], outs[names[0]])
                suffixes = ("+g", "-plain", "-four", "-epi", "-apart", "-var")
                for name, other in [(n, n + t) for n in ("fixed", "fused", "sm90") for t in suffixes]:
                    if other in outs:  # same products: same bits
                        same = np.array_equal(outs[name], outs[other], equal_nan=True)
                        print(f"{model} T={tokens} {routing}: {other} == {name} bit for bit: {same}")
                norm = float(np.linalg.norm(outs[names[0]]))
                runs = [run for run, _, _ in methods.values()]
                samples = time_each_alone(runs, rounds=rounds, warmup=WARMUP, stream=stream)
                scale = 1e3 if decode else 1.0
                med = {
                    k: float(np.median(v)) / per * scale
                    for (k, (_, _, per)), v in zip(methods.items(), samples)
                }
                if decode:
                    active = int((W.expert_counts(ids, s.experts) > 0).sum())
                    floor = W.layer_weight_bytes(case, active) / (args.hbm_gbs * 1e9) * 1e6
                    shares = " / ".join(f"{100 * floor / t:.1f}%" for t in med.values())
                    extra = f"floor {floor:.1f} us: {shares}"
                    label = f"{case.name} ({paths['chunked'][:7]}/{paths['sm90'][:4]})"
                else:
                    flops = W.layer_flops(case)
                    extra = " / ".join(f"{W.tflops(flops, t):.0f}" for t in med.values()) + " TFLOP/s"
                    label = case.name
                cols = " ".join(f"{t:12.3f}" for t in med.values())
                ratios = " ".join(f"{med[names[0]] / t:.3f}" for t in list(med.values())[1:])
                print(f"{label:40s} {cols} {ratios} {extra}  {diff:.2e} {norm:.3g}", flush=True)
        del w1, w2, packed
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
