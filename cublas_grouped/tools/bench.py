"""Benchmark of the MoE expert GEMMs and the whole MoE layer: ``python -m cublas_grouped.bench``.

For each case (a model's expert shapes x a token count x a routing) it times,
with CUDA events after warm-up (median of >= 20 runs):

- the first expert GEMM alone (gathered rows ``[R, H]`` @ ``w1 [E, H, 2I]``)
  with every algorithm and with AUTO, against a dense GEMM of the same FLOPs
  (the ceiling) and ``torch._grouped_mm`` when torch is importable;
- the whole layer (``moe_forward``) per algorithm, the routing kernel
  separately, and the stage split of AUTO, from which the layer's overhead
  (everything but the two GEMMs) follows;
- for decode token counts, one ``StaticMoE`` forward replayed from a CUDA
  graph, against the floor set by reading the active experts' weights once.

The table is printed last, followed by the targets, each PASS or MISS with the
numbers behind it. Before the cases it prints the facts the numbers rest on: the
HBM bandwidth used for %HBM and the decode floor, and where it came from
(``--hbm-gbs``, the datasheet figure of a GPU known by name, or a measured
device-to-device copy), and which tuning table AUTO uses and why. Failures of one (case, method) are recorded and the run
goes on. ``--json`` keeps every sample and the environment.

Everything up to the GPU work (argument parsing, cases, routing generation,
FLOP and byte counts, formatting) is plain NumPy and runs without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import re
import sys
import time
import types
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from ..gemm.select import capacity_for, choose_chunk_rows, padded_rows
from ..runtime.timing import L2_BYTES, rotation_count, summarize, time_ms

__all__ = [
    "MODELS",
    "Case",
    "Result",
    "parse_args",
    "build_cases",
    "expert_popularity",
    "uniform_routing",
    "skewed_routing",
    "routing_weights",
    "gemm1_flops",
    "layer_flops",
    "gemm1_weight_bytes",
    "layer_weight_bytes",
    "tflops",
    "gbs",
    "format_table",
    "evaluate_targets",
    "datasheet_hbm_gbs",
    "copy_gbs",
    "resolve_hbm",
    "main",
]

ALGORITHMS = ("cublas_grouped", "sequential", "chunked_batched", "padded_strided")


@dataclass(frozen=True)
class ModelShape:
    """Expert shapes of one MoE model (per layer)."""

    experts: int
    top_k: int
    hidden: int
    inter: int


MODELS: dict[str, ModelShape] = {
    "mixtral-8x7b": ModelShape(experts=8, top_k=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": ModelShape(experts=128, top_k=8, hidden=2048, inter=768),
    "deepseek-v3": ModelShape(experts=256, top_k=8, hidden=7168, inter=2048),
}
PREFILL_TOKENS = (4096, 16384)
DECODE_TOKENS = (16, 64)
QUICK_TOKENS = (16, 64, 4096)
# At or below this many tokens a layer reads more weight bytes than it does
# useful math: it is judged by bandwidth, not FLOP/s.
DECODE_MAX_TOKENS = 128
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OVERHEAD_STAGES = ("plan", "gather", "activation", "combine")
GEMM_STAGES = ("gemm1", "gemm2")

# HBM bandwidth by GPU name, GB/s from the datasheets: (name pattern, GB/s, part).
# %HBM is judged against these peaks; a GPU not listed is judged against a copy measured at start.
HBM_DATASHEET = (
    (re.compile(r"\bH100 80GB HBM3\b"), 3350.0, "H100 SXM"),
    (re.compile(r"\bH100 NVL\b"), 3900.0, "H100 NVL"),
    (re.compile(r"\bH100 PCIe\b"), 2000.0, "H100 PCIe"),
    (re.compile(r"(?<!G)H200\b"), 4800.0, "H200"),
)
# Used only when the GPU is unknown and the copy could not be measured.
FALLBACK_HBM_GBS = 3350.0
COPY_BYTES = 1 << 30
COPY_REPEAT = 5

# Targets from the issue. They are checked and reported, never tuned for.
AUTO_TOLERANCE = 0.05
DECODE_HBM_TARGET_PCT = 85.0
OVERHEAD_TARGET_PCT = 15.0
OVERHEAD_TOKENS = 4096


# -- cases -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark point: expert shapes, token count, routing and dtype."""

    model: str
    tokens: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    routing: str = "uniform"
    dtype: str = "bfloat16"
    gated: bool = True

    @property
    def name(self) -> str:
        return f"{self.model}/T{self.tokens}/{self.routing}"

    @property
    def n1(self) -> int:
        """N of the first GEMM: gate and up projections packed side by side when gated."""
        return 2 * self.inter if self.gated else self.inter

    @property
    def pairs(self) -> int:
        """(token, expert) pairs, the rows the expert GEMMs see without padding."""
        return self.tokens * self.top_k

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def phase(self) -> str:
        return "decode" if self.tokens <= DECODE_MAX_TOKENS else "prefill"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}; got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m cublas_grouped.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m cublas_grouped.bench",
        description="Time MoE expert GEMMs and MoE layers: every algorithm, AUTO, a dense ceiling "
        "and torch._grouped_mm when available. Prints a table and PASS/MISS targets.",
    )
    sel = p.add_argument_group("cases")
    sel.add_argument(
        "--cases", default=None, help="comma-separated substrings; keep model cases whose name contains one"
    )
    sel.add_argument(
        "--tokens",
        type=_int_list,
        nargs="+",
        action="extend",
        default=None,
        help="token counts, e.g. 16,64,4096 (default: 16,64,4096,16384; --quick: 16,64,4096)",
    )
    sel.add_argument(
        "--routing",
        choices=("uniform", "skewed", "both"),
        default="both",
        help="routing distribution (default: both)",
    )
    sel.add_argument("--skew", action="store_true", help="skewed routing only (same as --routing skewed)")
    sel.add_argument(
        "--sigma",
        type=_positive(float),
        default=1.0,
        help="sigma of the lognormal expert popularity of skewed routing (default 1.0)",
    )
    sel.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="element type")
    custom = p.add_argument_group("custom case (used instead of the model cases when --experts is given)")
    custom.add_argument("--experts", type=_positive(int), default=None, help="number of experts E")
    custom.add_argument("--topk", type=_positive(int), default=None, help="experts per token k")
    custom.add_argument("--hidden", type=_positive(int), default=None, help="hidden size H")
    custom.add_argument("--inter", type=_positive(int), default=None, help="expert FFN size I")
    run = p.add_argument_group("measurement")
    run.add_argument(
        "--quick", action="store_true", help="warm-up 3, 20 repeats, tokens 16,64,4096 only (unless --tokens)"
    )
    run.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; --quick 3)")
    run.add_argument(
        "--passes",
        type=_positive(int),
        default=2,
        help="time every method this many times per case, alternating forward and reverse order, "
        "and pool the samples (default 2): a GPU that slows as it heats up then favours no method",
    )
    run.add_argument(
        "--repeat",
        type=_positive(int),
        default=None,
        help="timed calls (default 30; --quick 20; large cases shrink toward 20)",
    )
    run.add_argument(
        "--hbm-gbs",
        type=_positive(float),
        default=None,
        help="HBM bandwidth in GB/s for %%HBM and the decode floor (default: the datasheet figure of "
        "a GPU known by name, H100 SXM 3350, H200 4800; else a device-to-device copy measured at start)",
    )
    run.add_argument(
        "--mem-gb",
        type=_positive(float),
        default=40.0,
        help="GPU memory the benchmark may use; methods whose layout would not fit are "
        "skipped and say so (default 40)",
    )
    run.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="stop starting new cases after this long, recording the rest as skipped "
        "(default 8; 0 = no limit)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of routing and data")
    run.add_argument("--no-torch", action="store_true", help="do not try torch._grouped_mm")
    run.add_argument("--no-layer", action="store_true", help="time the first GEMM only")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None, help="write every number and the environment")
    out.add_argument("--plot", metavar="PATH", default=None, help="bar chart of TFLOP/s (needs matplotlib)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; fills in the defaults that depend on ``--quick``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    argparse.Namespace
        With ``warmup``, ``repeat`` and ``routings`` (a list) resolved.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if args.repeat is None:
        args.repeat = 20 if args.quick else 30
    if args.skew and args.routing == "uniform":
        parser.error("--skew conflicts with --routing uniform")
    if args.skew:
        args.routing = "skewed"
    args.routings = ["uniform", "skewed"] if args.routing == "both" else [args.routing]
    if args.experts is not None:
        missing = [f"--{name}" for name in ("topk", "hidden", "inter") if getattr(args, name) is None]
        if missing:
            parser.error(f"a custom case (--experts) also needs {', '.join(missing)}")
        if args.topk > args.experts:
            parser.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    elif any(getattr(args, name) is not None for name in ("topk", "hidden", "inter")):
        parser.error("--topk/--hidden/--inter describe a custom case and need --experts")
    if args.tokens is not None:
        # "--tokens 16,64 4096": each word may itself be a comma list.
        args.tokens = sorted({t for group in args.tokens for t in group})
    if args.cases is not None and not build_cases(args):
        parser.error(f"--cases {args.cases!r} matches none of: {', '.join(MODELS)}")
    return args


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The cases a parsed command line asks for, grouped by model (weights are reused within one).

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`parse_args`.

    Returns
    -------
    list of Case
        Model x tokens (ascending) x routing; or the one custom shape x tokens x routing.
    """
    if args.tokens:
        tokens = list(args.tokens)
    elif args.quick:
        tokens = list(QUICK_TOKENS)
    else:
        tokens = sorted(DECODE_TOKENS + PREFILL_TOKENS)
    routings = getattr(args, "routings", None) or ["uniform", "skewed"]
    if args.experts is not None:
        name = f"custom-e{args.experts}k{args.topk}h{args.hidden}i{args.inter}"
        shapes = {name: ModelShape(args.experts, args.topk, args.hidden, args.inter)}
    else:
        wanted = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else []
        shapes = {m: s for m, s in MODELS.items() if not wanted or any(w in m for w in wanted)}
    return [
        Case(model, t, s.experts, s.top_k, s.hidden, s.inter, routing, args.dtype)
        for model, s in shapes.items()
        for t in tokens
        for routing in routings
    ]


# -- routing -----------------------------------------------------------------------------------------------


def _case_seed(name: str, seed: int) -> int:
    # crc32, not hash(): the same case gets the same routing in every process.
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def expert_popularity(num_experts: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Relative popularity of each expert, lognormal with parameter ``sigma``; sums to 1.

    The values are the lognormal's quantiles at ``(i + 0.5) / E``, shuffled
    over the experts: a stratified draw, so the spread between the busiest
    and the idlest expert is the same in every run and only which expert is
    busy depends on the seed. (With 8 experts a plain draw swings from nearly
    uniform to one dominant expert, which would make runs incomparable.)

    Parameters
    ----------
    num_experts : int
    sigma : float
        Standard deviation of the log-popularity.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
        float64 ``[E]``, positive, sums to 1.
    """
    normal = NormalDist()
    z = np.array([normal.inv_cdf((i + 0.5) / num_experts) for i in range(num_experts)])
    p = np.exp(sigma * z)
    rng.shuffle(p)
    return p / p.sum()


def _top_k_of_keys(keys: np.ndarray, top_k: int) -> np.ndarray:
    ids = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    return ids.astype(np.int32)


def uniform_routing(tokens: int, num_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Each token picks ``top_k`` distinct experts uniformly at random.

    Returns
    -------
    numpy.ndarray
        int32 ``[tokens, top_k]``.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
    return _top_k_of_keys(rng.random((tokens, num_experts)), top_k)


def skewed_routing(
    tokens: int, num_experts: int, top_k: int, rng: np.random.Generator, sigma: float = 1.0
) -> np.ndarray:
    """Each token picks ``top_k`` distinct experts, favouring popular ones.

    Sampling without replacement with probabilities from
    :func:`expert_popularity`, by the Gumbel-top-k trick: the k largest of
    ``log p_e + Gumbel noise`` are a draw without replacement in proportion
    to ``p``.

    Returns
    -------
    numpy.ndarray
        int32 ``[tokens, top_k]``.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}]; got {top_k}")
    p = expert_popularity(num_experts, sigma, rng)
    keys = np.log(p)[None, :] + rng.gumbel(size=(tokens, num_experts))
    return _top_k_of_keys(keys, top_k)


def routing_weights(tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Positive routing weights that sum to 1 per token (float32 ``[tokens, top_k]``)."""
    w = rng.random((tokens, top_k)) + 0.1
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def make_routing(case: Case, seed: int = 0, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(topk_weights, topk_ids)`` of a case, on the host, reproducible from the seed."""
    rng = np.random.default_rng(_case_seed(case.name, seed))
    if case.routing == "skewed":
        ids = skewed_routing(case.tokens, case.experts, case.top_k, rng, sigma)
    elif case.routing == "uniform":
        ids = uniform_routing(case.tokens, case.experts, case.top_k, rng)
    else:
        raise ValueError(f"routing must be 'uniform' or 'skewed'; got {case.routing!r}")
    return routing_weights(case.tokens, case.top_k, rng), ids


def expert_counts(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Rows per expert (int64 ``[E]``)."""
    return np.bincount(np.asarray(topk_ids).reshape(-1), minlength=num_experts).astype(np.int64)


# -- FLOPs and bytes ---------------------------------------------------------------------------------------


def gemm1_flops(case: Case) -> int:
    """Useful FLOPs of the first GEMM: ``2 * T*k * H * N1`` (padding rows do not count)."""
    return 2 * case.pairs * case.hidden * case.n1


def layer_flops(case: Case) -> int:
    """Useful FLOPs of both expert GEMMs of the layer."""
    return gemm1_flops(case) + 2 * case.pairs * case.inter * case.hidden


def gemm1_weight_bytes(case: Case, active_experts: int) -> int:
    """Bytes of ``w1`` the first GEMM must read: the active experts' ``[H, N1]`` slices."""
    return active_experts * case.hidden * case.n1 * case.itemsize


def layer_weight_bytes(case: Case, active_experts: int) -> int:
    """Bytes of ``w1`` and ``w2`` the layer must read: the decode floor's numerator."""
    return active_experts * (case.hidden * case.n1 + case.inter * case.hidden) * case.itemsize


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def gbs(nbytes: float, ms: float) -> float:
    """GB/s (10^9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def layout_rows(algorithm: str, counts: np.ndarray) -> int:
    """Rows of the gathered layout an algorithm needs (an estimate, for the memory guard)."""
    if algorithm == "padded_strided":
        return len(counts) * capacity_for(counts)
    if algorithm == "chunked_batched":
        return padded_rows(counts, choose_chunk_rows(counts))
    return int(counts.sum())


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
    header = ("case", "tokens", "routing") + stages + ("overhead%",)
    rows = []
    for r in split:
        times = r.extra.get("stages_ms", {})
        cells = [r.model, str(r.tokens), r.routing]
        cells += [_fmt(r.extra.get("route_ms") if s == "route" else times.get(s), 3) for s in stages]
        cells.append(_fmt(r.extra.get("overhead_pct"), 1))
        rows.append(cells)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(
        c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    lines = ["Layer stage split, AUTO (ms, median of the timed runs):", fmt(header)]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


def overhead_pct(stages_ms: dict[str, float], route_ms: float | None) -> float | None:
    """(plan + gather + activation + combine + route) / (gemm1 + gemm2), in percent."""
    gemm = sum(stages_ms.get(s, 0.0) for s in GEMM_STAGES)
    if gemm <= 0:
        return None
    rest = sum(stages_ms.get(s, 0.0) for s in OVERHEAD_STAGES) + (route_ms or 0.0)
    return 100.0 * rest / gemm


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
    CUDA-graph layer against its floor); layer overhead <= 15% at 4096 tokens.

    Returns
    -------
    list of str
        A heading per target followed by one line per case it applies to.
    """
    cases = _by_case(results)
    lines: list[str] = []

    def block(title: str, items: list[tuple[str, str]]) -> None:
        passed = sum(1 for verdict, _ in items if verdict == "PASS")
        judged = sum(1 for verdict, _ in items if verdict in ("PASS", "MISS"))
        lines.append(f"{title}: {passed}/{judged} PASS")
        lines.extend(f"  {verdict:4s} {text}" for verdict, text in items)
        if not items:
            lines.append("  (no cases)")

    for section in ("gemm1", "layer"):
        items = []
        for name, rs in cases.items():
            auto = rs.get((section, "auto"))
            singles = [rs[(section, a)] for a in ALGORITHMS if _ok(rs.get((section, a)))]
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
            (("graph", "static-graph"), "layer graph, w1+w2 bytes"),
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
    return lines


# -- GPU side ----------------------------------------------------------------------------------------------


def no_gpu_reason() -> str | None:
    """Why the benchmark cannot run here, or ``None`` when a CUDA GPU is usable."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no CUDA device found"


def datasheet_hbm_gbs(gpu_name: str) -> tuple[float, str] | None:
    """(GB/s, part) of a GPU whose HBM bandwidth is known by name, else None."""
    for pattern, value, part in HBM_DATASHEET:
        if pattern.search(gpu_name):
            return value, part
    return None


def copy_gbs(nbytes: int, ms: float) -> float:
    """Bandwidth of a device-to-device copy of ``nbytes`` that took ``ms``: every
    byte is read once and written once, so ``2 * nbytes`` cross the HBM interface."""
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_copy_gbs(nbytes: int = COPY_BYTES, repeat: int = COPY_REPEAT) -> float:
    """HBM bandwidth seen by one ``cudaMemcpyAsync`` of ``nbytes`` device to device:
    one untimed copy, then the median of ``repeat`` copies timed with CUDA events."""
    import cupy

    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty(nbytes, dtype=cupy.uint8)
    src.fill(1)
    stream = cupy.cuda.get_current_stream()
    d2d = cupy.cuda.runtime.memcpyDeviceToDevice
    to, frm = dst.data.ptr, src.data.ptr
    t = time_ms(
        lambda i: cupy.cuda.runtime.memcpyAsync(to, frm, nbytes, d2d, stream.ptr), warmup=1, repeat=repeat
    )
    del src, dst
    free_pool()
    return copy_gbs(nbytes, t["median"])


def resolve_hbm(flag_gbs: float | None, gpu_name: str, measured_gbs: float | None) -> tuple[float, str]:
    """The HBM bandwidth %HBM and the decode floor use, and where it comes from.

    ``--hbm-gbs`` when given; else the datasheet figure of a GPU known by name;
    else the measured copy; else ``FALLBACK_HBM_GBS`` (said so).
    """
    if flag_gbs is not None:
        return float(flag_gbs), "--hbm-gbs"
    known = datasheet_hbm_gbs(gpu_name)
    if known is not None:
        return known[0], f"datasheet figure of the {known[1]}, known by the GPU name"
    if measured_gbs is not None:
        return measured_gbs, (
            f"measured: device-to-device copy of {COPY_BYTES >> 30} GiB, median of {COPY_REPEAT}, "
            "bytes read + written"
        )
    return FALLBACK_HBM_GBS, "assumed (H100 SXM): the GPU is not known by name and the copy was not measured"


def hbm_lines(
    gbs: float, source: str, measured_gbs: float | None, copy_error: str | None = None
) -> list[str]:
    """What the benchmark says about the bandwidth it judges decode by."""
    lines = [f"HBM bandwidth for %HBM and the decode floor: {gbs:.0f} GB/s ({source})"]
    if measured_gbs is not None:
        lines.append(
            f"measured device-to-device copy: {measured_gbs:.0f} GB/s = {100 * measured_gbs / gbs:.0f}% of {gbs:.0f}"
        )
    elif copy_error:
        lines.append(f"device-to-device copy not measured: {copy_error}")
    return lines


def _auto_lines() -> list[str]:
    """Which tuning table AUTO uses on this GPU and why, and what it measured."""
    try:
        import cublas_grouped as cg
        from cublas_grouped.gemm.autotune import describe_auto

        return describe_auto(cg.device_info())
    except Exception as exc:
        return [f"AUTO tuning table: unknown ({_err(exc)})"]


def _cupy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def random_normal(shape: tuple[int, ...], dtype: str, scale: float, seed: int):
    """Random normal GPU array * ``scale`` in ``dtype``.

    Made in slices of the first axis so the float32 staging never needs more
    than ~256 MB (w1 of DeepSeek-V3 is 15 GB). bfloat16 is rounded from
    float32 by integer ops (round to nearest even), so no CuPy cast to
    bfloat16 is needed.
    """
    import cupy

    bf16 = dtype == "bfloat16"
    raw = cupy.empty(shape, dtype=cupy.uint16 if bf16 else _cupy_dtype(dtype))
    flat = raw.reshape(shape[0], -1)
    row_bytes = max(1, flat.shape[1] * 4)
    step = max(1, (256 << 20) // row_bytes)
    rng = cupy.random.default_rng(seed)
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        block = rng.standard_normal((stop - start, flat.shape[1]), dtype=cupy.float32)
        block *= scale
        if bf16:
            bits = block.view(cupy.uint32)
            flat[start:stop] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cupy.uint16)
        else:
            flat[start:stop] = block.astype(raw.dtype)
        del block
    return raw.view(_cupy_dtype(dtype)) if bf16 else raw


def free_pool() -> None:
    """Hand CuPy's cached blocks back so the next case starts from a clean pool."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


class WeightCache:
    """The current model's ``w1``/``w2``, kept across its cases (regenerated when dropped)."""

    def __init__(self, seed: int):
        self._seed = seed
        self._key: tuple | None = None
        self._arrays: dict[str, object] = {}

    def get(self, case: Case, which: str):
        key = (case.model, case.experts, case.hidden, case.inter, case.dtype, case.gated)
        if key != self._key:
            self.clear()
            self._key = key
        if which not in self._arrays:
            seed = _case_seed(f"{case.model}:{which}", self._seed)
            if which == "w1":
                self._arrays[which] = random_normal(
                    (case.experts, case.hidden, case.n1), case.dtype, 1.0 / math.sqrt(case.hidden), seed
                )
            else:
                self._arrays[which] = random_normal(
                    (case.experts, case.inter, case.hidden), case.dtype, 1.0 / math.sqrt(case.inter), seed
                )
        return self._arrays[which]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def drop(self, which: str) -> None:
        self._arrays.pop(which, None)
        free_pool()

    def clear(self) -> None:
        self._arrays.clear()
        self._key = None
        free_pool()


def _load_api():
    """The library entry points the benchmark needs; StaticMoE is optional."""
    import cublas_grouped as cg

    names = ("Algorithm", "route", "prepare_input", "expert_gemm", "moe_forward", "StageTimer", "device_info")
    missing = [n for n in names if not hasattr(cg, n)]
    if missing:
        raise ImportError(f"cublas_grouped lacks {', '.join(missing)}")
    api = {n: getattr(cg, n) for n in names}
    api["StaticMoE"] = getattr(cg, "StaticMoE", None)
    api["gmm"] = cg.gmm
    return types.SimpleNamespace(**api)


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def environment(argv: Sequence[str]) -> dict:
    """GPU, library and software versions, date and command line, for the JSON."""
    import cupy

    import cublas_grouped as cg

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m cublas_grouped.bench", *argv]),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": cupy.__version__,
        "cublas_grouped": getattr(cg, "__version__", "?"),
    }
    try:
        info = cg.device_info()
        env.update(
            gpu=info.name,
            sm=f"{info.sm[0]}.{info.sm[1]}",
            cublas_version=info.cublas_version,
            multiprocessors=info.multiprocessors,
        )
    except Exception as exc:
        env["gpu_error"] = _err(exc)
    for key, getter in (
        ("cuda_runtime", cupy.cuda.runtime.runtimeGetVersion),
        ("cuda_driver", cupy.cuda.runtime.driverGetVersion),
    ):
        try:
            env[key] = getter()
        except Exception as exc:
            env[key] = _err(exc)
    return env


class CaseRunner:
    """Runs every method of one case on the GPU, turning each failure into a recorded error."""

    def __init__(self, case: Case, args: argparse.Namespace, api, weights: WeightCache):
        import cupy

        self.cp = cupy
        self.case = case
        self.args = args
        self.api = api
        self.weights = weights
        self.results: list[Result] = []
        self.reverse = False  # time the methods in reverse order (odd passes)
        self.topk_weights_host, self.topk_ids_host = make_routing(case, args.seed, args.sigma)
        self.counts = expert_counts(self.topk_ids_host, case.experts)
        self.active = int(np.count_nonzero(self.counts))
        self.ids = cupy.asarray(self.topk_ids_host)
        self.wts = cupy.asarray(self.topk_weights_host)
        self.budget = int(args.mem_gb * 1e9)

    # -- helpers ---------------------------------------------------------------------------------------
    def _ordered(self, methods: Sequence[str]) -> Sequence[str]:
        return tuple(reversed(methods)) if self.reverse else tuple(methods)

    def _timing(self, fn: Callable[[int], object], sets: int) -> dict:
        return time_ms(
            fn,
            warmup=self.args.warmup,
            repeat=self.args.repeat,
            rotate=sets,
            min_repeat=min(20, self.args.repeat),
            budget_ms=2000.0,
        )

    def _result(self, section: str, method: str, **kw) -> Result:
        c = self.case
        r = Result(c.name, c.model, c.tokens, c.routing, c.phase, section, method, **kw)
        self.results.append(r)
        return r

    def _record(
        self, section: str, method: str, t: dict, flops: int | None, nbytes: int | None, **kw
    ) -> Result:
        ms = t["median"]
        decode = self.case.phase == "decode"
        bw = gbs(nbytes, ms) if (decode and nbytes) else None
        return self._result(
            section,
            method,
            ms=ms,
            p10=t["p10"],
            p90=t["p90"],
            tflops=tflops(flops, ms) if flops else None,
            gbs=bw,
            pct_hbm=100.0 * bw / self.args.hbm_gbs if bw is not None else None,
            samples=t["samples"],
            **kw,
        )

    def _guarded(self, section: str, method: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:
            self._result(section, method, error=_err(exc))
        finally:
            free_pool()

    def _fits(self, extra_bytes: int) -> str | None:
        need = self.weights.nbytes() + extra_bytes
        if need > self.budget:
            return f"skipped: needs ~{need / 1e9:.1f} GB with the weights, over --mem-gb {self.args.mem_gb:g}"
        return None

    def _sets(self, per_set_bytes: int, weight_bytes: int) -> tuple[int, bool]:
        """Input sets to rotate, and whether the weights are copied per set too (only when small)."""
        sets = rotation_count(per_set_bytes, l2_bytes=L2_BYTES, budget_bytes=1 << 30)
        copy_weights = sets > 1 and weight_bytes * (sets - 1) <= (1 << 30)
        return sets, copy_weights

    def _inputs(self, sets: int):
        c = self.case
        return [
            random_normal((c.tokens, c.hidden), c.dtype, 1.0, _case_seed(c.name, self.args.seed + s))
            for s in range(sets)
        ]

    def _check(self, inp, w, out) -> str | None:
        """Compare one expert's first rows with a float32 product; a note when it disagrees."""
        cp = self.cp
        try:
            counts = np.asarray(inp.counts_host)
            e = int(np.argmax(counts))
            m = int(min(counts[e], 64))
            if m == 0:
                return None
            start = int(inp.layout.offsets(counts)[e])
            a = inp.rows[start : start + m].astype(cp.float32)
            ref = a @ w[e].astype(cp.float32)
            got = out[start : start + m].astype(cp.float32)
            err = float(cp.linalg.norm(got - ref) / max(float(cp.linalg.norm(ref)), 1e-30))
        except Exception as exc:
            return f"unchecked ({_err(exc)})"
        tol = 1e-4 if self.case.dtype == "float32" else 3e-2
        return None if err <= tol else f"CHECK FAILED rel.err {err:.2g}"

    # -- first GEMM ----------------------------------------------------------------------------------------
    def run_gemm1(self) -> None:
        c = self.case
        w1 = self.weights.get(c, "w1")
        per_set = (c.tokens * c.hidden + c.pairs * (c.hidden + c.n1)) * c.itemsize
        sets, copy_w = self._sets(per_set + gemm1_weight_bytes(c, self.active), w1.nbytes)
        xs = self._inputs(sets)
        w1s = [w1] + [w1.copy() for _ in range(sets - 1)] if copy_w else [w1]
        note = None if sets == 1 or copy_w else "weights not rotated"
        flops, nbytes = gemm1_flops(c), gemm1_weight_bytes(c, self.active)
        for method in self._ordered(ALGORITHMS + ("auto",)):
            self._guarded(
                "gemm1", method, lambda m=method: self._gemm1_algorithm(m, xs, w1s, flops, nbytes, note)
            )
        # The dense GEMM reads one [H, N1] matrix, not every active expert's.
        dense_bytes = c.hidden * c.n1 * c.itemsize
        self._guarded("gemm1", "dense", lambda: self._gemm1_dense(sets, w1, flops, dense_bytes))
        if not self.args.no_torch:
            self._guarded("gemm1", "torch", lambda: self._gemm1_torch(xs, w1, flops, nbytes))
            torch = sys.modules.get("torch")
            if torch is not None:
                # torch's own caching allocator still holds the outputs (and any w1 copy).
                torch.cuda.empty_cache()

    def _gemm1_algorithm(self, method, xs, w1s, flops, nbytes, note) -> None:
        c = self.case
        if method not in ("auto", "sync-free"):
            rows = layout_rows(method, self.counts)
            skip = self._fits(rows * (c.hidden + c.n1) * c.itemsize * len(xs))
            if skip:
                self._result("gemm1", method, error=skip)
                return
        inps = [
            self.api.prepare_input(x, (self.wts, self.ids), c.experts, algorithm=method, gemm_n=c.n1)
            for x in xs
        ]
        outs = [self.cp.empty((inp.rows.shape[0], c.n1), dtype=inp.rows.dtype) for inp in inps]
        fn = lambda i: self.api.expert_gemm(inps[i], w1s[i % len(w1s)], out=outs[i])
        fn(0)
        check = self._check(inps[0], w1s[0], outs[0])
        t = self._timing(fn, len(inps))
        chosen = getattr(inps[0].algorithm, "value", str(inps[0].algorithm))
        fell_back = f"ran {chosen}" if method != "auto" and chosen != method else None
        notes = [n for n in (note, fell_back, check) if n]
        self._record(
            "gemm1",
            method,
            t,
            flops,
            nbytes,
            algorithm=chosen,
            note="; ".join(notes) or None,
            extra={"rows": int(inps[0].rows.shape[0])},
        )

    def _gemm1_dense(self, sets, w1, flops, nbytes) -> None:
        cp, c = self.cp, self.case
        a = [
            random_normal((c.pairs, c.hidden), c.dtype, 1.0, _case_seed(c.name, 1000 + s))
            for s in range(sets)
        ]
        b = w1[0]
        outs = [cp.empty((c.pairs, c.n1), dtype=a[0].dtype) for _ in range(sets)]
        note = "cupy.matmul"
        fn = lambda i: cp.matmul(a[i], b, out=outs[i])
        try:
            fn(0)
        except Exception as exc:
            # Once, at setup: a CuPy without bf16 matmul still gets a dense ceiling, one cublasGemmEx.
            sizes = np.array([c.pairs], dtype=np.int64)
            b3 = w1[:1]
            fn = lambda i: self.api.gmm(a[i], b3, sizes, out=outs[i], algorithm="sequential")
            fn(0)
            note = f"one cublasGemmEx (cupy.matmul: {_err(exc)})"
        t = self._timing(fn, sets)
        self._record("gemm1", "dense", t, flops, nbytes, note=note)

    def _gemm1_torch(self, xs, w1, flops, nbytes) -> None:
        cp, c = self.cp, self.case
        try:
            import torch
        except Exception as exc:
            self._result("gemm1", "torch", error=f"n/a: torch not importable ({_err(exc)})")
            return
        if not hasattr(torch, "_grouped_mm"):
            self._result("gemm1", "torch", error=f"n/a: torch {torch.__version__} has no _grouped_mm")
            return
        inps = [
            self.api.prepare_input(
                x, (self.wts, self.ids), c.experts, algorithm="cublas_grouped", gemm_n=c.n1
            )
            for x in xs
        ]
        if inps[0].rows.shape[0] != c.pairs:
            self._result(
                "gemm1", "torch", error="n/a: prepare_input gave padded rows, torch needs them packed"
            )
            return
        offs_host = np.cumsum(self.counts).astype(np.int32)
        offs = torch.from_dlpack(cp.asarray(offs_host))
        mats = [torch.from_dlpack(inp.rows) for inp in inps]
        b = torch.from_dlpack(w1)
        note = "row-major w1"
        stream_ptr = cp.cuda.get_current_stream().ptr
        # CuPy's current stream, so the CUDA events bracket torch's kernels too.
        ctx = (
            torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr))
            if stream_ptr
            else contextlib.nullcontext()
        )
        with ctx:
            try:
                out0 = torch._grouped_mm(mats[0], b, offs=offs)
            except Exception as first:
                skip = self._fits(w1.nbytes)
                if skip:
                    self.weights.drop("w2")  # regenerated for the layer; makes room for the copy
                    skip = self._fits(w1.nbytes)
                if skip:
                    self._result("gemm1", "torch", error=f"n/a: {_err(first)}; column-major copy {skip}")
                    return
                # Once, at setup: some builds want mat_b column-major in its last two dims.
                b = b.transpose(-2, -1).contiguous().transpose(-2, -1)
                try:
                    out0 = torch._grouped_mm(mats[0], b, offs=offs)
                except Exception as second:
                    self._result("gemm1", "torch", error=f"n/a: {_err(second)}")
                    return
                note = f"column-major w1 copy (row-major: {_err(first)})"
            note += self._cross_check(inps[0], w1, out0)
            del out0
            fn = lambda i: torch._grouped_mm(mats[i], b, offs=offs)
            t = self._timing(fn, len(mats))
        self._record("gemm1", "torch", t, flops, nbytes, note=f"torch {torch.__version__}, {note}")

    def _cross_check(self, inp, w1, torch_out) -> str:
        """torch and CUBLAS_GROUPED multiply the same packed rows: their results must agree."""
        cp = self.cp
        try:
            ours = self.api.expert_gemm(inp, w1).astype(cp.float32)
            theirs = cp.from_dlpack(torch_out.detach()).astype(cp.float32)
            err = float(cp.linalg.norm(theirs - ours) / max(float(cp.linalg.norm(ours)), 1e-30))
        except Exception as exc:
            return f"; unchecked ({_err(exc)})"
        return f"; CHECK FAILED vs cublas_grouped: rel.err {err:.2g}" if err > 3e-2 else ""

    # -- whole layer ---------------------------------------------------------------------------------------
    def run_layer(self) -> None:
        c = self.case
        w1 = self.weights.get(c, "w1")
        w2 = self.weights.get(c, "w2")
        nbytes = layer_weight_bytes(c, self.active)
        per_set = (2 * c.tokens * c.hidden + c.pairs * (2 * c.hidden + c.n1 + c.inter)) * c.itemsize
        sets, copy_w = self._sets(per_set + nbytes, w1.nbytes + w2.nbytes)
        xs = self._inputs(sets)
        w1s = [w1] + [w1.copy() for _ in range(sets - 1)] if copy_w else [w1]
        w2s = [w2] + [w2.copy() for _ in range(sets - 1)] if copy_w else [w2]
        note = None if sets == 1 or copy_w else "weights not rotated"
        methods = ALGORITHMS + ("auto",) + (("sync-free",) if c.phase == "decode" else ())
        for method in self._ordered(methods):
            self._guarded("layer", method, lambda m=method: self._layer(m, xs, w1s, w2s, nbytes, note))
        route_ms: list[float | None] = [None]
        self._guarded("route", "route", lambda: route_ms.__setitem__(0, self._route(sets)))
        self._guarded("split", "auto", lambda: self._split(xs, w1s, w2s, route_ms[0]))
        if c.phase == "decode" and self.api.StaticMoE is not None:
            self._guarded("graph", "static-graph", lambda: self._graph(xs, w1, w2, nbytes))

    def _layer(self, method, xs, w1s, w2s, nbytes, note) -> None:
        c = self.case
        if method not in ("auto", "sync-free"):
            rows = layout_rows(method, self.counts)
            skip = self._fits(rows * (2 * c.hidden + c.n1 + c.inter) * c.itemsize * len(xs))
            if skip:
                self._result("layer", method, error=skip)
                return
        fwd = self.api.moe_forward
        if method == "sync-free":  # moe_forward's no-host-copy decode path (eager, not captured)
            kw = {"sync_free": True}
        else:
            kw = {"algorithm": method}
        fn = lambda i: fwd(xs[i], self.ids, self.wts, w1s[i % len(w1s)], w2s[i % len(w2s)], **kw)
        t = self._timing(fn, len(xs))
        chosen = None
        if method == "auto":
            try:  # what AUTO picks for the first GEMM (a label only: the time above stands)
                probe = self.api.prepare_input(
                    xs[0], (self.wts, self.ids), c.experts, algorithm="auto", gemm_n=c.n1
                )
                chosen = getattr(probe.algorithm, "value", str(probe.algorithm))
            except Exception:
                chosen = None
        self._record("layer", method, t, layer_flops(c), nbytes, algorithm=chosen, note=note)

    def _route(self, sets: int) -> float:
        c = self.case
        logits = [
            random_normal((c.tokens, c.experts), "float32", 1.0, _case_seed(c.name, 2000 + s))
            for s in range(sets)
        ]
        t = self._timing(lambda i: self.api.route(logits[i], c.top_k), sets)
        self._record("route", "route", t, None, None)
        return t["median"]

    def _split(self, xs, w1s, w2s, route_ms: float | None) -> None:
        cp = self.cp
        runs = []
        for i in range(max(10, min(self.args.repeat, 20))):
            timer = self.api.StageTimer()
            s = i % len(xs)
            self.api.moe_forward(
                xs[s], self.ids, self.wts, w1s[s % len(w1s)], w2s[s % len(w2s)], algorithm="auto", timer=timer
            )
            cp.cuda.runtime.deviceSynchronize()
            runs.append(dict(timer.times_ms()))
        stages = list(runs[0])
        median = {s: float(np.median([r.get(s, 0.0) for r in runs])) for s in stages}
        pct = overhead_pct(median, route_ms)
        gemm = sum(median.get(s, 0.0) for s in GEMM_STAGES)
        rest = sum(median.get(s, 0.0) for s in OVERHEAD_STAGES) + (route_ms or 0.0)
        missing = [s for s in OVERHEAD_STAGES + GEMM_STAGES if s not in median]
        self._result(
            "split",
            "auto",
            ms=sum(median.values()),
            extra={
                "stages_ms": median,
                "route_ms": route_ms,
                "overhead_pct": pct,
                "gemm_ms": gemm,
                "non_gemm_ms": rest,
                "runs": runs,
            },
            note=f"missing stages {missing}" if missing else None,
        )

    def _graph(self, xs, w1, w2, nbytes) -> None:
        cp, c = self.cp, self.case
        static = self.api.StaticMoE(w1, w2, c.top_k, c.tokens, gated=c.gated, activation="silu")
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            static.forward(xs[0], self.ids, self.wts)  # compiles and allocates outside the capture
            stream.synchronize()
            graphs = []
            for x in xs:
                stream.begin_capture()
                static.forward(x, self.ids, self.wts)
                graphs.append(stream.end_capture())
            t = self._timing(lambda i: graphs[i].launch(stream), len(graphs))
        floor_ms = nbytes / (self.args.hbm_gbs * 1e9) * 1e3
        r = self._record(
            "graph",
            "static-graph",
            t,
            layer_flops(c),
            nbytes,
            note=f"floor {floor_ms:.3f} ms = {100 * floor_ms / t['median']:.0f}% of it",
        )
        r.extra.update(floor_ms=floor_ms, floor_ratio=floor_ms / t["median"])


def _case_error(case: Case, section: str, message: str) -> Result:
    """A whole section of a case that could not run, and why."""
    return Result(case.name, case.model, case.tokens, case.routing, case.phase, section, "all", error=message)


def merge_passes(results: Sequence[Result]) -> list[Result]:
    """Pool the samples of a case's repeated (section, method) measurements.

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


def _routing_stats(runner: CaseRunner) -> dict:
    counts = runner.counts
    mean = counts.sum() / len(counts)
    return {
        "active_experts": runner.active,
        "max_rows": int(counts.max()),
        "mean_rows": float(mean),
        "max_over_mean": float(counts.max() / mean) if mean else 0.0,
    }


def run_all(cases: Sequence[Case], args: argparse.Namespace, api) -> tuple[list[Result], list[dict]]:
    """Run every case; one progress line per case on stderr. Returns the results and case stats."""
    results: list[Result] = []
    stats: list[dict] = []
    weights = WeightCache(args.seed)
    start = time.monotonic()
    limit_s = args.max_minutes * 60 if args.max_minutes and args.max_minutes > 0 else math.inf
    for index, case in enumerate(cases, 1):
        elapsed = time.monotonic() - start
        if elapsed > limit_s:
            results.append(_case_error(case, "gemm1", f"skipped: --max-minutes {args.max_minutes:g} reached"))
            continue
        t0 = time.monotonic()
        try:
            runner = CaseRunner(case, args, api, weights)
        except Exception as exc:
            results.append(_case_error(case, "gemm1", f"setup: {_err(exc)}"))
            weights.clear()
            continue
        st = _routing_stats(runner)
        stats.append({**asdict(case), "name": case.name, **st})
        print(
            f"[{index}/{len(cases)}] {case.name}: E={case.experts} k={case.top_k} H={case.hidden} "
            f"I={case.inter} {case.dtype}, {st['active_experts']} active, busiest {st['max_rows']} rows "
            f"= {st['max_over_mean']:.1f}x mean ...",
            file=sys.stderr,
            end="",
            flush=True,
        )
        sections = [("gemm1", runner.run_gemm1), ("layer", runner.run_layer)]
        for index_pass, (section, body) in ((p, sec) for p in range(args.passes) for sec in sections):
            if section == "layer" and args.no_layer:
                continue
            runner.reverse = index_pass % 2 == 1
            try:
                body()
            except Exception as exc:  # setup of the section itself (weights, inputs)
                runner.results.append(_case_error(case, section, f"setup: {_err(exc)}"))
                weights.clear()
        errors = sum(1 for r in runner.results if r.error and not r.error.startswith(("skipped", "n/a")))
        print(
            f" {time.monotonic() - t0:.1f}s" + (f", {errors} errors" if errors else ""),
            file=sys.stderr,
            flush=True,
        )
        results.extend(merge_passes(runner.results))
        del runner
        free_pool()
    weights.clear()
    return results, stats


def write_json(
    path: str,
    env: dict,
    args: argparse.Namespace,
    stats: list[dict],
    results: list[Result],
    targets: list[str],
) -> None:
    """Every number, the settings and the environment, as JSON."""
    import json
    from pathlib import Path

    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    doc = {
        "environment": env,
        "settings": settings,
        "cases": stats,
        "results": [asdict(r) for r in results],
        "targets": targets,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cublas_grouped.bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = build_cases(args)
    reason = no_gpu_reason()
    if reason is not None:
        print(
            f"cublas_grouped.bench: cannot run: {reason}. The benchmark needs an NVIDIA GPU.", file=sys.stderr
        )
        return 2
    try:
        api = _load_api()
    except ImportError as exc:
        print(f"cublas_grouped.bench: cannot run: {exc}", file=sys.stderr)
        return 2
    env = environment(argv)
    measured, copy_error = None, None
    try:
        measured = measure_copy_gbs()
    except Exception as exc:  # out of memory, say: the datasheet or the flag still serve
        copy_error = _err(exc)
    args.hbm_gbs, hbm_source = resolve_hbm(args.hbm_gbs, env.get("gpu", ""), measured)
    env.update(hbm_gbs=args.hbm_gbs, hbm_source=hbm_source, hbm_copy_gbs=measured)
    facts = hbm_lines(args.hbm_gbs, hbm_source, measured, copy_error) + _auto_lines()
    print(
        f"cublas_grouped.bench: {len(cases)} cases on {env.get('gpu', '?')} (cuBLAS "
        f"{env.get('cublas_version', '?')}), warm-up {args.warmup}, repeat {args.repeat}",
        file=sys.stderr,
    )
    print("\n".join(facts), file=sys.stderr)
    results, stats = run_all(cases, args, api)
    # Again after the run: AUTO may have measured shapes on first sight meanwhile.
    env["auto_table"] = _auto_lines()
    if "torch" in sys.modules:
        env["torch"] = getattr(sys.modules["torch"], "__version__", "?")
    targets = evaluate_targets(results, args.hbm_gbs)
    if args.json:
        write_json(args.json, env, args, stats, results, targets)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        message = plot(args.plot, results)
        print(message or f"wrote {args.plot}", file=sys.stderr)
    split = format_split(results)
    if split:
        print(split)
        print()
    print(
        f"{env.get('gpu', '?')}, cuBLAS {env.get('cublas_version', '?')}, {args.dtype}; "
        f"%HBM of {args.hbm_gbs:g} GB/s (decode rows)"
    )
    print("\n".join(hbm_lines(args.hbm_gbs, hbm_source, measured, copy_error) + env["auto_table"]))
    print(format_table(results))
    print()
    print("Targets:")
    print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
