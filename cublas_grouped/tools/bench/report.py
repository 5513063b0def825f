"""The benchmark's report: results, the table, the stage split, the targets, JSON and the plot.

Plain Python over :class:`Result` rows; nothing here touches a GPU.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...runtime.timing import summarize
from .workloads import ALGORITHMS, KERNEL_ALGORITHMS

__all__ = [
    "Result",
    "format_table",
    "format_split",
    "overhead_pct",
    "non_gemm_share_pct",
    "evaluate_targets",
    "fused_targets",
    "write_json",
    "plot",
    "merge_passes",
    "OVERHEAD_STAGES",
    "GEMM_STAGES",
]

OVERHEAD_STAGES = ("plan", "gather", "activation", "combine")
GEMM_STAGES = ("gemm1", "gemm2")

# Targets from the issue. They are checked and reported, never tuned for.
AUTO_TOLERANCE = 0.05
DECODE_HBM_TARGET_PCT = 85.0
OVERHEAD_TARGET_PCT = 15.0
OVERHEAD_TOKENS = 4096
# The fused layer's (w1 packed, eager): over the torch eager block of the same
# math on every prefill case; whole-layer TFLOP/s by (model, tokens); its
# non-GEMM stages' share of the layer at OVERHEAD_TOKENS.
FUSED_OVER_TORCH = 1.5
FUSED_TFLOPS = {("qwen3-30b-a3b", 16384): 500.0, ("deepseek-v3", 4096): 550.0, ("deepseek-v3", 16384): 550.0}
FUSED_NON_GEMM_PCT = 20.0
# The fused layer's decode step replayed from a graph: this share of its floor.
FUSED_DECODE_FLOOR_PCT = 90.0


# -- results -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One (case, section, method) measurement, or why there is none."""

    case: str
    model: str
    tokens: int
    routing: str
    phase: str
    section: str  # gemm1 | layer | route | split | graph
    method: str
    ms: float | None = None
    p10: float | None = None
    p90: float | None = None
    tflops: float | None = None
    gbs: float | None = None
    pct_hbm: float | None = None
    algorithm: str | None = None  # the concrete algorithm AUTO chose
    error: str | None = None
    note: str | None = None
    samples: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _method_label(r: Result) -> str:
    label = f"{r.section}:{r.method}"
    if r.method == "auto" and r.algorithm:
        label += f"->{r.algorithm}"
    return label


def format_table(results: Sequence[Result], max_error: int = 60) -> str:
    """The plain-text results table: one row per case x method.

    Parameters
    ----------
    results : sequence of Result
        ``split`` rows are left out (they have their own section).
    max_error : int
        Error texts are cut to this many characters (the JSON keeps them whole).

    Returns
    -------
    str
        Header, rule and rows, columns aligned.
    """
    header = ("case", "tokens", "routing", "method", "ms", "TFLOP/s", "GB/s", "%HBM", "note")
    rows = []
    for r in results:
        if r.section == "split":
            continue
        if r.error is not None:
            # The reason goes in the note column, so the numeric columns stay narrow.
            quiet = r.error.startswith(("skipped", "n/a"))
            cells = (
                r.model,
                str(r.tokens),
                r.routing,
                _method_label(r),
                "",
                "",
                "",
                "",
                _clip(r.error if quiet else f"error: {r.error}", max_error),
            )
        else:
            cells = (
                r.model,
                str(r.tokens),
                r.routing,
                _method_label(r),
                _fmt(r.ms, 3),
                _fmt(r.tflops, 1),
                _fmt(r.gbs, 0),
                _fmt(r.pct_hbm, 1),
                r.note or "",
            )
        rows.append(cells)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    numeric = {1, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def format_split(results: Sequence[Result]) -> str:
    """The stage split of AUTO per case, and the layer overhead it implies."""
    split = [r for r in results if r.section == "split" and r.error is None]
    if not split:
        return ""
    stages = ("route",) + OVERHEAD_STAGES[:2] + ("gemm1", "activation", "gemm2", "combine")
    header = ("case", "tokens", "routing", "method") + stages + ("overhead%", "non-GEMM%")
    rows = []
    for r in split:
        times = r.extra.get("stages_ms", {})
        cells = [r.model, str(r.tokens), r.routing, r.method]
        cells += [_fmt(r.extra.get("route_ms") if s == "route" else times.get(s), 3) for s in stages]
        cells += [_fmt(r.extra.get("overhead_pct"), 1), _fmt(non_gemm_share_pct(r.extra), 1)]
        rows.append(cells)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(
        c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    lines = [
        "Layer stage split (ms, median of the timed runs; auto = the layer as AUTO runs it, "
        "fused = w1 packed; overhead% = non-GEMM / GEMM time, non-GEMM% = its share of the layer, "
        "route included):",
        fmt(header),
    ]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


def overhead_pct(stages_ms: dict[str, float], route_ms: float | None) -> float | None:
    """(plan + gather + activation + combine + route) / (gemm1 + gemm2), in percent."""
    gemm = sum(stages_ms.get(s, 0.0) for s in GEMM_STAGES)
    if gemm <= 0:
        return None
    rest = sum(stages_ms.get(s, 0.0) for s in OVERHEAD_STAGES) + (route_ms or 0.0)
    return 100.0 * rest / gemm


def non_gemm_share_pct(extra: dict) -> float | None:
    """The non-GEMM stages' share of the whole layer (route included), in
    percent, from a split row's ``extra``; None without a GEMM time."""
    gemm, rest = extra.get("gemm_ms"), extra.get("non_gemm_ms")
    if not gemm or rest is None:
        return None
    return 100.0 * rest / (gemm + rest)


def _by_case(results: Sequence[Result]) -> dict[str, dict[tuple[str, str], Result]]:
    table: dict[str, dict[tuple[str, str], Result]] = {}
    for r in results:
        table.setdefault(r.case, {})[(r.section, r.method)] = r
    return table


def _ok(r: Result | None) -> bool:
    return r is not None and r.error is None and r.ms is not None


def evaluate_targets(results: Sequence[Result], hbm_gbs: float = 3350.0) -> list[str]:
    """PASS/MISS lines for the issue's targets, computed from the measured numbers.

    Targets: AUTO within 5% of the best single algorithm (first GEMM and
    layer) per case; AUTO at least as fast as ``torch._grouped_mm`` on prefill;
    decode at >= 85% of HBM bandwidth (first GEMM under AUTO, and the
    CUDA-graph layer against its floor); layer overhead <= 15% at 4096 tokens;
    then the fused layer's (:func:`fused_targets`).

    Returns
    -------
    list of str
        A heading per target followed by one line per case it applies to.
    """
    cases = _by_case(results)
    lines: list[str] = []
    block = lambda title, items: _block(lines, title, items)  # noqa: E731

    for section in ("gemm1", "layer"):
        items = []
        for name, rs in cases.items():
            auto = rs.get((section, "auto"))
            # Every algorithm AUTO may choose that ran here (our kernel where the GPU allows).
            singles = [rs[(section, a)] for a in ALGORITHMS + KERNEL_ALGORITHMS if _ok(rs.get((section, a)))]
            if auto is None and not singles:
                continue
            if not _ok(auto):
                why = auto.error if auto is not None else "not run"
                items.append(("MISS", f"{name}: AUTO has no time ({_clip(why, 80)})"))
                continue
            if not singles:
                items.append(("MISS", f"{name}: no single algorithm has a time to compare with"))
                continue
            best = min(singles, key=lambda r: r.ms)
            slower = auto.ms / best.ms - 1.0
            verdict = "PASS" if slower <= AUTO_TOLERANCE else "MISS"
            items.append(
                (
                    verdict,
                    f"{name}: auto {auto.ms:.3f} ms ({auto.algorithm or '?'}) vs best "
                    f"{best.ms:.3f} ms ({best.method}), {100 * slower:+.1f}%",
                )
            )
        block(f"AUTO within {100 * AUTO_TOLERANCE:.0f}% of the best single algorithm ({section})", items)

    items = []
    for name, rs in cases.items():
        auto, torch_r = rs.get(("gemm1", "auto")), rs.get(("gemm1", "torch"))
        if auto is None or auto.phase != "prefill":
            continue
        if not _ok(torch_r):
            why = torch_r.error.removeprefix("n/a: ") if torch_r is not None and torch_r.error else "not run"
            items.append(("SKIP", f"{name}: torch n/a ({_clip(why, 80)})"))
        elif not _ok(auto):
            items.append(("MISS", f"{name}: AUTO failed ({_clip(auto.error or '', 80)})"))
        else:
            verdict = "PASS" if auto.ms <= torch_r.ms else "MISS"
            items.append(
                (
                    verdict,
                    f"{name}: auto {auto.tflops:.1f} TFLOP/s vs torch {torch_r.tflops:.1f} "
                    f"TFLOP/s ({auto.ms:.3f} vs {torch_r.ms:.3f} ms)",
                )
            )
    block("AUTO >= torch._grouped_mm on prefill (gemm1)", items)

    items = []
    for name, rs in cases.items():
        for key, what in (
            (("gemm1", "auto"), "gemm1 auto, w1 bytes"),
            (("graph", "fixed-capacity"), "layer graph, w1+w2 bytes"),
        ):
            r = rs.get(key)
            if r is None or r.phase != "decode":
                continue
            if not _ok(r) or r.pct_hbm is None:
                items.append(("MISS", f"{name} ({what}): {_clip(r.error or 'no bandwidth figure', 80)}"))
                continue
            verdict = "PASS" if r.pct_hbm >= DECODE_HBM_TARGET_PCT else "MISS"
            items.append((verdict, f"{name} ({what}): {r.gbs:.0f} GB/s = {r.pct_hbm:.1f}% of {hbm_gbs:.0f}"))
    block(f"decode >= {DECODE_HBM_TARGET_PCT:.0f}% of HBM bandwidth", items)

    items = []
    for name, rs in cases.items():
        r = rs.get(("split", "auto"))
        if r is None or r.tokens != OVERHEAD_TOKENS:
            continue
        pct = r.extra.get("overhead_pct") if r.error is None else None
        if pct is None:
            items.append(("MISS", f"{name}: no stage split ({_clip(r.error or 'no GEMM time', 80)})"))
            continue
        verdict = "PASS" if pct <= OVERHEAD_TARGET_PCT else "MISS"
        items.append(
            (
                verdict,
                f"{name}: overhead {pct:.1f}% (non-GEMM {r.extra['non_gemm_ms']:.3f} ms "
                f"incl. route, GEMMs {r.extra['gemm_ms']:.3f} ms)",
            )
        )
    block(f"layer overhead <= {OVERHEAD_TARGET_PCT:.0f}% at {OVERHEAD_TOKENS} tokens", items)
    return lines + fused_targets(cases)


def _block(lines: list[str], title: str, items: list[tuple[str, str]]) -> None:
    """Append one target's heading (passes over judged cases) and its lines to ``lines``."""
    passed = sum(1 for verdict, _ in items if verdict == "PASS")
    judged = sum(1 for verdict, _ in items if verdict in ("PASS", "MISS"))
    lines.append(f"{title}: {passed}/{judged} PASS")
    lines.extend(f"  {verdict:4s} {text}" for verdict, text in items)
    if not items:
        lines.append("  (no cases)")


def fused_targets(cases: dict[str, dict[tuple[str, str], Result]]) -> list[str]:
    """The fused layer's targets (``fused``: w1 packed, eager, as a user calls
    it): at decode its graph replay at :data:`FUSED_DECODE_FLOOR_PCT` of the
    weight-bandwidth floor or more; per prefill case at least :data:`FUSED_OVER_TORCH` times the torch
    eager block, the whole-layer TFLOP/s of :data:`FUSED_TFLOPS`, and a
    non-GEMM share of the layer of at most :data:`FUSED_NON_GEMM_PCT` at
    :data:`OVERHEAD_TOKENS` tokens, judged on the eager split (on SM 9.0 the
    prepared launches with a mark between stages, ``kernel_step.TIME_PREPARED``,
    queued behind a hold of the stream so that each stage is the GPU's time;
    the graph replay's share and the split as the host paces it, without the
    hold, are printed beside it). Cases where the fused layer
    cannot run (not SM 9.0) are left out; a fused layer that failed is a MISS."""
    lines: list[str] = []
    speed, rate, share, decode = [], [], [], []
    for name, rs in cases.items():
        graph = rs.get(("graph", "fused"))
        if graph is not None and graph.phase == "decode":
            if not _ok(graph) or "floor_ratio" not in graph.extra:
                decode.append(("MISS", f"{name}: no graph time ({_clip(graph.error or '', 80)})"))
            else:
                pct = 100.0 * graph.extra["floor_ratio"]
                verdict = "PASS" if pct >= FUSED_DECODE_FLOOR_PCT else "MISS"
                floor = graph.extra["floor_ms"]
                decode.append((verdict, f"{name}: {pct:.1f}% ({graph.ms:.3f} ms, floor {floor:.3f} ms)"))
        fused = rs.get(("layer", "fused"))
        if fused is None or fused.phase != "prefill" or (fused.error or "").startswith("skipped"):
            continue
        target = FUSED_TFLOPS.get((fused.model, fused.tokens))
        if not _ok(fused):  # a miss of each target that applies to the case
            failed = ("MISS", f"{name}: the fused layer has no time ({_clip(fused.error or '', 80)})")
            applies = (True, target is not None, fused.tokens == OVERHEAD_TOKENS)
            for items, judged in zip((speed, rate, share), applies):
                if judged:
                    items.append(failed)
            continue
        graph_text = f", graph {graph.tflops:.1f}" if _ok(graph) and graph.tflops else ""
        torch_r = rs.get(("layer", "torch-block"))
        if _ok(torch_r):
            ratio = torch_r.ms / fused.ms
            verdict = "PASS" if ratio >= FUSED_OVER_TORCH else "MISS"
            speed.append(
                (verdict, f"{name}: {ratio:.2f}x ({fused.ms:.3f} vs torch block {torch_r.ms:.3f} ms)")
            )
        else:
            why = torch_r.error if torch_r is not None and torch_r.error else "not run"
            speed.append(("SKIP", f"{name}: torch block n/a ({_clip(why, 80)})"))
        if target is not None:
            verdict = "PASS" if fused.tflops >= target else "MISS"
            rate.append((verdict, f"{name}: {fused.tflops:.1f} TFLOP/s{graph_text} (target {target:.0f})"))
        split = rs.get(("split", "fused"))
        if fused.tokens == OVERHEAD_TOKENS:
            pct = non_gemm_share_pct(split.extra) if split is not None and split.error is None else None
            if pct is None:
                share.append(("MISS", f"{name}: no stage split of the fused layer"))
            else:
                verdict = "PASS" if pct <= FUSED_NON_GEMM_PCT else "MISS"
                e = split.extra
                text = f"non-GEMM {e['non_gemm_ms']:.3f} ms of {e['non_gemm_ms'] + e['gemm_ms']:.3f} ms"
                if _ok(graph):  # beside it (not judged): the graph replay less the split's GEMMs
                    whole = graph.ms + (e.get("route_ms") or 0.0)
                    text += f"; graph replay {100.0 * (whole - e['gemm_ms']) / whole:.1f}%"
                unheld = non_gemm_share_pct(e["unheld"]) if "unheld" in e else None
                if unheld is not None:  # beside it (not judged): the split as the host paces it
                    text += f"; host-paced split {unheld:.1f}%"
                share.append((verdict, f"{name}: {pct:.1f}% ({text}, route included)"))
    floor_title = f"fused decode graph >= {FUSED_DECODE_FLOOR_PCT:.0f}% of the floor (w1 + w2 bytes)"
    _block(lines, floor_title, decode)
    _block(lines, f"fused layer >= {FUSED_OVER_TORCH:g}x the torch eager block (prefill)", speed)
    _block(lines, "fused layer TFLOP/s (eager; the graph replay beside it)", rate)
    _block(
        lines, f"fused layer non-GEMM share <= {FUSED_NON_GEMM_PCT:.0f}% at {OVERHEAD_TOKENS} tokens", share
    )
    return lines


def write_json(
    path: str,
    env: dict,
    args: argparse.Namespace,
    stats: list[dict],
    results: list[Result],
    targets: list[str],
    host: list[dict] | None = None,
) -> None:
    """Every number, the settings and the environment, as JSON (``host``: the host-overhead rows)."""
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    doc = {
        "environment": env,
        "settings": settings,
        "cases": stats,
        "results": [asdict(r) for r in results],
        "targets": targets,
        "host_overhead_us": host or [],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def plot(path: str, results: Sequence[Result]) -> str | None:
    """Bar chart of first-GEMM TFLOP/s per case and method; a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ok = [r for r in results if r.section == "gemm1" and r.error is None and r.tflops is not None]
    if not ok:
        return "nothing to plot"
    cases = list(dict.fromkeys(r.case for r in ok))
    methods = list(dict.fromkeys(r.method for r in ok))
    value = {(r.case, r.method): r.tflops for r in ok}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(cases)), 5.0))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [value.get((c, m), 0.0) for c in cases], width, label=m)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s (first expert GEMM)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def merge_passes(results: Sequence[Result]) -> list[Result]:
    """Pool the samples of a case's repeated (section, method) measurements (``--passes``).

    The first result of each (section, method) is kept, with its median,
    percentiles and the rates derived from the median recomputed over all
    samples; a failed pass gives way to a successful one.
    """
    merged: dict[tuple[str, str], Result] = {}
    for r in results:
        key = (r.section, r.method)
        first = merged.get(key)
        if first is None or (first.error and not r.error):
            merged[key] = r
            continue
        if r.error or not (first.samples and r.samples and first.ms):
            continue
        pooled = summarize(first.samples + r.samples)
        scale = first.ms / pooled["median"]
        first.ms, first.p10, first.p90, first.samples = (
            pooled["median"],
            pooled["p10"],
            pooled["p90"],
            pooled["samples"],
        )
        for attr in ("tflops", "gbs", "pct_hbm"):
            if getattr(first, attr) is not None:
                setattr(first, attr, getattr(first, attr) * scale)
        if "floor_ms" in first.extra:
            ratio = first.extra["floor_ms"] / first.ms
            first.extra["floor_ratio"] = ratio
            first.note = f"floor {first.extra['floor_ms']:.3f} ms = {100 * ratio:.0f}% of it"
        if r.note and "CHECK FAILED" in r.note:
            first.note = r.note
    return list(merged.values())
