"""Host overhead of eager calls: CPU microseconds per call of each public entry point.

Decode steps and small prefill chunks run eagerly in many CuPy pipelines, and
there the host, not the GPU, sets the pace. Each entry point is called on a
problem whose GPU work is tiny, ``repeat`` times in a row with no
synchronization inside the loop (the calls that must copy counts to the host
synchronize by themselves, as they would in a pipeline), after a warm-up;
the figure is the median over ``batches`` loops of the loop's wall time per
call. Peers (``torch._grouped_mm``, ``torch.mm``, ``cupy.matmul``) run the
same way when present.

``python -m cublas_grouped.bench --host`` prints this section; its targets
are in :data:`HOST_TARGETS_US`. ``--host-profile PATH`` also writes a
cProfile of each entry point (for finding where the time goes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["HostCase", "host_cases", "time_host_us", "run_host_section", "format_host", "HOST_TARGETS_US"]

# Targets (us per call) of the eager entry points, measured on the GPU machine's host.
HOST_TARGETS_US = {
    "gmm tiny, host sizes (auto)": 30.0,
    "gmm tiny, device sizes (auto)": 25.0,
    "moe_forward T=1 qwen3 (auto)": 120.0,
    "moe_forward T=1 qwen3 fixed_capacity": 80.0,
    "FixedCapacityMoE.forward T=1 qwen3": 60.0,
    "route T=1 E=128 k=8": 15.0,
}


@dataclass
class HostCase:
    """One timed call: ``fn()`` runs it once; ``peer`` marks other libraries."""

    name: str
    fn: Callable[[], object]
    peer: bool = False


def time_host_us(fn: Callable[[], object], repeat: int = 300, batches: int = 5, warmup: int = 20) -> float:
    """Median over ``batches`` of the wall time per call of ``repeat`` back-to-back calls (us)."""
    import cupy

    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    per_call = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        per_call.append((time.perf_counter() - start) / repeat * 1e6)
        cupy.cuda.get_current_stream().synchronize()
    return float(np.median(per_call))


def host_cases(torch_ok: bool = True) -> list[HostCase]:
    """The entry points and peers, on tiny problems (bf16), set up on the current device."""
    import cupy

    import cublas_grouped as cg

    rng = np.random.default_rng(0)
    bf16 = "bfloat16"

    def rand(*shape, dtype=bf16):
        return cupy.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(dtype)

    cases: list[HostCase] = []
    # gmm: E=4, 16 rows x 256 x 256
    a, b = rand(16, 256), rand(4, 256, 256)
    sizes_host = np.array([4, 4, 4, 4], dtype=np.int64)
    sizes_dev = cupy.asarray(sizes_host)
    out = cupy.empty((16, 256), dtype=bf16)
    for alg in ("auto", "cublas_grouped", "sequential", "chunked_batched"):
        cases.append(
            HostCase(f"gmm tiny, host sizes ({alg})", lambda alg=alg: cg.gmm(a, b, sizes_host, algorithm=alg))
        )
    cases.append(HostCase("gmm tiny, host sizes, out= (auto)", lambda: cg.gmm(a, b, sizes_host, out=out)))
    cases.append(HostCase("gmm tiny, device sizes (auto)", lambda: cg.gmm(a, b, sizes_dev)))
    info = cg.device_info()
    if info.sm[0] == 9:
        b_t = rand(4, 256, 256)
        cases.append(
            HostCase(
                "gmm tiny, device sizes (sm90_grouped, trans_b)",
                lambda: cg.gmm(a, b_t, sizes_dev, trans_b=True, algorithm="sm90_grouped"),
            )
        )
    # route and the layer at T=1, Qwen3-30B-A3B shape: E=128, k=8, H=2048, I=768
    e, k, h, inter = 128, 8, 2048, 768
    logits = rand(1, e, dtype=np.float32)
    cases.append(HostCase("route T=1 E=128 k=8", lambda: cg.route(logits, k)))
    x = rand(1, h)
    w1, w2 = rand(e, h, 2 * inter), rand(e, inter, h)
    weights, ids = cg.route(logits, k)
    cases.append(HostCase("moe_forward T=1 qwen3 (auto)", lambda: cg.moe_forward(x, ids, weights, w1, w2)))
    cases.append(
        HostCase(
            "moe_forward T=1 qwen3 fixed_capacity",
            lambda: cg.moe_forward(x, ids, weights, w1, w2, fixed_capacity=True),
        )
    )
    fixed = cg.FixedCapacityMoE(w1, w2, top_k=k, max_tokens=1)
    cases.append(HostCase("FixedCapacityMoE.forward T=1 qwen3", lambda: fixed.forward(x, ids, weights)))
    # peers
    a32 = cupy.asarray(rng.standard_normal((16, 256), dtype=np.float32))
    b32 = cupy.asarray(rng.standard_normal((256, 256), dtype=np.float32))
    cases.append(HostCase("cupy.matmul tiny", lambda: cupy.matmul(a32, b32), peer=True))
    if torch_ok:
        try:
            import torch

            ta = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
            tb = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16)
            offs = torch.tensor([4, 8, 12, 16], device="cuda", dtype=torch.int32)
            tm = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            cases.append(
                HostCase("torch._grouped_mm E=4 tiny", lambda: torch._grouped_mm(ta, tb, offs=offs), True)
            )
            cases.append(HostCase("torch.mm tiny", lambda: torch.mm(ta, tm), peer=True))
        except Exception:  # no torch, or no _grouped_mm on this build: the peers are optional
            pass
    return cases


def run_host_section(repeat: int = 300, profile_path: str | None = None, torch_ok: bool = True) -> list[dict]:
    """Time every host case; returns rows ``{name, us, target_us, peer}``.
    With ``profile_path``, also writes a cProfile text report of each case there."""
    rows = []
    profiles = []
    try:
        cases = host_cases(torch_ok)
    except Exception as exc:  # out of memory, say: the section reports it and the run goes on
        return [
            {"name": "host-overhead set-up", "us": None, "target_us": None, "peer": False, "error": _why(exc)}
        ]
    for case in cases:
        row = {"name": case.name, "us": None, "target_us": HOST_TARGETS_US.get(case.name), "peer": case.peer}
        try:
            row["us"] = time_host_us(case.fn, repeat=repeat)
            if profile_path and not case.peer:
                profiles.append(_profile(case))
        except Exception as exc:
            row["error"] = _why(exc)
        rows.append(row)
    if profile_path:
        with open(profile_path, "w") as f:
            f.write("\n\n".join(profiles))
    return rows


def _why(exc: BaseException) -> str:
    from .gpu import describe_error

    return describe_error(exc)


def _profile(case: HostCase, calls: int = 300) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        case.fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return f"=== {case.name} ({calls} calls)\n{text.getvalue()}"


def format_host(rows: list[dict]) -> str:
    """The host-overhead table with each target's PASS/MISS."""
    lines = ["Host overhead, CPU us per eager call (median of 5 loops):", f"{'call':48s} {'us':>8s}  target"]
    for r in rows:
        if r["us"] is None:
            lines.append(f"{r['name']:48s} {'failed':>8s}  {r.get('error', '')}")
            continue
        target = r["target_us"]
        verdict = "" if target is None else f"<= {target:g}: {'PASS' if r['us'] <= target else 'MISS'}"
        lines.append(f"{r['name']:48s} {r['us']:8.1f}  {'peer' if r['peer'] else verdict}")
    return "\n".join(lines)
