"""CUDA-event timing of GPU work, for the benchmark, the tuner and AUTO's measurements.

Every timed call sits between two ``cupy.cuda.Event`` records on the current
stream, so the number is GPU time from the first kernel of the call to the
last, including any gaps the host leaves while launching (a loop of many
small launches is charged for them, as it should be). Calls are warmed up
first; the statistic reported is the median of the timed repeats.

Rotation: small problems would otherwise be served from the 50 MB L2 cache on
every repeat, which no real layer enjoys. Callers build several input sets
(:func:`rotation_count` says how many) and ``fn(i)`` uses set ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["time_ms", "rotation_count", "summarize", "L2_BYTES"]

# H100 L2 size; rotating through at least twice this evicts a set before it returns.
L2_BYTES = 50 * 1000 * 1000


def summarize(samples: list[float]) -> dict:
    """Median, 10th and 90th percentile of ``samples`` (milliseconds).

    Parameters
    ----------
    samples : list of float
        One duration per timed call.

    Returns
    -------
    dict
        ``median``, ``p10``, ``p90`` (floats) and ``samples`` (the list as given).
    """
    if not samples:
        raise ValueError("summarize needs at least one sample")
    arr = np.asarray(samples, dtype=np.float64)
    return {
        "median": float(np.median(arr)),
        "p10": float(np.percentile(arr, 10)),
        "p90": float(np.percentile(arr, 90)),
        "samples": [float(s) for s in arr],
    }


def rotation_count(
    bytes_per_set: int,
    *,
    l2_bytes: int = L2_BYTES,
    factor: float = 2.0,
    max_sets: int = 16,
    budget_bytes: int | None = None,
) -> int:
    """How many input sets to rotate through so that the L2 cache cannot hold them all.

    Parameters
    ----------
    bytes_per_set : int
        Bytes one call reads and writes that belong to its own set.
    l2_bytes : int
        L2 cache size of the GPU.
    factor : float
        The sets together should exceed ``factor * l2_bytes``.
    max_sets : int
        Upper bound on the count.
    budget_bytes : int, optional
        Memory the extra sets may use in all; the count never exceeds
        ``budget_bytes // bytes_per_set`` (but is at least 1).

    Returns
    -------
    int
        Between 1 and ``max_sets``.
    """
    if bytes_per_set <= 0:
        return 1
    wanted = math.ceil(factor * l2_bytes / bytes_per_set)
    count = max(1, min(wanted, max_sets))
    if budget_bytes is not None:
        count = max(1, min(count, budget_bytes // bytes_per_set))
    return int(count)


def time_ms(
    fn: Callable[[int], object],
    *,
    warmup: int = 5,
    repeat: int = 30,
    rotate: int | None = None,
    min_repeat: int | None = None,
    budget_ms: float | None = None,
    stream=None,
) -> dict:
    """Time ``fn(i)`` with CUDA events on ``stream`` (default: the current CuPy stream).

    Parameters
    ----------
    fn : callable
        Called as ``fn(i)`` with ``i`` the rotation index (``call % rotate``);
        it must enqueue its GPU work on the current stream.
    warmup : int
        Untimed calls first (compilation, allocator, cuBLAS heuristics).
    repeat : int
        Timed calls.
    rotate : int, optional
        Number of input sets ``fn`` rotates through; ``None`` means one.
    min_repeat, budget_ms : optional
        When both are given, ``repeat`` shrinks (never below ``min_repeat``)
        so that the timed calls take about ``budget_ms`` in all, judged from
        one timed probe call after the warm-up. Keeps huge cases affordable
        without dropping below a trustworthy sample count.
    stream : cupy.cuda.Stream, optional
        The stream ``fn`` enqueues its work on; the events are recorded there.

    Returns
    -------
    dict
        ``median``, ``p10``, ``p90`` in milliseconds and ``samples``, the
        time of every timed call.
    """
    import cupy

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    sets = max(1, int(rotate or 1))
    if stream is None:
        stream = cupy.cuda.get_current_stream()
    call = 0
    for _ in range(max(0, warmup)):
        fn(call % sets)
        call += 1
    stream.synchronize()

    if budget_ms is not None and min_repeat is not None and repeat > min_repeat:
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        fn(call % sets)
        call += 1
        end.record(stream)
        end.synchronize()
        probe = cupy.cuda.get_elapsed_time(start, end)
        if probe > 0:
            repeat = max(min_repeat, min(repeat, int(budget_ms / probe)))

    # One event pair per call: the spread (p10/p90) is real, not an average.
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeat)]
    for start, end in events:
        start.record(stream)
        fn(call % sets)
        call += 1
        end.record(stream)
    events[-1][1].synchronize()
    return summarize([cupy.cuda.get_elapsed_time(start, end) for start, end in events])
