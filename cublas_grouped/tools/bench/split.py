"""The benchmark's stage split of one layer: milliseconds per stage of
``moe_forward`` (route, plan, gather, GEMM 1, activation, GEMM 2, combine),
from a :class:`~cublas_grouped.StageTimer`'s marks, median of repeated calls.

The fused layer (w1 packed, on SM 9.0) waits for nothing, so its split is
timed with the stream held (:func:`.gpu.hold_stream`, :data:`SPLIT_HOLD_MS`)
while the call queues: each stage is then the GPU's own time, as in
back-to-back eager calls, where the host queues ahead. Runs without the hold
alternate with those (``extra["unheld"]``: the split as the host paces it,
the judged one before 2026-11-27 16:30 UTC, when every call still waited for
its count of bad ids). AUTO's layer copies its counts to the host mid-call,
so no hold would outlast it: its split is timed as the host paces it.
"""

from __future__ import annotations

import numpy as np

from .fused_layer import FUSED_METHOD
from .gpu import hold_stream
from .report import GEMM_STAGES, OVERHEAD_STAGES, Result, overhead_pct

__all__ = ["SPLIT_HOLD_MS", "time_split", "split_medians"]

# How long the stream is held while a fused call queues (the host's queuing
# of a layer took 0.12-0.19 ms on the H200 machine, 2026-11-27).
SPLIT_HOLD_MS = 2.0


def time_split(runner, xs, w1s, w2s, route_ms: float | None, method: str = "auto") -> Result:
    """The split row of ``runner``'s case: AUTO's layer, or (``method``
    "fused") the layer with w1 packed, over the input sets ``xs`` and the
    weights ``w1s``, ``w2s`` (rotated); ``route_ms`` is added to the non-GEMM time."""
    cp = runner.cp
    held_runs, unheld_runs = [], []
    layout = "gate_up_blocked" if method == FUSED_METHOD else "gate_up"
    hold = method == FUSED_METHOD
    for i in range(max(10, min(runner.args.repeat, 20)) * (2 if hold else 1)):
        timer = runner.api.StageTimer()
        s = (i // 2 if hold else i) % len(xs)
        w1, w2 = w1s[s % len(w1s)], w2s[s % len(w2s)]
        held = hold and i % 2 == 0
        if held:
            hold_stream(SPLIT_HOLD_MS)
        runner.api.moe_forward(xs[s], runner.ids, runner.wts, w1, w2, timer=timer, w1_layout=layout)
        cp.cuda.runtime.deviceSynchronize()
        (held_runs if held or not hold else unheld_runs).append(dict(timer.times_ms()))
    median, extra = split_medians(held_runs, route_ms)
    if unheld_runs:
        extra["unheld"] = split_medians(unheld_runs, route_ms)[1]
        extra["unheld"].pop("runs")
    missing = [s for s in OVERHEAD_STAGES + GEMM_STAGES if s not in median]
    return runner.result(
        "split",
        method,
        ms=sum(median.values()),
        extra=extra,
        note=f"missing stages {missing}" if missing else None,
    )


def split_medians(runs: list[dict], route_ms: float | None) -> tuple[dict, dict]:
    """(median ms per stage, a split row's ``extra``) of timed runs."""
    stages = list(runs[0])
    median = {s: float(np.median([r.get(s, 0.0) for r in runs])) for s in stages}
    gemm = sum(median.get(s, 0.0) for s in GEMM_STAGES)
    rest = sum(median.get(s, 0.0) for s in OVERHEAD_STAGES) + (route_ms or 0.0)
    extra = {
        "stages_ms": median,
        "route_ms": route_ms,
        "overhead_pct": overhead_pct(median, route_ms),
        "gemm_ms": gemm,
        "non_gemm_ms": rest,
        "runs": runs,
    }
    return median, extra
