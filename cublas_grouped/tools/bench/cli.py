"""The command line of ``python -m cublas_grouped.bench``: arguments, the run, the printed report."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Callable, Sequence

import numpy as np

from .clocks import format_clocks
from .gpu import describe_error, hbm_lines, measure_copy_gbs, no_gpu_reason, resolve_hbm
from .host import format_host, run_host_section
from .report import evaluate_targets, format_split, format_table, plot, write_json
from .runner import load_api, run_all
from .workloads import DTYPE_BYTES, MODELS, build_cases

__all__ = ["build_parser", "parse_args", "environment", "auto_table_lines", "main"]


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
    run.add_argument(
        "--warmup", type=int, default=None, help="untimed calls (rounds) first (default 5; --quick 3)"
    )
    run.add_argument(
        "--timing",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved (default): the methods of a case and section are timed round-robin, each "
        "round calling every method once in a rotating order, so a GPU clock that drifts during "
        "the run moves every method alike; sequential: all calls of one method, then the next",
    )
    run.add_argument(
        "--passes",
        type=_positive(int),
        default=None,
        help="time every section this many times per case and pool the samples; sequential "
        "timing alternates forward and reverse order (default 1 interleaved, 2 sequential)",
    )
    run.add_argument(
        "--repeat",
        type=_positive(int),
        default=None,
        help="timed calls (rounds) per method (default 100; --quick 20; cases whose calls are long "
        "shrink toward 20, about 2 s of calls per method). Decode-sized layers synchronize inside each "
        "call, so their times spread: over 30 calls, AUTO and the algorithm it ran differed by up to 12%%, "
        "over 200 by 1.4%%",
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
    run.add_argument(
        "--fp8", action="store_true", help="also time the first GEMM with FP8 weights (bf16 on SM 9.0)"
    )
    host = p.add_argument_group("host overhead (CPU us per eager call on tiny problems)")
    host.add_argument("--no-host", action="store_true", help="skip the host-overhead section")
    host.add_argument("--host-only", action="store_true", help="run the host-overhead section only")
    host.add_argument(
        "--host-profile",
        metavar="PATH",
        default=None,
        help="also write a cProfile report of each entry point",
    )
    run.add_argument(
        "--backward", action="store_true", help="time the layer's backward against its forward (and torch)"
    )
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
        With ``warmup``, ``repeat``, ``passes`` and ``routings`` (a list) resolved.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if args.repeat is None:
        args.repeat = 20 if args.quick else 100
    if args.passes is None:
        args.passes = 2 if args.timing == "sequential" else 1
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
        env["gpu_error"] = describe_error(exc)
    for key, getter in (
        ("cuda_runtime", cupy.cuda.runtime.runtimeGetVersion),
        ("cuda_driver", cupy.cuda.runtime.driverGetVersion),
    ):
        try:
            env[key] = getter()
        except Exception as exc:
            env[key] = describe_error(exc)
    return env


def auto_table_lines() -> list[str]:
    """Which tuning table AUTO uses on this GPU and why, and what it measured."""
    try:
        import cublas_grouped as cg
        from cublas_grouped.gemm.autotune import describe_auto

        return describe_auto(cg.device_info())
    except Exception as exc:
        return [f"AUTO tuning table: unknown ({describe_error(exc)})"]


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
    if args.backward:
        from .backward import run_backward

        return run_backward(args)
    try:
        api = load_api()
    except ImportError as exc:
        print(f"cublas_grouped.bench: cannot run: {exc}", file=sys.stderr)
        return 2
    env = environment(argv)
    measured, copy_error = None, None
    try:
        measured = measure_copy_gbs()
    except Exception as exc:  # out of memory, say: the datasheet or the flag still serve
        copy_error = describe_error(exc)
    args.hbm_gbs, hbm_source = resolve_hbm(args.hbm_gbs, env.get("gpu", ""), measured)
    env.update(hbm_gbs=args.hbm_gbs, hbm_source=hbm_source, hbm_copy_gbs=measured)
    facts = hbm_lines(args.hbm_gbs, hbm_source, measured, copy_error) + auto_table_lines()
    print(
        f"cublas_grouped.bench: {len(cases)} cases on {env.get('gpu', '?')} (cuBLAS "
        f"{env.get('cublas_version', '?')}), warm-up {args.warmup}, repeat {args.repeat}, "
        f"{args.timing} timing",
        file=sys.stderr,
    )
    print("\n".join(facts), file=sys.stderr)
    host_rows = []
    if not args.no_host:
        host_rows = run_host_section(profile_path=args.host_profile, torch_ok=not args.no_torch)
        print(format_host(host_rows), file=sys.stderr)
    if args.host_only:
        if args.json:
            write_json(args.json, env, args, {}, [], [], host=host_rows)
        print(format_host(host_rows))
        return 0
    results, stats = run_all(cases, args, api)
    # Again after the run: AUTO may have measured shapes on first sight meanwhile.
    env["auto_table"] = auto_table_lines()
    if "torch" in sys.modules:
        env["torch"] = getattr(sys.modules["torch"], "__version__", "?")
    targets = evaluate_targets(results, args.hbm_gbs)
    if args.json:
        write_json(args.json, env, args, stats, results, targets, host=host_rows)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        message = plot(args.plot, results)
        print(message or f"wrote {args.plot}", file=sys.stderr)
    split = format_split(results)
    if split:
        print(split)
        print()
    clocks = format_clocks(results)
    if clocks:
        print(clocks)
        print()
    print(
        f"{env.get('gpu', '?')}, cuBLAS {env.get('cublas_version', '?')}, {args.dtype}; "
        f"%HBM of {args.hbm_gbs:g} GB/s (decode rows)"
    )
    print("\n".join(hbm_lines(args.hbm_gbs, hbm_source, measured, copy_error) + env["auto_table"]))
    print(format_table(results))
    print()
    if host_rows:
        print(format_host(host_rows))
        print()
    print("Targets:")
    print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
