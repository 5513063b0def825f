"""AUTO's last resort: time the candidate algorithms once per shape class, on the GPU at hand.

Where AUTO gets the times it compares, for one call (:func:`auto_times`):

1. a *close* tuning table (:func:`~cublas_grouped.gemm.tables.is_close_table`: the
   same GPU name and the same cuBLAS major version) with an entry near the shape;
2. this device's own measurements from earlier calls or processes (in memory,
   and in ``<tuning dir>/<gpu>-cublas<version>-sm<sm>.autotune.json``) near the shape;
3. a measurement now, when allowed (below), stored for the next time;
4. the fallback table (the same GPU with another cuBLAS major, or another GPU
   of the same architecture) near the shape;
5. nothing: the built-in rules decide.

"Near" is the tables' own distance (``MAX_TABLE_DISTANCE`` in log2 space over
experts, active experts, mean rows, N, K and skew), so a *shape class* is the
neighbourhood of a measured shape: a shape is measured only when no close table
entry and no earlier measurement lies that near it.

Measuring happens only when all of these hold:

- ``CUBLAS_GROUPED_AUTOTUNE`` is not ``0`` (default on). With ``0``, AUTO
  neither measures nor reads earlier measurements: its choice depends only on
  the tables and the rules.
- The call's stream is not capturing a CUDA graph (measuring synchronizes).
- Fewer than ``MAX_CLASSES_PER_PROCESS`` shape classes were measured in this process.
- The scratch fits in ``SCRATCH_FRACTION`` of the free device memory.

Each candidate runs once untimed, once to size the repeats, then 2 to 5 times
between CUDA events on the call's stream, the class taking about
``CLASS_BUDGET_MS`` of GPU time in all (a GEMM slower than its share still gets
2 timed calls). The runs write to scratch memory taken straight from the driver
(the caller's pool is untouched), never to the caller's output, and they finish before the real call.
Results are written atomically (temporary file, then rename) into the user's
tuning folder, ``CUBLAS_GROUPED_TUNING_DIR`` or ``~/.cache/cublas_grouped/tuning``.

Why on by default: the shipped tables cover particular GPUs and cuBLAS versions;
elsewhere AUTO would follow a table measured elsewhere, or rules measured on one
H100 (the rules alone missed the best algorithm by 12-18% on an H200). The cost
is bounded (tens of ms per new shape class, at most ``MAX_CLASSES_PER_PROCESS``,
kept on disk). Set ``CUBLAS_GROUPED_AUTOTUNE=0`` where the same inputs must pick
the same algorithm on every machine, or no first call may take longer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import warnings
from pathlib import Path

import numpy as np

from ..runtime.device import DeviceInfo, resources
from ..runtime.files import exclusive_lock
from ..runtime.timing import time_interleaved
from . import select as _select
from . import tables as _tables
from .config import Algorithm
from .plan import GemmPlan, ProblemStats
from .select import MAX_STRIDED_PADDING, measured_times, select_algorithm, usable_times
from .tables import AUTOTUNE_SUFFIX, TuningTable, file_slug, is_close_table, tuning_table_for, user_tuning_dir

__all__ = [
    "AUTOTUNE_ENV",
    "autotune_enabled",
    "autotune_path",
    "auto_times",
    "gmm_algorithm",
    "layer_times",
    "describe_auto",
    "stream_is_capturing",
    "scratch_fits",
    "time_candidates",
    "reset_measurements",
]

AUTOTUNE_ENV = "CUBLAS_GROUPED_AUTOTUNE"
# Shape classes measured per process at most: bounds the total first-sight cost.
MAX_CLASSES_PER_PROCESS = 32
# GPU time of the timed calls of one class, shared by its candidates.
CLASS_BUDGET_MS = 10.0
MIN_TIMED_CALLS = 2
MAX_TIMED_CALLS = 5
# Scratch may take at most this share of the free device memory.
SCRATCH_FRACTION = 0.25
_ALIGN = 256  # bytes; every scratch operand starts on a cuBLAS-friendly boundary

_FALSE = ("0", "false", "off", "no")
_TRUE = ("1", "true", "on", "yes", "")


def autotune_enabled() -> bool:
    """Whether AUTO may measure (``CUBLAS_GROUPED_AUTOTUNE``; unset means on).

    Raises
    ------
    ValueError
        When the variable holds anything but 0/1, off/on, false/true or no/yes.
    """
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ValueError(
        f"{AUTOTUNE_ENV} must be 0 or 1 (also off/on, false/true, no/yes); got {os.environ[AUTOTUNE_ENV]!r}"
    )


def autotune_path(device: DeviceInfo) -> Path:
    """The file holding AUTO's measurements for ``device`` (GPU name, cuBLAS version, SM)."""
    name = f"{file_slug(device.name)}-cublas{device.cublas_version}-sm{device.sm[0]}{device.sm[1]}{AUTOTUNE_SUFFIX}"
    return user_tuning_dir() / name


def scratch_fits(nbytes: int, free_bytes: int) -> bool:
    """Whether ``nbytes`` of scratch may be taken when ``free_bytes`` are free."""
    return nbytes <= SCRATCH_FRACTION * free_bytes


def stream_is_capturing(stream: int | None) -> bool:
    """Whether ``stream`` (a raw handle; None: CuPy's current stream) is capturing a
    CUDA graph. True when that cannot be told (such as the legacy stream while
    another stream captures), so that nothing is measured then."""
    try:
        import cupy

        if stream is None:
            stream = cupy.cuda.get_current_stream().ptr
        return bool(cupy.cuda.runtime.streamIsCapturing(int(stream)))
    except Exception:
        return True


class _NotMeasured(Exception):
    """A shape class that will not be measured in this process, and why."""


class _Store:
    """One device's measurements: saved entries plus, in memory only, the shapes
    that were given up on. Entries carry ``layout``: the family of calls they
    were measured for ("layer", or "gmm" with its transposes)."""

    def __init__(self, device: DeviceInfo, path: Path):
        self.device = device
        self.path = path
        self.entries = self._read(path)
        self.given_up: list[dict] = []
        self.measured_here = 0
        self._tables: dict[str, TuningTable] = {}

    def _read(self, path: Path) -> list[dict]:
        try:
            table = TuningTable.load(path)
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, OSError) as exc:
            _tables.warn_ignored_file(path, str(exc))  # then replaced on the next save
            return []
        same = (table.gpu, table.cublas_version, table.sm) == (
            self.device.name,
            self.device.cublas_version,
            self.device.sm,
        )
        return [e for e in table.entries if isinstance(e, dict) and "layout" in e] if same else []

    def nearest(self, stats: ProblemStats, family: str) -> dict | None:
        """Times of the nearest measured (or given-up: ``{}``) shape of ``family``, or None."""
        table = self._tables.get(family)
        if table is None:
            mine = [e for e in self.entries + self.given_up if e["layout"] == family]
            table = self._tables[family] = TuningTable(self.device.name, self.device.cublas_version, mine)
        return table.nearest(stats)

    def add(self, entry: dict, keep: bool) -> None:
        (self.entries if keep else self.given_up).append(entry)
        self._tables.pop(entry["layout"], None)
        if keep:
            self._save()

    def _save(self) -> None:
        # Merge with what other processes stored meanwhile; the rename is atomic,
        # so a reader sees the old file or the new one, never half of one.
        try:
            with exclusive_lock(self.path):  # other processes' read-merge-writes wait
                on_disk = self._read(self.path)
                seen = {_entry_key(e) for e in self.entries}
                merged = self.entries + [e for e in on_disk if _entry_key(e) not in seen]
                TuningTable(self.device.name, self.device.cublas_version, merged, self.device.sm).save(
                    self.path
                )
        except OSError as exc:
            _warn_once(
                f"cublas_grouped AUTO could not store its measurements in {self.path} ({exc}); "
                "they are kept for this process only"
            )


def _entry_key(entry: dict) -> tuple:
    return tuple(entry.get(f) for f in ("layout", "dtype", "num_experts", "active_experts", *_SHAPE))


_SHAPE = ("mean_rows", "max_rows", "n", "k")


_lock = threading.RLock()
_stores: dict[tuple, _Store] = {}
# Changes whenever a lookup may answer differently than before (a new
# measurement, or one put off by a graph capture): memoized layer choices key on it.
_generation = 0
_classes_measured = 0  # in this process, over all devices: MAX_CLASSES_PER_PROCESS bounds it
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _store_for(device: DeviceInfo) -> _Store:
    key = (device.name, device.cublas_version, device.sm, os.environ.get("CUBLAS_GROUPED_TUNING_DIR"))
    store = _stores.get(key)
    if store is None:
        with _lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = _Store(device, autotune_path(device))
    return store


def reset_measurements() -> None:
    """Forget the measurements held in memory and the per-process count (the files
    stay); for tests."""
    global _generation, _classes_measured
    with _lock:
        _stores.clear()
        _warned.clear()
        _classes_measured = 0
        _generation += 1


def state_token() -> tuple:
    """Changes whenever :func:`auto_times` may answer differently (memo key part)."""
    return (_generation, autotune_enabled())


def _entry(stats: ProblemStats, family: str, times: dict) -> dict:
    return {
        "layout": family,
        "dtype": stats.dtype,
        "num_experts": stats.num_experts,
        "active_experts": stats.active_experts,
        "mean_rows": stats.mean_rows,
        "max_rows": stats.max_rows,
        "n": stats.n,
        "k": stats.k,
        "times_ms": {alg.value: t for alg, t in times.items()},
    }


def _measure_class(store: _Store, stats, candidates, family: str, stream, measure) -> dict | None:
    """Measure one new shape class if allowed; its times, ``{}`` if given up, None if put off."""
    global _generation, _classes_measured
    with _lock:
        found = store.nearest(stats, family)  # another thread may have measured it meanwhile
        if found is not None:
            return found
        if _classes_measured >= MAX_CLASSES_PER_PROCESS:
            return None
        if stream_is_capturing(stream):
            _generation += 1  # put off, not given up: ask again after the capture
            return None
        # PADDED_STRIDED on a load that padding blows up is never taken: not worth timing.
        wanted = [
            a
            for a in candidates
            if not (a is Algorithm.PADDED_STRIDED and stats.padding_ratio > MAX_STRIDED_PADDING)
        ]
        try:
            times = measure(stats, tuple(wanted))
        except _NotMeasured as exc:
            store.add({**_entry(stats, family, {}), "given_up": str(exc)}, keep=False)
            return {}
        except Exception as exc:
            _warn_once(
                f"cublas_grouped AUTO could not measure {family} E={stats.num_experts} N={stats.n} "
                f"K={stats.k} ({type(exc).__name__}: {exc}); tables and rules decide for it"
            )
            store.add({**_entry(stats, family, {}), "given_up": f"{type(exc).__name__}: {exc}"}, keep=False)
            return {}
        store.measured_here += 1
        _classes_measured += 1
        store.add(_entry(stats, family, times), keep=True)
        _generation += 1
        return times


def auto_times(
    stats: ProblemStats,
    device: DeviceInfo,
    candidates,
    *,
    family: str,
    measure=None,
    stream: int | None = None,
) -> dict[Algorithm, float] | None:
    """The times (ms per algorithm) AUTO compares for ``stats``, or None for the rules.

    Parameters
    ----------
    stats : ProblemStats
    device : DeviceInfo
    candidates : sequence of Algorithm
        The algorithms that can run for this call.
    family : str
        Which calls a measurement stands for ("layer"; "gmm", "gmm-trans_a", ...):
        measurements are only reused within their family.
    measure : callable, optional
        ``measure(stats, candidates) -> {algorithm: ms}`` on scratch; None never measures.
    stream : int, optional
        Raw handle of the call's stream (default: CuPy's current stream), checked
        for a graph capture before measuring.
    """
    table, _ = tuning_table_for(device)
    close = is_close_table(table, device)
    if close:
        found = measured_times(stats, device, candidates, table)
        if found:
            return found
    if stats.active_experts and autotune_enabled():
        store = _store_for(device)
        near = store.nearest(stats, family)
        if near is None and measure is not None:
            near = _measure_class(store, stats, candidates, family, stream, measure)
        found = usable_times(near, stats, candidates)
        if found:
            return found
    if table is not None and not close:
        return measured_times(stats, device, candidates, table)
    return None


def time_candidates(candidates, run, stream) -> dict[Algorithm, float]:
    """Median ms of ``run(algorithm)`` per candidate, CUDA events on ``stream``.

    The candidates are timed round-robin (:func:`~cublas_grouped.runtime.timing.time_interleaved`),
    so a clock that drifts while they run moves them alike: one untimed round
    (cuBLAS heuristics, kernel compilation), one probe round, then between
    ``MIN_TIMED_CALLS`` and ``MAX_TIMED_CALLS`` timed rounds, as many as fit
    ``CLASS_BUDGET_MS`` by the probe. A candidate that fails is left out; when
    all fail, the first error is raised.
    """
    candidates = tuple(candidates)
    share = CLASS_BUDGET_MS / max(len(candidates), 1)
    fns = [lambda _i, a=a: run(a) for a in candidates]
    results = time_interleaved(
        fns, warmup=1, repeat=MAX_TIMED_CALLS, min_repeat=MIN_TIMED_CALLS, budget_ms=share, stream=stream
    )
    times = {a: r["median"] for a, r in zip(candidates, results) if not isinstance(r, Exception)}
    errors = [r for r in results if isinstance(r, Exception)]  # e.g. a cuBLAS status on this shape
    if not times and errors:
        raise errors[0]
    return times


@contextlib.contextmanager
def _scratch(nbytes: int):
    """Device memory for measuring, straight from the driver (not the caller's
    CuPy pool, which keeps its cached blocks); freed on exit."""
    import cupy

    free, _ = cupy.cuda.runtime.memGetInfo()
    if not scratch_fits(nbytes, free):
        raise _NotMeasured(
            f"needs {nbytes / 2**30:.2f} GiB of scratch, over {SCRATCH_FRACTION:.0%} of the "
            f"{free / 2**30:.1f} GiB free"
        )
    memory = cupy.cuda.Memory(max(nbytes, 1))
    try:
        yield int(memory.ptr)
    finally:
        del memory


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _family(base: str, executor, dtype: np.dtype) -> str:
    """The family a measurement stands for: float32 runs differently per compute
    precision (FP32, TF32, ...) and math mode, so those are part of it."""
    if dtype != np.float32:
        return base
    config = executor.config
    return f"{base}-{config.compute_precision.value}" + ("" if config.use_tensor_cores else "-pedantic")


def gmm_algorithm(executor, device: DeviceInfo, plan: GemmPlan, ops, dtype, res, sizes_dev=None) -> Algorithm:
    """AUTO for ``gmm`` on grouped-contiguous rows: the executor's AUTO branch.

    ``device`` is the call's device; ``ops`` are the call's operands (an
    ``Operands``). A measurement reads the caller's ``a`` and ``b`` and writes
    its products to scratch in place of ``ops.c``, before the real call runs.
    """
    dtype = np.dtype(dtype)
    base = "gmm" + ("-trans_a" if plan.trans_a else "") + ("-trans_b" if plan.trans_b else "")
    family = _family(base, executor, dtype)
    # A repeated call (same sizes and shapes, nothing measured since) repeats the choice.
    state = (_select.tuning_state(device), state_token(), family, dtype.name)
    choose = lambda: _choose_gmm(executor, device, plan, ops, dtype, res, sizes_dev, family)  # noqa: E731
    return _select.remembered((*state, plan.n, plan.k, plan.sizes.tobytes()), choose)


def _choose_gmm(executor, device, plan, ops, dtype, res, sizes_dev, family) -> Algorithm:
    stats = ProblemStats.from_sizes(plan.sizes, plan.n, plan.k, dtype.name)

    def measure(_stats, candidates):
        with _scratch(math.prod(plan.out_shape) * dtype.itemsize) as out_ptr:
            scratch_ops = dataclasses.replace(ops, c=out_ptr)
            run = lambda a: executor.run(plan, scratch_ops, dtype, a, res, sizes_dev=sizes_dev)  # noqa: E731
            return time_candidates(candidates, run, res.cupy_stream)

    times = lambda s, c: auto_times(s, device, c, family=family, measure=measure, stream=res.stream)  # noqa: E731
    rows = not plan.trans_a  # grouped rows, not the K-grouped product: chunks and our kernel can run
    return select_algorithm(stats, device, packed_chunks=rows, times=times, own_kernel=rows)


def _measure_layer_gemm(executor, operands_for, counts: np.ndarray, n: int, k: int, dtype, candidates):
    """Time one expert GEMM ``[rows, K] @ [E, K, N]`` of the layer per candidate, on
    zero-filled scratch in the layout each candidate needs."""
    import cupy

    res = resources(cupy.cuda.Device().id, int(cupy.cuda.get_current_stream().ptr))
    experts, item = len(counts), dtype.itemsize
    active = np.flatnonzero(counts)
    setups = {}
    for algorithm in candidates:
        layout = executor.layout_for(algorithm, counts)
        offsets = layout.offsets(counts)
        plan = GemmPlan(experts, int(offsets[-1]), n, k, False, False, counts, offsets, active)
        setups[algorithm] = (plan, layout)
    rows = max(plan.total_rows for plan, _ in setups.values())
    w_bytes, rows_bytes = _aligned(experts * k * n * item), _aligned(rows * k * item)
    with _scratch(w_bytes + rows_bytes + _aligned(rows * n * item)) as base:
        # Defined inputs (no NaN from stale memory); GEMM speed does not depend on the values.
        cupy.cuda.runtime.memsetAsync(base, 0, w_bytes + rows_bytes, res.stream)
        w_ptr, rows_ptr, out_ptr = base, base + w_bytes, base + w_bytes + rows_bytes

        def run(algorithm):
            plan, layout = setups[algorithm]
            ops = operands_for(plan, rows_ptr, w_ptr, out_ptr, item)
            executor.run(plan, ops, dtype, algorithm, res, layout=layout)

        return time_candidates(candidates, run, res.cupy_stream)


def layer_times(executor, device: DeviceInfo, operands_for, counts: np.ndarray, dtype):
    """AUTO's times source for the MoE layer: ``(times, times_key)``
    for :func:`~cublas_grouped.gemm.select.choose_layer_algorithms` and ``select_algorithm``.

    ``operands_for`` is :meth:`.plan.Operands.for_plan` (or a stand-in, in
    tests). A measurement times one expert GEMM over ``counts`` on
    scratch, on the current CuPy stream and device, which the caller has set to
    the layer's.
    """
    dtype = np.dtype(dtype)

    def measure(stats, candidates):
        return _measure_layer_gemm(executor, operands_for, counts, stats.n, stats.k, dtype, candidates)

    family = _family("layer", executor, dtype)
    times = lambda s, c: auto_times(s, device, c, family=family, measure=measure)  # noqa: E731
    return times, state_token()


def describe_auto(device: DeviceInfo) -> list[str]:
    """Lines saying which tuning table AUTO uses on ``device`` and why, whether it
    measures, and what it has measured (for the benchmark and for users)."""
    table, why = tuning_table_for(device)
    lines = [f"AUTO tuning table: {why}"]
    if table is not None and not is_close_table(table, device):
        lines.append("  (not close: same GPU and cuBLAS major needed; shapes are measured where allowed)")
    try:
        enabled = autotune_enabled()
    except ValueError as exc:
        return [*lines, f"AUTO measuring: {exc}"]
    if not enabled:
        return [*lines, f"AUTO measuring: off ({AUTOTUNE_ENV}=0): tables and rules only"]
    store = _store_for(device)
    given_up = sorted({e.get("given_up", "") for e in store.given_up})
    lines.append(
        f"AUTO measuring: on (set {AUTOTUNE_ENV}=0 to turn off); {len(store.entries)} shape classes "
        f"stored in {store.path}, {store.measured_here} measured in this process"
        + (f", {len(store.given_up)} not measured ({'; '.join(given_up)})" if store.given_up else "")
    )
    return lines
