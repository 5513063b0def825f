"""Measure every GEMM algorithm on this GPU and write a tuning table: ``python -m cublas_grouped.tune``.

AUTO (:func:`cublas_grouped.select_algorithm`) follows built-in rules measured
on one H100; a tuning table measured on the GPU at hand overrides them for the
shapes it covers (the nearest measured shape decides). This program times
``expert_gemm`` for each algorithm over a grid of shapes:

- the expert GEMMs of the benchmark's models (the first, ``[R, H] @ [H, 2I]``,
  and the second, ``[R, I] @ [I, H]``) at token counts from 16 to 16384;
- synthetic grids of E in {8, 32, 64, 128, 256} experts x rows per expert;

in bfloat16 and float16, and writes the table where AUTO looks for it
(``tuning_table_path(device_info(), user=True)``) or to ``--out``. The table
records the GPU name, the cuBLAS version and the SM version, so that another
GPU of the same architecture can fall back on it.

A table to ship for a new GPU, in about five minutes (the benchmark's token
counts, bfloat16 then float16; at most 10 minutes), written under its
canonical name::

    python -m cublas_grouped.tune --quick --out cublas_grouped/tuning/
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.timing import time_interleaved
from .bench.gpu import describe_error, free_pool, no_gpu_reason, random_normal
from .bench.workloads import (
    ALGORITHMS,
    DTYPE_BYTES,
    KERNEL_ALGORITHMS,
    MODELS,
    case_seed,
    expert_counts,
    kernel_unavailable,
    layout_rows,
    routing_weights,
    skewed_routing,
    uniform_routing,
)

__all__ = ["Shape", "build_grid", "parse_args", "summarize_entries", "output_path", "make_table", "main"]

FULL_TOKENS = (16, 64, 256, 1024, 4096, 16384)
# The benchmark's default token counts and 256: a quick table covers every default case.
QUICK_TOKENS = (16, 64, 256, 4096, 16384)
GRID_EXPERTS = (8, 32, 64, 128, 256)
FULL_ROWS = (8, 32, 128, 512, 2048)
QUICK_ROWS = (16, 128, 1024)
# (N, K) of the synthetic grid: a mid-sized expert, and (full run only) a large one.
FULL_NK = ((2048, 2048), (4096, 4096))
QUICK_NK = ((2048, 2048),)
DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Shape:
    """One grouped GEMM to measure: ``tokens`` tokens routed top-``top_k`` over ``experts``,
    each row ``[K]`` times its expert's ``[K, N]``."""

    label: str
    experts: int
    top_k: int
    tokens: int
    n: int
    k: int
    dtype: str
    routing: str = "uniform"

    @property
    def weight_key(self) -> tuple:
        return (self.experts, self.k, self.n, self.dtype)


def build_grid(quick: bool, dtypes: Sequence[str] = DTYPES) -> list[Shape]:
    """The shapes to measure, ordered so that shapes sharing weights run together.

    Parameters
    ----------
    quick : bool
        The smaller grid (fewer token counts, rows and synthetic shapes).
    dtypes : sequence of str

    Returns
    -------
    list of Shape
    """
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    rows = QUICK_ROWS if quick else FULL_ROWS
    grid: list[Shape] = []
    for dtype in dtypes:
        for model, m in MODELS.items():
            for gemm, (n, k) in (("gemm1", (2 * m.inter, m.hidden)), ("gemm2", (m.hidden, m.inter))):
                # Skewed loads too: which algorithm wins depends on how uneven the rows are.
                grid += [
                    Shape(f"{model} {gemm} T={t} {routing}", m.experts, m.top_k, t, n, k, dtype, routing)
                    for t in tokens
                    for routing in ("uniform", "skewed")
                ]
        for n, k in QUICK_NK if quick else FULL_NK:
            for experts in GRID_EXPERTS:
                top_k = max(1, min(8, experts // 4))
                for r in rows:
                    # Tokens so that the mean rows per expert is r.
                    t = max(1, math.ceil(experts * r / top_k))
                    grid.append(Shape(f"E={experts} rows={r} N={n} K={k}", experts, top_k, t, n, k, dtype))
    # The first dtype first (a run cut short by --max-minutes loses the later
    # dtypes, not whole models); shapes sharing weights stay together.
    return sorted(grid, key=lambda s: (dtypes.index(s.dtype), s.weight_key, s.tokens))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m cublas_grouped.tune``."""
    p = argparse.ArgumentParser(
        prog="python -m cublas_grouped.tune",
        description="Time every grouped-GEMM algorithm over a grid of MoE shapes on this GPU and write "
        "the tuning table that AUTO reads.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller grid (the benchmark's token counts) and fewer repeats: a few minutes",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write the table: a file, or a folder (ending in / or existing) to write it "
        "under its canonical name, e.g. cublas_grouped/tuning/ to ship it "
        "(default: the per-user path AUTO reads)",
    )
    p.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma-separated, from bfloat16,float16,float32"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; --quick 2)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default 20; --quick 10)")
    p.add_argument("--mem-gb", type=float, default=40.0, help="GPU memory the tuner may use (default 40)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop measuring after this long and write what was measured (default 10 with --quick, else 30)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPE_BYTES]
    if bad or not args.dtypes:
        p.error(f"--dtypes must name some of {', '.join(DTYPE_BYTES)}; got {bad or args.dtypes}")
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.repeat is None:
        args.repeat = 10 if args.quick else 20
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be >= 1 and --warmup >= 0")
    if args.max_minutes is None:
        args.max_minutes = 10.0 if args.quick else 30.0
    return args


def summarize_entries(entries: Sequence[dict], rule_choice=None) -> list[str]:
    """Lines saying which algorithm won how often per dtype, and how the built-in rules fare.

    Parameters
    ----------
    entries : sequence of dict
        Tuning-table entries (``times_ms`` maps algorithm value to ms or None).
    rule_choice : callable, optional
        ``rule_choice(entry) -> str``: what the built-in rules would pick.

    Returns
    -------
    list of str
    """
    lines = []
    for dtype in sorted({e["dtype"] for e in entries}):
        mine = [e for e in entries if e["dtype"] == dtype]
        wins: dict[str, int] = {}
        regret = []
        agree = 0
        for e in mine:
            times = {a: t for a, t in e["times_ms"].items() if t is not None}
            if not times:
                continue
            best = min(times, key=times.get)
            wins[best] = wins.get(best, 0) + 1
            if rule_choice is not None:
                pick = rule_choice(e)
                if pick == best:
                    agree += 1
                if times.get(pick) is not None:
                    regret.append(times[pick] / times[best] - 1.0)
        measured = sum(wins.values())
        won = ", ".join(f"{a} {n}" for a, n in sorted(wins.items(), key=lambda kv: -kv[1]))
        lines.append(f"{dtype}: {measured} shapes measured; fastest: {won or 'none'}")
        if rule_choice is not None and measured:
            mean = 100 * float(np.mean(regret)) if regret else float("nan")
            worst = 100 * float(np.max(regret)) if regret else float("nan")
            lines.append(
                f"  built-in rules picked the fastest in {agree}/{measured}; their pick is "
                f"{mean:.1f}% slower on average, {worst:.1f}% at worst (the table fixes that)"
            )
    return lines


def output_path(out: str | None, info) -> Path:
    """Where ``--out`` puts the table of the GPU ``info`` (a ``DeviceInfo``).

    None: the user's tuning folder, where AUTO looks first. A folder (an
    existing one, or a path ending in ``/``): the table's canonical file name
    (GPU name and cuBLAS version) inside it. Anything else: that file.
    """
    from ..gemm.tables import tuning_table_path

    if out is None:
        return tuning_table_path(info, user=True)
    path = Path(out)
    if out.endswith(("/", "\\")) or path.is_dir():
        return path / tuning_table_path(info, user=True).name
    return path


def make_table(info, entries: list[dict]):
    """The tuning table of ``entries`` measured on ``info``: GPU name, cuBLAS and SM version."""
    from ..gemm.tables import TuningTable

    return TuningTable(info.name, info.cublas_version, entries, sm=info.sm)


def _measure(shape: Shape, w, api, args, budget_bytes: int) -> dict:
    """Time every algorithm on one shape; returns the table entry (with errors, if any)."""
    import cupy

    rng = np.random.default_rng(case_seed(shape.label, args.seed))
    route = skewed_routing if shape.routing == "skewed" else uniform_routing
    ids_host = route(shape.tokens, shape.experts, shape.top_k, rng)
    wts_host = routing_weights(shape.tokens, shape.top_k, rng)
    counts = expert_counts(ids_host, shape.experts)
    ids, wts = cupy.asarray(ids_host), cupy.asarray(wts_host)
    x = random_normal((shape.tokens, shape.k), shape.dtype, 1.0, case_seed(shape.label, args.seed + 1))
    itemsize = DTYPE_BYTES[shape.dtype]
    active = int(np.count_nonzero(counts))
    times: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    # Every algorithm is set up first and then timed round-robin, so a clock
    # that drifts during the shape moves them alike (the table compares them).
    runs, used = {}, w.nbytes
    sm = tuple(api.device_info().sm)
    for algorithm in ALGORITHMS + KERNEL_ALGORITHMS:
        times[algorithm] = None
        if algorithm in KERNEL_ALGORITHMS and (why := kernel_unavailable(algorithm, sm, shape.dtype)):
            errors[algorithm] = why  # a fallback would time another algorithm under this name
            continue
        need = layout_rows(algorithm, counts) * (shape.k + shape.n) * itemsize
        if used + need > budget_bytes:
            errors[algorithm] = f"skipped: needs ~{(used + need) / 1e9:.1f} GB with the others"
            continue
        try:
            inp = api.prepare_input(x, (wts, ids), shape.experts, algorithm=algorithm, gemm_n=shape.n)
            chosen = getattr(inp.algorithm, "value", str(inp.algorithm))
            if chosen != algorithm:
                # A fallback ran another algorithm: its time is not this one's.
                errors[algorithm] = f"ran {chosen} instead"
                continue
            out = cupy.empty((inp.rows.shape[0], shape.n), dtype=inp.rows.dtype)
            runs[algorithm] = lambda i, inp=inp, out=out: api.expert_gemm(inp, w, out=out)
            used += need
        except Exception as exc:
            errors[algorithm] = describe_error(exc)
    results = time_interleaved(
        list(runs.values()),
        warmup=args.warmup,
        repeat=args.repeat,
        min_repeat=min(5, args.repeat),
        budget_ms=300.0,
    )
    for algorithm, result in zip(runs, results):
        if isinstance(result, Exception):
            errors[algorithm] = describe_error(result)
        else:
            times[algorithm] = result["median"]
    runs = results = None
    free_pool()
    entry = {
        "dtype": shape.dtype,
        "num_experts": shape.experts,
        "active_experts": active,
        "mean_rows": float(counts.sum() / active) if active else 0.0,
        "max_rows": int(counts.max()),
        "n": shape.n,
        "k": shape.k,
        "times_ms": times,
        "label": shape.label,
        "tokens": shape.tokens,
        "top_k": shape.top_k,
    }
    if errors:
        entry["errors"] = errors
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cublas_grouped.tune``; returns the exit status."""
    args = parse_args(argv)
    grid = build_grid(args.quick, args.dtypes)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"cublas_grouped.tune: cannot run: {reason}. Tuning needs an NVIDIA GPU.", file=sys.stderr)
        return 2
    try:
        import cublas_grouped as cg

        from ..gemm.select import reset_tuning_cache

        api = cg
        for name in ("prepare_input", "expert_gemm", "TuningTable", "ProblemStats", "device_info"):
            if not hasattr(cg, name):
                raise ImportError(f"cublas_grouped lacks {name}")
    except ImportError as exc:
        print(f"cublas_grouped.tune: cannot run: {exc}", file=sys.stderr)
        return 2
    info = cg.device_info()
    path = output_path(args.out, info)
    print(
        f"cublas_grouped.tune: {len(grid)} shapes on {info.name} (cuBLAS {info.cublas_version}, "
        f"SM {info.sm[0]}.{info.sm[1]}), "
        f"warm-up {args.warmup}, repeat {args.repeat}",
        file=sys.stderr,
    )
    budget = int(args.mem_gb * 1e9)
    limit_s = args.max_minutes * 60 if args.max_minutes > 0 else math.inf
    start = time.monotonic()
    entries: list[dict] = []
    key, w = None, None
    stopped = 0
    for index, shape in enumerate(grid, 1):
        if time.monotonic() - start > limit_s:
            stopped = len(grid) - index + 1
            break
        try:
            if shape.weight_key != key:
                key, w = None, None
                free_pool()
                w = random_normal(
                    (shape.experts, shape.k, shape.n),
                    shape.dtype,
                    1.0 / math.sqrt(shape.k),
                    case_seed(f"tune:{shape.weight_key}", args.seed),
                )
                key = shape.weight_key
            entry = _measure(shape, w, api, args, budget)
        except Exception as exc:
            print(
                f"[{index}/{len(grid)}] {shape.label} {shape.dtype}: error {describe_error(exc)}",
                file=sys.stderr,
            )
            key, w = None, None
            free_pool()
            continue
        entries.append(entry)
        best = {a: t for a, t in entry["times_ms"].items() if t is not None}
        winner = min(best, key=best.get) if best else "none"
        print(
            f"[{index}/{len(grid)}] {shape.label} {shape.dtype}: {entry['active_experts']} active, "
            f"{entry['mean_rows']:.0f} rows/expert -> {winner}",
            file=sys.stderr,
            flush=True,
        )
    w = None
    free_pool()
    if not entries:
        print("cublas_grouped.tune: nothing was measured; no table written", file=sys.stderr)
        return 1
    make_table(info, entries).save(path)
    reset_tuning_cache()  # AUTO in this process reads the new table

    def rule_choice(entry: dict) -> str:
        stats = cg.ProblemStats(
            entry["num_experts"],
            entry["active_experts"],
            int(round(entry["mean_rows"] * entry["active_experts"])),
            entry["max_rows"],
            entry["n"],
            entry["k"],
            entry["dtype"],
        )
        return cg.select_algorithm(stats, info, padded_layouts=True, table=None).value

    print(f"wrote {path} ({len(entries)} shapes)")
    if stopped:
        print(f"stopped after --max-minutes {args.max_minutes:g}: {stopped} shapes not measured")
    print("\n".join(summarize_entries(entries, rule_choice)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
