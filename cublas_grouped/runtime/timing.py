"""CUDA-event timing of GPU work, for the benchmark, the tuner and AUTO's measurements.

Every timed call sits between two ``cupy.cuda.Event`` records on the current
stream, so the number is GPU time from the first kernel of the call to the
last, including any gaps the host leaves while launching (a loop of many
small launches is charged for them, as it should be). Calls are warmed up
first; the statistic reported is the median of the timed repeats.

Comparing methods: a GPU's clock drifts during a run (one algorithm measured
1.21 ms in one pass and 1.55 ms in the next), so methods timed one after
another are compared at different clocks. :func:`time_interleaved` runs
rounds instead: each round calls every method once, in an order that rotates
from round to round, each call between its own pair of CUDA events; a
method's time is its median over the rounds, and drift moves every method's
samples alike. The benchmark, the tuner and AUTO's measurements compare
algorithms this way. :func:`time_sequential` is the earlier scheme (all calls
of one method, then the next). :func:`time_each_alone` waits for every call
before the next, so each starts on an idle GPU (what one call alone costs,
its host work before the first launch included; the development probes).

Rotation: small problems would otherwise be served from the 50 MB L2 cache on
every repeat, which no real layer enjoys. Callers build several input sets
(:func:`rotation_count` says how many) and ``fn(i)`` uses set ``i``.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "time_ms",
    "rotation_count",
    "summarize",
    "round_order",
    "time_interleaved",
    "time_sequential",
    "no_garbage_collection",
    "L2_BYTES",
    "time_each_alone",
]

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
    hold: Callable[[], object] | None = None,
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
    hold : callable, optional
        Called once before the timed calls, to queue GPU work that keeps
        ``stream`` busy while the host queues them: then each call's time is
        its GPU time even where the host takes longer to launch it than the
        GPU to run it (a short kernel behind a Python call). Without it, such
        a call's time is the host's pace.

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
    with no_garbage_collection():
        if hold is not None:
            hold()
        for start, end in events:
            start.record(stream)
            fn(call % sets)
            call += 1
            end.record(stream)
        events[-1][1].synchronize()
    return summarize([cupy.cuda.get_elapsed_time(start, end) for start, end in events])


@contextlib.contextmanager
def no_garbage_collection():
    """Python's cyclic garbage collector off while timing (as ``timeit`` does).

    Calls that synchronize inside (the layer copies its counts to the host)
    leave the GPU idle while the host works, so a collection pause that lands
    in one call shows in its GPU time; which call it lands in is chance, and
    on decode-sized layers it moved medians by several percent.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def round_order(count: int, round_index: int) -> list[int]:
    """The order in which round ``round_index`` calls ``count`` methods.

    Rounds come in pairs: rotated forward by ``round_index // 2``, then the
    same rotation reversed. Over ``2 * count`` rounds every method takes every
    position exactly twice, and follows each of its two neighbours equally
    often, so neither its place in the round nor the method before it (the
    heat or the cache state it leaves) favours a method.
    """
    shift = (round_index // 2) % count
    order = [(shift + j) % count for j in range(count)]
    return order[::-1] if round_index % 2 else order


def time_interleaved(
    fns: Sequence[Callable[[int], object]],
    *,
    sets: Sequence[int] | None = None,
    warmup: int = 5,
    repeat: int = 30,
    min_repeat: int | None = None,
    budget_ms: float | None = None,
    stream=None,
) -> list[dict | Exception]:
    """Time ``fns`` round-robin with CUDA events on ``stream`` (default: the current CuPy stream).

    Parameters
    ----------
    fns : sequence of callables
        Method ``m`` is called as ``fns[m](i)``, ``i`` its input set (its own
        call count modulo ``sets[m]``); it must enqueue its work on the stream.
    sets : sequence of int, optional
        Input sets each method rotates through (default one each).
    warmup : int
        Untimed rounds first (compilation, allocator, cuBLAS heuristics).
    repeat : int
        Timed rounds: samples per method.
    min_repeat, budget_ms : optional
        When both are given, the rounds shrink (never below ``min_repeat``)
        so that the timed calls take about ``budget_ms`` per method, judged
        from one probe round after the warm-up (its samples are not kept).
    stream : cupy.cuda.Stream, optional

    Returns
    -------
    list
        Per method, in the order of ``fns``: :func:`summarize`'s dict, or the
        exception its first failing call raised (it is not called again).
    """
    import cupy

    count = len(fns)
    if count == 0:
        return []
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    sets = [max(1, int(s)) for s in (sets or [1] * count)]
    if stream is None:
        stream = cupy.cuda.get_current_stream()
    calls = [0] * count
    failed: list[Exception | None] = [None] * count

    def call(m: int) -> None:
        try:
            fns[m](calls[m] % sets[m])
        except Exception as exc:
            failed[m] = exc
        calls[m] += 1

    def timed_round(index: int, events: list[list]) -> None:
        for m in round_order(count, index):
            if failed[m] is None:
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(stream)
                call(m)
                end.record(stream)
                events[m].append((start, end))

    index = 0
    for _ in range(max(0, warmup)):
        for m in round_order(count, index):
            if failed[m] is None:
                call(m)
        index += 1
    stream.synchronize()

    if budget_ms is not None and min_repeat is not None and repeat > min_repeat:
        probe: list[list] = [[] for _ in range(count)]
        timed_round(index, probe)
        index += 1
        stream.synchronize()
        live = [pairs[0] for m, pairs in enumerate(probe) if pairs and failed[m] is None]
        round_ms = sum(cupy.cuda.get_elapsed_time(start, end) for start, end in live)
        if round_ms > 0:
            repeat = max(min_repeat, min(repeat, int(budget_ms * len(live) / round_ms)))

    # One event pair per call: the spread (p10/p90) is real, not an average.
    events: list[list] = [[] for _ in range(count)]
    with no_garbage_collection():
        for _ in range(repeat):
            timed_round(index, events)
            index += 1
        stream.synchronize()
    return [
        failed[m]
        if failed[m] is not None
        else summarize([cupy.cuda.get_elapsed_time(start, end) for start, end in events[m]])
        for m in range(count)
    ]


def time_sequential(
    fns: Sequence[Callable[[int], object]],
    *,
    sets: Sequence[int] | None = None,
    order: Sequence[int] | None = None,
    **kwargs,
) -> list[dict | Exception]:
    """Time each of ``fns`` on its own with :func:`time_ms`
    (warm-up, then all its calls), one method after another in ``order``.

    Takes :func:`time_interleaved`'s arguments and returns the same list.
    """
    sets = list(sets or [1] * len(fns))
    out: list[dict | Exception | None] = [None] * len(fns)
    for m in order if order is not None else range(len(fns)):
        try:
            out[m] = time_ms(fns[m], rotate=sets[m], **kwargs)
        except Exception as exc:
            out[m] = exc
    return out


def time_each_alone(
    fns: Sequence[Callable[[], object]], *, rounds: int, warmup: int, stream
) -> list[list[float]]:
    """Per method, the milliseconds of each timed round: ``fns`` called in
    turns (the order reversed every other round), each call between two
    events on ``stream`` (a CuPy stream, made current for it) and waited for
    before the next, after ``warmup`` untimed rounds. Unlike
    :func:`time_interleaved`, nothing queues behind a call: each starts on
    an idle GPU, so a call's host work before its first launch is in its
    time (as a synchronizing call's is in a model's step)."""
    import cupy

    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds + warmup):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for m in order:
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            with stream:
                fns[m]()
            end.record(stream)
            end.synchronize()
            if r >= warmup:
                times[m].append(cupy.cuda.get_elapsed_time(start, end))
    return times
