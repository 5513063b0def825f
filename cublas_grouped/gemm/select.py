"""Choose the GEMM algorithm for one call: built-in rules, refined by measured times.

The rules encode what was measured on an H100 (docs/design-notes.md):
``cublasGemmGroupedBatchedEx`` is steady but slow for large problems; a loop of
``cublasGemmEx`` is near peak when experts are few and large; one
``cublasGemmBatchedEx`` over equal row chunks wins on many mid-sized experts.
Measured times override the rules for shapes they cover: those of the tuning
table :mod:`.tables` picks, or those AUTO passes in (``times``: see
:mod:`.autotune`, which may measure on first sight).

An expert layer's two GEMMs share one row layout, made for the first GEMM's
algorithm (:func:`.plan.layout_for`), so :func:`choose_layer_algorithms`
picks the pair together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from ..runtime.device import DeviceInfo
from .backends import hopper as _hopper
from .config import Algorithm
from .plan import ProblemStats, RowLayout, layout_for
from .tables import TuningTable, forget_tables, load_tuning_table

__all__ = [
    "select_algorithm",
    "best_measured",
    "choose_layer_algorithms",
    "algorithms_on_layout_of",
    "measured_times",
    "usable_times",
    "allowed_algorithms",
    "with_own_kernel",
    "reset_tuning_cache",
    "MAX_STRIDED_PADDING",
    "OWN_KERNEL_MARGIN",
    "PADDED_LAYOUT_MARGIN",
    "TimesSource",
    "remembered",
    "tuning_state",
    "WEIGHT_BOUND_ROWS",
]

# PADDED_STRIDED is taken from measured times only while it computes at most
# this many times the real rows (tables are measured on even loads).
MAX_STRIDED_PADDING = 1.5
# AUTO takes SM90_GROUPED only where it measures at least this much faster
# than the best other candidate (its time is scaled by this before comparing).
# In the H100 tables the kernel was fastest on 86 of 244 shapes, on half of
# them by less than 1.6% (a tie: those choices flipped between the tuner's and
# the benchmark's runs, one of them 3% the wrong way); a quarter by 5-23%.
OWN_KERNEL_MARGIN = 1.03
# A layer pair on padded rows (CHUNKED_BATCHED's chunk-aligned, PADDED_STRIDED's
# padded capacity) is taken only where its GEMMs measure at least this much
# faster than the best pair on back-to-back rows: the tables time GEMMs, not
# the gather, activation and combine over the padding. On an H100, pairs that
# won by 0.3% in the tables ran the Mixtral layer 5-8% slower than SEQUENTIAL.
PADDED_LAYOUT_MARGIN = 1.03
# Sizes for asking which layout an algorithm makes: its kind does not depend on them.
_ANY_SIZES = np.ones(1, dtype=np.int64)

# times(stats, candidates) -> {algorithm: ms} or None: where AUTO gets measured times.
TimesSource = Callable[["ProblemStats", tuple], "dict | None"]


# Counts reset_tuning_cache calls: the plan cache of eager calls (.call_cache) keys AUTO on it.
_resets = 0


def reset_tuning_cache() -> None:
    """Forget the cached tables and choices (after writing a new table, and in tests)."""
    global _resets
    _resets += 1
    forget_tables()
    _layer_choices.clear()
    _exact_choices.clear()


# Rows per active expert up to which an expert layer is bound by reading its
# weights (bf16 on an H100 turns weight-bound below about 300 rows; 32 leaves a
# wide margin): see choose_layer_algorithms.
WEIGHT_BOUND_ROWS = 32

# Choices for exactly these sizes and shapes, so that a repeated call (every
# decode step of a model, every layer) skips the statistics and table lookups.
# Keys carry everything the choice depends on; reset_tuning_cache clears them.
_exact_choices: dict[tuple, object] = {}
MAX_REMEMBERED = 4096


def remembered(key: tuple, choose: Callable[[], object]):
    """``choose()``, computed once per ``key`` (which must name every input of the
    choice: device, tuning folder, measurement state, shapes, dtype, sizes)."""
    found = _exact_choices.get(key)
    if found is None:
        found = choose()
        if len(_exact_choices) >= MAX_REMEMBERED:
            _exact_choices.clear()
        _exact_choices[key] = found
    return found


def tuning_state(device: DeviceInfo) -> tuple:
    """What a remembered choice on ``device`` depends on besides its shapes: the
    device's identity and the user's tuning folder (read at each call)."""
    return (device.name, device.cublas_version, device.sm, os.environ.get("CUBLAS_GROUPED_TUNING_DIR"))


def allowed_algorithms(
    device: DeviceInfo, *, padded_layouts: bool, packed_chunks: bool = False
) -> list[Algorithm]:
    """Algorithms that can run here.

    ``padded_layouts``: the rows are (or will be) laid out by the MoE layer in
    the layout the algorithm needs (chunk-aligned or padded capacity), so
    CHUNKED_BATCHED and PADDED_STRIDED can run. ``packed_chunks``: the rows are
    grouped-contiguous (``gmm``) but CHUNKED_BATCHED can still run, with
    overlapping last chunks (not for the K-grouped product).
    """
    allowed = [Algorithm.SEQUENTIAL]
    if device.supports_grouped_gemm():
        allowed.insert(0, Algorithm.CUBLAS_GROUPED)
    if padded_layouts or packed_chunks:
        allowed.append(Algorithm.CHUNKED_BATCHED)
    if padded_layouts:
        allowed.append(Algorithm.PADDED_STRIDED)
    return allowed


def with_own_kernel(allowed: list[Algorithm], device: DeviceInfo, stats: ProblemStats) -> list[Algorithm]:
    """``allowed`` plus SM90_GROUPED where our Hopper kernel can run ``stats``'s
    product on ``device`` (SM 9.0, bfloat16 or float16, K and N multiples of 8).

    AUTO acts on it only through measured times (tables or its own
    measurement), never through the built-in rules: the benchmark showed it
    faster than every cuBLAS algorithm on skewed prefill layers and slower on
    most uniform ones (docs/benchmarks.md), so only a measurement can tell.
    """
    if _hopper.unsupported_shape(device.sm, stats.dtype, stats.n, stats.k) is None:
        return [*allowed, Algorithm.SM90_GROUPED]
    return allowed


def _rule(stats: ProblemStats, allowed: list[Algorithm]) -> Algorithm:
    mean = stats.mean_rows
    if Algorithm.SEQUENTIAL in allowed and stats.active_experts <= 16 and mean >= 512:
        return Algorithm.SEQUENTIAL  # few large GEMMs: each runs near peak, few launches
    if Algorithm.CHUNKED_BATCHED in allowed and mean >= 64:
        return Algorithm.CHUNKED_BATCHED
    if Algorithm.CUBLAS_GROUPED in allowed:
        return Algorithm.CUBLAS_GROUPED
    return Algorithm.SEQUENTIAL


def select_algorithm(
    stats: ProblemStats,
    device: DeviceInfo,
    *,
    padded_layouts: bool = False,
    table: TuningTable | None | bool = True,
    packed_chunks: bool = False,
    times: TimesSource | None = None,
    own_kernel: bool = True,
) -> Algorithm:
    """The algorithm to run for ``stats`` on ``device``.

    ``table=True`` uses the table :func:`.tables.tuning_table_for` picks (if any); pass
    a :class:`TuningTable`, or ``None``/``False`` for the built-in rules only.
    ``times(stats, candidates)``, when given, replaces the table lookup (AUTO
    passes one that may measure, see :mod:`.autotune`). ``own_kernel``: the
    product is one our Hopper kernel could run (not the K-grouped one), so it
    is a candidate where :func:`with_own_kernel` allows.
    """
    allowed = allowed_algorithms(device, padded_layouts=padded_layouts, packed_chunks=packed_chunks)
    if own_kernel:
        allowed = with_own_kernel(allowed, device, stats)
    found = (
        times(stats, tuple(allowed)) if times is not None else measured_times(stats, device, allowed, table)
    )
    if found:
        return min(found, key=found.get)
    return _rule(stats, allowed)


def measured_times(
    stats: ProblemStats, device: DeviceInfo, candidates, table: TuningTable | None | bool = True
) -> dict[Algorithm, float] | None:
    """Times (ms) of ``candidates`` at the tuning table's nearest shape, or None
    when no table covers ``stats``."""
    if table is True:
        table = load_tuning_table(device)
    if not table or not stats.active_experts:
        return None
    return usable_times(table.nearest(stats), stats, candidates)


def usable_times(measured: dict | None, stats: ProblemStats, candidates) -> dict[Algorithm, float] | None:
    """The times of ``measured`` that AUTO may act on for ``stats``: only ``candidates``,
    no PADDED_STRIDED on a load that padding would blow up, and SM90_GROUPED's
    time scaled by :data:`OWN_KERNEL_MARGIN`. None when nothing is left."""
    if not measured:
        return None
    times = {alg: t for alg, t in measured.items() if alg in candidates}
    if Algorithm.SM90_GROUPED in times:
        # Our kernel must win by a margin: where it measures within a few percent
        # of a cuBLAS algorithm the two are tied within the noise of one
        # measurement, and a tie broken either way flips from run to run.
        times[Algorithm.SM90_GROUPED] *= OWN_KERNEL_MARGIN
    # Padding every expert to the busiest one costs far more on a skewed load
    # than the table's (mostly even) measurements show.
    if stats.padding_ratio > MAX_STRIDED_PADDING:
        times.pop(Algorithm.PADDED_STRIDED, None)
    return times or None


def best_measured(
    stats: ProblemStats, device: DeviceInfo, candidates, table: TuningTable | None | bool = True
) -> Algorithm | None:
    """Fastest of ``candidates`` in the tuning table's nearest shape, or None."""
    times = measured_times(stats, device, candidates, table)
    return min(times, key=times.get) if times else None


def algorithms_on_layout_of(first: Algorithm) -> tuple[Algorithm, ...]:
    """Algorithms that can run on the row layout made for ``first``: that of
    :func:`.plan.layout_for`, asked with :meth:`RowLayout.algorithms`."""
    return layout_for(first, _ANY_SIZES).algorithms()


_layer_choices: dict[tuple, tuple[Algorithm, Algorithm]] = {}


def choose_layer_algorithms(
    sizes: np.ndarray,
    first_nk: tuple[int, int],
    second_nk: tuple[int, int],
    dtype: str,
    device: DeviceInfo,
    *,
    times: TimesSource | None = None,
    times_key=None,
) -> tuple[Algorithm, Algorithm]:
    """AUTO for an expert layer's two GEMMs on one row layout: (first, second).

    The layout is made for the first GEMM's algorithm, so the pair is chosen
    together: the first algorithm's measured time plus the best measured time
    of any algorithm that runs on its layout. Without table entries for both
    shapes, the built-in rules pick the first and the second follows it.

    Weight-bound layers (at most :data:`WEIGHT_BOUND_ROWS` rows per active
    expert: decode) take CUBLAS_GROUPED for both GEMMs, on grouped-contiguous
    rows, before any table is asked. There every algorithm streams the same
    weights at nearly the same rate (the tables' GEMM times differ by 2-3%),
    and what separates them in a layer is what the tables do not see: the
    work after the layer's one sync, while the GPU waits (padding rows to
    gather, pointer arrays, one cuBLAS call per expert). Measured on an H100
    (docs/benchmarks.md), CUBLAS_GROUPED was within 2% of the fastest layer on
    every decode case of Mixtral, Qwen3-30B-A3B and DeepSeek-V3, while
    table-led choices missed by up to 12%.

    Decisions are memoized on a coarse key (log2 of active experts, mean rows
    and skew in quarter steps), because this runs after the one host
    synchronization of each layer call, where host time is GPU idle time.

    ``times(stats, candidates)`` replaces the table lookup when given;
    ``times_key`` is part of the memo key and must change whenever ``times``
    may answer differently (new measurements).
    """
    exact = (tuning_state(device), times_key, dtype, first_nk, second_nk, sizes.dtype.str, sizes.tobytes())
    return remembered(
        exact, lambda: _choose_layer(sizes, first_nk, second_nk, dtype, device, times, times_key)
    )


def _choose_layer(sizes, first_nk, second_nk, dtype, device, times, times_key) -> tuple[Algorithm, Algorithm]:
    active = int(np.count_nonzero(sizes))
    total, largest = int(sizes.sum()), int(sizes.max(initial=0))
    first_stats = ProblemStats(len(sizes), active, total, largest, *first_nk, dtype)
    if first_stats.mean_rows <= WEIGHT_BOUND_ROWS and device.supports_grouped_gemm():
        return (Algorithm.CUBLAS_GROUPED, Algorithm.CUBLAS_GROUPED)
    quarter = lambda v: round(4 * math.log2(max(v, 1e-9)))  # noqa: E731
    key = (
        tuning_state(device),
        times_key,
        dtype,
        len(sizes),
        first_nk,
        second_nk,
        quarter(max(active, 1)),
        quarter(first_stats.mean_rows + 1),
        quarter(first_stats.skew),
        first_stats.padding_ratio > MAX_STRIDED_PADDING,
    )
    found = _layer_choices.get(key)
    if found is not None:
        return found
    allowed = allowed_algorithms(device, padded_layouts=True)
    if times is None:
        times = lambda stats, candidates: measured_times(stats, device, candidates)  # noqa: E731
    first = times(first_stats, tuple(with_own_kernel(allowed, device, first_stats)))
    second = None
    if first:
        second_stats = ProblemStats(len(sizes), active, total, largest, *second_nk, dtype)
        second = times(second_stats, tuple(with_own_kernel(allowed, device, second_stats)))
    if first and second:

        def on_layout(a: Algorithm) -> tuple[float, Algorithm]:
            options = [(second[b], b) for b in algorithms_on_layout_of(a) if b in second]
            return min(options) if options else (math.inf, a)

        def pair_ms(a: Algorithm) -> float:
            pair = first[a] + on_layout(a)[0]
            # Rows laid out with padding (chunk-aligned, padded capacity) cost the
            # layer more than its GEMMs show: a near tie goes to back-to-back rows.
            return (
                pair if layout_for(a, _ANY_SIZES) == RowLayout.contiguous() else pair * PADDED_LAYOUT_MARGIN
            )

        choice = min(first, key=pair_ms)
        found = (choice, on_layout(choice)[1] if on_layout(choice)[0] < math.inf else choice)
    else:
        choice = _rule(first_stats, allowed) if not first else min(first, key=first.get)
        found = (choice, choice)
    if len(_layer_choices) > 4096:
        _layer_choices.clear()
    _layer_choices[key] = found
    return found
