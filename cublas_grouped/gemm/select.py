"""Choose the GEMM algorithm for one call: built-in rules, refined by a tuning table.

The rules encode what was measured on an H100 (../shared/DESIGN.md):
``cublasGemmGroupedBatchedEx`` is steady but slow for large problems; a loop of
``cublasGemmEx`` is near peak when experts are few and large; one
``cublasGemmBatchedEx`` over equal row chunks wins on many mid-sized experts.
A tuning table measured on the actual GPU (``python -m cublas_grouped.tune``)
overrides the rules for shapes it covers: the nearest measured shape (in log
space over experts, active experts, rows per expert, N, K and skew) decides.

Which table: :func:`tuning_table_for` walks a fallback chain (the user's exact
table, the shipped exact one, the same GPU with the nearest cuBLAS, the same
architecture) and says why it took the one it took. Measuring on first sight,
where no close table covers a shape, lives one layer up in ``_autotune``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.device import DeviceInfo
from .config import Algorithm

__all__ = [
    "ProblemStats",
    "TuningTable",
    "select_algorithm",
    "best_measured",
    "choose_layer_algorithms",
    "packed_chunks",
    "algorithms_on_layout_of",
    "measured_times",
    "allowed_algorithms",
    "choose_chunk_rows",
    "tuning_table_path",
    "tuning_table_for",
    "is_close_table",
    "load_tuning_table",
    "reset_tuning_cache",
    "user_tuning_dir",
    "TimesSource",
]

CHUNK_CANDIDATES = (256, 128, 64, 32)
# bf16 TFLOP/s of one cublasGemmBatchedEx over chunks of that many rows, at
# 256-1024 rows per expert (H100, cuBLAS 13.1, 2026-11-26: Qwen3 and
# DeepSeek-V3 expert shapes, no padding; see docs/design-notes.md). Thin
# chunks leave the row tile mostly empty, so padding often costs less.
CHUNK_TFLOPS = {256: 640.0, 128: 560.0, 64: 370.0, 32: 240.0}
_CHUNKS = np.array(CHUNK_CANDIDATES, dtype=np.int64)
_CHUNK_RATES = np.array([CHUNK_TFLOPS[c] for c in CHUNK_CANDIDATES])
# PADDED_STRIDED is taken from a table only while it computes at most this
# many times the real rows (tables are measured on even loads).
MAX_STRIDED_PADDING = 1.5
# A tuning entry farther than this (sum of squared log2 ratios) does not apply.
MAX_TABLE_DISTANCE = 2.0
# The tables that ship inside the package (one file per GPU name and cuBLAS version).
SHIPPED_TUNING_DIR = Path(__file__).resolve().parent.parent / "tuning"
# Files of measurements made on first sight (``_autotune``): never a fallback table.
AUTOTUNE_SUFFIX = ".autotune.json"
# Hopper parts whose tables may lack ``sm`` (written before it was recorded).
_HOPPER_NAME = re.compile(r"\bG?H(100|200|800|20)\b")

# times(stats, candidates) -> {algorithm: ms} or None: where AUTO gets measured times.
TimesSource = Callable[["ProblemStats", tuple], "dict | None"]


@dataclass(frozen=True)
class ProblemStats:
    """What the choice depends on, cheap to compute from the host row counts."""

    num_experts: int
    active_experts: int
    total_rows: int
    max_rows: int
    n: int
    k: int
    dtype: str = "bfloat16"

    @property
    def padding_ratio(self) -> float:
        """Rows the padded strided layout computes over the rows there are."""
        return self.num_experts * self.max_rows / self.total_rows if self.total_rows else float("inf")

    @property
    def mean_rows(self) -> float:
        return self.total_rows / self.active_experts if self.active_experts else 0.0

    @classmethod
    def from_sizes(cls, sizes: np.ndarray, n: int, k: int, dtype: str) -> ProblemStats:
        active = int(np.count_nonzero(sizes))
        return cls(len(sizes), active, int(sizes.sum()), int(sizes.max(initial=0)), n, k, dtype)

    @property
    def skew(self) -> float:
        """Busiest expert's rows over the mean (1 for an even load)."""
        mean = self.mean_rows
        return max(self.max_rows / mean, 1.0) if mean else 1.0

    def features(self) -> np.ndarray:
        """log2 of (experts, active experts, mean rows + 1, N, K, skew): what the
        table's distance is measured on."""
        return np.log2(
            np.array(
                [
                    self.num_experts,
                    max(self.active_experts, 1),
                    self.mean_rows + 1,
                    self.n,
                    self.k,
                    self.skew,
                ],
                dtype=np.float64,
            )
        )


def infer_sm(gpu: str) -> tuple[int, int] | None:
    """SM version of a GPU known by name alone (the Hopper parts), else None.

    Tables written before ``sm`` was recorded get their architecture this way;
    any other old table counts as unknown architecture.
    """
    return (9, 0) if _HOPPER_NAME.search(gpu) else None


def _parse_sm(value, gpu: str) -> tuple[int, int] | None:
    if value is None:
        return infer_sm(gpu)
    try:
        major, minor = (int(v) for v in (value.split(".") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ValueError(f"sm must be [major, minor] like [9, 0]; got {value!r}") from None
    return (major, minor)


@dataclass
class TuningTable:
    """Measured times per shape for one (GPU name, cuBLAS version, SM version).

    ``sm`` is the architecture the table was measured on, ``(9, 0)`` for
    Hopper; ``None`` reads it from the GPU name where that is an H100/H200 class
    part, else leaves it unknown (such a table is never a same-architecture
    fallback).
    """

    gpu: str
    cublas_version: int
    entries: list[dict]
    sm: tuple[int, int] | None = None

    def __post_init__(self):
        self.sm = _parse_sm(self.sm, self.gpu)
        grouped: dict[str, tuple[list, list]] = {}
        for entry in self.entries:
            active = entry["active_experts"]
            total = int(round(entry["mean_rows"] * active))
            # Tables written before max_rows was recorded count as even loads.
            max_rows = entry.get("max_rows", int(math.ceil(entry["mean_rows"])))
            stats = ProblemStats(
                entry["num_experts"], active, total, max_rows, entry["n"], entry["k"], entry["dtype"]
            )
            times = {Algorithm(name): float(t) for name, t in entry["times_ms"].items() if t is not None}
            feats, items = grouped.setdefault(entry["dtype"], ([], []))
            feats.append(stats.features())
            items.append(times)
        self._by_dtype = {d: (np.array(f), i) for d, (f, i) in grouped.items()}

    def nearest(self, stats: ProblemStats) -> dict[Algorithm, float] | None:
        """Measured times (ms per algorithm) of the closest shape, or None if none is close."""
        found = self._by_dtype.get(stats.dtype)
        if found is None:
            return None
        feats, items = found
        dist = ((feats - stats.features()) ** 2).sum(axis=1)
        best = int(np.argmin(dist))
        return items[best] if dist[best] <= MAX_TABLE_DISTANCE else None

    @classmethod
    def load(cls, path: Path) -> TuningTable:
        """Read a table; a malformed file raises ValueError, KeyError or TypeError."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise ValueError(f"{path} is not a tuning table (no list of entries)")
        return cls(str(data["gpu"]), int(data["cublas_version"]), data["entries"], data.get("sm"))

    def to_json(self) -> dict:
        """The table as written to disk."""
        doc = {"gpu": self.gpu, "cublas_version": self.cublas_version}
        if self.sm is not None:
            doc["sm"] = list(self.sm)
        doc["entries"] = self.entries
        return doc

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, then a rename, so a
        reader (or a second writer) never sees half a table."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def user_tuning_dir() -> Path:
    """``$CUBLAS_GROUPED_TUNING_DIR``, else ``~/.cache/cublas_grouped/tuning``: where
    ``python -m cublas_grouped.tune`` and AUTO's measurements write."""
    root = os.environ.get("CUBLAS_GROUPED_TUNING_DIR")
    return Path(root) if root else Path.home() / ".cache" / "cublas_grouped" / "tuning"


def tuning_table_path(device: DeviceInfo, user: bool = True) -> Path:
    """Where the exact table for ``device`` (its GPU name and cuBLAS version) lives.

    ``user=True``: in :func:`user_tuning_dir` (what ``python -m cublas_grouped.tune``
    writes). ``user=False``: among the tables shipped inside the package.
    """
    name = f"{_slug(device.name)}-cublas{device.cublas_version}.json"
    return (user_tuning_dir() if user else SHIPPED_TUNING_DIR) / name


def _read_tables(folder: Path) -> list[tuple[Path, TuningTable]]:
    """Every readable table in ``folder``, by file name; broken files are ignored, not trusted."""
    try:
        paths = sorted(p for p in folder.glob("*.json") if not p.name.endswith(AUTOTUNE_SUFFIX))
    except OSError:
        return []
    tables = []
    for path in paths:
        try:
            tables.append((path, TuningTable.load(path)))
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return tables


def _version_distance(table: TuningTable, device: DeviceInfo) -> tuple[int, int]:
    """How far a table's cuBLAS is from the device's: another major version first,
    then the absolute difference of the version numbers (major*10000 + minor*100 + patch)."""
    other_major = int(table.cublas_version // 10000 != device.cublas_version // 10000)
    return (other_major, abs(table.cublas_version - device.cublas_version))


def is_close_table(table: TuningTable | None, device: DeviceInfo) -> bool:
    """Whether ``table`` was measured close enough to ``device`` to be trusted
    over measuring: the same GPU name and the same cuBLAS major version.

    Tables of another cuBLAS major (which may pick other kernels) or of
    another GPU of the same architecture (other bandwidth and clocks) are only
    fallbacks: AUTO uses them where it cannot measure (see ``_autotune``).
    """
    return (
        table is not None
        and table.gpu == device.name
        and table.cublas_version // 10000 == device.cublas_version // 10000
    )


def _choose_table(device: DeviceInfo, user_dir: Path, shipped_dir: Path) -> tuple[TuningTable | None, str]:
    found = [(path, table, True) for path, table in _read_tables(user_dir)]
    found += [(path, table, False) for path, table in _read_tables(shipped_dir)]
    where = lambda path, user: f"{'user' if user else 'shipped'} table {path}"  # noqa: E731
    running = f"{device.name}, cuBLAS {device.cublas_version}, SM {device.sm[0]}.{device.sm[1]}"
    # 1-2: exact (GPU name and cuBLAS version), the user's before the shipped one.
    for path, table, user in found:
        if table.gpu == device.name and table.cublas_version == device.cublas_version:
            return table, f"{where(path, user)}: exact match ({running})"
    # 3: the same GPU, nearest cuBLAS; 4: another GPU of the same architecture.
    same_gpu = [f for f in found if f[1].gpu == device.name]
    same_arch = [f for f in found if f[1].gpu != device.name and f[1].sm is not None and f[1].sm == device.sm]
    for group, what in ((same_gpu, "same GPU, nearest cuBLAS"), (same_arch, "same architecture")):
        if group:
            # Nearer cuBLAS first; at equal distance the user's table before the shipped
            # one, then the newer cuBLAS.
            path, table, user = min(
                group, key=lambda f: (_version_distance(f[1], device), not f[2], -f[1].cublas_version)
            )
            return table, (
                f"{where(path, user)}: {what} ({table.gpu}, cuBLAS {table.cublas_version}); running {running}"
            )
    return None, f"no table for {running} in {user_dir} or the shipped tables: built-in rules"


_tables: dict[tuple, tuple[TuningTable | None, str]] = {}


def tuning_table_for(device: DeviceInfo) -> tuple[TuningTable | None, str]:
    """The tuning table AUTO uses on ``device``, and why: ``(table or None, reason)``.

    Fallback order, first found wins:

    1. the user's exact table (same GPU name and cuBLAS version, in
       :func:`user_tuning_dir`);
    2. the shipped exact table;
    3. a table of the same GPU name with the nearest cuBLAS version: one of the
       same major version before any other, then the smallest difference of
       the version numbers (``major*10000 + minor*100 + patch``); at equal
       distance the user's table before the shipped one, then the newer cuBLAS;
    4. a table of another GPU of the same architecture (``sm``), ordered the
       same way.

    Broken files are skipped. Cached per (GPU name, cuBLAS version, SM version)
    and tuning folders; :func:`reset_tuning_cache` forgets.
    """
    user_dir = os.environ.get("CUBLAS_GROUPED_TUNING_DIR")
    key = (device.name, device.cublas_version, device.sm, user_dir, SHIPPED_TUNING_DIR)
    found = _tables.get(key)
    if found is None:
        found = _tables[key] = _choose_table(device, user_tuning_dir(), SHIPPED_TUNING_DIR)
    return found


def load_tuning_table(device: DeviceInfo) -> TuningTable | None:
    """The table :func:`tuning_table_for` picks for ``device``, or None (cached)."""
    return tuning_table_for(device)[0]


def reset_tuning_cache() -> None:
    """Forget the cached tables and layer choices (after writing a new table, and in tests)."""
    _tables.clear()
    _layer_choices.clear()


def allowed_algorithms(
    device: DeviceInfo, *, padded_layouts: bool, packed_chunks: bool = False
) -> list[Algorithm]:
    """Algorithms that can run here.

    ``padded_layouts``: the rows are (or will be) laid out by the MoE layer,
    so CHUNKED_BATCHED and PADDED_STRIDED can run. ``packed_chunks``: rows are
    packed (``gmm``) but CHUNKED_BATCHED can still run, with overlapping last
    chunks (not for the K-grouped product).
    """
    allowed = [Algorithm.SEQUENTIAL]
    if device.supports_grouped_gemm():
        allowed.insert(0, Algorithm.CUBLAS_GROUPED)
    if padded_layouts or packed_chunks:
        allowed.append(Algorithm.CHUNKED_BATCHED)
    if padded_layouts:
        allowed.append(Algorithm.PADDED_STRIDED)
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
) -> Algorithm:
    """The algorithm to run for ``stats`` on ``device``.

    ``table=True`` uses the table :func:`tuning_table_for` picks (if any); pass
    a :class:`TuningTable`, or ``None``/``False`` for the built-in rules only.
    ``times(stats, candidates)``, when given, replaces the table lookup (AUTO
    passes one that may measure, see ``_autotune``).
    """
    allowed = allowed_algorithms(device, padded_layouts=padded_layouts, packed_chunks=packed_chunks)
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
    and no PADDED_STRIDED on a load that padding would blow up. None when nothing is left."""
    if not measured:
        return None
    times = {alg: t for alg, t in measured.items() if alg in candidates}
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
    """Algorithms that can run on the row layout made for ``first``
    (the same sets as :meth:`RowLayout.algorithms`)."""
    if first is Algorithm.PADDED_STRIDED:
        return (Algorithm.PADDED_STRIDED, Algorithm.SEQUENTIAL)
    if first is Algorithm.CHUNKED_BATCHED:
        return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL, Algorithm.CHUNKED_BATCHED)
    return (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL)


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

    Decisions are memoized on a coarse key (log2 of active experts, mean rows
    and skew in quarter steps), because this runs after the one host
    synchronization of each layer call, where host time is GPU idle time.

    ``times(stats, candidates)`` replaces the table lookup when given;
    ``times_key`` is part of the memo key and must change whenever ``times``
    may answer differently (new measurements).
    """
    active = int(np.count_nonzero(sizes))
    total, largest = int(sizes.sum()), int(sizes.max(initial=0))
    first_stats = ProblemStats(len(sizes), active, total, largest, *first_nk, dtype)
    quarter = lambda v: round(4 * math.log2(max(v, 1e-9)))  # noqa: E731
    key = (
        device.name,
        device.cublas_version,
        device.sm,
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
    first = times(first_stats, tuple(allowed))
    second = None
    if first:
        second_stats = ProblemStats(len(sizes), active, total, largest, *second_nk, dtype)
        second = times(second_stats, tuple(allowed))
    if first and second:

        def on_layout(a: Algorithm) -> tuple[float, Algorithm]:
            options = [(second[b], b) for b in algorithms_on_layout_of(a) if b in second]
            return min(options) if options else (math.inf, a)

        choice = min(first, key=lambda a: first[a] + on_layout(a)[0])
        found = (choice, on_layout(choice)[1] if on_layout(choice)[0] < math.inf else choice)
    else:
        choice = _rule(first_stats, allowed) if not first else min(first, key=first.get)
        found = (choice, choice)
    if len(_layer_choices) > 4096:
        _layer_choices.clear()
    _layer_choices[key] = found
    return found


def choose_chunk_rows(sizes: np.ndarray) -> int:
    """Chunk size with the least expected time: padded rows over the rate
    batched GEMMs reach with that many rows per problem (CHUNK_TFLOPS)."""
    if int(sizes.sum()) == 0:
        return CHUNK_CANDIDATES[-1]
    # Padded rows for every candidate at once, in one array operation.
    padded = ((sizes[None, :] + _CHUNKS[:, None] - 1) // _CHUNKS[:, None] * _CHUNKS[:, None]).sum(axis=1)
    return int(_CHUNKS[int(np.argmin(padded / _CHUNK_RATES))])


def packed_chunks(sizes: np.ndarray, offsets: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk problems over packed rows: (first row of each chunk, its group).

    A group of m >= chunk rows gets ceil(m / chunk) chunks; when m is not a
    multiple, its last chunk ends exactly at the group's last row and
    overlaps the one before, so no chunk reads or writes another group's
    rows (the overlapping rows are computed twice, with the same inputs).
    Groups of fewer rows than ``chunk`` get no chunk: the caller runs them
    another way.
    """
    big = np.flatnonzero(sizes >= chunk)
    per_group = -(-sizes[big] // chunk)
    groups = np.repeat(big, per_group)
    index = np.arange(len(groups)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    starts = offsets[groups] + np.minimum(index * chunk, sizes[groups] - chunk)
    return starts.astype(np.int64), groups.astype(np.int64)


def padded_rows(sizes: np.ndarray, align: int) -> int:
    """Rows of the layout where each group starts at a multiple of ``align``."""
    return int((-(-sizes // align) * align).sum())


def capacity_for(sizes: np.ndarray, multiple: int = 8) -> int:
    """Per-expert capacity of the padded strided layout: the largest group, rounded up."""
    return max(multiple, int(math.ceil(int(sizes.max(initial=0)) / multiple) * multiple))
