"""Timing several methods against each other: round-robin (the default) or one after another.

A GPU's clock drifts during a run (one algorithm measured 1.21 ms in one pass
and 1.55 ms in the next), so methods timed one after another are compared at
different clocks. :func:`time_interleaved` runs rounds instead: each round
calls every method once, in an order that rotates from round to round, each
call between its own pair of CUDA events; a method's time is its median over
the rounds. Drift then moves every method's samples alike.

:func:`time_sequential` is the earlier scheme (all calls of one method, then
the next), kept behind ``--timing sequential``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ...runtime.timing import summarize, time_ms

__all__ = ["round_order", "time_interleaved", "time_sequential"]


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
    """Time each of ``fns`` on its own with :func:`cublas_grouped.runtime.timing.time_ms`
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
