"""``python -m cublas_grouped.tools.ep_bench``: the expert-parallel layer on 1, 2 and 4 GPUs.

The driver starts, for each GPU count R, one worker per GPU through
``cublas_grouped.launch``; each worker builds a DeepSeek-V3-shaped layer
(H 7168, I 2048, E 256, k 8, bf16; E scaled down, and said so, when the
experts of one rank do not fit its GPU) with E/R experts per rank, and
measures, for each tokens-per-rank count:

- the layer time (median wall time of a whole call, host sync included) and
  tokens/s over all ranks, and its scaling against R = 1 at the same
  per-GPU batch;
- the dispatch and combine transfers (CUDA events around the NCCL calls):
  bytes that leave the rank per second, the same measure as NCCL's bus
  bandwidth of an all-to-all;
- in the same processes, NCCL's all-reduce bus bandwidth (256 MiB) and an
  equal-split all-to-all of the dispatch's bytes;
- on 2+ GPUs, the same layer with ``overlap_chunks=N`` (``--overlap-chunks``,
  default 2 and 4) on the same inputs: its layer time, whether its output has
  the same bits, and the share of the transfer time it hides,
  ``(layer ms without - layer ms with) / (dispatch + combine ms without)``.

Targets printed: dispatch + combine >= 70% of the all-to-all bus bandwidth
at 4096+ tokens per rank; tokens/s >= 1.7x on 2 GPUs and >= 3.2x on 4.
Overlap: PASS where it is faster (and then which N to turn on), MISS where
not (``overlap_chunks`` stays 1, the default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["main", "worker", "format_report"]

SHAPE = {"hidden": 7168, "inter": 2048, "experts": 256, "top_k": 8}
ALLREDUCE_BYTES = 256 << 20
# Overlap counts as faster when it saves at least this share of the layer time
# (about the spread of the medians of 10 calls).
OVERLAP_MIN_GAIN = 0.01


def _median_event_ms(fn, stream, repeat: int) -> float:
    import cupy

    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def _nccl_bus_gbs(group, alltoall_bytes: int, repeat: int) -> dict:
    """All-reduce (sum, fp32) and equal-split all-to-all bus bandwidth, GB/s (None for one rank)."""
    import cupy

    world = group.world_size
    if world == 1:
        return {"allreduce_busbw": None, "alltoall_busbw": None}
    stream = cupy.cuda.get_current_stream()
    buf = cupy.ones(ALLREDUCE_BYTES // 4, dtype=cupy.float32)
    for _ in range(3):
        group.all_reduce(buf, "sum", stream.ptr)
    ms = _median_event_ms(lambda: group.all_reduce(buf, "sum", stream.ptr), stream, repeat)
    allreduce = 2 * (world - 1) / world * ALLREDUCE_BYTES / (ms * 1e6)
    part = max(1, alltoall_bytes // world)
    send = cupy.zeros(part * world, dtype=cupy.uint8)
    recv = cupy.empty_like(send)
    spans = [(p * part, part) for p in range(world)]

    def a2a():
        group.exchange(send.data.ptr, spans, recv.data.ptr, spans, stream.ptr)

    for _ in range(3):
        a2a()
    ms = _median_event_ms(a2a, stream, repeat)
    return {"allreduce_busbw": allreduce, "alltoall_busbw": (world - 1) / world * part * world / (ms * 1e6)}


def _fit_experts(world: int, requested: int, hidden: int, inter: int, tokens: int, k: int) -> int:
    """The largest E (a multiple of 4 ranks' worth, halving from ``requested``) whose share fits in 85% of free memory."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    rows = tokens * k
    activations = (
        rows * (hidden * 4 + 2 * inter * 3) * 2 * 2
    )  # send, receive, back, expert buffers; margin 2x
    experts = requested
    while experts > world and (experts // world) * 3 * hidden * inter * 2 + activations > 0.85 * free:
        experts //= 2
    return max(experts - experts % world, world)


def _wall_ms(layer, x, ids, weights, stream, args, timer_stages=False):
    """Median wall time of whole calls (host sync included), and the median stage times."""
    import cublas_grouped as cg

    for _ in range(args.warmup):
        layer(x, ids, weights)
    stream.synchronize()
    walls, stages = [], []
    for _ in range(args.repeat):
        timer = cg.StageTimer() if timer_stages else None
        start = time.perf_counter()
        layer(x, ids, weights, timer=timer)
        stream.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
        if timer is not None:
            stages.append(timer.times_ms())
    stage_ms = {name: statistics.median(s[name] for s in stages) for name in stages[0]} if stages else {}
    return statistics.median(walls), stage_ms


def _overlap(group, w1, w2, experts, k, x, ids, weights, stream, args, base_ms, base_out) -> list[dict]:
    """The layer with each ``overlap_chunks`` N on the same inputs: ms and same bits as without."""
    import cupy

    from cublas_grouped.distributed import ExpertParallelMoE

    rows = []
    for chunks in args.overlap_chunks:
        try:
            layer = ExpertParallelMoE(group, w1, w2, experts, k, overlap_chunks=chunks)
            ms, _ = _wall_ms(layer, x, ids, weights, stream, args)
            out = layer(x, ids, weights)
            same = bool((out.view(cupy.uint16) == base_out.view(cupy.uint16)).all())
            rows.append({"chunks": chunks, "layer_ms": ms, "same_bits": same, "base_ms": base_ms})
        except Exception as exc:  # reported, not fatal: the rows without overlap stand
            rows.append({"chunks": chunks, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def worker(args) -> int:
    """One rank of the benchmark (started by the driver through the launcher)."""
    import cupy
    import ml_dtypes

    import cublas_grouped as cg
    from cublas_grouped.distributed import ExpertParallelMoE, init_process_group

    bf16 = ml_dtypes.bfloat16

    group = init_process_group(timeout=300)
    rank, world = group.rank, group.world_size
    hidden, inter, k = SHAPE["hidden"], SHAPE["inter"], SHAPE["top_k"]
    fitted = _fit_experts(world, args.experts, hidden, inter, max(args.tokens), k)
    # Every rank must use the same E: take the smallest that fits anywhere.
    e_buf = cupy.asarray([fitted], dtype=cupy.int64)
    group.all_reduce(e_buf, "min", cupy.cuda.get_current_stream().ptr)
    experts = int(e_buf[0])
    epr = experts // world
    rng = cupy.random.default_rng(1234 + rank)
    w1 = cupy.empty((epr, hidden, 2 * inter), dtype=bf16)
    w2 = cupy.empty((epr, inter, hidden), dtype=bf16)
    for e in range(epr):  # expert by expert: no full-size float32 temporary
        g1 = rng.standard_normal((hidden, 2 * inter), dtype=cupy.float32)
        w1[e] = (g1 * hidden**-0.5).astype(bf16)
        w2[e] = (rng.standard_normal((inter, hidden), dtype=cupy.float32) * inter**-0.5).astype(bf16)
    layer = ExpertParallelMoE(group, w1, w2, experts, k)
    stream = cupy.cuda.get_current_stream()
    rows = []
    for tokens in args.tokens:
        x = (rng.standard_normal((tokens, hidden), dtype=cupy.float32)).astype(bf16)
        logits = rng.standard_normal((tokens, experts), dtype=cupy.float32)
        weights, ids = cg.route(logits, k)
        layer_ms, stage_ms = _wall_ms(layer, x, ids, weights, stream, args, timer_stages=True)
        item = 2 * hidden
        sent, received = layer.last_traffic["sent"], layer.last_traffic["received"]
        off_rank = int(sent.sum() - sent[rank]) * item
        back = int(received.sum() - received[rank]) * item  # the combine returns what was received
        bus = _nccl_bus_gbs(group, int(sent.sum()) * item, args.repeat)
        rows.append(
            {
                "tokens_per_rank": tokens,
                "layer_ms": layer_ms,
                "stage_ms": stage_ms,
                "dispatch_bytes": off_rank,
                "combine_bytes": back,
                "dispatch_gbs": off_rank / (stage_ms["dispatch"] * 1e6) if world > 1 else None,
                "combine_gbs": back / (stage_ms["combine_exchange"] * 1e6) if world > 1 else None,
                **bus,
            }
        )
        if world > 1 and args.overlap_chunks:
            base_out = layer(x, ids, weights)
            rows[-1]["overlap"] = _overlap(
                group, w1, w2, experts, k, x, ids, weights, stream, args, layer_ms, base_out
            )
        if tokens <= args.fixed_max_tokens:
            rows[-1]["fixed"] = _fixed_capacity(group, w1, w2, experts, k, x, ids, weights, args)
    if rank == 0:
        info = {"world": world, "experts": experts, "requested_experts": args.experts, **SHAPE, "rows": rows}
        info["experts"] = experts
        with open(args.json, "w") as f:
            json.dump(info, f)
    group.close()
    return 0


def _fixed_capacity(group, w1, w2, experts, k, x, ids, weights, args) -> dict:
    """The fixed-capacity layer on the same decode batch: eager call and CUDA-graph replay, ms."""
    import cupy

    from cublas_grouped.distributed import FixedCapacityExpertParallelMoE

    tokens, world = x.shape[0], group.world_size
    capacity = max(1, int(np.ceil(args.capacity_margin * tokens * k / world)))
    try:
        layer = FixedCapacityExpertParallelMoE(
            group, w1, w2, experts, k, capacity=capacity, max_tokens=tokens, on_overflow="drop"
        )
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            for _ in range(args.warmup):
                layer(x, ids, weights)
            eager = _median_event_ms(lambda: layer(x, ids, weights), stream, args.repeat)
            stream.begin_capture()
            layer(x, ids, weights)
            graph = stream.end_capture()
            graph.launch(stream)
            replay = _median_event_ms(lambda: graph.launch(stream), stream, args.repeat)
        return {
            "capacity": capacity,
            "eager_ms": eager,
            "graph_ms": replay,
            "overflow": layer.overflow_pairs(),
        }
    except Exception as exc:  # reported, not fatal: the synchronizing rows above stand
        return {"capacity": capacity, "error": f"{type(exc).__name__}: {exc}"}


def _fmt(value, spec=".0f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(runs: list[dict]) -> list[str]:
    """The table and the PASS/MISS lines, from the workers' results (one dict per GPU count)."""
    base = {}
    for run in runs:
        if run["world"] == 1:
            base = {r["tokens_per_rank"]: r["layer_ms"] for r in run["rows"]}
    lines = [
        "GPUs  E    tok/rank  layer ms  tokens/s   scaling  dispatch GB/s  combine GB/s  a2a busbw  "
        "allreduce busbw  (d+c)/a2a",
    ]
    verdicts = []
    for run in runs:
        world = run["world"]
        for r in run["rows"]:
            t = r["tokens_per_rank"]
            tps = world * t / (r["layer_ms"] / 1e3)
            scaling = (base[t] / r["layer_ms"]) * world if t in base else None
            ratio = None
            if world > 1 and r["alltoall_busbw"]:
                ms = r["stage_ms"]["dispatch"] + r["stage_ms"]["combine_exchange"]
                ratio = (r["dispatch_bytes"] + r["combine_bytes"]) / (ms * 1e6) / r["alltoall_busbw"]
            lines.append(
                f"{world:<5d} {run['experts']:<4d} {t:<9d} {r['layer_ms']:<9.2f} {tps:<10.0f} "
                f"{_fmt(scaling, '.2f'):<8} {_fmt(r['dispatch_gbs']):<14} {_fmt(r['combine_gbs']):<13} "
                f"{_fmt(r['alltoall_busbw']):<10} {_fmt(r['allreduce_busbw']):<16} {_fmt(ratio, '.0%')}"
            )
            if world > 1 and t >= 4096 and ratio is not None:
                verdicts.append(
                    f"{'PASS' if ratio >= 0.7 else 'MISS'} dispatch+combine at {ratio:.0%} of the all-to-all bus "
                    f"bandwidth (target >= 70%), {world} GPUs, {t} tokens/rank"
                )
            target = {2: 1.7, 4: 3.2}.get(world)
            if target and scaling is not None:
                verdicts.append(
                    f"{'PASS' if scaling >= target else 'MISS'} tokens/s scaling {scaling:.2f}x on {world} GPUs "
                    f"(target >= {target}x), {t} tokens/rank"
                )
    notes = [
        f"note: E scaled down to {run['experts']} (of {run['requested_experts']}) on {run['world']} GPU(s): "
        "the full expert set does not fit one GPU's memory"
        for run in runs
        if run["experts"] != run["requested_experts"]
    ]
    fixed = [
        "fixed capacity (no host copy): GPUs  tok/rank  capacity  eager ms  graph replay ms  overflow pairs"
    ]
    for run in runs:
        for r in run["rows"]:
            f = r.get("fixed")
            if f is None:
                continue
            if "error" in f:
                fixed.append(f"  {run['world']} GPUs, {r['tokens_per_rank']} tokens/rank: {f['error']}")
            else:
                fixed.append(
                    f"  {run['world']:<5d} {r['tokens_per_rank']:<9d} {f['capacity']:<9d} {f['eager_ms']:<9.3f} "
                    f"{f['graph_ms']:<16.3f} {f['overflow']}"
                )
    fixed = fixed if len(fixed) > 1 else []
    return lines + verdicts + notes + fixed + _overlap_report(runs, base)


def _overlap_report(runs: list[dict], base: dict) -> list[str]:
    """The overlap table (``overlap_chunks`` N against 1, same run) and its PASS/MISS lines."""
    lines = [
        "overlap (chunks of local experts): GPUs  tok/rank  chunks  layer ms (1 chunk)  layer ms  "
        "transfer ms  hidden  tokens/s  scaling  same bits"
    ]
    verdicts = []
    for run in runs:
        world = run["world"]
        for r in run["rows"]:
            t, best = r["tokens_per_rank"], None
            transfer = r["stage_ms"].get("dispatch", 0.0) + r["stage_ms"].get("combine_exchange", 0.0)
            for o in r.get("overlap", []):
                if "error" in o:
                    lines.append(f"  {world} GPUs, {t} tokens/rank, {o['chunks']} chunks: {o['error']}")
                    continue
                hidden = (o["base_ms"] - o["layer_ms"]) / transfer if transfer > 0 else None
                scaling = base[t] / o["layer_ms"] * world if t in base else None
                lines.append(
                    f"  {world:<5d} {t:<9d} {o['chunks']:<7d} {o['base_ms']:<19.2f} {o['layer_ms']:<9.2f} "
                    f"{transfer:<12.2f} {_fmt(hidden, '.0%'):<7} {world * t / (o['layer_ms'] / 1e3):<9.0f} "
                    f"{_fmt(scaling, '.2f'):<8} {'yes' if o['same_bits'] else 'NO'}"
                )
                if not o["same_bits"]:
                    verdicts.append(
                        f"MISS overlap changed the output's bits (overlap_chunks={o['chunks']}), {world} GPUs, "
                        f"{t} tokens/rank"
                    )
                elif best is None or o["layer_ms"] < best["layer_ms"]:
                    best = {**o, "hidden": hidden}
            if best is None:
                continue
            where = f"{world} GPUs, {t} tokens/rank"
            if best["layer_ms"] < (1 - OVERLAP_MIN_GAIN) * best["base_ms"]:
                verdicts.append(
                    f"PASS overlap faster: {best['layer_ms']:.2f} vs {best['base_ms']:.2f} ms, "
                    f"{_fmt(best['hidden'], '.0%')} of the transfer time hidden with "
                    f"overlap_chunks={best['chunks']}, {where}"
                )
            else:
                verdicts.append(
                    f"MISS overlap not faster: {best['layer_ms']:.2f} vs {best['base_ms']:.2f} ms at best "
                    f"(overlap_chunks={best['chunks']}): keep overlap_chunks=1, {where}"
                )
    return lines + verdicts if len(lines) > 1 else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cublas_grouped.tools.ep_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--gpus", default="1,2,4", help="GPU counts to run (those above the GPUs present are skipped)"
    )
    p.add_argument(
        "--tokens", default="64,4096,8192", help="tokens per rank, comma-separated (default 64,4096,8192)"
    )
    p.add_argument("--experts", type=int, default=SHAPE["experts"], help="E (default 256, DeepSeek-V3)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write every run's numbers here")
    p.add_argument(
        "--fixed-max-tokens",
        type=int,
        default=64,
        help="also time the fixed-capacity layer up to this T (default 64: its expert step is sized for "
        "R * capacity rows, which suits decode, not prefill)",
    )
    p.add_argument(
        "--capacity-margin", type=float, default=2.0, help="fixed capacity = margin * T * k / R (default 2)"
    )
    p.add_argument(
        "--overlap-chunks",
        default="2,4",
        help="also time overlap_chunks=N for each N on 2+ GPUs, comma-separated (default 2,4; 0: none)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    args.overlap_chunks = [int(n) for n in str(args.overlap_chunks).split(",") if int(n) > 1]
    if args.worker:
        return worker(args)
    import cupy

    present = cupy.cuda.runtime.getDeviceCount()
    runs = []
    for world in [int(g) for g in args.gpus.split(",")]:
        if world > present:
            print(f"skipped {world} GPUs: {present} present", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            command = [sys.executable, "-m", "cublas_grouped.launch", "--nproc", str(world), "-m"]
            command += [
                "cublas_grouped.tools.ep_bench",
                "--worker",
                "--json",
                out,
                "--experts",
                str(args.experts),
            ]
            command += ["--tokens", ",".join(map(str, args.tokens)), "--repeat", str(args.repeat)]
            command += ["--warmup", str(args.warmup), "--fixed-max-tokens", str(args.fixed_max_tokens)]
            command += ["--capacity-margin", str(args.capacity_margin)]
            command += ["--overlap-chunks", ",".join(map(str, args.overlap_chunks)) or "0"]
            code = subprocess.call(command)
            if code:
                print(f"the {world}-GPU run failed (exit {code})", file=sys.stderr)
                return code
            with open(out) as f:
                runs.append(json.load(f))
        print("\n".join(format_report(runs)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
